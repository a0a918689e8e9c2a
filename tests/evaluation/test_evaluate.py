"""`python -m evaluation.evaluate` / `evaluation.crosseval`: child run `evaluation`, exit 2, the AUC matrix."""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from evaluation import crosseval as crosseval_cli
from evaluation import evaluate as evaluate_cli
from evaluation.evaluate import EvalOptions, Source
from evaluation.scoring import score_dataset
from models.build import load_trained_model
from helpers import subset_csv, tiny_checkpoint


def source_run(tmp_path: Path, ckpt: Path, data: Path, uri: str) -> str:
    """An MLflow run that logged what train() logs for evaluation: checkpoint, val predictions, history."""
    trained = load_trained_model(ckpt, "cpu")
    val = score_dataset(trained, data, split="val", num_workers=0).table
    (tmp_path / "run" / "predictions").mkdir(parents=True)
    val.to_parquet(tmp_path / "run" / "predictions" / "val.parquet")
    pd.DataFrame({"epoch": [0, 1], "train_loss": [0.7, 0.6], "val_loss": [0.69, 0.65], "val_auc": [0.5, 0.6],
                  "lr": [1e-3, 5e-4]}).to_csv(tmp_path / "run" / "training_log.csv", index=False)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("test", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp, run_name="tiny") as run:
        mlflow.log_artifact(str(ckpt), "checkpoints")
        mlflow.log_artifacts(str(tmp_path / "run" / "predictions"), "predictions")
        mlflow.log_artifact(str(tmp_path / "run" / "training_log.csv"))
    return run.info.run_id


def test_evaluate_logs_a_child_run_under_the_source_run(tmp_path: Path, shared_data: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ckpt = tiny_checkpoint(tmp_path / "ckpt" / "best.pt", dropout=0.3)
    data = subset_csv(shared_data / "lfw_faceswap", tmp_path / "lfw.csv", per_class=12)
    rid = source_run(tmp_path, ckpt, data, uri)
    out = tmp_path / "eval"
    rc = evaluate_cli.main(["--run", rid, "--data_dir", str(data), "--tracking_uri", uri, "--output_dir", str(out),
                            "--num_workers", "0", "--max_images", "20", "--mc_dropout", "3", "--use_tta",
                            "--n_boot", "50"])
    assert rc == 0
    children = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{rid}'", output_format="list",
                                  search_all_experiments=True)
    assert [c.info.run_name for c in children] == ["evaluation"]
    child = children[0]
    assert child.data.tags["source_run_id"] == rid and child.data.tags["eval_only"] == "true"
    assert "re-scored" in child.data.tags["thresholds_from"]  # val re-scored with flip TTA + MC passes
    assert 0.0 <= child.data.metrics["test_auc"] <= 1.0 and child.data.metrics["n_images"] == 20
    assert child.data.metrics["mc_std_mean"] > 0 and "mc_std_wrong" in child.data.metrics
    assert child.data.params["tta"] == "flip: 2 views, logit" and child.data.params["mc_dropout"] == "3"
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(child.info.run_id)}
    assert {"dashboard.html", "metrics.json", "errors.html", "thresholds.csv", "predictions"} <= arts
    preds = pd.read_parquet(out / "predictions" / "eval.parquet")
    assert len(preds) == 20 and (preds["score_std"] > 0).all()
    html = (out / "dashboard.html").read_text()
    assert 'id="section-mc_dropout"' in html and 'id="section-learning_curves"' in html
    assert 'class="input' in (out / "errors.html").read_text()  # the gallery shows what the model saw
    setup = json.loads((out / "metrics.json").read_text())["setup"]
    assert setup["source_run_id"] == rid and setup["n_images"] == 20


def test_evaluate_checkpoint_with_robustness_and_no_tracking(tmp_path: Path, shared_data: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "ckpt" / "best.pt")
    data = subset_csv(shared_data / "hardfake_vs_real", tmp_path / "hf.csv", per_class=6)
    out = tmp_path / "eval"
    rc = evaluate_cli.main(["--checkpoint", str(ckpt), "--data_dir", str(data), "--no_tracking", "--num_workers", "0",
                            "--output_dir", str(out), "--robustness", "--perturbations", "jpeg:50,blur:2",
                            "--tta", "crop", "--tta_space", "prob", "--n_boot", "20"])
    assert rc == 0
    table = pd.read_csv(out / "robustness.csv")
    assert list(table["perturbation"]) == ["clean", "jpeg", "blur"] and table["auc"].between(0, 1).all()
    html = (out / "dashboard.html").read_text()
    assert 'id="section-robustness"' in html and 'id="table-Robustness"' in html
    flat = json.loads((out / "metrics.json").read_text())["flat"]
    assert "robust_jpeg_q50_delta_auc" in flat and flat["n_images"] == 12


