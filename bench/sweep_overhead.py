#!/usr/bin/env python
"""Sweep trial overhead: the share of a sweep's wall time spent outside the train and validation loops.

Runs a small study of the sweep file (every trial COMPLETE unless --pruner is given, so every trial pays
the end-of-run work) with MLflow on, in a temporary store, and times where each second went: the
training epochs and per-epoch validation (the work), and everything else (model and loader build, the
AMP probe, test-split scoring, the evaluation report, checkpoints, MLflow, Optuna). The figure it judges
is the issue's: the share of each TRIAL's wall (from sampling its parameters to its result, less the one-time
AMP probes) spent outside the loops; the costs paid once per sweep (study, parent run, Optuna figures) are
printed apart. With --compare it
runs the same study again with the per-trial extras this project used to have (last.pt every epoch,
val decoded again every epoch), alternating the two, so load on a shared machine hits both alike.

    python bench/sweep_overhead.py [--n_trials 4] [--epochs 5] [--compare]
"""
from __future__ import annotations

import collections
import functools
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from core.cli import ArgumentParser  # noqa: E402
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

BEFORE = {"train.save_last": True, "data.eval_cache_mb": 0}  # what a trial did before issue 11


class StageTimer:
    """Wall seconds per stage, by wrapping functions (validate is split by its split argument)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.undo: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, name: str, stage: str | None = None) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            key = stage or name
            if name == "validate":
                split = kwargs.get("split", args[1] if len(args) > 1 else "val")
                key = "val loop" if split == "val" else "test scoring"
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - t0

        setattr(owner, name, timed)
        self.undo.append((owner, name, original))

    def restore(self) -> None:
        for owner, name, original in reversed(self.undo):
            setattr(owner, name, original)
        self.undo.clear()


def run_study(sweep: str, label: str, n_trials: int, epochs: int | None, pruner: str, sets: dict, tmp: Path) -> dict:
    import core.amp as amp
    import core.tracking as tracking
    import training.run_io as run_io
    import training.trainer as trainer
    from experiments import sweep_report
    from experiments import sweep as sweep_module
    from experiments.sweep import run_sweep

    timer = StageTimer()
    timer.wrap(sweep_module._Objective, "__call__", "trial")  # a trial's wall: sampling to its result
    timer.wrap(trainer.Trainer, "train_one_epoch", "train loop")
    timer.wrap(trainer.Trainer, "validate")
    timer.wrap(trainer.Trainer, "__init__", "build (model, loaders)")
    timer.wrap(amp, "time_training_steps", "AMP probe (once per model/size/strategy)")
    timer.wrap(run_io, "run_report", "evaluation report")
    timer.wrap(trainer, "atomic_save", "checkpoints")
    timer.wrap(run_io, "atomic_save", "checkpoints")  # best.pt written once at the end (trials keep it in memory)
    timer.wrap(run_io, "load_checkpoint", "checkpoints")  # best.pt reloaded at the end (resumable runs)
    for name in ("log_start", "log_dataset", "log_metrics", "log_artifacts", "log_model", "set_tags"):
        timer.wrap(tracking.RunTracker, name, "mlflow (train)")
    for name in ("start_trial", "end_trial", "log_trial_params"):
        timer.wrap(sweep_report, name, "mlflow (trial runs)")
    overrides = {**({"train.num_epochs": epochs} if epochs else {}), "train.output_dir": str(tmp / label / "outputs"),
                 "tracking.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", **sets}
    t0 = time.perf_counter()
    try:
        result = run_sweep(sweep, n_trials=n_trials, study_name=f"overhead-{label}", pruner=pruner,
                           storage=f"sqlite:///{tmp / 'optuna.db'}", overrides=overrides)
    finally:
        timer.restore()
    wall = time.perf_counter() - t0
    probe = timer.seconds.get("AMP probe (once per model/size/strategy)", 0.0)
    timer.seconds["build (model, loaders)"] -= probe  # the probe runs inside the build: count it once
    return {"label": label, "wall": wall, "states": result.states, "seconds": dict(timer.seconds)}


def report(r: dict) -> float:
    s = r["seconds"]
    loops = s.get("train loop", 0.0) + s.get("val loop", 0.0)
    share = 1 - loops / r["wall"]
    print(f"\n[{r['label']}] sweep wall {r['wall']:.1f}s, trials {r['states']}; train+val loops {loops:.1f}s; "
          f"overhead {r['wall'] - loops:.1f}s = {share:.1%} of the wall")
    named = {k: v for k, v in s.items() if k not in ("train loop", "val loop", "trial")}
    for k, v in sorted(named.items(), key=lambda kv: -kv[1]):
        print(f"    {k:<42} {v:7.2f}s  {v / r['wall']:6.1%}")
    rest = r["wall"] - loops - sum(named.values())
    print(f"    {'other (Optuna, scan, imports, files)':<42} {rest:7.2f}s  {rest / r['wall']:6.1%}")
    probe = s.get("AMP probe (once per model/size/strategy)", 0.0)
    if probe:  # cached after the first trial of each model/size/freeze strategy: not a per-trial cost
        print(f"    without the one-time AMP probes: overhead {1 - loops / (r['wall'] - probe):.1%} of the wall")
    # the measure: inside the trials (sampling, build, loops, test, report, checkpoints, MLflow), less
    # the one-time probes; what is left outside the trials is paid once per sweep (study, parent run, figures)
    trial = s.get("trial", 0.0) - probe
    n = max(sum(r["states"].values()), 1)
    per_trial = 1 - loops / trial if trial > 0 else share
    print(f"    per trial: {trial / n:.2f}s wall, of which {(trial - loops) / n:.2f}s outside the loops = "
          f"{per_trial:.1%} of the trial wall; once per sweep: {r['wall'] - s.get('trial', 0.0):.1f}s")
    return per_trial


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", default=str(REPO_ROOT / "experiments" / "sweeps" / "default.yaml"))
    p.add_argument("--n_trials", type=int, default=4)
    p.add_argument("--epochs", type=int, help="train.num_epochs of every trial (default: the file's)")
    p.add_argument("--pruner", default="none", choices=["none", "median", "percentile", "hyperband"])
    p.add_argument("--compare", action="store_true", help="also run the study with last.pt + no val cache")
    p.add_argument("--set", dest="sets", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from core.config import parse_set

    import torch

    sets = parse_set(a.sets)
    tmp = Path(tempfile.mkdtemp(prefix="dfsweep-sweep-overhead-"))
    os.environ["DFSWEEP_CACHE_DIR"] = str(tmp)  # AMP probes of this bench stay here (timed as their own stage)
    print(f"sweep={Path(a.sweep).name} n_trials={a.n_trials} epochs={a.epochs} pruner={a.pruner} "
          f"threads={torch.get_num_threads()} cpus={os.cpu_count()}")
    # one untimed trial first: imports, the demo set, the AMP probe cache (a study's steady state)
    run_study(a.sweep, "warmup", 1, 1, "none", sets, tmp)
    runs = [("now", sets)] + ([("before", {**BEFORE, **sets})] if a.compare else [])
    shares: dict[str, float] = {}
    for label, extra in runs:
        shares[label] = report(run_study(a.sweep, label, a.n_trials, a.epochs, a.pruner, extra, tmp))
    if a.compare:
        print(f"\nper-trial overhead share: now {shares['now']:.1%}, before {shares['before']:.1%} "
              f"(last.pt each epoch + val decoded each epoch)")
    print(f"target: per-trial overhead <= 8% of the trial wall: {'met' if shares['now'] <= 0.08 else 'not met'} "
          f"({shares['now']:.1%})")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
