"""Sweep runner: trials vs MLflow runs, failures, pruning, resume, workers, stale-trial retry, CLI errors.

Fast tests inject `fake_train` (metrics are a deterministic function of the params); the tests at the
end run the real train() on a tiny model and the demo data.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from experiments.sweep import Heartbeat, main, run_sweep
from experiments.sweep_report import format_table, top_trials
from plotly.offline import get_plotlyjs

REPO_ROOT = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parent
GOOD = {"optim.lr": 1e-3, "model.dropout": 0.1, "loss.loss_type": "bce", "aug.use_mixup": False}
WORSE = {**GOOD, "model.dropout": 0.9}    # clearly worse at every epoch
BROKEN = {**GOOD, "model.dropout": 0.99}  # raises like a NaN loss


def fake_train(cfg, *, index=None, epoch_callback=None):
    """Stands in for training.trainer.train: per-epoch val_auc from the params, a checkpoint on disk."""
    import mlflow

    if cfg.model.dropout > 0.98:
        raise RuntimeError("loss is nan at epoch 0 batch 3; lower the LR or turn AMP off")
    quality = 0.95 - 0.1 * abs(math.log10(cfg.optim.lr) + 3) - (0.45 if cfg.model.dropout > 0.85 else 0.0)
    out = Path(cfg.train.output_dir) / "run"
    out.mkdir(parents=True, exist_ok=True)
    (out / "best.pt").write_bytes(b"weights")
    best = -math.inf
    for epoch in range(cfg.train.num_epochs):
        auc = quality * (1 - 0.5 ** (epoch + 1))
        best = max(best, auc)
        if mlflow.active_run() is not None:
            mlflow.log_metric("val_auc", auc, step=epoch)
        if epoch_callback is not None:
            epoch_callback(epoch, {"epoch": epoch, "val_auc": auc, "val_loss": 1 - auc, "train_loss": 1 - auc})
    return SimpleNamespace(best_metric=best, output_dir=out, epochs_run=cfg.train.num_epochs)


def hang_train(cfg, *, index=None, epoch_callback=None):
    """A worker that gets killed mid-trial: one epoch reported, then it hangs."""
    epoch_callback(0, {"val_auc": 0.6})
    time.sleep(600)


def hang_one_train(cfg, *, index=None, epoch_callback=None):
    """fake_train, except the first trial with dropout 0.5 (not its retry) reports one epoch, writes its
    worker's pid, then hangs."""
    if cfg.model.dropout == 0.5 and not Path(os.environ["HANG_PID_FILE"]).exists():
        epoch_callback(0, {"val_auc": 0.6})
        Path(os.environ["HANG_PID_FILE"]).write_text(str(os.getpid()))
        time.sleep(600)
    return fake_train(cfg, index=index, epoch_callback=epoch_callback)


def write_sweep(tmp_path: Path, tracking: bool = False, **study) -> Path:
    doc = {
        "study": {"name": "t", "n_trials": 4, "seed": 0, "sampler": {"type": "tpe", "n_startup_trials": 3},
                  "pruner": {"type": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
                  "full_reports": 0, **study},  # fake_train logs no predictions to build a report from
        "base": {"model": {"model_type": "test_efficientnet", "pretrained": False},
                 "data": {"image_size": 32, "num_workers": 0},
                 "train": {"num_epochs": 3, "output_dir": str(tmp_path / "out")},
                 "tracking": {"enabled": tracking, "experiment_name": "sweep-test"}},
        "space": {
            "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
            "model.dropout": {"type": "float", "low": 0.0, "high": 0.99},
            "loss.loss_type": {"type": "categorical", "choices": ["bce", "focal"]},
            "loss.focal_gamma": {"type": "float", "low": 0.5, "high": 3.0, "when": {"loss.loss_type": "focal"}},
            "aug.use_mixup": {"type": "categorical", "choices": [False, True]},
            "aug.mixup_alpha": {"type": "float", "low": 0.1, "high": 0.4, "when": {"aug.use_mixup": True}},
        },
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def storage_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'optuna.db'}"


def enqueue(tmp_path: Path, *params: dict, name: str = "t") -> None:
    study = optuna.create_study(study_name=name, storage=storage_url(tmp_path), direction="maximize",
                                load_if_exists=True)
    for p in params:
        study.enqueue_trial(p)


def load(tmp_path: Path, name: str = "t") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage_url(tmp_path))


