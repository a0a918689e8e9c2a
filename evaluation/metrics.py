"""Binary detection metrics from (label, score) arrays: label 1 = fake, score = P(fake).

`binary_metrics` runs every epoch, so it is one pass of scikit-learn calls plus a few numpy
reductions; bootstrap intervals live in `bootstrap_ci` (vectorised, used at the end of a run).

Conventions used everywhere in evaluation/:
- a sample is predicted fake when ``score >= threshold``;
- calibration errors (ECE/MCE/ACE) are for the positive class: scores are binned by P(fake) and
  each bin's mean score ("confidence") is compared with its observed fake rate ("accuracy"),
  i.e. the binary reliability diagram of sklearn's ``calibration_curve``. Equal-width bins are
  right-closed ``(lo, hi]`` with 0 in the first bin; ECE/ACE weight each bin by its sample count.
"""
from __future__ import annotations

import logging
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)
from core.errors import UserError

log = logging.getLogger(__name__)

CLASS_NAMES = {0: "real", 1: "fake"}
N_BINS = 15
_BOOT_CELLS = 4_000_000  # resamples x samples held in memory at once by bootstrap_ci


class MetricError(UserError):
    """A metric cannot be computed from this input (one class only, NaN scores, ...)."""


def as_label_score(labels: ArrayLike, scores: ArrayLike, what: str = "metrics") -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to (int64 labels in {0,1}, float64 scores in [0,1]) of equal length."""
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise MetricError(f"{what}: labels and scores differ in length ({y.size} vs {s.size})")
    if y.size == 0:
        raise MetricError(f"{what} needs both real and fake samples; got no samples (n=0)")
    bad = ~np.isfinite(s)
    if bad.any():
        raise MetricError(f"{what}: {int(bad.sum())} of {s.size} scores are NaN or infinite")
    if s.min() < 0.0 or s.max() > 1.0:
        raise MetricError(f"{what}: scores must be probabilities in [0, 1]; got range [{s.min():.4g}, {s.max():.4g}]")
    if not np.isin(y, (0, 1)).all():
        raise MetricError(f"{what}: labels must be 0 (real) or 1 (fake); got values {sorted(set(y.tolist()))[:5]}")
    return y.astype(np.int64), s


def require_both_classes(y: np.ndarray, what: str = "metrics") -> None:
    """Raise MetricError naming the single class present when `y` holds only one class."""
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        only = CLASS_NAMES[int(y[0])]
        raise MetricError(f"{what} needs both real and fake samples; got only {only} (n={y.size})")


# --------------------------------------------------------------------------- calibration bins
def calibration_bins(
    labels: ArrayLike, scores: ArrayLike, n_bins: int = N_BINS,
    strategy: Literal["uniform", "quantile"] = "uniform",
) -> dict[str, np.ndarray]:
    """Per-bin low/high edges, count, mean score (confidence) and fake rate (accuracy).

    uniform: ``n_bins`` equal-width right-closed bins over [0, 1] (empty bins have count 0 and NaN
    means). quantile: equal-mass bins over the sorted scores (ties may be split between bins).
    """
    y, s = as_label_score(labels, scores, "calibration")
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        idx = np.searchsorted(edges[1:-1], s, side="left")  # (lo, hi], 0 -> bin 0
        count = np.bincount(idx, minlength=n_bins).astype(np.float64)
        sum_s = np.bincount(idx, weights=s, minlength=n_bins)
        sum_y = np.bincount(idx, weights=y, minlength=n_bins)
        low, high = edges[:-1], edges[1:]
    elif strategy == "quantile":
        order = np.argsort(s, kind="stable")
        chunks = [c for c in np.array_split(order, min(n_bins, s.size)) if c.size]
        count = np.array([c.size for c in chunks], dtype=np.float64)
        sum_s = np.array([s[c].sum() for c in chunks])
        sum_y = np.array([y[c].sum() for c in chunks], dtype=np.float64)
        low = np.array([s[c].min() for c in chunks])
        high = np.array([s[c].max() for c in chunks])
    else:
        raise ValueError(f"unknown binning strategy {strategy!r}; valid: uniform, quantile")
    with np.errstate(invalid="ignore", divide="ignore"):
        conf, acc = sum_s / count, sum_y / count
    return {"low": low, "high": high, "count": count, "confidence": conf, "accuracy": acc}


def calibration_errors(
    labels: ArrayLike, scores: ArrayLike, n_bins: int = N_BINS,
    strategy: Literal["uniform", "quantile"] = "uniform",
) -> tuple[float, float]:
    """(expected, maximum) calibration error over the bins of `calibration_bins`."""
    b = calibration_bins(labels, scores, n_bins, strategy)
    full = b["count"] > 0
    gap = np.abs(b["accuracy"][full] - b["confidence"][full])
    return float(np.sum(gap * b["count"][full]) / b["count"].sum()), float(gap.max())


# --------------------------------------------------------------------------- ROC-derived metrics
def eer_from_roc(fpr: np.ndarray, tpr: np.ndarray, thresholds: np.ndarray) -> tuple[float, float]:
    """Equal error rate and its threshold from a full ROC curve (``drop_intermediate=False``).

    The EER is where FPR = FNR on the piecewise-linear ROC, interpolated between the two ROC points
    that straddle the crossing; the threshold is that of the first point with FNR <= FPR (so
    ``score >= threshold`` reaches the crossing). Infinite thresholds become just above 1.
    """
    diff = fpr - (1.0 - tpr)  # rises from -1 (nothing flagged) to +1 (everything flagged)
    i = int(np.argmax(diff >= 0.0))
    if i == 0 or diff[i] == 0.0:
        eer = float(fpr[i])
    else:
        t = -diff[i - 1] / (diff[i] - diff[i - 1])
        eer = float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))
    thr = float(thresholds[i]) if np.isfinite(thresholds[i]) else float(np.nextafter(1.0, 2.0))
    return eer, thr


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Highest TPR among ROC operating points with FPR <= target (no interpolation)."""
    ok = fpr <= target + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def full_roc(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """sklearn roc_curve keeping every threshold (needed for exact EER / TPR@FPR)."""
    return roc_curve(y, s, drop_intermediate=False)


def confusion_counts(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, int]:
    """tn, fp, fn, tp for the rule ``score >= threshold`` -> fake."""
    pred = s >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    return {"tn": int(y.size - tp - fp - fn), "fp": fp, "fn": fn, "tp": tp}


def binary_metrics(labels: ArrayLike, scores: ArrayLike, threshold: float = 0.5) -> dict[str, float]:
    """All per-split detection metrics; raises MetricError for one-class or invalid input.

    Keys: accuracy, precision, recall, f1 (at `threshold`), auc, ap, eer, eer_threshold,
    tpr_at_fpr_1pct, tpr_at_fpr_0.1pct, log_loss, brier, ece, mce (15 equal-width bins),
    ace (15 equal-mass bins), n, n_pos.
    """
    y, s = as_label_score(labels, scores, "binary_metrics")
    require_both_classes(y, "binary_metrics")
    pred = (s >= threshold).astype(np.int64)
    precision, recall, f1, _ = precision_recall_fscore_support(
        y, pred, average="binary", zero_division=0)
    fpr, tpr, thr = full_roc(y, s)
    eer, eer_thr = eer_from_roc(fpr, tpr, thr)
    ece, mce = calibration_errors(y, s, N_BINS, "uniform")
    ace, _ = calibration_errors(y, s, N_BINS, "quantile")
    return {
        "accuracy": float(np.mean(pred == y)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "auc": float(roc_auc_score(y, s)),
        "ap": float(average_precision_score(y, s)),
        "eer": eer,
        "eer_threshold": eer_thr,
        "tpr_at_fpr_1pct": tpr_at_fpr(fpr, tpr, 0.01),
        "tpr_at_fpr_0.1pct": tpr_at_fpr(fpr, tpr, 0.001),
        "log_loss": float(log_loss(y, s, labels=[0, 1])),
        "brier": float(brier_score_loss(y, s)),
        "ece": ece,
        "mce": mce,
        "ace": ace,
        "n": float(y.size),
        "n_pos": float(y.sum()),
    }


# --------------------------------------------------------------------------- bootstrap
def _stratified_counts(rng: np.random.Generator, y: np.ndarray, n_boot: int) -> np.ndarray:
    """(n_boot, n) multiplicities of each sample in stratified bootstrap resamples."""
    counts = np.zeros((n_boot, y.size), dtype=np.float64)
    rows = np.arange(n_boot)[:, None]
    for cls in (0, 1):
        members = np.flatnonzero(y == cls)
        m = members.size
        draw = rng.integers(0, m, size=(n_boot, m)) + rows * m
        counts[:, members] = np.bincount(draw.ravel(), minlength=n_boot * m).reshape(n_boot, m)
    return counts


def _grouped_weights(s: np.ndarray, y: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-resample positive/negative weight at each distinct score, scores ascending."""
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    c = counts[:, order]
    pos = y[order].astype(bool)
    w_pos = np.add.reduceat(np.where(pos, c, 0.0), starts, axis=1)
    w_neg = np.add.reduceat(np.where(pos, 0.0, c), starts, axis=1)
    return w_pos, w_neg


def _auc_from_counts(s: np.ndarray, y: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Weighted ROC AUC (ties count 1/2) for each row of sample multiplicities."""
    w_pos, w_neg = _grouped_weights(s, y, counts)
    neg_below = np.cumsum(w_neg, axis=1) - w_neg
    num = np.sum(w_pos * (neg_below + 0.5 * w_neg), axis=1)
    return num / (w_pos.sum(axis=1) * w_neg.sum(axis=1))


def _ap_from_counts(s: np.ndarray, y: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Weighted average precision (sklearn's step definition) for each row of multiplicities."""
    w_pos, w_neg = _grouped_weights(s, y, counts)
    tp = np.cumsum(w_pos[:, ::-1], axis=1)  # thresholds from the highest score down
    fp = np.cumsum(w_neg[:, ::-1], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.nan_to_num(tp / (tp + fp))
    recall_step = w_pos[:, ::-1] / w_pos.sum(axis=1, keepdims=True)
    return np.sum(recall_step * precision, axis=1)


_BOOT_METRICS = {"auc": _auc_from_counts, "ap": _ap_from_counts}


def bootstrap_distribution(
    labels: ArrayLike, scores: ArrayLike, metric: str = "auc", n_boot: int = 1000, seed: int = 0,
) -> np.ndarray:
    """`metric` ("auc" or "ap") on `n_boot` stratified bootstrap resamples (vectorised, chunked)."""
    if metric not in _BOOT_METRICS:
        raise ValueError(f"bootstrap metric must be one of {sorted(_BOOT_METRICS)}; got {metric!r}")
    y, s = as_label_score(labels, scores, f"bootstrap {metric}")
    require_both_classes(y, f"bootstrap {metric}")
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOT_CELLS // y.size)
    out = [
        _BOOT_METRICS[metric](s, y, _stratified_counts(rng, y, min(chunk, n_boot - start)))
        for start in range(0, n_boot, chunk)
    ]
    values = np.concatenate(out) if out else np.empty(0)
    # Stratified resamples always hold both classes; this only guards degenerate weights.
    return values[np.isfinite(values)]


def bootstrap_ci(
    labels: ArrayLike, scores: ArrayLike, metric: str = "auc", n_boot: int = 1000, seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile (1 - alpha) interval of `metric` over stratified bootstrap resamples."""
    values = bootstrap_distribution(labels, scores, metric, n_boot, seed)
    if values.size == 0:
        raise MetricError(f"bootstrap {metric}: no valid resamples (n_boot={n_boot})")
    low, high = np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)
