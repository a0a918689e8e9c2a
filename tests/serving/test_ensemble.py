"""Ensembles from logged predictions: weights, methods, run selection, the ensemble image model."""
from __future__ import annotations

import json

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from evaluation.calibration import sigmoid
from serving.ensemble import (
    METHOD_RULES, EnsembleError, candidate_runs, ensemble_predictions, fit_weights, log_loss_of, main,
    select_members,
)
from serving.pyfunc_model import log_image_model, member_from_checkpoint, save_member
from core.config import load_config
from dataio.demo_data import ensure_demo_data


def tables(n: int, seed: int, prefix: str = "img") -> list[pd.DataFrame]:
    """Prediction tables of an informative member (logit ~ +-2 + noise) and a noisy one (pure noise)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    paths = [f"/data/{prefix}_{i}.png" for i in range(n)]
    out = []
    for z in ((2 * y - 1) * 2.0 + rng.normal(0, 1.0, n), rng.normal(0, 2.0, n)):
        out.append(pd.DataFrame({"path": paths, "label": y, "score": sigmoid(z), "logit": z}))
    return out


def test_weights_go_to_the_informative_member() -> None:
    val = tables(400, 0)
    y = val[0]["label"].to_numpy()
    probs = np.stack([t["score"].to_numpy() for t in val], axis=1)
    w = fit_weights(probs, y)
    assert w.shape == (2,) and (w >= 0).all() and w.sum() == pytest.approx(1.0)
    assert w[0] > 0.9
    ensemble_loss = log_loss_of(probs @ w, y.astype(float))
    assert ensemble_loss <= min(log_loss_of(probs[:, k], y.astype(float)) for k in range(2)) + 1e-9


def test_weighted_ensemble_beats_each_member_when_both_help() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 2000)
    signal = 2 * y - 1
    probs = np.stack([sigmoid(signal + rng.normal(0, 1.5, y.size)) for _ in range(2)], axis=1)  # independent errors
    w = fit_weights(probs, y)
    assert 0.3 < w[0] < 0.7  # two equally good members share the weight
    assert log_loss_of(probs @ w, y.astype(float)) < min(log_loss_of(probs[:, k], y.astype(float)) for k in range(2))


@pytest.mark.parametrize("method", list(METHOD_RULES))
def test_every_method_reports_members_and_ensemble_with_intervals(method: str) -> None:
    r = ensemble_predictions(tables(300, 2), tables(300, 3, "test"), ["good", "noisy"], method, n_boot=200)
    assert list(r.members.index) == ["good", "noisy", "ensemble"]
    t = r.members
    assert ((t["test_auc_ci_low"] <= t["test_auc"]) & (t["test_auc"] <= t["test_auc_ci_high"])).all()
    s = r.test["score"].to_numpy()
    assert ((s >= 0) & (s <= 1)).all() and len(s) == 300
    z = np.stack([tb["logit"].to_numpy() for tb in tables(300, 3, "test")], axis=1)
    if method == "mean":
        np.testing.assert_allclose(s, sigmoid(z.mean(axis=1)))
    if method == "soft":
        np.testing.assert_allclose(s, sigmoid(z).mean(axis=1))
    if method == "hard":
        assert set(np.unique(s)) <= {0.0, 0.5, 1.0}
    if method == "weighted":
        np.testing.assert_allclose(s, sigmoid(z) @ r.weights)
        assert t.loc["ensemble", "val_log_loss"] <= t["val_log_loss"].iloc[:2].min() + 1e-9


def test_calibrate_fits_one_temperature_per_member() -> None:
    val = tables(300, 4)
    val[0] = val[0].assign(logit=val[0]["logit"] * 5, score=sigmoid(val[0]["logit"] * 5))  # over-confident
    r = ensemble_predictions(val, tables(300, 5, "test"), ["a", "b"], "soft", calibrate=True, n_boot=100)
    # informative member: logit x ~ N(+-2, 1) has true log-odds 4x, so T ~ 1/4 after scaling by 5 -> ~1.25;
    # the pure-noise member is flattened (large T)
    assert 1.0 < r.temperatures[0] < 2.0 and r.temperatures[1] > 5.0
    z = val[0]["logit"].to_numpy() / r.temperatures[0]
    assert r.references[0] == pytest.approx(sorted(z))


def test_different_data_and_labels_are_clear_errors() -> None:
    val, test = tables(100, 6), tables(100, 7, "test")
    shifted = val[1].assign(path=[p.replace("img", "other") for p in val[1]["path"]])
    with pytest.raises(EnsembleError, match="different val data"):
        ensemble_predictions([val[0], shifted], test, ["a", "b"], "mean")
    flipped = test[1].assign(label=1 - test[1]["label"])
    with pytest.raises(EnsembleError, match="test labels differ"):
        ensemble_predictions(val, [test[0], flipped], ["a", "b"], "mean")


# ------------------------------------------------------------------------------------ MLflow side
def _log_fake_run(name: str, val_auc: float | None, val: pd.DataFrame | None, test: pd.DataFrame | None,
                  tmp: Path, tags: dict[str, str] | None = None) -> str:
    with mlflow.start_run(run_name=name, tags=tags or {}) as run:
        if val_auc is not None:
            mlflow.log_metric("val_auc", val_auc)
        for split, df in (("val", val), ("test", test)):
            if df is not None:
                f = tmp / f"{name}-{split}" / f"{split}.parquet"
                f.parent.mkdir(parents=True)
                df.to_parquet(f)
                mlflow.log_artifact(str(f), "predictions")
    return run.info.run_id


def test_selection_by_experiment_and_study_skips_runs_without_predictions(tmp_path: Path) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("sel", artifact_location=(tmp_path / "a").as_uri()))
    val, test = tables(60, 8), tables(60, 9, "test")
    ids = {
        "best_no_preds": _log_fake_run("best_no_preds", 0.99, None, test[0], tmp_path, {"study_name": "s1"}),
        "second": _log_fake_run("second", 0.9, val[0], test[0], tmp_path, {"study_name": "s1"}),
        "third": _log_fake_run("third", 0.8, val[1], test[1], tmp_path, {"study_name": "s1"}),
        "fourth": _log_fake_run("fourth", 0.7, val[1], test[1], tmp_path),
        "parent": _log_fake_run("sweep-s1", 0.95, val[0], test[0], tmp_path,
                                {"study_name": "s1", "sweep_role": "parent"}),
    }
    members = select_members(candidate_runs(experiment="sel"), top=2, metric="val_auc")
    assert [m.name for m in members] == ["second", "third"]
    members = select_members(candidate_runs(study="s1"), top=5, metric="val_auc")
    assert [m.run_id for m in members] == [ids["second"], ids["third"]]  # parent and no-prediction run left out
    members = select_members(candidate_runs(run_ids=[ids["fourth"], ids["second"]]), top=5, metric="val_auc",
                             keep_all=True)
    assert [m.name for m in members] == ["second", "fourth"]
    # a metric MLflow does not chart (val_eer) is read from the run's evaluation/metrics.json
    for name, eer in (("second", 0.3), ("third", 0.1)):
        report = tmp_path / f"{name}-eval" / "metrics.json"
        report.parent.mkdir()
        report.write_text(json.dumps({"flat": {"val_eer": eer}}))
        mlflow.log_artifact(str(report), "evaluation", run_id=ids[name])
    members = select_members(candidate_runs(study="s1"), top=5, metric="val_eer")  # lower is better
    assert [(m.name, m.metric) for m in members] == [("third", 0.1), ("second", 0.3)]
    with pytest.raises(EnsembleError, match="not found"):
        candidate_runs(experiment="missing")
    with pytest.raises(EnsembleError, match="no finished runs"):
        candidate_runs(study="nobody")


def test_ensemble_members_selected_by_an_extra_val_metric(tmp_path: Path) -> None:
    """serving.ensemble --metric val_<name>_auc ranks runs by the value at their kept epoch (best_...)."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("x", artifact_location=(tmp_path / "a").as_uri()))
    val, test = tables(40, 1), tables(40, 2, "test")
    for name, in_domain, gan in (("a", 0.99, 0.30), ("b", 0.97, 0.80), ("c", 0.98, 0.60)):
        with mlflow.start_run(run_name=name):
            mlflow.log_metrics({"best_val_auc": in_domain, "best_val_gan_auc": gan})
            for split, df in (("val", val[0]), ("test", test[0])):
                f = tmp_path / name / f"{split}.parquet"
                f.parent.mkdir(exist_ok=True)
                df.to_parquet(f)
                mlflow.log_artifact(str(f), "predictions")
    runs = candidate_runs(experiment="x")
    assert [m.name for m in select_members(runs, top=2, metric="val_gan_auc")] == ["b", "c"]
    assert [m.name for m in select_members(runs, top=2, metric="val_auc")] == ["a", "c"]


