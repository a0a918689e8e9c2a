"""CLIs end with core.cli.exit_now: no interpreter teardown, but nothing a normal exit does for the outside
world is skipped (threads joined, atexit handlers, stdout flushed, loader workers ended)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest

from core.config import REPO_ROOT
from helpers import alive

SCRIPT = textwrap.dedent("""
    import atexit, multiprocessing, sys, threading, time
    from pathlib import Path
    from core.cli import exit_now

    def slow_writer():
        time.sleep(0.5)
        Path(sys.argv[1]).write_text("thread finished")

    def sleeper():
        time.sleep(120)

    if __name__ == "__main__":
        child = multiprocessing.get_context("fork").Process(target=sleeper, daemon=True)  # as a DataLoader worker
        child.start()
        Path(sys.argv[2]).write_text(str(child.pid))
        threading.Thread(target=slow_writer).start()  # non-daemon: a normal exit waits for it
        atexit.register(lambda: print("atexit ran"))
        print("buffered", end=" ")  # a pipe is block-buffered: lost unless flushed
        exit_now(3)
""")


def test_exit_now_does_what_a_normal_exit_does_for_the_outside_world(tmp_path: Path) -> None:
    script, marker, child_pid = tmp_path / "cli.py", tmp_path / "marker", tmp_path / "child.pid"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(marker), str(child_pid)], capture_output=True, text=True,
                          cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "buffered atexit ran\n"
    assert marker.read_text() == "thread finished"
    assert not alive(int(child_pid.read_text()))


@pytest.mark.slow  # ~20 s: a whole CLI run with two loader workers
def test_training_cli_exits_with_its_run_finished_and_no_workers_left(tmp_path: Path) -> None:
    sets = {"model.model_type": "test_efficientnet", "model.pretrained": False, "data.image_size": 32,
            "data.batch_size": 16, "data.num_workers": 2, "data.max_samples_per_split": 32, "train.num_epochs": 1,
            "train.use_amp": False, "tracking.log_model": False, "train.output_dir": str(tmp_path / "out"),
            "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment_name": "exit"}
    argv = [sys.executable, str(REPO_ROOT / "training" / "train_unified.py")]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    first = out.splitlines()[0]
    assert first.startswith("status=COMPLETE") and out.rstrip().splitlines()[-1].startswith("mlflow: make ui, then http")
    run_id = first.split("run_id=")[1].split()[0]
    mlflow.set_tracking_uri(sets["tracking.tracking_uri"])
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["run_status"] == "COMPLETE"
    # tracked through the CLI's MLflow helper process, with the CLI's own run context
    assert run.data.tags["mlflow.source.name"].endswith("train_unified.py") and "git_commit" in run.data.tags
    run_dir = Path(run.data.tags["run_dir"])
    assert (run_dir / "best.pt").stat().st_size > 0 and (run_dir / "evaluation" / "metrics.json").exists()
    # nothing of the run outlives it: its process group (the CLI and its loader workers) is empty
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)
    # nor its MLflow helper process, which runs in a session of its own (core.mlflow_backend)
    store = str(tmp_path / "mlflow.db").encode()
    assert not [p for p in Path("/proc").glob("[0-9]*") if _cmdline_has(p, store) and alive(int(p.name))]


def _cmdline_has(proc_dir: Path, needle: bytes) -> bool:
    try:
        return needle in (proc_dir / "cmdline").read_bytes()
    except OSError:  # ended meanwhile
        return False
