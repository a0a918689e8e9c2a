"""Crosseval: AUC, AP, EER, ECE and accuracy at each run's own val-chosen threshold, per data set, table and MLflow."""
from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from evaluation import crosseval as crosseval_cli
from evaluation.crosseval import CELL_METRICS, cell_metrics
from evaluation.metrics import binary_metrics
from evaluation.thresholds import choose_thresholds
from helpers import subset_csv, tiny_checkpoint


def test_crosseval_reports_every_measure_at_the_runs_own_val_threshold(tmp_path: Path, shared_data: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with_val = tiny_checkpoint(tmp_path / "a" / "best.pt", seed=0)
    without_val = tiny_checkpoint(tmp_path / "b" / "best.pt", seed=1)
    # run a's logged val predictions put its EER threshold near 0.9, far from 0.5
    rng = np.random.default_rng(0)
    val = pd.DataFrame({"path": [f"v{i}.jpg" for i in range(40)], "label": [0] * 20 + [1] * 20,
                        "score": np.r_[rng.uniform(0.80, 0.92, 20), rng.uniform(0.88, 1.0, 20)]})
    (tmp_path / "a" / "predictions").mkdir()
    val.to_parquet(tmp_path / "a" / "predictions" / "val.parquet")
    expected = choose_thresholds(val["label"], val["score"])["eer"]
    assert 0.85 < expected < 0.95
    datasets = [subset_csv(shared_data / name, tmp_path / f"{name}.csv", per_class=6)
                for name in ("lfw_faceswap", "hardfake_vs_real")]
    out = tmp_path / "cx"
    rc = crosseval_cli.main(["--runs", str(with_val), str(without_val), "--datasets", *map(str, datasets),
                             "--tracking_uri", uri, "--output_dir", str(out), "--num_workers", "0",
                             "--experiment_name", "cx"])
    assert rc == 0
    long = pd.read_csv(out / "crosseval.csv")
    assert {*CELL_METRICS, "threshold", "accuracy_at_0.5", "threshold_from"} <= set(long.columns) and len(long) == 4
    runs = list(dict.fromkeys(long["run"]))
    for r in long.to_dict("records"):
        preds = pd.read_parquet(out / "predictions" / f"{r['run']}__{r['dataset']}.parquet")
        y, s = preds["label"].to_numpy(), preds["score"].to_numpy()
        own = r["run"] == runs[0]
        assert r["threshold"] == pytest.approx(expected if own else 0.5)
        assert ("eer on source run val predictions" if own else "0.5 (") in r["threshold_from"]
        assert r["accuracy"] == pytest.approx(np.mean((s >= r["threshold"]) == (y == 1)))
        assert r["accuracy_at_0.5"] == pytest.approx(np.mean((s >= 0.5) == (y == 1)))
        m = binary_metrics(y, s)
        for k in ("auc", "ap", "eer", "ece"):
            assert r[k] == pytest.approx(m[k]), k
    html = (out / "crosseval.html").read_text()
    assert "threshold_from" in html and "Accuracy at each run" in html
    run = mlflow.search_runs(experiment_names=["cx"], output_format="list")[0]
    for r in long.to_dict("records"):
        for k in CELL_METRICS:
            key = f"{k}_{crosseval_cli._key(r['run'])}__{r['dataset']}"
            assert run.data.metrics[key] == pytest.approx(r[k]), key
    assert run.data.metrics[f"threshold_{crosseval_cli._key(runs[0])}"] == pytest.approx(expected)


def test_one_class_cell_keeps_its_accuracy() -> None:
    table = pd.DataFrame({"label": [1, 1, 1, 1], "score": [0.2, 0.6, 0.8, 0.95]})
    m = cell_metrics(table, threshold=0.7)
    assert np.isnan(m["auc"]) and np.isnan(m["ece"])
    assert m["accuracy"] == 0.5 and m["accuracy_at_0.5"] == 0.75  # detection rate of a fakes-only folder
