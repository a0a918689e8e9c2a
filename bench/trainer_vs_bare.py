#!/usr/bin/env python
"""Trainer overhead: train(cfg) (MLflow on) vs a bare PyTorch loop, same model/data/batch/steps.

Rounds alternate trainer and bare so drift on a shared machine hits both. Prints images/s of each
and the ratio (target >= 0.97), for fp32 and for bf16 autocast + channels_last.

    python bench/trainer_vs_bare.py [--model_type efficientnet_lite0] [--steps 30] [--rounds 3] [--precision fp32]
"""
from __future__ import annotations

import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from models import create_detector  # noqa: E402
from core.config import load_config  # noqa: E402
from dataio.data import scan  # noqa: E402
from dataio.loaders import build_loaders  # noqa: E402
from dataio.pipeline import data_config  # noqa: E402
from training.trainer import train  # noqa: E402
from core.cli import ArgumentParser  # noqa: E402
from bare_loop import bare_steps  # noqa: E402  (bench/ is the script folder, first on sys.path)


def bare_loop(cfg, index, steps: int) -> float:
    """The 20-line reference: same detector, loader, optimizer family and loss; returns images/s."""
    torch.manual_seed(cfg.train.seed)
    model = create_detector(cfg.model, 1, image_size=cfg.data.image_size)
    cl = bool(cfg.model.channels_last)
    model = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format).train()
    loader = build_loaders(index, cfg, model.data_config["mean"], model.data_config["std"])["train"]
    return bare_steps(model, loader, steps, cfg.optim.lr, cfg.optim.weight_decay, cl, bool(cfg.train.use_amp))


def trainer_run(cfg) -> float:
    """One epoch of `steps` updates through train(cfg); images/s as the trainer measured its loop."""
    result = train(cfg)
    import pandas as pd

    return float(pd.read_csv(result.output_dir / "training_log.csv")["images_per_s"].iloc[0])


def main() -> None:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model_type", default="efficientnet_lite0")
    ap.add_argument("--image_size", type=int, default=96)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data_dir", default=None, help="default: the demo set")
    ap.add_argument("--precision", choices=("both", "fp32", "bf16"), default="both",
                    help="fp32, bf16 autocast + channels_last, or both rows")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    tmp = Path(tempfile.mkdtemp(prefix="dfsweep-bench-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    print(f"model={args.model_type} image_size={args.image_size} batch={args.batch_size} steps={args.steps} "
          f"rounds={args.rounds} threads={torch.get_num_threads()}")
    rows = (("fp32", False, False), ("bf16+channels_last", True, True))
    for label, amp, cl in (r for r in rows if args.precision in ("both", r[0][:4])):
        cfg = load_config(overrides={
            "model.model_type": args.model_type, "model.pretrained": False, "model.channels_last": cl,
            "data.data_dir": args.data_dir, "data.image_size": args.image_size, "data.batch_size": args.batch_size,
            "data.num_workers": 1, "data.aug_policy": "basic", "train.num_epochs": 1,
            "train.max_steps_per_epoch": args.steps, "train.use_amp": amp, "optim.scheduler": "none",
            "train.output_dir": str(tmp / "outputs"), "tracking.log_model": False,
            "tracking.experiment_name": "bench-trainer-vs-bare",
        })
        index = scan(data_config(cfg), cfg.train.seed)
        trainer_run(cfg), bare_loop(cfg, index, args.steps)  # warm-up: caches, allocator, first-call costs
        ours, bare = [], []
        for _ in range(args.rounds):
            ours.append(trainer_run(cfg))
            bare.append(bare_loop(cfg, index, args.steps))
        o, b = statistics.median(ours), statistics.median(bare)
        print(f"{label:>20}: trainer {o:7.1f} img/s   bare {b:7.1f} img/s   ratio {o / b:.3f}   "
              f"(rounds trainer {[round(v, 1) for v in ours]} bare {[round(v, 1) for v in bare]})")


if __name__ == "__main__":
    main()