@pytest.fixture
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def child_runs(parent_run_id: str, experiment_id: str):
    import mlflow

    return mlflow.search_runs(experiment_ids=[experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")


def test_tiny_sweep_trials_match_nested_mlflow_runs(tmp_path: Path, mlflow_uri: str) -> None:
    import mlflow

    enqueue(tmp_path, BROKEN, GOOD, {**GOOD, "optim.lr": 3e-3}, WORSE, {**GOOD, "model.dropout": 0.2})
    res = run_sweep(write_sweep(tmp_path, tracking=True, n_trials=5), storage=storage_url(tmp_path),
                    train_fn=fake_train)
    trials = load(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE,
                                         TrialState.PRUNED, TrialState.COMPLETE]
    runs = child_runs(res.parent_run_id, res.experiment_id)
    assert len(runs) == 5 == res.n_trials_run
    by_id = runs.set_index("run_id")
    for t in trials:
        row = by_id.loc[t.user_attrs["mlflow_run_id"]]
        assert row["tags.trial_state"] == t.state.name and row["tags.mlflow.runName"] == f"trial-{t.number}"
        assert row["tags.trial_number"] == str(t.number)
        assert row["params.optim.lr"] == str(t.params["optim.lr"])
        assert row["status"] == {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}[t.state.name]
    assert by_id.loc[trials[0].user_attrs["mlflow_run_id"], "tags.fail_reason"].startswith("RuntimeError: loss is nan")
    history = mlflow.MlflowClient().get_metric_history(trials[1].user_attrs["mlflow_run_id"], "val_auc")
    assert [m.step for m in history] == [0, 1, 2]  # per-epoch curves overlay in the UI
    parent = mlflow.get_run(res.parent_run_id)
    best = load(tmp_path).best_trial
    assert parent.data.metrics["best_value"] == pytest.approx(best.value)
    assert parent.data.params["best_optim.lr"] == str(best.params["optim.lr"])
    assert parent.data.tags["study_name"] == "t" and parent.data.tags["sweep_file"].endswith("sweep.yaml")
    assert "git_commit" in parent.data.tags and parent.info.status == "FINISHED"
    artifacts = {f.path: f.file_size for f in mlflow.MlflowClient().list_artifacts(res.parent_run_id, "optuna")}
    assert set(artifacts) == {"optuna/trials.csv", "optuna/plots.html"}
    page = Path(mlflow.artifacts.download_artifacts(run_id=res.parent_run_id, artifact_path="optuna/plots.html",
                                                    dst_path=str(tmp_path / "dl"))).read_text()
    assert page.count("Plotly.newPlot") >= 4 and len(page) < 1.2 * len(get_plotlyjs())  # plotly.js inlined once
    assert "Objective Value" not in page and "val_auc" in page  # set_metric_names: axes name the metric
    # the parent's Description is the top-trials table, each row linked to its trial run
    note = parent.data.tags["mlflow.note.content"]
    assert f"| {best.number} | {best.value:.4f} | COMPLETE |" in note
    assert f"(#/experiments/{res.experiment_id}/runs/{best.user_attrs['mlflow_run_id']})" in note
    assert load(tmp_path).metric_names == ["val_auc"]
    link = best.user_attrs["mlflow_run_link"]  # optuna-dashboard shows it beside the trial
    assert link.startswith("http://127.0.0.1:5000/#/experiments/") and best.user_attrs["mlflow_run_id"] in link
    assert res.top[0]["state"] == "COMPLETE" and res.top[0]["value"] == pytest.approx(best.value)
    assert "trial" in format_table(res.top) and best.user_attrs["mlflow_run_id"] in format_table(res.top)


def test_conditional_params_appear_only_under_their_parent_choice(tmp_path: Path) -> None:
    run_sweep(write_sweep(tmp_path, n_trials=10, sampler="random", pruner="none"), storage=storage_url(tmp_path),
              train_fn=fake_train)
    trials = load(tmp_path).trials
    assert len(trials) == 10
    assert {t.params["loss.loss_type"] for t in trials} == {"bce", "focal"}  # both branches were visited
    for t in trials:
        assert ("loss.focal_gamma" in t.params) == (t.params["loss.loss_type"] == "focal")
        assert ("aug.mixup_alpha" in t.params) == t.params["aug.use_mixup"]


def test_failing_trial_is_fail_with_reason_and_the_study_goes_on(tmp_path: Path) -> None:
    enqueue(tmp_path, BROKEN, {**GOOD, "loss.loss_type": "focal", "loss.focal_gamma": -1.0})
    with pytest.warns(UserWarning, match="out of range"):  # Optuna lets an enqueued value through; Config does not
        run_sweep(write_sweep(tmp_path, n_trials=3), storage=storage_url(tmp_path), train_fn=fake_train)
    t0, t1, t2 = load(tmp_path).trials
    assert t0.state == TrialState.FAIL and "loss is nan" in t0.user_attrs["fail_reason"]
    assert t1.state == TrialState.FAIL and "loss.focal_gamma" in t1.user_attrs["fail_reason"]  # ConfigError
    assert t2.state == TrialState.COMPLETE


@pytest.mark.parametrize("pruner", [{"type": "median", "n_startup_trials": 2},
                                    {"type": "percentile", "percentile": 33, "n_startup_trials": 2}])
def test_pruner_prunes_a_clearly_worse_trial(tmp_path: Path, pruner: dict) -> None:
    enqueue(tmp_path, GOOD, {**GOOD, "optim.lr": 3e-3}, WORSE, {**GOOD, "model.dropout": 0.3})
    run_sweep(write_sweep(tmp_path, n_trials=4, pruner=pruner), storage=storage_url(tmp_path), train_fn=fake_train)
    trials = load(tmp_path).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE"]
    assert trials[2].user_attrs["epochs_trained"] == 1 and trials[0].user_attrs["epochs_trained"] == 3
    sweep_dir = tmp_path / "out" / "sweeps" / "t"
    assert not (sweep_dir / "trial-0002").exists()  # pruned trials keep no checkpoints
    assert (sweep_dir / "trial-0000" / "run" / "best.pt").is_file()


def test_running_the_same_study_again_adds_trials(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, n_trials=2)
    first = run_sweep(path, storage=storage_url(tmp_path), train_fn=fake_train)
    second = run_sweep(path, n_trials=3, storage=storage_url(tmp_path), train_fn=fake_train)
    trials = load(tmp_path).trials
    assert (first.n_trials_run, second.n_trials_run) == (2, 3)
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    assert len({t.user_attrs["sweep_id"] for t in trials}) == 2
    assert len({repr(sorted(t.params.items())) for t in trials}) == 5  # resumed sampler does not repeat itself


def test_resuming_with_changed_settings_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path, url = write_sweep(tmp_path, n_trials=1), storage_url(tmp_path)
    run_sweep(path, storage=url, train_fn=fake_train)
    with caplog.at_level(logging.WARNING, logger="experiments.sweep"):
        run_sweep(path, storage=url, train_fn=fake_train, overrides={"train.output_dir": str(tmp_path / "elsewhere")})
        assert "sweep_settings_changed" not in caplog.text  # where outputs go does not change trial values
        run_sweep(path, storage=url, train_fn=fake_train, overrides={"train.num_epochs": 2})
    assert "event=sweep_settings_changed study=t trials=2" in caplog.text and "--study_name" in caplog.text
    assert len(load(tmp_path).trials) == 3  # a warning, not a refusal: the study still grows


def test_timeout_stops_starting_new_trials(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def slow_train(cfg, **kw):
        time.sleep(0.5)
        return fake_train(cfg, **kw)

    t0 = time.time()
    with caplog.at_level(logging.INFO):
        res = run_sweep(write_sweep(tmp_path, n_trials=100, timeout=1.0), storage=storage_url(tmp_path),
                        train_fn=slow_train)
    assert 1 <= res.n_trials_run <= 3 and time.time() - t0 < 30
    said = [r for r in caplog.records if r.getMessage().startswith("timeout 1 s reached")]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert said[0].getMessage() == (f"timeout 1 s reached after {res.n_trials_run} of 100 trials; re-run to add "
                                    "trials (or raise study.timeout / --timeout)")


def chatty_train(cfg, *, index=None, epoch_callback=None):
    """fake_train that logs like train() does: setup and epoch lines at INFO from the training packages."""
    logging.getLogger("training.optim").info("optimizer=adamw group=backbone_decay")
    logging.getLogger("models.factory").info("event=model_built")
    return fake_train(cfg, index=index, epoch_callback=epoch_callback)


def test_one_info_line_per_trial_and_setup_at_debug(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    enqueue(tmp_path, GOOD, BROKEN, {**GOOD, "optim.lr": 3e-3}, WORSE)
    with caplog.at_level(logging.INFO):
        run_sweep(write_sweep(tmp_path, n_trials=4, pruner={"type": "median", "n_startup_trials": 2}),
                  storage=storage_url(tmp_path), train_fn=chatty_train)
    lines = [r.getMessage() for r in caplog.records if r.name == "experiments.sweep" and r.levelno == logging.INFO
             and r.getMessage().startswith("trial ")]
    assert len(lines) == 4, lines
    assert re.fullmatch(r"trial 1/4 COMPLETE val_auc=0\.\d{4} best 0\.\d{4} \(trial 0\) \d+s ETA \d+s", lines[0])
    assert re.fullmatch(r"trial 2/4 FAIL RuntimeError: loss is nan at epoch 0 batch 3; lower the LR or turn AMP off "
                        r"best 0\.\d{4} \(trial 0\) \d+s ETA \d+s", lines[1]), lines[1]
    assert re.fullmatch(r"trial 4/4 PRUNED val_auc=0\.\d{4} at epoch 1/3 best 0\.\d{4} \(trial [02]\) \d+s", lines[3])
    assert not [r for r in caplog.records if r.name.startswith(("training", "models"))]  # not at INFO
    assert any(m.startswith("sweep t: 4 trials in") for m in caplog.messages)
    caplog.clear()
    with caplog.at_level(logging.DEBUG):  # --log_level DEBUG brings the setup lines back
        run_sweep(write_sweep(tmp_path, n_trials=1), storage=storage_url(tmp_path), train_fn=chatty_train)
    setup = [r for r in caplog.records if r.name in ("training.optim", "models.factory")]
    assert len(setup) == 2 and {r.levelname for r in setup} == {"DEBUG"}
    logging.getLogger("training.optim").info("outside a sweep")  # a single run keeps its INFO lines
    assert caplog.records[-1].levelname == "INFO"


def test_progress_formatting() -> None:
    from experiments.progress import eta_seconds, fmt_duration, stop_line, trial_line

    assert [fmt_duration(s) for s in (41, 130, 3900)] == ["41s", "2m10s", "1h05m"]
    assert trial_line(3, 16, 2, "COMPLETE", "val_auc", 0.951, "", 0.951, 1, 130, 360) == \
        "trial 3/16 COMPLETE val_auc=0.9510 best 0.9510 (trial 1) 2m10s ETA 6m"
    assert trial_line(3, 16, 14, "FAIL", "val_auc", None, "ValueError: x", None, None, 3, None) == \
        "trial 3/16 (#14) FAIL ValueError: x best - 3s"
    assert eta_seconds(3, 16, 60.0, 2, None) == 390 and eta_seconds(3, 16, 60.0, 1, 100.0) == 100
    assert stop_line("timeout", 16, 16, 600) is None
    assert stop_line("timeout", 3, 16, 600.0) == ("timeout 600 s reached after 3 of 16 trials; re-run to add trials "
                                                  "(or raise study.timeout / --timeout)")


def test_two_workers_share_one_budget(tmp_path: Path, mlflow_uri: str) -> None:
    res = run_sweep(write_sweep(tmp_path, tracking=True, n_trials=6), storage=storage_url(tmp_path), n_workers=2,
                    train_fn=fake_train)
    trials = load(tmp_path).trials
    assert sorted(t.number for t in trials) == list(range(6))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) for t in trials)
    runs = child_runs(res.parent_run_id, res.experiment_id)
    assert sorted(runs["tags.trial_number"].astype(int)) == list(range(6))
    assert sorted(runs["tags.trial_state"]) == sorted(t.state.name for t in trials)


def test_a_killed_workers_trial_is_retried(tmp_path: Path, mlflow_uri: str) -> None:
    path, url = write_sweep(tmp_path, tracking=True, n_trials=1), storage_url(tmp_path)
    code = (f"import sys; sys.path[:0] = [{str(REPO_ROOT)!r}, {str(TESTS)!r}]\n"
            "from test_sweep import hang_train\nfrom experiments.sweep import Heartbeat, run_sweep\n"
            f"run_sweep({str(path)!r}, storage={url!r}, train_fn=hang_train, heartbeat=Heartbeat(1, 2, 1))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                trials = load(tmp_path).trials
            except KeyError:  # the study does not exist yet
                trials = []
            if trials and trials[0].intermediate_values:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the worker never reported its first epoch")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert load(tmp_path).trials[0].state == TrialState.RUNNING
    time.sleep(3)  # > grace_period
    res = run_sweep(path, storage=url, train_fn=fake_train, heartbeat=Heartbeat(1, 2, 1))
    killed, retry = load(tmp_path).trials
    assert killed.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    assert retry.params == killed.params and res.n_trials_run == 1
    import mlflow

    old = mlflow.get_run(killed.user_attrs["mlflow_run_id"])
    assert old.info.status == "KILLED" and old.data.tags["trial_state"] == "FAIL"
    assert mlflow.get_run(retry.user_attrs["mlflow_run_id"]).data.tags["retry_of_trial"] == "0"
    # the killed sweep's parent run is closed by the re-run (its process is gone); the re-run's own finished
    parents = mlflow.search_runs(search_all_experiments=True, filter_string="tags.sweep_role = 'parent'")
    assert sorted(parents["status"]) == ["FINISHED", "KILLED"], parents[["run_id", "status"]]
    orphan = parents[parents["status"] == "KILLED"].iloc[0]
    assert orphan["tags.sweep_pid"] == str(proc.pid) and "gone" in orphan["tags.sweep_end"]


def test_orphan_parent_closed_only_when_its_process_is_gone(mlflow_uri: str) -> None:
    """A parent run left RUNNING is closed only if it was started on this host by a process that no longer
    exists: a live sweep (here: this process) and a sweep on another machine keep theirs."""
    import mlflow

    from experiments import sweep_report as report

    exp = mlflow.set_experiment("orphans").experiment_id
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ids = {}
    for name, pid, host in (("alive", str(os.getpid()), None), ("dead", str(dead.pid), None),
                            ("elsewhere", str(dead.pid), "another-host"), ("other_study", str(dead.pid), None)):
        study = "other" if name == "other_study" else "s"
        ids[name] = report.start_parent(study, "sqlite:///x.db", "f.yaml", {}, {})
        mlflow.set_tag("sweep_pid", pid)
        if host:
            mlflow.set_tag("sweep_host", host)
        mlflow.end_run(status="RUNNING")  # left as a killed process leaves it
    assert mlflow.get_run(ids["alive"]).info.status == "RUNNING"
    assert report.close_orphan_parents("s", exp) == [ids["dead"]]
    status = {k: mlflow.get_run(v).info.status for k, v in ids.items()}
    assert status == {"alive": "RUNNING", "dead": "KILLED", "elsewhere": "RUNNING", "other_study": "RUNNING"}


@pytest.mark.slow
def test_kill_9_one_of_two_workers_then_rerun(tmp_path: Path, mlflow_uri: str) -> None:
    """Two worker processes on one storage; one is SIGKILLed mid-trial while the other goes on. After a re-run:
    every trial number once, none RUNNING, the killed trial FAIL and retried once with its params, and no
    MLflow run left RUNNING (the surviving worker, not the re-run, usually finds the stale trial)."""
    import mlflow

    path, url = write_sweep(tmp_path, tracking=True, n_trials=4, pruner="none"), storage_url(tmp_path)
    enqueue(tmp_path, {**GOOD, "model.dropout": 0.5})
    pid_file = tmp_path / "hang.pid"
    code = (f"import sys; sys.path[:0] = [{str(REPO_ROOT)!r}, {str(TESTS)!r}]\n"
            "from test_sweep import hang_one_train\nfrom experiments.sweep import Heartbeat, run_sweep\n"
            f"run_sweep({str(path)!r}, storage={url!r}, train_fn=hang_one_train, n_workers=2, "
            "heartbeat=Heartbeat(1, 2, 1))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "HANG_PID_FILE": str(pid_file)})
    try:
        deadline = time.time() + 120
        while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
            assert proc.poll() is None, "the sweep ended before the hanging trial started"
            time.sleep(0.2)
        assert pid_file.exists(), "the hanging trial never started"
        os.kill(int(pid_file.read_text()), signal.SIGKILL)  # one worker dies; the other finishes the budget
        assert proc.wait(timeout=180) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(3)  # > grace_period, in case no surviving worker looked after the kill
    run_sweep(path, storage=url, n_trials=1, train_fn=fake_train, heartbeat=Heartbeat(1, 2, 1))
    trials = load(tmp_path).trials
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials))) and len(trials) >= 5
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    killed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(killed) == 1 and killed[0].params["model.dropout"] == 0.5
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed[0].number]
    assert len(retries) == 1 and retries[0].params == killed[0].params
    runs = mlflow.search_runs(search_all_experiments=True)
    assert not (runs["status"] == "RUNNING").any(), runs[["tags.mlflow.runName", "status"]]
    old = mlflow.get_run(killed[0].user_attrs["mlflow_run_id"])
    assert old.info.status == "KILLED" and old.data.tags["trial_state"] == "FAIL"
    by_trial = runs[runs["tags.trial_number"].notna()]
    assert sorted(by_trial["tags.trial_number"].astype(int)) == sorted(numbers)  # one MLflow run per trial


