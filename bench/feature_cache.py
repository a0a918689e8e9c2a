#!/usr/bin/env python
"""Frozen-feature cache: frozen-backbone epochs through train(cfg) with the cache (train.feature_cache=auto)
and without it (off), same model, data, size, batch and seed. Runs alternate cached / uncached so load
on a shared machine hits both.

Prints, per mode, the median wall time of an epoch after the first (train + validation + checkpoint +
MLflow logging, measured between epoch callbacks) and of its training loop alone, their ratios, the
one-off cost of building the cache and the largest difference in val AUC / loss between the modes.

    python bench/feature_cache.py [--model_type mobilenetv2] [--image_size 128] [--epochs 4] [--rounds 1]
                                  [--data ../shared/data/lfw_faceswap] [--amp]
"""
from __future__ import annotations

import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pandas as pd  # noqa: E402

from core.config import REPO_ROOT, load_config  # noqa: E402
from training.trainer import train  # noqa: E402
from core.cli import ArgumentParser  # noqa: E402

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "lfw_faceswap"


def one_run(args, mode: str, root: Path) -> dict[str, object]:
    """One train(cfg) with feature_cache=mode: epoch walls (from callbacks), training log, final val metrics."""
    cfg = load_config(overrides={
        "model.model_type": args.model_type, "model.pretrained": True, "data.data_dir": str(args.data),
        "data.center_crop": args.center_crop, "data.aug_policy": "none", "data.image_size": args.image_size,
        "data.batch_size": args.batch_size, "data.num_workers": args.num_workers,
        "train.freeze_strategy": "frozen", "train.num_epochs": args.epochs, "train.use_amp": args.amp,
        "optim.lr": 3e-3, "train.feature_cache": mode, "train.output_dir": str(root / mode),
        "tracking.tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "tracking.experiment_name": "bench-feature-cache",
        "tracking.log_model": False,
    })
    stamps: list[float] = []
    result = train(cfg, epoch_callback=lambda epoch, row: stamps.append(time.perf_counter()))
    log = pd.read_csv(result.output_dir / "training_log.csv")
    return {"walls": [b - a for a, b in zip(stamps, stamps[1:])], "loops": log["epoch_seconds"].tolist()[1:],
            "build": float(log["feature_cache_seconds"].iloc[0]) if "feature_cache_seconds" in log else None,
            "val": log[["val_auc", "val_loss"]].to_numpy()}


def main() -> None:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_type", default="mobilenetv2")
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=4, help="per run; the first (cache build) is reported apart")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--center_crop", type=float, default=0.5, help="LFW photos: keep the central face")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CPU) / fp16 (CUDA) in both modes")
    args = p.parse_args()
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (epochs after the first are timed)")
    logging.basicConfig(level=logging.WARNING)
    runs: dict[str, list[dict]] = {"off": [], "auto": []}
    with tempfile.TemporaryDirectory(prefix="bench-fc-") as tmp:
        for r in range(args.rounds):
            for mode in (("off", "auto") if r % 2 == 0 else ("auto", "off")):
                runs[mode].append(one_run(args, mode, Path(tmp) / f"r{r}"))
    med = {m: (statistics.median(w for run in rs for w in run["walls"]),
               statistics.median(w for run in rs for w in run["loops"])) for m, rs in runs.items()}
    build = statistics.median(run["build"] for run in runs["auto"])
    gap = max(abs(a["val"] - b["val"]).max() for a, b in zip(runs["auto"], runs["off"]))
    print(f"{args.model_type} {args.image_size}px batch {args.batch_size}, {args.data.name}, frozen backbone, "
          f"amp={args.amp}, {args.epochs} epochs x {args.rounds} round(s) per mode")
    print(f"epoch wall (train+val+checkpoint+logging): uncached {med['off'][0]:.2f} s, cached {med['auto'][0]:.3f} s, "
          f"ratio {med['off'][0] / med['auto'][0]:.1f}x")
    print(f"training loop only:                        uncached {med['off'][1]:.2f} s, cached {med['auto'][1]:.3f} s, "
          f"ratio {med['off'][1] / med['auto'][1]:.1f}x")
    print(f"cache build (train+val features, once per run): {build:.2f} s = {build / med['off'][0]:.2f} uncached epochs")
    print(f"largest per-epoch difference in val_auc / val_loss, cached vs uncached: {gap:.2e}")


if __name__ == "__main__":
    main()
