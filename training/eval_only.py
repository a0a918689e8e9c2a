"""`--eval_only --checkpoint FILE|runs:/RUN_ID/path --data_dir DIR`: score a trained model on a data set.

The model is rebuilt from the config stored in the checkpoint; data and evaluation flags come from the
command line. Every image of the data set is scored (a cross-dataset evaluation uses all of it) and
the result is an MLflow run named eval-<source run>, tagged with the source run id.

The building blocks (`load_trained_model`, `select_samples`, `score_samples`) are shared with
`python -m evaluation.evaluate` and `evaluation.crosseval`.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from core.checkpoints import load_checkpoint
from core.config import Config
from evaluation.inference import Predictions, autocast_factory, predict, predictions_table, resolve_device

log = logging.getLogger(__name__)

SPLIT_CHOICES = ("all", "train", "val", "test")


@dataclass
class TrainedModel:
    """A detector rebuilt from a checkpoint, on its device, with what scoring it needs."""

    model: torch.nn.Module
    config: Config  # the training config stored in the checkpoint
    device: torch.device
    channels_last: bool
    amp: Callable[[], contextlib.AbstractContextManager]
    info: dict[str, Any] = field(default_factory=dict)  # checkpoint metadata: path, run_id, epoch, best_metric

    @property
    def run_id(self) -> str | None:
        return self.info.get("run_id")


def load_trained_model(ref: str | Path, device: str = "auto", use_amp: bool = False,
                       fallback_config: Config | None = None) -> TrainedModel:
    """Rebuild the model of a checkpoint (file, run folder or runs:/ URI) without downloading weights."""
    from training.trainer import build_model

    ckpt = load_checkpoint(ref)
    if "config" in ckpt:
        trained = Config.model_validate(ckpt["config"])
    elif fallback_config is not None:
        trained = fallback_config
    else:
        from core.checkpoints import CheckpointError

        raise CheckpointError(f"{ckpt['path']} stores no config; use a checkpoint written by train(cfg) (best.pt)")
    model = build_model(trained.with_overrides({"model.pretrained_path": None}, "checkpoint"), pretrained=False)
    model.load_state_dict(ckpt.pop("model"))
    dev = resolve_device(device)
    channels_last = model.is_convnet if trained.model.channels_last is None else trained.model.channels_last
    model.to(dev, memory_format=torch.channels_last if channels_last else torch.preserve_format).eval()
    info = {k: ckpt.get(k) for k in ("path", "run_id", "epoch", "best_metric")}
    return TrainedModel(model, trained, dev, channels_last, autocast_factory(dev, use_amp), info)


def with_face_crop(trained: TrainedModel, face_crop: str | None) -> TrainedModel:
    """The model read with another face crop (none | mtcnn; None keeps the run's own). mtcnn uses the run's
    margin and crop size; it replaces a center_crop the run trained with."""
    if face_crop is None or face_crop == trained.config.data.face_crop:
        return trained
    from dataclasses import replace

    over = {"data.face_crop": face_crop, **({"data.center_crop": None} if face_crop != "none" else {})}
    return replace(trained, config=trained.config.with_overrides(over, "--face_crop"))


def select_samples(index, split: str = "all", max_images: int | None = None, seed: int = 0) -> list:
    """Samples of one split of a scanned DataIndex ("all" = train + val + test), capped stratified and seeded."""
    from dataio.data import cap_split

    if split not in SPLIT_CHOICES:
        raise ValueError(f"split must be one of {SPLIT_CHOICES}; got {split!r}")
    samples = index.train + index.val + index.test if split == "all" else list(index.split(split))
    return cap_split(samples, max_images, seed) if max_images else samples


def scan_for(trained: TrainedModel, data_dir: str | Path):
    """Scan a data folder/CSV the way the trained model's config would (split seed, grouping, video or image)."""
    from training.trainer import scan_data

    cfg = trained.config.with_overrides({"data.data_dir": str(data_dir), "data.max_samples_per_split": None},
                                        "--data_dir")
    return scan_data(cfg)


def eval_loader(trained: TrainedModel, samples: list, *, batch_size: int = 64, num_workers: int = 2,
                wrap_transform: Callable[[Any], Any] | None = None):
    """A loader over `samples` with the model's eval transform (the training code's test loader);
    `wrap_transform(transform)` may replace the per-image transform (e.g. a perturbation before it)."""
    from dataio.data import DataIndex
    from dataio.loaders import build_loaders

    cfg = trained.config.with_overrides({"data.batch_size": batch_size, "data.num_workers": num_workers}, "evaluation")
    index = DataIndex(train=[], val=[], test=list(samples))
    dc = trained.model.data_config
    if trained.config.model.is_video:
        if wrap_transform is not None:
            raise ValueError("image perturbations (robustness) are not supported for the video model")
        from dataio.video_data import build_video_loaders as build  # noqa: F811
    else:
        build = build_loaders
    loader = build(index, cfg, dc["mean"], dc["std"], device_type=trained.device.type)["test"]
    if wrap_transform is not None:
        loader.dataset.transform = wrap_transform(loader.dataset.transform)
    return loader


def score_samples(trained: TrainedModel, samples: list, *, batch_size: int = 64, num_workers: int = 2,
                  tta: Any = False, mc_dropout: int = 0, seed: int = 0,
                  wrap_transform: Callable[[Any], Any] | None = None,
                  desc: str = "eval") -> tuple[Predictions, pd.DataFrame]:
    """Score samples (TTA / MC-dropout as in evaluation.inference.predict): (Predictions, predictions table)."""
    if not samples:
        raise ValueError(f"{desc}: no samples to score")
    loader = eval_loader(trained, samples, batch_size=batch_size, num_workers=num_workers,
                         wrap_transform=wrap_transform)
    preds = predict(trained.model, loader, trained.device, channels_last=trained.channels_last, amp=trained.amp,
                    tta=tta, mc_dropout=mc_dropout, seed=seed, desc=desc)
    return preds, predictions_table(preds, samples)


@dataclass
class ScoredData:
    """One data set scored by one model."""

    name: str
    data_dir: str
    samples: list
    table: pd.DataFrame  # predictions_table: path, label, score, logit[, group, subset, score_std]
    digest: str  # data digest of the scored samples


def dataset_name(data_dir: str | Path) -> str:
    """'celebdf' for /data/celebdf, 'faces' for faces.csv."""
    p = Path(data_dir)
    return p.stem if p.suffix.lower() == ".csv" else (p.name or str(p))


def score_dataset(trained: TrainedModel, data_dir: str | Path, *, split: str = "all", max_images: int | None = None,
                  tta: Any = False, mc_dropout: int = 0, seed: int = 0, batch_size: int = 64,
                  num_workers: int = 2) -> ScoredData:
    """Scan `data_dir` as the trained config would, pick the split (capped), and score it. Missing data or
    an empty split raise dataio.data.DataError (a one-line user error)."""
    from dataio.data import DataError, data_digest

    if not Path(data_dir).expanduser().exists():
        raise DataError(f"data dir not found: {data_dir}")
    samples = select_samples(scan_for(trained, data_dir), split, max_images, seed)
    if not samples:
        raise DataError(f"the {split} split of {data_dir} is empty; use --split all")
    name = dataset_name(data_dir)
    _, table = score_samples(trained, samples, batch_size=batch_size, num_workers=num_workers, tta=tta,
                             mc_dropout=mc_dropout, seed=seed, desc=name)
    root = Path(data_dir).parent if Path(data_dir).is_file() else Path(data_dir)
    return ScoredData(name, str(data_dir), samples, table, data_digest({split: samples}, root))


def evaluate_checkpoint(cfg: Config, index=None):
    """Evaluate cfg.train.checkpoint on cfg.data (all splits together); returns a TrainResult."""
    from dataio.data import DataIndex
    from training.run_io import run_report, start_tags
    from core.tracking import RunTracker
    from training.trainer import TrainResult, default_data_cfg, scan_data, split_metrics

    trained = load_trained_model(cfg.train.checkpoint, cfg.train.device, cfg.train.use_amp, fallback_config=cfg)
    tcfg = trained.config
    data_cfg = default_data_cfg(cfg)
    if index is None:
        index = scan_data(cfg.with_overrides({"model.model_type": tcfg.model.model_type}, "checkpoint"))
    everything = DataIndex(train=[], val=[], test=select_samples(index), skipped=index.skipped,
                           source=index.source, digest=index.digest)
    source = trained.run_id or Path(trained.info["path"]).stem
    eval_cfg = tcfg.with_overrides({
        "data.data_dir": str(data_cfg.data_dir), "data.batch_size": cfg.data.batch_size,
        "data.num_workers": cfg.data.num_workers, "data.image_size": tcfg.data.image_size,
        "train.use_tta": cfg.train.use_tta, "train.eval_only": True, "train.checkpoint": cfg.train.checkpoint,
        "tracking.experiment_name": cfg.tracking.experiment_name,
        "tracking.run_name": cfg.tracking.run_name or f"eval-{source}",
        "tracking.tracking_uri": cfg.tracking.tracking_uri, "tracking.enabled": cfg.tracking.enabled,
        "tracking.log_model": False,
    }, "--eval_only")
    preds, table = score_samples(trained, everything.test, batch_size=cfg.data.batch_size,
                                 num_workers=cfg.data.num_workers, tta=cfg.train.use_tta, desc="eval")
    metrics = split_metrics("test", preds)
    out_dir = Path(cfg.train.output_dir) / time.strftime("eval-%Y%m%d-%H%M%S")
    (out_dir / "predictions").mkdir(parents=True, exist_ok=True)
    table.to_parquet(out_dir / "predictions" / "test.parquet")
    with RunTracker(eval_cfg) as tracker:
        tags = {**start_tags(eval_cfg, index), "source_run_id": str(trained.run_id), "eval_only": "true"}
        tracker.log_start(tags)
        report = run_report(local_val_predictions(trained.info["path"]), table, None, out_dir / "evaluation")
        tracker.log_metrics({**metrics, **{k: v for k, v in report.items() if k.startswith("test_")}}, step=0)
        tracker.log_artifacts(out_dir / "predictions", "predictions")
        tracker.log_artifacts(out_dir / "evaluation", "evaluation")
    log.info("event=eval_only n=%d %s", len(table), " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    epoch = trained.info.get("epoch")
    return TrainResult(run_id=tracker.run_id, status="EVALUATED", best_metric=metrics.get("test_auc", float("nan")),
                       best_epoch=-1 if epoch is None else int(epoch), epochs_run=0, test_metrics=metrics,
                       output_dir=out_dir)


def local_val_predictions(checkpoint_path: str | Path) -> pd.DataFrame | None:
    """The source run's validation predictions (for thresholds/temperature), when they sit beside the checkpoint."""
    path = Path(checkpoint_path).parent / "predictions" / "val.parquet"
    return pd.read_parquet(path) if path.exists() else None
