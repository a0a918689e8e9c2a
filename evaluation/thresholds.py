"""Operating thresholds chosen on validation and applied unchanged to test.

Every threshold t means "fake when score >= t" (as in evaluation.metrics). Names:
default (0.5), best_f1 (max F1 on val), youden_j (max TPR - FPR), eer (FPR = FNR point),
target_fpr (lowest t whose val FPR <= target, i.e. the highest TPR within the FPR budget).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from sklearn.metrics import precision_recall_curve

from evaluation.metrics import (
    as_label_score, confusion_counts, eer_from_roc, full_roc, require_both_classes,
)

log = logging.getLogger(__name__)

THRESHOLD_NAMES = ("default", "best_f1", "youden_j", "eer", "target_fpr")


def _above_all(s: np.ndarray) -> float:
    """A threshold no score reaches (everything predicted real), finite for JSON."""
    return float(np.nextafter(max(float(s.max()), 1.0), 2.0))


def best_f1_threshold(y: np.ndarray, s: np.ndarray) -> float:
    """Score threshold maximising F1 (the lowest one among ties)."""
    precision, recall, thr = precision_recall_curve(y, s)
    p, r = precision[:-1], recall[:-1]  # the last PR point has no threshold
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return float(thr[int(np.argmax(f1))])


def youden_threshold(fpr: np.ndarray, tpr: np.ndarray, thr: np.ndarray) -> float:
    """Threshold maximising Youden's J = TPR - FPR (the infinite first ROC point is skipped)."""
    return float(thr[1 + int(np.argmax((tpr - fpr)[1:]))])


def target_fpr_threshold(fpr: np.ndarray, thr: np.ndarray, s: np.ndarray, target: float) -> float:
    """Lowest threshold whose FPR stays <= target (max TPR within the budget)."""
    ok = np.flatnonzero(fpr <= target + 1e-12)
    i = int(ok[-1])  # fpr is non-decreasing along the curve
    if i == 0:
        log.warning("target_fpr=%g unreachable on val (top score is a real sample); threshold above all scores",
                    target)
        return _above_all(s)
    return float(thr[i])


def choose_thresholds(val_labels: ArrayLike, val_scores: ArrayLike, target_fpr: float = 0.01) -> dict[str, float]:
    """Thresholds named in THRESHOLD_NAMES, all computed on validation predictions."""
    y, s = as_label_score(val_labels, val_scores, "choose_thresholds")
    require_both_classes(y, "choose_thresholds")
    fpr, tpr, thr = full_roc(y, s)
    out = {
        "default": 0.5,
        "best_f1": best_f1_threshold(y, s),
        "youden_j": youden_threshold(fpr, tpr, thr),
        "eer": eer_from_roc(fpr, tpr, thr)[1],
        "target_fpr": target_fpr_threshold(fpr, thr, s, target_fpr),
    }
    log.info("thresholds %s", " ".join(f"{k}={v:.4f}" for k, v in out.items()))
    return out


def threshold_metrics(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, float]:
    """Confusion counts and rates at one threshold (zero_division -> 0)."""
    c = confusion_counts(y, s, threshold)
    tp, fp, fn, tn = c["tp"], c["fp"], c["fn"], c["tn"]
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "threshold": float(threshold), "accuracy": (tp + tn) / y.size, "precision": precision,
        "recall": recall, "f1": f1, "fpr": fp / (fp + tn) if fp + tn else 0.0,
        "fnr": fn / (fn + tp) if fn + tp else 0.0, "tn": tn, "fp": fp, "fn": fn, "tp": tp,
    }


def apply_thresholds(test_labels: ArrayLike, test_scores: ArrayLike, thresholds: Mapping[str, float]) -> pd.DataFrame:
    """One row per named threshold: threshold, accuracy, precision, recall, f1, fpr, fnr, counts."""
    y, s = as_label_score(test_labels, test_scores, "apply_thresholds")
    rows = {name: threshold_metrics(y, s, t) for name, t in thresholds.items()}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("name")


def threshold_sweep(labels: ArrayLike, scores: ArrayLike, n_points: int = 101) -> pd.DataFrame:
    """precision, recall, f1 and fpr on a regular grid of thresholds in [0, 1] (for plots)."""
    y, s = as_label_score(labels, scores, "threshold_sweep")
    grid = np.linspace(0.0, 1.0, n_points)
    order = np.sort(s)
    n_flagged = s.size - np.searchsorted(order, grid, side="left")  # count of s >= t
    pos_sorted = np.sort(s[y == 1])
    tp = pos_sorted.size - np.searchsorted(pos_sorted, grid, side="left")
    fp = n_flagged - tp
    n_pos, n_neg = pos_sorted.size, s.size - pos_sorted.size
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(n_flagged > 0, tp / np.maximum(n_flagged, 1), 0.0)
        recall = tp / n_pos if n_pos else np.zeros_like(grid)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        fpr = fp / n_neg if n_neg else np.zeros_like(grid)
    return pd.DataFrame({"threshold": grid, "precision": precision, "recall": recall, "f1": f1, "fpr": fpr})
