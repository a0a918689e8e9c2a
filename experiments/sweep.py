"""Optuna sweeps over Config fields; every trial is one `train(cfg)` call and one nested MLflow run.

`run_sweep` opens (or resumes) a study (experiments/study.py: RDB storage with heartbeats, sampler,
pruner), runs trials in this process or in `n_workers` spawned processes sharing the storage, and
logs a parent MLflow run with the best trial, the trials table and Optuna's plotly figures.

    python experiments/sweep.py --sweep experiments/sweeps/default.yaml --n_trials 12 --n_workers 2
"""
from __future__ import annotations

import logging
import math
import multiprocessing as mp
import shutil
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # `python experiments/sweep.py` without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from experiments import progress
from experiments import sweep_report as report
from experiments.search_space import SweepSpec, load_sweep
from experiments.study import Heartbeat, best_trial, default_storage, make_storage, open_study, study_figures
from core.errors import UserError
from core.cli import ArgumentParser

log = logging.getLogger(__name__)
TrainFn = Callable[..., Any]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclass
class SweepResult:
    study_name: str
    storage: str
    experiment_id: str | None
    parent_run_id: str | None
    n_trials_run: int
    states: dict[str, int]  # this call's trials by final state (complete, pruned, fail)
    best_value: float | None
    best_params: dict[str, Any]
    top: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Job:
    """Everything a worker needs; picklable for the spawn context."""

    spec: SweepSpec
    storage: str
    heartbeat: Heartbeat
    sweep_id: str
    n_trials: int
    deadline: float | None
    parent_run_id: str | None
    seed: int
    train_fn: TrainFn
    index: Any
    max_consecutive_fails: int
    n_workers: int = 1
    log_level: int = logging.INFO


# ---------------------------------------------------------------------------- one trial
class _Gate:
    """Serialises 'check budget -> create trial' across local workers so the trial count is exact."""

    def __init__(self, lock: Any) -> None:
        self.lock, self.held = lock, False

    def acquire(self) -> None:
        if self.lock is not None:
            self.lock.acquire()
        self.held = True

    def release(self) -> None:
        if self.held and self.lock is not None:
            self.lock.release()
        self.held = False


class _Objective:
    """trial params -> Config -> train(); reports each epoch's metric; records state and reason."""

    def __init__(self, job: _Job, gate: _Gate) -> None:
        self.job, self.gate, self.spec = job, gate, job.spec
        self.last_state, self.last_reason, self.last_number = "", "", -1

    def __call__(self, trial: optuna.Trial) -> float:
        retry_of = trial.user_attrs.get("trial_number")  # copied from a stale trial by the retry callback
        trial.set_user_attr("sweep_id", self.job.sweep_id)
        trial.set_user_attr("trial_number", trial.number)
        self.gate.release()  # the trial exists and is counted: other workers may go on
        params = self.spec.sample(trial)
        out_dir = Path(self.spec.base.train.output_dir) / "sweeps" / self.spec.study.name / f"trial-{trial.number:04d}"
        run = None
        if self.spec.base.tracking.enabled:
            run, link = report.start_trial(trial.number, self.spec.study.name, self.job.parent_run_id, retry_of,
                                           self.spec.base.tracking.system_metrics)
            trial.set_user_attr("mlflow_run_id", run)
            trial.set_user_attr("mlflow_run_link", link)
        epochs = [0]
        state, reason = "FAIL", ""

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            epochs[0] += 1
            metric = self.spec.study.metric
            if metric not in metrics:
                raise KeyError(f"epoch metrics have no '{metric}' (have {', '.join(sorted(metrics))})")
            trial.report(float(metrics[metric]), step=int(epoch))
            if trial.should_prune():
                raise optuna.TrialPruned(  # epochs counted from 1, as the progress bar does
                    f"{metric}={metrics[metric]:.4f} at epoch {epoch + 1}/{self.spec.base.train.num_epochs}")

        try:
            cfg = self.spec.trial_config(params, {"train.output_dir": str(out_dir),
                                                  "tracking.run_name": f"trial-{trial.number}"})
            if run is not None:
                report.log_trial_params(cfg, list(params))
            result = self.job.train_fn(cfg, index=self.job.index, epoch_callback=on_epoch)
            value = float(result.best_metric)
            if not math.isfinite(value):
                raise ValueError(f"{self.spec.study.metric} is not finite ({value})")
            trial.set_user_attr("output_dir", str(result.output_dir))
            state = "COMPLETE"
            return value
        except optuna.TrialPruned as e:
            state, reason = "PRUNED", str(e)
            shutil.rmtree(out_dir, ignore_errors=True)  # pruned trials keep no checkpoints
            raise
        except BaseException as e:  # recorded, then re-raised: Optuna marks FAIL (KeyboardInterrupt stops)
            reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:500]
            trial.set_user_attr("fail_reason", reason)
            if "out of memory" in reason.lower():  # give the next trial the memory back
                import torch

                torch.cuda.empty_cache()
            raise
        finally:
            trial.set_user_attr("epochs_trained", epochs[0])
            self.last_state, self.last_reason, self.last_number = state, reason, trial.number
            if run is not None:
                report.end_trial(state, reason if state == "FAIL" else "")


