"""What a sweep prints while it runs: one INFO line per finished trial, a line when it stops early, and the
per-trial setup chatter of the training code moved to DEBUG.

    trial 3/16 COMPLETE val_auc=0.9510 best 0.9510 (trial 1) 2m10s ETA 6m
    trial 4/16 PRUNED val_auc=0.7100 at epoch 2/5 best 0.9510 (trial 1) 41s ETA 5m
    trial 5/16 FAIL RuntimeError: loss is nan ... best 0.9510 (trial 1) 3s ETA 5m

Plain values in; no Optuna import (experiments/sweep.py talks to Optuna).
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Iterator

# top-level packages whose INFO records are per-trial detail during a sweep (model built, optimizer groups,
# scheduler, parameter counts, per-epoch lines, evaluation summary, run end)
DETAIL_PACKAGES = ("core", "dataio", "models", "training", "evaluation", "augmentation", "preprocessing", "mlflow")


def fmt_duration(seconds: float) -> str:
    """41s, 2m10s, 1h05m (rounded down to the unit shown)."""
    s = max(int(seconds), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def fmt_eta(seconds: float) -> str:
    """Coarser than fmt_duration: 40s, 6m, 1h05m."""
    s = max(int(round(seconds)), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{int(round(s / 60))}m"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def eta_seconds(done: int, total: int, seconds_per_trial: float, n_workers: int,
                seconds_to_deadline: float | None) -> float:
    """Time left for `total - done` trials at the mean trial time over `n_workers`, capped by the deadline."""
    left = max(total - done, 0) * seconds_per_trial / max(n_workers, 1)
    if seconds_to_deadline is not None:
        left = min(left, max(seconds_to_deadline, 0.0))
    return left


def trial_line(k: int, n: int, number: int, state: str, metric: str, value: float | None, reason: str,
               best_value: float | None, best_number: int | None, seconds: float, eta: float | None) -> str:
    """The one line a finished trial gets. `k` counts this call's trials (1-based), `number` is Optuna's."""
    head = f"trial {k}/{n}" + (f" (#{number})" if number != k - 1 else "")
    if state == "COMPLETE" and value is not None:
        what = f"COMPLETE {metric}={value:.4f}"
    elif state == "PRUNED":
        what = f"PRUNED {reason}".rstrip()
    else:
        what = f"{state} {reason}".rstrip()
    best = (f"best {best_value:.4f} (trial {best_number})" if best_value is not None and math.isfinite(best_value)
            else "best -")
    tail = f" ETA {fmt_eta(eta)}" if eta is not None and k < n else ""
    return f"{head} {what} {best} {fmt_duration(seconds)}{tail}"


def stop_line(reason: str, done: int, n: int, timeout: float | None = None, fails: int = 0) -> str | None:
    """The line printed when a sweep stops before its trial budget; None when it ran them all."""
    if done >= n:
        return None
    if reason == "timeout":
        return (f"timeout {timeout:g} s reached after {done} of {n} trials; re-run to add trials "
                "(or raise study.timeout / --timeout)")
    if reason == "grid":
        return f"grid exhausted after {done} of {n} trials: every grid point has been tried"
    if reason == "failures":
        return (f"stopped after {fails} consecutive failed trials ({done} of {n} run); "
                "see the trials' fail_reason and fix the base config")
    return f"stopped after {done} of {n} trials ({reason})"


class _DemoteDetail(logging.Filter):
    """Handler filter: INFO records of DETAIL_PACKAGES become DEBUG (kept only where DEBUG is enabled)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and record.name.split(".")[0] in DETAIL_PACKAGES:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


@contextlib.contextmanager
def detail_at_debug() -> Iterator[None]:
    """While a sweep runs trials, the training code's INFO lines are logged at DEBUG (`--log_level DEBUG`
    shows them); warnings and errors pass unchanged."""
    flt = _DemoteDetail()
    # root's handlers, and MLflow's own (its logger does not propagate: system-metrics start/stop lines)
    handlers = list(logging.getLogger().handlers) + list(logging.getLogger("mlflow").handlers)
    for h in handlers:
        h.addFilter(flt)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(flt)
