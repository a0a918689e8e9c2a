#!/usr/bin/env python
"""One training run: parse flags -> Config -> train(cfg) -> report. Every run lands in MLflow.

    python training/train_unified.py --model_type efficientnet --data_dir /data/ffpp --use_amp
    python training/train_unified.py --config experiments/configs/mobilenetv2_ce.yaml --set optim.lr=3e-4
    python training/train_unified.py --preset seed003 --data_dir /data/ffpp
    python training/train_unified.py --eval_only --checkpoint runs:/RUN_ID/checkpoints/best.pt --data_dir /data/celebdf
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from core.cli import ArgumentParser  # noqa: E402  (after the sys.path line above)

# flag -> (config key, argparse kwargs). Seed-guide names are kept; each maps onto one Config key.
FLAGS: dict[str, tuple[str, dict]] = {
    "data_dir": ("data.data_dir", {"type": str}),
    "batch_size": ("data.batch_size", {"type": int}),
    "num_workers": ("data.num_workers", {"type": int}),
    "image_size": ("data.image_size", {"type": int}),
    "sequence_length": ("data.sequence_length", {"type": int, "help": "video: frames per clip"}),
    "frame_skip": ("data.frame_skip", {"type": int, "help": "video: every k-th frame"}),
    "model_type": ("model.model_type", {"type": str}),
    "model_name": ("model.model_name", {"type": str, "help": "any timm model name (overrides the preset backbone)"}),
    "pretrained_path": ("model.pretrained_path", {"type": str}),
    "dropout": ("model.dropout", {"type": float}),
    "head": ("model.head", {"type": str}),
    "embedding_dim": ("model.embedding_dim", {"type": int, "help": "mlp/arcface embedding size"}),
    "num_epochs": ("train.num_epochs", {"type": int}),
    "epochs": ("train.num_epochs", {"type": int, "help": "alias of --num_epochs (seed Xception script)"}),
    "lr": ("optim.lr", {"type": float}),
    "backbone_lr": ("optim.backbone_lr", {"type": float}),
    "classifier_lr": ("optim.classifier_lr", {"type": float}),
    "weight_decay": ("optim.weight_decay", {"type": float}),
    "scheduler": ("optim.scheduler", {"type": str}),
    "warmup_epochs": ("optim.warmup_epochs", {"type": float}),
    "gradient_accumulation": ("optim.gradient_accumulation", {"type": int}),
    "gradient_clip": ("optim.gradient_clip", {"type": float}),
    "loss_type": ("loss.loss_type", {"type": str}),
    "focal_alpha": ("loss.focal_alpha", {"type": float}),
    "focal_gamma": ("loss.focal_gamma", {"type": float}),
    "label_smoothing": ("loss.label_smoothing", {"type": float}),
    "num_classes": ("loss.num_classes", {"type": int, "help": "ce/arcface logits per image (seed 002: 9)"}),
    "mixup_alpha": ("aug.mixup_alpha", {"type": float}),
    "early_stopping_patience": ("train.early_stopping_patience", {"type": int}),
    "freeze_strategy": ("train.freeze_strategy", {"type": str}),
    "unfreeze_epoch": ("train.unfreeze_epoch", {"type": int}),
    "output_dir": ("train.output_dir", {"type": str}),
    "checkpoint_in": ("train.checkpoint_in", {"type": str, "help": "initial weights (e.g. a stage-1 checkpoint)"}),
    "checkpoint_out": ("train.checkpoint_out", {"type": str, "help": "copy the best checkpoint here"}),
    "checkpoint": ("train.checkpoint", {"type": str, "help": "with --eval_only: a file or runs:/RUN_ID/path"}),
    "resume": ("train.resume", {"type": str, "help": "last.pt or run folder; continues the same MLflow run"}),
    "seed": ("train.seed", {"type": int}),
    "device": ("train.device", {"choices": ["auto", "cpu", "cuda", "mps"]}),
    "experiment_name": ("tracking.experiment_name", {"type": str}),
    "run_name": ("tracking.run_name", {"type": str}),
}
SWITCHES: dict[str, tuple[str, object]] = {  # store_true flag -> (config key, value when given)
    "use_attention": ("model.use_attention", True),
    "use_advanced_aug": ("data.aug_policy", "advanced"),
    "use_mixup": ("aug.use_mixup", True),
    "use_tta": ("train.use_tta", True),
    "use_amp": ("train.use_amp", True),
    "eval_only": ("train.eval_only", True),
    "train_all_layers": ("train.freeze_strategy", "full"),
}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--config", help="a YAML file of config keys (as in experiments/configs/default.yaml)")
    source.add_argument("--preset", help="NAME of experiments/configs/NAME.yaml, e.g. seed003 (EfficientNet-B3 "
                        "recipe), seed002 (ResNet-18 ArcFace), seed001 (dual-stream video)")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override any key, e.g. --set optim.lr=3e-4 data.image_size=128 (repeatable)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None, help="ImageNet weights")
    p.add_argument("--no_tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("-v", "--verbose", action="store_true")
    from core.registry import FAMILIES

    for name, (key, kw) in FLAGS.items():
        names = f"{key}: one of {', '.join(FAMILIES[key].names())}" if key in FAMILIES else key  # from the registry
        p.add_argument(f"--{name}", dest=name, default=None, **{"help": names, **kw})
    for name, (key, value) in SWITCHES.items():
        p.add_argument(f"--{name}", action="store_true", default=None, help=f"{key}={value}")
    return p


def overrides_from_args(args: argparse.Namespace) -> dict[str, object]:
    """Only the flags the user gave become overrides (in the order of FLAGS, then switches)."""
    out: dict[str, object] = {}
    for name, (key, _) in FLAGS.items():
        if getattr(args, name) is not None:
            out[key] = getattr(args, name)
    for name, (key, value) in SWITCHES.items():
        if getattr(args, name):
            out[key] = value
    if args.pretrained is not None:
        out["model.pretrained"] = args.pretrained
    if args.no_tracking:
        out["tracking.enabled"] = False
    return out


def main(argv: list[str] | None = None) -> int:
    from core.config import compose, parse_set, preset_path
    from core.errors import UserError, error_line

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "mlflow.store", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        config_file = preset_path(args.preset) if args.preset else args.config
        cfg = compose(config_file, [(parse_set(args.set), "--set"), (overrides_from_args(args), "command line")])
        if cfg.train.eval_only:  # the evaluation path (python -m evaluation.evaluate --checkpoint ...)
            from evaluation.evaluate import evaluate_config, print_summary

            print_summary(evaluate_config(cfg))
            return 0
        if cfg.tracking.enabled and not cfg.train.resume:
            from core.mlflow_backend import start_helper

            # MLflow's import and store open run in a helper process from here, beside the imports of torch
            # and timm below (core.mlflow_backend); a resumed run's store comes from its checkpoint
            start_helper(cfg.tracking.tracking_uri, cfg.tracking.experiment_name)
        from training.trainer import train

        result = train(cfg)
    except KeyboardInterrupt:
        print("interrupted: the last completed epoch is saved; continue with --resume <output_dir>/<run>/last.pt", file=sys.stderr)
        return 130
    except UserError as e:  # bad input (config, names, data, checkpoint, offline weights): one line, exit 2
        print(error_line(e), file=sys.stderr)
        return 2
    finally:
        from core.mlflow_backend import close_helpers

        close_helpers()  # one the run did not take: it failed before its MLflow run began
    report(result, cfg)
    return 0


def report(result, cfg) -> None:
    from core.tracking import ui_link

    lines = [f"status={result.status} run_id={result.run_id} epochs={result.epochs_run} "
             f"best_epoch={result.best_epoch} best_{cfg.train.monitor}={result.best_metric:.4f}"]
    if result.test_metrics:
        lines.append(" ".join(f"{k}={v:.4f}" for k, v in sorted(result.test_metrics.items())))
    lines.append(f"output_dir={result.output_dir}")
    if result.run_id and result.experiment_id:
        lines.append(f"mlflow: make ui, then {ui_link(result.experiment_id, result.run_id)}")
    print("\n".join(lines))


if __name__ == "__main__":
    from core.cli import exit_now

    exit_now(main())