# ---------------------------------------------------------------------------- workers
def _ours(study: optuna.Study, sweep_id: str) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False)
            if t.user_attrs.get("sweep_id") == sweep_id and t.state != TrialState.WAITING]


def _work(job: _Job, lock: Any = None, worker: int = 0) -> str:
    """Run trials until this invocation's budget, deadline or grid is used up; return why it stopped:
    budget | timeout | grid | failures."""
    if worker:  # a spawned process: its own logging and MLflow setup
        logging.basicConfig(level=job.log_level, format=f"%(asctime)s w{worker} %(levelname)s %(name)s: %(message)s")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        report.configure(job.spec.base.tracking)
    study = open_study(job.spec, make_storage(job.storage, job.heartbeat), job.seed, create=False)
    gate, fails, why = _Gate(lock), 0, "budget"
    objective = _Objective(job, gate)
    with progress.detail_at_debug():
        while True:
            if job.deadline is not None and time.time() >= job.deadline:
                why = "timeout"
                break
            gate.acquire()
            try:
                if len(_ours(study, job.sweep_id)) >= job.n_trials:
                    break
                study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
            finally:
                gate.release()
            _log_trial(study, job, objective)
            fails = fails + 1 if objective.last_state == "FAIL" else 0
            if fails >= job.max_consecutive_fails:
                log.error("event=sweep_stop reason=consecutive_failures n=%d last=%r", fails, objective.last_reason)
                why = "failures"
                break
            sampler = study.sampler
            if isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(study):
                why = "grid"
                break
    return why


def _log_trial(study: optuna.Study, job: _Job, objective: "_Objective") -> None:
    """One INFO line for the trial just finished: k/N, state, value or reason, best so far, time, ETA."""
    ours = [t for t in _ours(study, job.sweep_id) if t.state in FINISHED]
    trial = next((t for t in ours if t.number == objective.last_number), None)
    if trial is None:
        return
    seconds = [(t.datetime_complete - t.datetime_start).total_seconds() for t in ours
               if t.datetime_complete and t.datetime_start]
    mean = sum(seconds) / len(seconds) if seconds else 0.0
    eta = progress.eta_seconds(len(ours), job.n_trials, mean, job.n_workers,
                               job.deadline - time.time() if job.deadline else None)
    best = best_trial(study)
    this = (trial.datetime_complete - trial.datetime_start).total_seconds() if trial.datetime_complete else 0.0
    log.info(progress.trial_line(len(ours), job.n_trials, trial.number, trial.state.name, job.spec.study.metric,
                                 trial.value, objective.last_reason, best and best.value, best and best.number,
                                 this, eta))


def _spawn(job: _Job, n_workers: int) -> None:
    """n_workers processes (spawn context) on the same storage, sharing the budget through a lock."""
    ctx = mp.get_context("spawn")
    lock = ctx.Lock()
    procs = []
    for w in range(1, n_workers + 1):
        wjob = _Job(**{**job.__dict__, "seed": job.seed + 1009 * w})
        procs.append(ctx.Process(target=_work, args=(wjob, lock, w), name=f"sweep-worker-{w}"))
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(10)
    bad = [f"{p.name} exit {p.exitcode}" for p in procs if p.exitcode]
    if bad:
        log.error("event=sweep_workers_failed %s", "; ".join(bad))


