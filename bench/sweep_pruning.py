"""Benchmark: the same study with and without pruning (same seed, same trial budget).

Prints, for each: trials, pruned trials, epochs trained, best value and wall time, then the epoch
ratio and the best-value gap. Target (issue 3): at least 40% fewer epochs, best value within 0.01.

    python bench/sweep_pruning.py                                   # default study: ~5 + ~3 min on 2 idle cores
    python bench/sweep_pruning.py --n_trials 8 --set train.num_epochs=2
    python bench/sweep_pruning.py --pruner median                   # compare another pruner with none
    python bench/sweep_pruning.py --seeds 42 43 44                  # repeat with other study seeds; prints the mean
    python bench/sweep_pruning.py --study pruner.n_warmup_steps=1   # change the file's study section

Each study gets its own temporary Optuna storage and output folder; MLflow tracking is off unless
--track (then runs go to a temporary MLflow store too).
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.sweep import run_sweep  # noqa: E402
from core.config import parse_set  # noqa: E402
from core.cli import ArgumentParser  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def set_study(doc: dict, study_sets: dict, seed: int | None) -> None:
    """Apply dotted `study` overrides (pruner.n_warmup_steps=1) and the seed to a sweep file's document."""
    study = doc.setdefault("study", {})
    study["timeout"] = None  # the trial budget is what is compared, not the wall clock
    if seed is not None:
        study["seed"] = seed
    for key, value in study_sets.items():
        *path, last = key.split(".")
        node = study
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SystemExit(f"--study {key}: '{part}' is not a mapping in the study section")
        node[last] = value


def run_one(sweep: str, pruner: str, n_trials: int | None, sets: dict, track: bool, root: Path,
            study_sets: dict, seed: int | None) -> dict:
    """Run the study once in `root` (the file's timeout removed: the trial budget is what is compared)."""
    import optuna
    import yaml

    root.mkdir(parents=True)
    doc = yaml.safe_load(Path(sweep).read_text())
    set_study(doc, study_sets, seed)
    if doc.get("config"):  # keep a preset path resolvable from the copy
        doc["config"] = str((Path(sweep).parent / doc["config"]) if (Path(sweep).parent / doc["config"]).is_file()
                            else doc["config"])
    sweep = str(root / Path(sweep).name)
    Path(sweep).write_text(yaml.safe_dump(doc, sort_keys=False))
    overrides = {**sets, "train.output_dir": str(root / "outputs")}
    if not track:
        overrides["tracking.enabled"] = False
    else:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    url = f"sqlite:///{root / 'optuna.db'}"
    t0 = time.perf_counter()
    res = run_sweep(sweep, n_trials=n_trials, storage=url, pruner=pruner, overrides=overrides)
    wall = time.perf_counter() - t0
    trials = optuna.load_study(study_name=res.study_name, storage=url).trials
    return {"pruner": pruner, "seed": doc["study"].get("seed"),
            "values": [(t.number, t.state.name, int(t.user_attrs.get("epochs_trained", 0)),
                        None if t.value is None else round(t.value, 4)) for t in trials], "trials": len(trials),
            "pruned": sum(t.state.name == "PRUNED" for t in trials),
            "failed": sum(t.state.name == "FAIL" for t in trials),
            "epochs": sum(int(t.user_attrs.get("epochs_trained", 0)) for t in trials),
            "best": res.best_value, "wall_s": wall}


def print_pair(base: dict, pruned: dict) -> tuple[float, float]:
    """Print one seed's two studies; return (epoch ratio pruned/none, best value gap none - pruned)."""
    print(f"\nseed {base['seed']}")
    print(f"{'pruner':<10} {'trials':>6} {'pruned':>6} {'failed':>6} {'epochs':>6} {'best':>8} {'wall_s':>8}")
    for r in (base, pruned):
        best = f"{r['best']:.4f}" if r["best"] is not None else "-"
        print(f"{r['pruner']:<10} {r['trials']:>6} {r['pruned']:>6} {r['failed']:>6} {r['epochs']:>6} {best:>8} "
              f"{r['wall_s']:>8.0f}")
    ratio = pruned["epochs"] / max(base["epochs"], 1)
    gap = (base["best"] - pruned["best"]) if None not in (base["best"], pruned["best"]) else float("nan")
    print(f"epochs {pruned['pruner']}/none = {ratio:.2f} ({1 - ratio:.0%} fewer); best value none - "
          f"{pruned['pruner']} = {gap:+.4f}; wall {pruned['wall_s'] / max(base['wall_s'], 1e-9):.2f}x")
    return ratio, gap


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", default=str(REPO_ROOT / "experiments" / "sweeps" / "default.yaml"))
    p.add_argument("--n_trials", type=int, help="trial budget for both studies (default: the file's)")
    p.add_argument("--pruner", choices=["median", "hyperband", "percentile"],
                   help="the pruner compared with none (default: the file's)")
    p.add_argument("--seeds", type=int, nargs="+", help="study seeds to repeat the pair with (default: the file's)")
    p.add_argument("--set", dest="sets", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="Config overrides for every trial, as in the training CLI")
    p.add_argument("--study", dest="study_sets", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="overrides of the sweep file's study section, e.g. pruner.n_startup_trials=4")
    p.add_argument("--track", action="store_true", help="log to a temporary MLflow store as well")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder and print its path")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from experiments.search_space import load_sweep

    pruner = a.pruner or load_sweep(a.sweep).study.pruner
    if pruner == "none":
        raise SystemExit(f"{a.sweep} has no pruner; pass --pruner median|percentile|hyperband")
    sets, study_sets = parse_set(a.sets), parse_set(a.study_sets)
    tmp = Path(tempfile.mkdtemp(prefix="sweep_pruning_"))
    ratios, gaps = [], []
    for seed in a.seeds or [None]:
        rows = [run_one(a.sweep, name, a.n_trials, sets, a.track, tmp / f"{name}-{seed}", study_sets, seed)
                for name in ("none", pruner)]
        ratio, gap = print_pair(*rows)
        ratios.append(ratio)
        gaps.append(gap)
        if a.keep:
            for r in rows:
                print(f"  {r['pruner']}: (trial, state, epochs, value) {r['values']}")
    ratio, gap = sum(ratios) / len(ratios), sum(gaps) / len(gaps)
    ok = ratio <= 0.6 and abs(gap) <= 0.01
    if len(ratios) > 1:
        print(f"\nmean over {len(ratios)} seeds: epochs {pruner}/none = {ratio:.2f} ({1 - ratio:.0%} fewer); "
              f"best value none - {pruner} = {gap:+.4f} (per seed: {', '.join(f'{g:+.3f}' for g in gaps)})")
    print(f"target (>= 40% fewer epochs, best within 0.01): {'met' if ok else 'not met'}")
    if a.keep:
        print(f"studies and outputs kept in {tmp}")
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
