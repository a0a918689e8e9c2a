"""Crash and stop tests: kill -9 mid-epoch and mid-checkpoint-write, SIGTERM with loader workers; each run
resumes to the weights of an uninterrupted run, in the same MLflow run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from core.checkpoints import SLOW_WRITE_ENV, load_checkpoint
from core.config import REPO_ROOT, load_config
from training.trainer import train

TINY = {
    "model.model_type": "test_efficientnet", "model.pretrained": False, "data.image_size": 32,
    "data.batch_size": 16, "data.num_workers": 0, "data.max_samples_per_split": 64, "train.num_epochs": 3,
    "optim.lr": 3e-3, "train.use_amp": False, "tracking.log_model": False, "train.max_steps_per_epoch": 3,
    "tracking.experiment_name": "crash",
}


def _overrides(root: Path, **extra: object) -> dict[str, object]:
    return {**TINY, "train.output_dir": str(root / "outputs"), "tracking.tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
            **extra}


def _start_cli(root: Path, env: dict[str, str] | None = None, **extra: object) -> subprocess.Popen:
    sets = [f"{k}={v}" for k, v in _overrides(root, **extra).items()]
    argv = [sys.executable, str(REPO_ROOT / "training" / "train_unified.py"), "--set", *sets]
    return subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def _wait_for(proc: subprocess.Popen, ready, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"timed out waiting for {what}")


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _resume_and_check(root: Path, last: Path, reference: Path) -> None:
    ckpt = load_checkpoint(last)
    resumed = train(load_config(overrides={**TINY, "train.resume": str(last)}))
    assert resumed.run_id == ckpt["run_id"] and resumed.epochs_run == 3 and resumed.status == "COMPLETE"
    _assert_same_weights(reference, last)
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    run = mlflow.get_run(resumed.run_id)
    assert run.info.status == "FINISHED"
    hist = mlflow.MlflowClient().get_metric_history(resumed.run_id, "val_auc")
    assert sorted({m.step for m in hist}) == [0, 1, 2]


def _uninterrupted(root: Path, **extra: object) -> Path:
    """last.pt of the run an interrupted run must end up equal to."""
    return train(load_config(overrides=_overrides(root, **extra))).output_dir / "last.pt"


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_write_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    """SIGKILL while last.pt of epoch 1 is being written (temp file on disk, not yet renamed): last.pt is
    still epoch 0's, intact, and --resume finishes the run with the uninterrupted run's weights."""
    uninterrupted = _uninterrupted(tmp_path / "full")
    out = tmp_path / "outputs"
    proc = _start_cli(tmp_path, {SLOW_WRITE_ENV: "5"})
    _wait_for(proc, lambda: any(out.glob("*/.last.pt.*.tmp")) and any(out.glob("*/last.pt")),
              "the second last.pt write")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    (last,) = out.glob("*/last.pt")
    assert load_checkpoint(last)["epoch"] == 0
    _resume_and_check(tmp_path, last, uninterrupted)


@pytest.mark.slow
def test_sigterm_with_loader_workers_stops_cleanly_and_resumes(tmp_path: Path) -> None:
    """SIGTERM to the whole process group mid-epoch with 2 loader workers: the run stops as the README says
    (exit 130, one line, no worker traceback), MLflow marks it KILLED, and --resume finishes it."""
    uninterrupted = _uninterrupted(tmp_path / "full", **{"data.num_workers": 2})  # workers draw their own augmentations
    out = tmp_path / "outputs"
    proc = _start_cli(tmp_path, **{"data.num_workers": 2})
    _wait_for(proc, lambda: any(out.glob("*/last.pt")), "the first epoch's checkpoint")
    os.killpg(proc.pid, signal.SIGTERM)  # the run and its workers, as a scheduler or `kill -- -PGID` does
    try:
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = proc.stderr.read()
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err and "DataLoader worker" not in err, err[-3000:]
    assert "interrupted: the last completed epoch is saved; continue with --resume" in err
    (last,) = out.glob("*/last.pt")
    ckpt = load_checkpoint(last)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert mlflow.get_run(ckpt["run_id"]).info.status == "KILLED"
    _resume_and_check(tmp_path, last, uninterrupted)