@pytest.mark.parametrize("argv, message", [
    (["--run", "0123456789abcdef"], "run 0123456789abcdef not found"),
    (["--checkpoint", "{ckpt}", "--data_dir", "{missing}"], "data dir not found"),
    (["--checkpoint", "{tmp}/nope.pt"], "checkpoint not found"),
    (["--checkpoint", "{ckpt}", "--tta", "flp"], "did you mean 'flip'"),
])
def test_bad_input_exits_2_with_one_line(tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture,
                                         argv: list[str], message: str) -> None:
    ckpt = tiny_checkpoint(tmp_path / "best.pt")
    data = subset_csv(shared_data / "lfw_faceswap", tmp_path / "lfw.csv", per_class=4)
    fill = {"ckpt": str(ckpt), "missing": str(tmp_path / "missing"), "tmp": str(tmp_path)}
    argv = [a.format(**fill) for a in argv]
    if "--data_dir" not in argv:
        argv += ["--data_dir", str(data)]
    rc = evaluate_cli.main(argv + ["--tracking_uri", f"sqlite:///{tmp_path / 'm.db'}", "--num_workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_cross_dataset_matrix_on_two_tiny_datasets(tmp_path: Path, shared_data: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ckpts = [tiny_checkpoint(tmp_path / f"m{i}" / "best.pt", seed=i) for i in range(2)]
    datasets = [subset_csv(shared_data / name, tmp_path / f"{name}.csv", per_class=8)
                for name in ("lfw_faceswap", "hardfake_vs_real")]
    out = tmp_path / "cx"
    rc = crosseval_cli.main(["--runs", *map(str, ckpts), "--datasets", *map(str, datasets), "--tracking_uri", uri,
                             "--output_dir", str(out), "--num_workers", "0", "--experiment_name", "cx"])
    assert rc == 0
    matrix = pd.read_csv(out / "auc_matrix.csv", index_col=0)
    assert matrix.shape == (2, 2) and list(matrix.columns) == ["lfw_faceswap", "hardfake_vs_real"]
    assert np.isfinite(matrix.to_numpy()).all() and ((matrix >= 0) & (matrix <= 1)).all().all()
    assert matrix.iloc[0, 0] != matrix.iloc[1, 0]  # two different models
    long = pd.read_csv(out / "crosseval.csv")
    assert len(long) == 4 and (long["n"] == 16).all() and not long["in_domain"].any()
    assert "<script" in (out / "crosseval.html").read_text()
    runs = mlflow.search_runs(experiment_names=["cx"], output_format="list")
    assert [r.info.run_name for r in runs] == ["crosseval"]
    assert len([k for k in runs[0].data.metrics if k.startswith("auc_")]) == 4
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id)}
    assert {"auc_matrix.csv", "crosseval.csv", "crosseval.html", "predictions"} <= arts


@pytest.mark.slow
def test_evaluate_a_real_training_run_and_its_in_domain_test_split(tmp_path: Path, shared_data: Path) -> None:
    """train() -> evaluate --run (local run_dir) on another data set; crosseval scores the own data's test split."""
    from core.config import load_config
    from training.trainer import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    own = subset_csv(shared_data / "lfw_faceswap", tmp_path / "lfw.csv", per_class=20)
    other = subset_csv(shared_data / "hardfake_vs_real", tmp_path / "hf.csv", per_class=10)
    result = train(load_config(overrides={
        "model.model_type": "test_efficientnet", "model.pretrained": False, "data.image_size": 32,
        "data.data_dir": str(own), "data.batch_size": 16, "data.num_workers": 0, "train.num_epochs": 1,
        "train.output_dir": str(tmp_path / "outputs"), "tracking.tracking_uri": uri, "tracking.log_model": False,
        "tracking.experiment_name": "real"}))
    rc = evaluate_cli.main(["--run", result.run_id, "--data_dir", str(other), "--tracking_uri", uri,
                            "--output_dir", str(tmp_path / "eval"), "--num_workers", "0", "--n_boot", "20"])
    assert rc == 0
    child = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'", output_format="list",
                               search_all_experiments=True)[0]
    assert child.info.run_name == "evaluation" and child.data.tags["thresholds_from"] == "source run val predictions"
    cx = crosseval_cli.crosseval([Source(str(result.output_dir / "best.pt"))], [str(own), str(other)],
                                 EvalOptions(num_workers=0), tmp_path / "cx", device="cpu")
    assert list(cx.long["in_domain"]) == [True, False] and list(cx.long["split"]) == ["test", "all"]
    assert cx.long.loc[0, "n"] == 6 and cx.long.loc[1, "n"] == 20  # 15% of 40 held out; all 20 of the other