# ---------------------------------------------------------------------------- sweep
def run_sweep(
    sweep_file: str | Path,
    *,
    n_trials: int | None = None,
    timeout: float | None = None,
    study_name: str | None = None,
    storage: str | None = None,
    n_workers: int = 1,
    overrides: dict[str, Any] | None = None,
    metric: str | None = None,
    direction: str | None = None,
    sampler: str | None = None,
    pruner: str | None = None,
    seed: int | None = None,
    train_fn: TrainFn | None = None,
    scan_data: bool | None = None,
    heartbeat: Heartbeat = Heartbeat(),
    max_consecutive_fails: int = 5,
) -> SweepResult:
    """Run (or resume) the study of `sweep_file`; `n_trials` more trials are run by this call.

    `train_fn` defaults to training.trainer.train; the data set is scanned once here (unless
    `scan_data` is False, or the space sweeps a data key that changes the scan) and shared by workers.
    """
    study_cli = dict(n_trials=n_trials, timeout=timeout, name=study_name, metric=metric, direction=direction,
                     sampler=sampler, pruner=pruner, seed=seed)
    spec = load_sweep(sweep_file, overrides, study_cli)
    if train_fn is None:
        from training.trainer import train as train_fn  # noqa: PLW0127
        scan_data = True if scan_data is None else scan_data
    url = storage or default_storage()
    rdb = make_storage(url, heartbeat)
    study = open_study(spec, rdb, spec.study.seed, create=True)
    experiment_id = report.configure(spec.base.tracking)
    _fail_stale(study, experiment_id is not None)
    if experiment_id is not None:
        for run_id in report.close_orphan_parents(spec.study.name, experiment_id):
            log.warning("event=sweep_orphan_parent run_id=%s action=killed reason=its sweep process is gone", run_id)
    index = _scan(spec) if scan_data else None
    sweep_id = uuid.uuid4().hex[:12]
    deadline = time.time() + spec.study.timeout if spec.study.timeout else None
    job = _Job(spec=spec, storage=url, heartbeat=heartbeat, sweep_id=sweep_id, n_trials=spec.study.n_trials,
               deadline=deadline, parent_run_id=None, seed=spec.study.seed + len(study.trials),
               train_fn=train_fn, index=index, max_consecutive_fails=max_consecutive_fails, n_workers=n_workers,
               log_level=logging.getLogger().getEffectiveLevel())
    log.info("event=sweep_start study=%s storage=%s n_trials=%d n_workers=%d existing_trials=%d",
             spec.study.name, report.safe_url(url), spec.study.n_trials, n_workers, len(study.trials))
    s = spec.study
    parent = report.start_parent(s.name, url, sweep_file, {
        "study.metric": s.metric, "study.direction": s.direction, "study.sampler": s.sampler, "study.pruner": s.pruner,
        "study.seed": s.seed, "study.n_trials": s.n_trials, "study.n_workers": n_workers,
    }, dict(spec.base.tracking.tags)) if experiment_id else None
    job.parent_run_id = parent
    status, why, t0 = "FAILED", "budget", time.time()
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our one line per trial replaces Optuna's
    try:
        if n_workers > 1:
            _spawn(job, n_workers)
            why = "timeout" if deadline is not None and time.time() >= deadline else "stopped early"
            if isinstance(study.sampler, optuna.samplers.GridSampler) and study.sampler.is_exhausted(study):
                why = "grid"
        else:
            why = _work(job)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        optuna.logging.set_verbosity(verbosity)
        study = open_study(spec, rdb, spec.study.seed, create=False)
        ours = _ours(study, sweep_id)
        states = {st.name.lower(): sum(t.state == st for t in ours) for st in FINISHED}
        if status == "FINISHED":
            _log_end(spec, study, ours, states, why, time.time() - t0, max_consecutive_fails)
            if s.full_reports:  # trials keep metrics only: the dashboards of the best, once
                t1 = time.time()
                done = report.full_reports(report.top_trials(study.get_trials(
                    deepcopy=False, states=(TrialState.COMPLETE,)), s.direction, k=s.full_reports), parent is not None)
                if done:
                    log.info("event=full_reports trials=%s seconds=%.1f", ",".join(map(str, done)), time.time() - t1)
        if parent is not None:
            best = best_trial(study)
            report.finish_parent(
                status, states, s.metric,
                best and {"number": best.number, "value": best.value, "params": best.params,
                          "run_id": best.user_attrs.get("mlflow_run_id")},
                study.trials_dataframe(), study_figures(study),
                report.description_markdown(s.name, s.metric, report.top_trials(
                    study.get_trials(deepcopy=False, states=FINISHED), s.direction, k=10), states, experiment_id))
    best = best_trial(study)
    return SweepResult(study_name=spec.study.name, storage=report.safe_url(url), experiment_id=experiment_id,
                       parent_run_id=parent, n_trials_run=len(ours), states=states,
                       best_value=best.value if best else None, best_params=best.params if best else {},
                       top=report.top_trials(study.get_trials(deepcopy=False, states=FINISHED), spec.study.direction))


