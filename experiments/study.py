"""The Optuna side of a sweep: storage with heartbeats, sampler, pruner, the study, its best trial and plots.

experiments/sweep.py runs trials on what this module opens; experiments/sweep_report.py logs plain values.
"""
from __future__ import annotations

import logging
import warnings
from functools import partial
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from experiments.search_space import SweepSpec
from core.config import REPO_ROOT, ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Heartbeat:
    """RDBStorage heartbeat settings; a RUNNING trial silent for `grace_period` s is failed and retried."""

    interval: int = 60
    grace_period: int = 180
    max_retry: int = 2


def default_storage() -> str:
    (REPO_ROOT / "mlruns").mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{REPO_ROOT / 'mlruns' / 'optuna.db'}"


class RetryAndCloseRun(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a dead worker's trial, plus closing that trial's MLflow run (KILLED).

    Whichever process finds the stale trial runs this: with several workers it is usually a surviving
    worker inside `optimize`, so the sweep's own start-up check would never see the trial RUNNING and its
    MLflow run would stay RUNNING for ever."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        super().__call__(study, trial)
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            from experiments.sweep_report import close_stale

            log.warning("event=sweep_stale_trial trial=%d action=failed_and_retried", trial.number)
            close_stale(run_id)


def make_storage(url: str, hb: Heartbeat) -> RDBStorage:
    """RDBStorage with heartbeat + retry of stale trials; sqlite waits on locks instead of failing."""
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=hb.interval,
                          grace_period=hb.grace_period,
                          heartbeat_stale_trial_callback=RetryAndCloseRun(max_retry=hb.max_retry))


def make_sampler(spec: SweepSpec, seed: int) -> optuna.samplers.BaseSampler:
    s = spec.study
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        if s.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if s.sampler == "grid":
            return optuna.samplers.GridSampler(spec.grid_space(), seed=seed)
        opts = {"multivariate": True, "group": True, "constant_liar": True, **s.sampler_options}
        return optuna.samplers.TPESampler(seed=seed, **opts)


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    s = spec.study
    if s.pruner == "median":
        return optuna.pruners.MedianPruner(**s.pruner_options)
    if s.pruner == "percentile":  # keeps the top `percentile` % at each epoch (median = 50)
        return optuna.pruners.PercentilePruner(**{"percentile": 25.0, **s.pruner_options})
    if s.pruner == "hyperband":
        opts = {"min_resource": 1, "max_resource": spec.base.train.num_epochs, **s.pruner_options}
        return optuna.pruners.HyperbandPruner(**opts)
    return optuna.pruners.NopPruner()


def open_study(spec: SweepSpec, storage: RDBStorage, seed: int, create: bool) -> optuna.Study:
    """Create or load the study; sampler and pruner are not stored, so they are passed every time."""
    kw = dict(study_name=spec.study.name, storage=storage, sampler=make_sampler(spec, seed), pruner=make_pruner(spec))
    if not create:
        return optuna.load_study(**kw)
    study = optuna.create_study(direction=spec.study.direction, load_if_exists=True, **kw)
    if study.direction.name.lower() != spec.study.direction:
        raise ConfigError(f"study '{spec.study.name}' already exists with direction {study.direction.name.lower()}; "
                          f"{spec.path} asks for {spec.study.direction} (use another --study_name)")
    with warnings.catch_warnings():  # experimental API: names the objective in optuna-dashboard and the plots
        warnings.simplefilter("ignore", ExperimentalWarning)
        if study.metric_names != [spec.study.metric]:
            study.set_metric_names([spec.study.metric])
    before, now = study.user_attrs.get("settings_fingerprint"), spec.fingerprint
    if before != now:
        if before is not None and study.trials:
            log.warning("event=sweep_settings_changed study=%s trials=%d: the base config, space or metric differs "
                        "from the earlier trials' (their values may not compare); use --study_name for a new study",
                        spec.study.name, len(study.trials))
        study.set_user_attr("settings_fingerprint", now)
    return study


def study_figures(study: optuna.Study) -> list[tuple[str, Any]]:
    """Optuna's plotly figures; each is skipped (with a log line) when the study cannot support it."""
    import optuna.visualization as vis

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    varying = any(len({repr(t.params.get(k)) for t in done}) > 1 for k in {k for t in done for k in t.params})
    curves = any(t.intermediate_values for t in study.get_trials(deepcopy=False))
    name = (study.metric_names or ["Objective Value"])[0]  # the axis titles that would otherwise say "Objective"
    plots = [("optimization_history", partial(vis.plot_optimization_history, target_name=name), bool(done),
              "no completed trial"),
             ("param_importances", vis.plot_param_importances, len(done) >= 2 and varying,
              "needs 2 completed trials with varying params"),
             ("parallel_coordinate", partial(vis.plot_parallel_coordinate, target_name=name), bool(done),
              "no completed trial"),
             ("intermediate_values", vis.plot_intermediate_values, curves, "no reported epochs"),
             ("slice", partial(vis.plot_slice, target_name=name), bool(done), "no completed trial")]
    out = []
    for name, fn, ok, why in plots:
        try:
            if not ok:
                raise ValueError(why)
            with warnings.catch_warnings():  # PED-ANOVA warns about small regimes on every tiny study
                warnings.simplefilter("ignore", UserWarning)
                out.append((name, fn(study)))
        except Exception as e:  # a figure is a nice-to-have: never fail the sweep for it
            log.info("event=sweep_plot_skipped plot=%s reason=%r", name, str(e).splitlines()[0][:200])
    return out


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no completed trial yet
        return None
