"""Score a trained model on a data set: pick the samples, build the eval loader the training code would,
run evaluation.inference.predict, and return the predictions table.

Shared by `python -m evaluation.evaluate`, `evaluation.crosseval`, robustness and the training CLI's
`--eval_only` (which is evaluation.evaluate.evaluate_config).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from core.errors import DataError
from dataio.data import DataIndex, cap_split, data_digest
from dataio.pipeline import is_video, make_loaders, scan_data
from evaluation.inference import Predictions, predict, predictions_table
from models.build import TrainedModel

SPLIT_CHOICES = ("all", "train", "val", "test")


def split_metrics(prefix: str, preds: Predictions) -> dict[str, float]:
    """val_/test_ metrics for one split: loss + evaluation.metrics.binary_metrics."""
    from evaluation.metrics import binary_metrics

    out = {f"{prefix}_{k}": float(v) for k, v in binary_metrics(preds.labels, preds.scores).items()
           if isinstance(v, (int, float))}
    if math.isfinite(preds.loss):
        out[f"{prefix}_loss"] = preds.loss
    return out


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
    if split not in SPLIT_CHOICES:
        raise ValueError(f"split must be one of {SPLIT_CHOICES}; got {split!r}")
    samples = index.train + index.val + index.test if split == "all" else list(index.split(split))
    return cap_split(samples, max_images, seed) if max_images else samples


def scan_for(trained: TrainedModel, data_dir: str | Path):
    """Scan a data folder/CSV the way the trained model's config would (split seed, grouping, video or image)."""
    cfg = trained.config.with_overrides({"data.data_dir": str(data_dir), "data.max_samples_per_split": None},
                                        "--data_dir")
    return scan_data(cfg)


def eval_loader(trained: TrainedModel, samples: list, *, batch_size: int = 64, num_workers: int = 2,
                wrap_transform: Callable[[Any], Any] | None = None):
    """A loader over `samples` with the model's eval transform (the training code's test loader);
    `wrap_transform(transform)` may replace the per-image transform (e.g. a perturbation before it)."""
    cfg = trained.config.with_overrides({"data.batch_size": batch_size, "data.num_workers": num_workers}, "evaluation")
    index = DataIndex(train=[], val=[], test=list(samples))
    dc = trained.model.data_config
    if is_video(cfg) and wrap_transform is not None:
        raise ValueError("image perturbations (robustness) are not supported for the video model")
    loader = make_loaders(index, cfg, dc["mean"], dc["std"], device_type=trained.device.type)["test"]
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