def _log_end(spec: SweepSpec, study: optuna.Study, ours: list[FrozenTrial], states: dict[str, int], why: str,
             seconds: float, max_fails: int) -> None:
    """The sweep's last lines: why it stopped short of its budget (if it did), then the totals and the best."""
    line = progress.stop_line(why, len(ours), spec.study.n_trials, spec.study.timeout, max_fails)
    if line:
        log.warning(line)
    best = best_trial(study)
    log.info("sweep %s: %d trials in %s (%s); best %s", spec.study.name, len(ours), progress.fmt_duration(seconds),
             ", ".join(f"{v} {k}" for k, v in states.items()),
             f"{spec.study.metric}={best.value:.4f} (trial {best.number})" if best else "-")


def _scan(spec: SweepSpec) -> Any:
    if spec.touches_scan:
        log.info("event=sweep_scan_per_trial reason=space_sweeps_data_keys")
        return None
    from dataio.pipeline import scan_data

    t0 = time.time()
    index = scan_data(spec.base)  # photos or clips, by the model preset's kind
    log.info("event=sweep_scan seconds=%.1f train=%d val=%d", time.time() - t0, len(index.train), len(index.val))
    return index


def _fail_stale(study: optuna.Study, with_mlflow: bool) -> None:
    """Fail trials of dead workers now (queuing their retries) and close their MLflow runs."""
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    stale = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number in before]
    for t in stale:
        log.warning("event=sweep_stale_trial trial=%d action=failed_and_retried", t.number)
        if t.user_attrs.get("mlflow_run_id") and with_mlflow:
            report.close_stale(t.user_attrs["mlflow_run_id"])


# ---------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", required=True, help="sweep YAML (experiments/sweeps/*.yaml)")
    p.add_argument("--n_trials", type=int, help="trials to run in this call (added to the study)")
    p.add_argument("--timeout", type=float, help="seconds; no new trial starts after this")
    p.add_argument("--study_name")
    p.add_argument("--storage", help="SQLAlchemy URL (default sqlite:///<repo>/mlruns/optuna.db)")
    p.add_argument("--n_workers", type=int, default=1, help="local worker processes sharing the study")
    p.add_argument("--set", dest="sets", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="fixed Config overrides for every trial, e.g. data.data_dir=/data/ffpp")
    for flag, choices in (("--direction", ["maximize", "minimize"]), ("--sampler", ["tpe", "random", "grid"]),
                          ("--pruner", ["median", "percentile", "hyperband", "none"]), ("--metric", None)):
        p.add_argument(flag, choices=choices)
    p.add_argument("--seed", type=int)
    p.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING"],
                   help="INFO: one line per trial; DEBUG adds each trial's setup and epoch lines")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from core.config import parse_set

    try:
        result = run_sweep(a.sweep, n_trials=a.n_trials, timeout=a.timeout, study_name=a.study_name, storage=a.storage,
                           n_workers=a.n_workers, overrides=parse_set(a.sets), metric=a.metric, direction=a.direction,
                           sampler=a.sampler, pruner=a.pruner, seed=a.seed)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\nstudy {result.study_name} ({result.storage}): {result.n_trials_run} trials run now; top {len(result.top)}:")
    print(report.format_table(result.top))
    if result.experiment_id:
        from core.tracking import ui_link

        print(f"\nOpen the runs: make ui  ->  {ui_link(result.experiment_id)}")
    print("Study dashboard: make dashboard  ->  http://127.0.0.1:8080")
    return 1 if result.n_trials_run and result.states["fail"] == result.n_trials_run else 0


if __name__ == "__main__":
    from core.cli import exit_now

    exit_now(main())