# ------------------------------------------------------------------------------------ image model
def tiny_member(tmp: Path, seed: int, image_size: int, model_type: str = "test_efficientnet") -> Path:
    """A randomly initialised tiny detector saved as a member checkpoint."""
    cfg = load_config(overrides={"model.model_type": model_type, "model.pretrained": False,
                                 "data.image_size": image_size})
    from models import create_detector

    torch.manual_seed(seed)
    det = create_detector(cfg.model, cfg.loss.num_outputs, image_size=image_size)
    return save_member(det.state_dict(), cfg.model_dump(mode="json"), tmp / f"member-{seed}.pt")


def demo_images(n_per_class: int = 3) -> list[str]:
    root = ensure_demo_data()
    return [str(p) for c in ("real", "fake") for p in sorted(root.rglob(f"{c}/**/*.jpg"))[:n_per_class]]


def reference_probs(checkpoint: Path, paths: list[str]) -> np.ndarray:
    """P(fake) of one member computed independently: rebuild, eval transform, sigmoid."""
    from augmentation.policies import build_transform
    from models import create_detector
    from core.config import Config
    from dataio.loaders import load_rgb

    ckpt = torch.load(checkpoint, weights_only=True)
    cfg = Config.model_validate(ckpt["config"])
    det = create_detector(cfg.model, 1, image_size=cfg.data.image_size)
    det.load_state_dict(ckpt["model"])
    det.eval()
    size = cfg.data.image_size
    t = build_transform("none", size, det.data_config["mean"], det.data_config["std"], train=False)
    x = torch.stack([t(image=load_rgb(p, size))["image"] for p in paths])
    with torch.no_grad():
        return det(x)[:, 0].double().numpy()


