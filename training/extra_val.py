"""Cross-dataset model selection: the `data.extra_val` sets scored every epoch next to the run's own val split.

Each extra set is scanned and split as the run's own data would be (same split fractions and seed) and read
with the run's preprocessing (face crop, image size, normalisation). Its val split is scored every epoch
(`val_<name>_auc`, `val_<name>_ap`; `val_extra_mean_auc` over the sets, `val_mean_auc` with the run's own
val_auc): train.monitor may be any of them, so early stopping, the best checkpoint, sweeps and ensembles
can select for generalisation. Its test split, never used for selection, is scored once with the kept
weights at the end (`test_<name>_auc`, predictions/test_<name>.parquet).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from core.config import EXTRA_VAL_METRICS, Config

log = logging.getLogger(__name__)


@dataclass
class ExtraSet:
    name: str
    path: str
    index: object  # dataio.data.DataIndex with an empty train split
    loaders: dict  # "val" and (when non-empty) "test"


def build_extra_sets(cfg: Config, mean: Sequence[float], std: Sequence[float], device_type: str) -> list[ExtraSet]:
    """Scan and load every data.extra_val set (val + test splits only)."""
    from dataio.data import DataError, DataIndex, scan
    from dataio.loaders import build_loaders

    out = []
    for name, path in cfg.data.extra_val_sets:
        data_cfg = cfg.data.model_copy(update={"data_dir": path})
        try:
            full = scan(data_cfg, cfg.train.seed)
        except DataError as e:
            raise DataError(f"data.extra_val {name}={path}: {e}") from None
        index = DataIndex(train=[], val=full.val, test=full.test, skipped=full.skipped, source=full.source,
                          digest=full.digest)
        ecfg = cfg.with_overrides({"data.data_dir": path}, f"data.extra_val {name}")
        loaders = build_loaders(index, ecfg, mean, std, device_type=device_type)
        log.info("event=extra_val name=%s data=%s val=%d test=%d", name, path, len(index.val), len(index.test))
        out.append(ExtraSet(name, path, index, loaders))
    return out


def score_extra(trainer, split: str) -> tuple[dict[str, float], dict[str, pd.DataFrame]]:
    """{split}_<name>_auc/_ap for every extra set (plus the means on val) and each set's predictions table."""
    from evaluation.inference import predict, predictions_table
    from evaluation.metrics import MetricError, binary_metrics

    metrics: dict[str, float] = {}
    tables: dict[str, pd.DataFrame] = {}
    for extra in trainer.extra_sets:
        if split not in extra.loaders:
            continue
        preds = predict(trainer.eval_model, extra.loaders[split], trainer.device, channels_last=trainer.channels_last,
                        amp=trainer.amp, tta=trainer.cfg.train.use_tta, desc=f"{split}_{extra.name}")
        tables[extra.name] = predictions_table(preds, extra.index.split(split))
        try:
            m = binary_metrics(preds.labels, preds.scores)
        except MetricError as e:
            log.warning("event=extra_val_nan name=%s split=%s reason=%s", extra.name, split, e)
            m = {k: float("nan") for k in EXTRA_VAL_METRICS}
        metrics.update({f"{split}_{extra.name}_{k}": float(m[k]) for k in EXTRA_VAL_METRICS})
    return metrics, tables


def add_means(row: dict[str, float], names: Sequence[str]) -> None:
    """val_extra_mean_<m> over the extra sets and val_mean_<m> over them and the run's own val split."""
    if not names:
        return
    for m in EXTRA_VAL_METRICS:
        extra = [row[f"val_{n}_{m}"] for n in names]
        row[f"val_extra_mean_{m}"] = float(np.mean(extra))
        row[f"val_mean_{m}"] = float(np.mean(extra + [row.get(f"val_{m}", np.nan)]))
