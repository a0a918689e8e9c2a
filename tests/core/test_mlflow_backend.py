"""The training CLI's MLflow helper process (core.mlflow_backend): a run tracked through it is the run an
in-process tracker records; failures come back as errors; Ctrl-C and kills are the training process's to
handle; nothing of it outlives the run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest

from core import mlflow_backend
from core.config import REPO_ROOT
from core.mlflow_backend import Helper, TrackingError
from helpers import alive
from training import train_unified
from training.trainer import train


def _run_record(client: mlflow.MlflowClient, run_id: str) -> dict:
    run = client.get_run(run_id)

    def files(path: str | None = None) -> list[str]:
        out = []
        for a in client.list_artifacts(run_id, path):
            out += files(a.path) if a.is_dir else [a.path]
        return sorted(out)

    stable_tags = ("mlflow.source.name", "mlflow.source.git.commit", "git_commit", "amp_reason", "data_digest",
                   "run_status", "model_type")
    return {
        "status": run.info.status, "experiment": run.info.experiment_id, "params": run.data.params,
        "tag_keys": sorted(k for k in run.data.tags if k != "mlflow.runName"),
        "tags": {k: run.data.tags.get(k) for k in stable_tags},
        "metrics": sorted(k for k in run.data.metrics if not k.startswith("system/")),
        "steps": [m.step for m in client.get_metric_history(run_id, "val_auc")],
        "artifacts": files(),
        "inputs": [(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs],
    }


def test_a_run_tracked_through_the_helper_matches_an_in_process_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_cfg) -> None:
    cfg = tiny_cfg(tmp_path, **{"tracking.log_model": True})  # as a default CLI run: the model logged too
    in_process = train(cfg)

    taken: list[Helper] = []
    real_take = mlflow_backend.take_helper
    monkeypatch.setattr(mlflow_backend, "take_helper", lambda uri: taken.append(real_take(uri)) or taken[-1])

    def not_here(*args, **kwargs):
        raise AssertionError("the run was started in the training process, not in the helper")

    monkeypatch.setattr(mlflow_backend.Backend, "start", not_here)  # this process's Backend; the helper has its own
    mlflow_backend.start_helper(cfg.tracking.tracking_uri, cfg.tracking.experiment_name)
    helped = train(cfg)

    (helper,) = taken
    assert helper is not None and helper.proc.returncode == 0  # used, told to stop, reaped
    assert helped.experiment_id == in_process.experiment_id
    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    a, b = _run_record(client, in_process.run_id), _run_record(client, helped.run_id)
    assert a == b
    assert b["status"] == "FINISHED" and b["steps"] == [0, 1] and b["inputs"]
    assert b["tags"]["mlflow.source.name"] == sys.argv[0]  # the training process's source, not the helper's "-c"
    # the model logged from the training process into the helper's run: its experiment, and it scores images
    run = client.get_run(helped.run_id)
    model_id = run.data.tags["model_uri"].removeprefix("models:/")
    assert client.get_logged_model(model_id).experiment_id == run.info.experiment_id
    scores = np.asarray(mlflow.pyfunc.load_model(run.data.tags["model_uri"]).predict(
        np.random.rand(2, 3, 32, 32).astype(np.float32)))
    assert scores.shape == (2, 1) and ((scores >= 0) & (scores <= 1)).all()


def test_a_failed_mlflow_call_in_the_helper_is_raised_here_and_signals_do_not_stop_it(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    helper = Helper(uri, "helper")
    try:
        with pytest.raises(TrackingError, match="MlflowException: .*no-such-run"):
            helper.call("start", "helper", None, "no-such-run", False)
        # Ctrl-C reaches the terminal's process group and `kill -- -PGID` the run's: not the helper, whose
        # session is its own, and which ignores both anyway: the training process decides how the run ends
        assert os.getpgid(helper.proc.pid) != os.getpgrp()
        os.kill(helper.proc.pid, signal.SIGINT)
        os.kill(helper.proc.pid, signal.SIGTERM)
        run_id, _, owns = helper.call("start", "helper", "helped", None, False)
        assert owns and helper.proc.poll() is None
        helper.call("end", "KILLED")
    finally:
        helper.close()
    assert helper.proc.returncode == 0
    assert mlflow.MlflowClient(uri).get_run(run_id).info.status == "KILLED"


def test_a_killed_training_process_leaves_its_run_running_and_the_helper_gone(tmp_path: Path) -> None:
    """SIGKILL (or the OOM killer) gives the training process no chance to end its run: as with in-process
    tracking the run stays RUNNING for --resume, and the helper exits on its own within a second or two."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = (f"import sys, time; sys.path.insert(0, {str(REPO_ROOT)!r}); from core.mlflow_backend import Helper\n"
              f"h = Helper({uri!r}, 'killed'); run_id = h.call('start', 'killed', None, None, False)[0]\n"
              f"print(run_id, h.proc.pid, flush=True); time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    run_id, helper_pid = proc.stdout.readline().split()
    proc.kill()
    proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and alive(int(helper_pid)):
        time.sleep(0.1)
    assert not alive(int(helper_pid)), "the helper outlived the training process"
    assert mlflow.MlflowClient(uri).get_run(run_id).info.status == "RUNNING"


def test_the_cli_stops_its_helper_when_the_run_fails_before_it_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    started: list[Helper] = []

    class Recorded(Helper):
        def __init__(self, *args) -> None:
            super().__init__(*args)
            started.append(self)

    monkeypatch.setattr(mlflow_backend, "Helper", Recorded)
    empty = tmp_path / "no_images"
    (empty / "train").mkdir(parents=True)
    rc = train_unified.main(["--set", f"data.data_dir={empty}", "--set", f"train.output_dir={tmp_path / 'out'}",
                             "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    assert rc == 2 and capsys.readouterr().err.strip()
    (helper,) = started
    assert helper.proc.returncode == 0 and not mlflow_backend._HELPERS


def test_wait_ready_returns_once_the_helper_has_warmed_up_and_leaves_it_to_the_run(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_backend.start_helper(uri, "ready")
    try:
        mlflow_backend.wait_ready(uri)  # the store exists by now: warm() created it before the helper answered
        assert (tmp_path / "mlflow.db").stat().st_size > 0
        assert mlflow_backend.has_helper(uri)
    finally:
        mlflow_backend.close_helpers()
    assert not mlflow_backend.has_helper(uri)