def test_ensemble_pyfunc_equals_weighted_member_scores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DFSWEEP_DATA_ROOTS", str(ensure_demo_data()))  # paths are served only under the data roots
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("pf", artifact_location=(tmp_path / "a").as_uri()))
    ckpts = [tiny_member(tmp_path, 0, 32), tiny_member(tmp_path, 1, 40)]  # own image sizes and weights
    members = [member_from_checkpoint(ckpts[0]), member_from_checkpoint(ckpts[1], temperature=2.0)]
    paths = demo_images(2)
    with mlflow.start_run():
        info = log_image_model(members, [0.3, 0.7], example_path=paths[0])
    model = mlflow.pyfunc.load_model(info.model_uri)
    out = model.predict(pd.DataFrame({"path": paths}))
    assert list(out.columns) == ["path", "fake_prob"] and list(out["path"]) == paths
    z = [reference_probs(c, paths) for c in ckpts]
    expected = 0.3 * sigmoid(z[0]) + 0.7 * sigmoid(z[1] / 2.0)
    np.testing.assert_allclose(out["fake_prob"].to_numpy(), expected, rtol=0, atol=1e-6)
    assert mlflow.get_run(mlflow.last_active_run().info.run_id).data.tags["image_model_uri"] == info.model_uri
    meta = mlflow.models.get_model_info(info.model_uri)
    assert meta.signature is not None and meta.saved_input_example_info is not None


