"""What `make ui` and `make help` print: the experiment to open found by name in the store, real values."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest

from core.tracking import experiment_overview

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_ui_link_opens_the_named_or_latest_experiment(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    first = client.create_experiment("deepfake-detection", artifact_location=(tmp_path / "a").as_uri())
    sweeps = client.create_experiment("dfsweep-sweeps", artifact_location=(tmp_path / "b").as_uri())
    client.set_terminated(client.create_run(first).info.run_id)
    client.set_terminated(client.create_run(sweeps).info.run_id)  # the latest run is the sweep's
    link = "http://127.0.0.1:{port}/#/experiments/{eid}/runs?workflowType=machine_learning"
    out = experiment_overview(uri, port=5055).splitlines()
    assert out[-1] == f"open {link.format(port=5055, eid=sweeps)}   (dfsweep-sweeps)"
    assert sweeps != "1"  # not the hard-coded experiment 1 `make ui` used to print
    assert experiment_overview(uri, "deepfake-detection").splitlines()[-1].startswith(
        f"open {link.format(port=5000, eid=first)}")
    missing = experiment_overview(uri, "nope").splitlines()
    assert "no experiment named 'nope' (names above)" in missing and any("deepfake-detection" in x for x in missing)


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_help_shows_values_not_variable_names() -> None:
    out = subprocess.run(["make", "-s", "help", "PORT=5123"], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=60).stdout
    assert "make ui" in out and "127.0.0.1:5123" in out and "127.0.0.1:5001" in out
    assert "$(" not in out
