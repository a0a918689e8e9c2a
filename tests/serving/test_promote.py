"""Registry round trip with aliases and the champion gate, on a temporary SQLite store."""
from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from evaluation.calibration import sigmoid
from serving.promote import CHALLENGER, CHAMPION, PromotionError, main, paired_difference, promote
from test_ensemble import demo_images, tiny_member

NAME = "deepfake-detector"


@pytest.fixture
def store(tmp_path: Path) -> Path:
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    eid = mlflow.create_experiment("promote", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_experiment(experiment_id=eid)
    return tmp_path


def make_run(tmp: Path, name: str, separation: float, paths: list[str] | None = None, seed: int = 0) -> str:
    """A finished run as training leaves it: test/val predictions (AUC set by `separation`), a checkpoint
    of a tiny real network, data_digest tag. Scores are synthetic, so the gate's decisions are known."""
    paths = paths or demo_images(30)
    y = np.array([1 if "/fake/" in p else 0 for p in paths])
    z = separation * (2 * y - 1) + np.random.default_rng(seed).normal(0, 1.0, len(paths))
    table = pd.DataFrame({"path": paths, "label": y, "score": sigmoid(z), "logit": z})
    folder = tmp / name
    for sub in ("predictions", "checkpoints"):
        (folder / sub).mkdir(parents=True)
    for split in ("val", "test"):
        table.to_parquet(folder / "predictions" / f"{split}.parquet")
    tiny_member(folder, seed, 32).rename(folder / "checkpoints" / "best.pt")
    with mlflow.start_run(run_name=name, tags={"data_digest": "d1g3st", "model_type": "test_efficientnet"}) as run:
        mlflow.log_artifacts(str(folder / "predictions"), "predictions")
        mlflow.log_artifacts(str(folder / "checkpoints"), "checkpoints")
    return run.info.run_id


def test_paired_difference_of_identical_scores_is_zero() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = sigmoid(2 * y - 1 + rng.normal(0, 1, 200))
    diff, (low, high) = paired_difference(y, s, s, n_boot=200)
    assert diff == 0.0 and low == 0.0 and high == 0.0
    better = sigmoid(3 * (2 * y - 1) + rng.normal(0, 1, 200))
    diff, (low, high) = paired_difference(y, better, s, n_boot=200)
    assert diff > 0 and low > 0 and low <= diff <= high


def test_registry_round_trip_with_aliases(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DFSWEEP_DATA_ROOTS", str(Path(demo_images(1)[0]).parents[1]))  # served paths: only under the roots
    rid = make_run(store, "first", 1.5)
    r = promote(rid, n_boot=200)
    assert r.promoted and r.reason == "no champion yet" and r.version == "1"
    client = MlflowClient()
    champ = client.get_model_version_by_alias(NAME, CHAMPION)
    assert str(champ.version) == "1" and str(client.get_model_version_by_alias(NAME, CHALLENGER).version) == "1"
    assert champ.tags["run_id"] == rid and champ.tags["data_digest"] == "d1g3st"
    assert float(champ.tags["test_auc"]) == pytest.approx(r.challenger_value, abs=1e-4)
    assert rid in champ.description and "d1g3st" in champ.description and "auc=" in champ.description
    assert mlflow.get_run(rid).data.tags["image_model_uri"] == r.model_uri  # image model logged into the run
    again = promote(rid, n_boot=200)  # idempotent: same version, still champion
    assert again.version == "1" and again.promoted and again.reason == "already champion"
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@{CHAMPION}")
    out = model.predict(pd.DataFrame({"path": demo_images(1)}))
    assert ((out["fake_prob"] >= 0) & (out["fake_prob"] <= 1)).all() and len(out) == 2


def test_gate_refuses_a_worse_challenger_and_accepts_a_better_one(store: Path) -> None:
    client = MlflowClient()
    assert promote(make_run(store, "ok", 1.0, seed=1), n_boot=200).promoted
    worse = promote(make_run(store, "worse", 0.1, seed=2), n_boot=200)
    assert not worse.promoted and worse.diff < 0 and worse.diff_ci[0] <= worse.diff <= worse.diff_ci[1]
    assert "refused" in worse.reason and worse.champion_ece is not None
    assert str(client.get_model_version_by_alias(NAME, CHAMPION).version) == "1"
    assert str(client.get_model_version_by_alias(NAME, CHALLENGER).version) == "2"
    assert client.get_model_version(NAME, "2").tags["gate_decision"] == "refused"
    better = promote(make_run(store, "better", 3.0, seed=3), n_boot=200)
    assert better.promoted and better.diff > 0 and better.champion_version == "1"
    assert str(client.get_model_version_by_alias(NAME, CHAMPION).version) == "3"
    assert client.get_model_version(NAME, "1").tags["replaced_by_version"] == "3"
    within_margin = promote(worse.run_id, margin=1.0, n_boot=200)  # reuses version 2; allowed drop of 1.0 AUC
    assert within_margin.promoted and within_margin.version == "2"
    forced = promote(make_run(store, "worst", 0.0, seed=4), force=True, n_boot=200)
    assert forced.promoted and forced.reason.startswith("forced")
    assert str(client.get_model_version_by_alias(NAME, CHAMPION).version) == forced.version


def test_different_test_sets_and_bad_input_are_clear_errors(store: Path, capsys) -> None:
    promote(make_run(store, "a", 1.0), n_boot=200)
    other = make_run(store, "b", 1.0, paths=demo_images(20))
    with pytest.raises(PromotionError, match="different images"):
        promote(other, n_boot=200)
    capsys.readouterr()
    assert main(["--run", "no-such-run", "--tracking-uri", mlflow.get_tracking_uri()]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: run no-such-run not found") and "\n" not in err