@pytest.mark.slow
def test_ensemble_cli_on_trained_runs_logs_run_and_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DFSWEEP_DATA_ROOTS", str(ensure_demo_data()))  # paths are served only under the data roots
    """Two tiny trained runs -> `python -m serving.ensemble` -> ensemble run whose model reproduces it."""
    from training.trainer import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = {"model.pretrained": False, "data.image_size": 32, "data.batch_size": 16, "data.num_workers": 0,
            "data.max_samples_per_split": 48, "train.num_epochs": 1, "optim.lr": 3e-3,
            "train.output_dir": str(tmp_path / "outputs"), "tracking.tracking_uri": uri,
            "tracking.experiment_name": "ens", "tracking.log_model": False}
    ids = [train(load_config(overrides={**base, "model.model_type": m})).run_id
           for m in ("test_efficientnet", "test_convnext")]
    mlflow.set_tracking_uri(uri)
    assert main(["--experiment", "ens", "--method", "weighted", "--n-boot", "200", "--out", str(tmp_path / "e"),
                 "--tracking-uri", uri]) == 0
    run = mlflow.search_runs(experiment_names=["ens"], filter_string="tags.run_kind = 'ensemble'",
                             output_format="list")[0]
    assert run.info.run_name == "ensemble-weighted"
    assert {run.data.params["member_0"], run.data.params["member_1"]} == set(ids)
    assert run.data.metrics["weight_0"] + run.data.metrics["weight_1"] == pytest.approx(1.0)
    for key in ("test_auc", "test_auc_ci_low", "test_auc_ci_high", "member_0_test_auc"):
        assert key in run.data.metrics
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"members.csv", "ensemble.json", "predictions", "evaluation"} <= arts
    test = pd.read_parquet(tmp_path / "e" / "predictions" / "test.parquet")
    model = mlflow.pyfunc.load_model(run.data.tags["image_model_uri"])
    out = model.predict(test[["path"]])
    np.testing.assert_allclose(out["fake_prob"].to_numpy(), test["score"].to_numpy(), atol=1e-5)
    from serving.promote import promote

    promoted = promote(run.info.run_id, n_boot=100)  # the ensemble's own image model is registered
    version = mlflow.MlflowClient().get_model_version("deepfake-detector", promoted.version)
    assert promoted.model_uri == run.data.tags["image_model_uri"] and version.tags["model_kind"] == "ensemble"
    assert version.tags["ensemble_members"] == ",".join(run.data.params[f"member_{i}"] for i in range(2))


def test_a_runs_model_uses_the_temperature_the_run_fitted(tmp_path: Path) -> None:
    """Predictions from a run apply its validation temperature; an explicit one (ensembles) wins."""
    from serving.pyfunc_model import member_from_run

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'm.db'}")
    ckpt = tiny_member(tmp_path, seed=0, image_size=32).rename(tmp_path / "best.pt")
    eid = mlflow.create_experiment("temperature", artifact_location=(tmp_path / "artifacts").as_uri())
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation" / "calibration.json").write_text('{"method": "temperature", "temperature": 2.5}')
    with mlflow.start_run(experiment_id=eid) as run:  # what training logs: evaluation/calibration.json
        mlflow.log_artifact(str(ckpt), "checkpoints")
        mlflow.log_artifacts(str(tmp_path / "evaluation"), "evaluation")
    assert member_from_run(run.info.run_id).temperature == 2.5
    assert member_from_run(run.info.run_id, temperature=1.0).temperature == 1.0
    with mlflow.start_run(experiment_id=eid) as old:  # runs logged before: the metric `temperature`
        mlflow.log_artifact(str(ckpt), "checkpoints")
        mlflow.log_metric("temperature", 1.5)
    assert member_from_run(old.info.run_id).temperature == 1.5
