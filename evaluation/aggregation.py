"""Group-level (video / identity) scores from frame-level predictions.

Rules (registered in AGGREGATORS, each a factory returning ``f(scores) -> float``):
- mean: average frame P(fake) (the default);
- median: robust to a few wild frames;
- max: the most suspicious frame decides (high recall, more false alarms on long videos);
- confident: average only the "confident" frames, those with ``|s - 0.5| >= margin`` (default
  margin 0.3, i.e. s <= 0.2 or s >= 0.8); a group with no confident frame falls back to the mean
  of all its frames. Frames the model is unsure about (blur, profile views, occlusion) then do
  not dilute the decisive ones.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pandas as pd

from evaluation.metrics import MetricError
from core.registry import Registry

log = logging.getLogger(__name__)

Aggregator = Callable[[np.ndarray], float]
AGGREGATORS: Registry[Aggregator] = Registry("video aggregator")


@AGGREGATORS.register("mean")
def mean_aggregator() -> Aggregator:
    return lambda s: float(np.mean(s))


@AGGREGATORS.register("median")
def median_aggregator() -> Aggregator:
    return lambda s: float(np.median(s))


@AGGREGATORS.register("max")
def max_aggregator() -> Aggregator:
    return lambda s: float(np.max(s))


@AGGREGATORS.register("confident")
def confident_aggregator(margin: float = 0.3) -> Aggregator:
    """Mean of frames with |s - 0.5| >= margin; mean of all frames when none qualifies."""
    if not 0.0 <= margin <= 0.5:
        raise ValueError(f"confident aggregator margin must be in [0, 0.5]; got {margin}")

    def aggregate(s: np.ndarray) -> float:
        s = np.asarray(s, dtype=np.float64)
        keep = np.abs(s - 0.5) >= margin
        return float(np.mean(s[keep]) if keep.any() else np.mean(s))

    return aggregate


def _vectorised(rule: str, frames: pd.DataFrame, margin: float) -> pd.Series:
    """Fast groupby path for the registered rules (same results as the callables)."""
    g = frames.groupby("group", sort=True)["score"]
    if rule in ("mean", "median", "max"):
        return g.agg(rule)
    keep = (frames["score"] - 0.5).abs() >= margin
    kept = frames["score"].where(keep)
    confident = kept.groupby(frames["group"], sort=True).mean()  # NaN when no frame qualifies
    return confident.fillna(g.mean())


def aggregate_groups(df: pd.DataFrame, rule: str = "mean", margin: float = 0.3) -> pd.DataFrame:
    """Per-group rows (group, label, score, n_frames[, subset]) from a frame prediction table.

    Frames without a group (None/NaN) each form their own group keyed by their path. Every group
    must hold a single label, otherwise MetricError names the conflicting groups.
    """
    for col in ("label", "score", "group"):
        if col not in df.columns:
            raise MetricError(f"aggregate_groups needs a {col!r} column; got {list(df.columns)}")
    aggregate = AGGREGATORS.create(rule, **({"margin": margin} if rule == "confident" else {}))
    frames = df.copy()
    missing = frames["group"].isna()
    if missing.any():
        fallback = frames["path"] if "path" in frames.columns else frames.index.to_series()
        frames.loc[missing, "group"] = fallback[missing].astype(str)
    frames["group"] = frames["group"].astype(str)

    n_labels = frames.groupby("group")["label"].nunique()
    conflicting = n_labels.index[n_labels > 1].tolist()
    if conflicting:
        shown = ", ".join(conflicting[:5]) + (" ..." if len(conflicting) > 5 else "")
        raise MetricError(f"{len(conflicting)} group(s) mix real and fake frames: {shown}")

    if rule in ("mean", "median", "max", "confident"):
        scores = _vectorised(rule, frames, margin)
    else:  # a rule registered elsewhere: apply its callable per group
        scores = frames.groupby("group", sort=True)["score"].agg(lambda s: aggregate(s.to_numpy()))
    grouped = frames.groupby("group", sort=True)
    out = pd.DataFrame({
        "group": scores.index,
        "label": grouped["label"].first().to_numpy().astype(int),
        "score": scores.to_numpy(dtype=np.float64),
        "n_frames": grouped.size().to_numpy(),
    })
    if "subset" in frames.columns:
        out["subset"] = grouped["subset"].first().to_numpy()
    log.debug("aggregated rule=%s frames=%d groups=%d", rule, len(frames), len(out))
    return out