def test_top_trials_rank_completed_then_pruned_then_failed() -> None:
    def mk(n: int, state: str, value: float | None = None, curve: dict | None = None) -> SimpleNamespace:
        return SimpleNamespace(number=n, state=SimpleNamespace(name=state), value=value, intermediate_values=curve or {},
                               params={"optim.lr": 1e-3, "loss.loss_type": "bce"}, user_attrs={"mlflow_run_id": f"r{n}"})

    trials = [mk(0, "FAIL"), mk(1, "COMPLETE", 0.7), mk(2, "PRUNED", 0.5, {0: 0.5}), mk(3, "COMPLETE", 0.9)]
    assert [r["number"] for r in top_trials(trials, "maximize", k=3)] == [3, 1, 2]
    assert [r["number"] for r in top_trials(trials, "minimize")] == [1, 3, 2, 0]
    table = format_table(top_trials(trials, "maximize"))
    assert "0.9000" in table and "lr=0.001 loss_type=bce" in table and "r3" in table


@pytest.mark.parametrize("space,words", [
    ({"optim.lrr": {"type": "float", "low": 1e-4, "high": 1e-2}}, ["optim.lrr"]),
    ({"optim.lr": {"type": "float", "low": 1e-2, "high": 1e-4}}, ["space.optim.lr", "low"]),
])
def test_bad_sweep_file_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, space, words) -> None:
    path = write_sweep(tmp_path)
    doc = yaml.safe_load(path.read_text())
    doc["space"].update(space)
    path.write_text(yaml.safe_dump(doc))
    assert main(["--sweep", str(path), "--storage", storage_url(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and str(path) in err
    for w in words:
        assert w in err


def test_script_runs_from_the_repo_root_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: {name: x}\nspace: {train.freeze: {type: categorical, choices: [full]}}\n")
    out = subprocess.run([sys.executable, "experiments/sweep.py", "--sweep", str(bad)], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "train.freeze" in out.stderr and len(out.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------- real train()
def real_sweep_file(tmp_path: Path, n_trials: int) -> Path:
    doc = {
        "study": {"name": "real", "n_trials": n_trials, "seed": 0, "sampler": {"type": "tpe", "n_startup_trials": 2},
                  "pruner": {"type": "median", "n_startup_trials": 2}},
        "base": {"model": {"model_type": "test_efficientnet", "pretrained": False},
                 "data": {"image_size": 32, "batch_size": 16, "num_workers": 0, "max_samples_per_split": 24},
                 "train": {"num_epochs": 2, "output_dir": str(tmp_path / "out")},
                 "tracking": {"experiment_name": "sweep-real", "log_model": False}},
        "space": {
            "train.freeze_strategy": {"type": "categorical", "choices": ["full", "frozen", "progressive"]},
            "train.unfreeze_epoch": {"type": "categorical", "choices": [1],
                                     "when": {"train.freeze_strategy": "progressive"}},
            "loss.loss_type": {"type": "categorical", "choices": ["bce", "focal", "label_smoothing"]},
            "loss.focal_gamma": {"type": "float", "low": 1.0, "high": 3.0, "when": {"loss.loss_type": "focal"}},
            "aug.use_mixup": {"type": "categorical", "choices": [False, True]},
            "optim.scheduler": {"type": "categorical", "choices": ["cosine", "plateau", "onecycle"]},
            "optim.gradient_accumulation": {"type": "categorical", "choices": [1, 2]},
            "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
            "model.dropout": {"type": "float", "low": 0.0, "high": 0.9},
            "train.use_amp": {"type": "categorical", "choices": [True, False]},
        },
    }
    path = tmp_path / "real.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def train_pruned_when_high_dropout(cfg, *, index=None, epoch_callback=None):
    """The real train(); its first epoch is pruned when model.dropout > 0.8 (a deterministic prune)."""
    from training.trainer import train

    def callback(epoch: int, metrics: dict[str, float]) -> None:
        epoch_callback(epoch, metrics)
        if cfg.model.dropout > 0.8:
            raise optuna.TrialPruned("forced by the test")

    return train(cfg, index=index, epoch_callback=callback)


@pytest.mark.slow
def test_real_train_sweep_end_to_end(tmp_path: Path, mlflow_uri: str) -> None:
    import mlflow

    enqueue(tmp_path, {"train.freeze_strategy": "progressive", "train.unfreeze_epoch": 1, "loss.loss_type": "focal",
                       "loss.focal_gamma": 2.0, "aug.use_mixup": True, "optim.scheduler": "onecycle",
                       "model.dropout": 0.1, "train.use_amp": True},
            {"model.dropout": 0.85}, name="real")
    res = run_sweep(real_sweep_file(tmp_path, 4), storage=storage_url(tmp_path),
                    train_fn=train_pruned_when_high_dropout, scan_data=True)
    trials = load(tmp_path, "real").trials
    assert len(trials) == 4 and trials[1].state == TrialState.PRUNED
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), [
        t.user_attrs.get("fail_reason") for t in trials]
    runs = child_runs(res.parent_run_id, res.experiment_id).set_index("run_id")
    assert len(runs) == 4
    assert len(mlflow.search_runs(experiment_ids=[res.experiment_id])) == 5  # train() logged into the trial runs
    sweep_dir = tmp_path / "out" / "sweeps" / "real"
    for t in trials:
        row = runs.loc[t.user_attrs["mlflow_run_id"]]
        assert row["tags.trial_state"] == t.state.name
        assert row["params.model.model_type"] == "test_efficientnet"  # train's full flattened config
        history = mlflow.MlflowClient().get_metric_history(t.user_attrs["mlflow_run_id"], "val_auc")
        epochs = t.user_attrs["epochs_trained"]
        if t.state == TrialState.COMPLETE:
            assert epochs == 2
        else:  # the forced prune stops after epoch 1; the median pruner may stop a sampled trial after either epoch
            assert (epochs == 1) if t.number == 1 else (1 <= epochs <= 2)
        assert set(range(epochs)) <= {m.step for m in history}  # per-epoch curves in the trial's run
        if t.state == TrialState.COMPLETE:
            assert list((sweep_dir / f"trial-{t.number:04d}").glob("*/best.pt"))
        else:
            assert not (sweep_dir / f"trial-{t.number:04d}").exists()
    assert trials[0].params["loss.focal_gamma"] == 2.0 and runs.loc[trials[0].user_attrs["mlflow_run_id"],
                                                                      "params.loss.loss_type"] == "focal"


@pytest.mark.slow
def test_real_train_two_workers(tmp_path: Path, mlflow_uri: str) -> None:
    res = run_sweep(real_sweep_file(tmp_path, 3), storage=storage_url(tmp_path), n_workers=2, pruner="none")
    trials = load(tmp_path, "real").trials
    assert sorted(t.number for t in trials) == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE for t in trials), [t.user_attrs.get("fail_reason") for t in trials]
    assert len(child_runs(res.parent_run_id, res.experiment_id)) == 3


@pytest.mark.slow
def test_trials_log_metrics_only_and_the_best_trial_gets_the_full_report(tmp_path: Path, mlflow_uri: str,
                                                                          capsys: pytest.CaptureFixture) -> None:
    """train.report=metrics in trials: metrics files + predictions; the sweep builds the best trial's dashboard
    from what it logged; training.full_report builds any other trial's later; a trial's logged test
    predictions reproduce its logged test AUC."""
    import mlflow
    from sklearn.metrics import roc_auc_score

    from training import full_report

    run_sweep(real_sweep_file(tmp_path, 2), storage=storage_url(tmp_path), pruner="none")
    trials = sorted(load(tmp_path, "real").trials, key=lambda t: -t.value)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    client = mlflow.MlflowClient()
    best, other = trials
    for t, full in ((best, True), (other, False)):
        run_id, out = t.user_attrs["mlflow_run_id"], Path(t.user_attrs["output_dir"])
        logged = {a.path for a in client.list_artifacts(run_id, "evaluation")}
        assert {"evaluation/metrics.json", "evaluation/thresholds.csv"} <= logged
        assert ("evaluation/dashboard.html" in logged) is full and ("evaluation/errors.html" in logged) is full
        assert (out / "evaluation" / "dashboard.html").is_file() is full
        assert client.get_run(run_id).data.tags["report"] == ("full" if full else "metrics")
        test = pd.read_parquet(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="predictions/test.parquet",
                                                                   dst_path=str(tmp_path / "dl" / run_id)))
        assert roc_auc_score(test["label"], test["score"]) == pytest.approx(client.get_run(run_id).data.metrics["test_auc"])
    other_id, other_dir = other.user_attrs["mlflow_run_id"], Path(other.user_attrs["output_dir"])
    before = json.loads((other_dir / "evaluation" / "metrics.json").read_text())["flat"]
    assert full_report.main(["--run", other_id]) == 0
    assert json.loads((other_dir / "evaluation" / "metrics.json").read_text())["flat"] == before  # same metrics
    assert "evaluation/dashboard.html" in {a.path for a in client.list_artifacts(other_id, "evaluation")}
    capsys.readouterr()
    assert full_report.main(["--run", "0" * 32]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: run 000") and "not found" in err[0]
