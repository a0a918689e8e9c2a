"""Temperature scaling for 1-logit detectors and before/after calibration summaries.

A 2-output model is handled through its logit difference (z1 - z0), for which
``softmax(z / T)[:, 1] == sigmoid((z1 - z0) / T)``; training writes that difference as `logit`.
T is fitted on validation by minimising the mean binary NLL over log T (bounded Brent search,
scipy); T > 1 softens an over-confident model, T < 1 sharpens an under-confident one. Dividing
by a positive T is monotone, so rankings (AUC, AP, EER) never change.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy.optimize import minimize_scalar
from sklearn.metrics import brier_score_loss, log_loss

from evaluation.metrics import (
    N_BINS, MetricError, as_label_score, calibration_bins, calibration_errors, require_both_classes,
)

log = logging.getLogger(__name__)

LOG_T_BOUNDS = (np.log(1e-2), np.log(1e2))
_EPS = 1e-7


def sigmoid(z: ArrayLike) -> np.ndarray:
    """Numerically stable logistic function."""
    z = np.asarray(z, dtype=np.float64)
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


def logits_from_scores(scores: ArrayLike) -> np.ndarray:
    """log(s / (1 - s)) with s clipped to [1e-7, 1 - 1e-7] (for tables without a logit column)."""
    s = np.clip(np.asarray(scores, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.log(s) - np.log1p(-s)


def _nll(z: np.ndarray, y: np.ndarray) -> float:
    """Mean BCE of sigmoid(z) against y, computed on logits (no clipping)."""
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def _validated(logits: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if z.shape != y.shape:
        raise MetricError(f"temperature: logits and labels differ in length ({z.size} vs {y.size})")
    if z.size == 0 or not np.all(np.isfinite(z)):
        raise MetricError(f"temperature: logits must be finite and non-empty (n={z.size})")
    y, _ = as_label_score(y, np.full(z.shape, 0.5), "temperature")
    require_both_classes(y, "temperature scaling")
    return z, y.astype(np.float64)


def fit_temperature(logits: ArrayLike, labels: ArrayLike) -> float:
    """Temperature T minimising the validation NLL of sigmoid(logit / T), T in [0.01, 100]."""
    z, y = _validated(logits, labels)
    res = minimize_scalar(lambda lt: _nll(z / np.exp(lt), y), bounds=LOG_T_BOUNDS,
                          method="bounded", options={"xatol": 1e-6})
    temperature = float(np.exp(res.x))
    if min(abs(res.x - b) for b in LOG_T_BOUNDS) < 1e-3:
        log.warning("temperature=%.4g hit its search bound (separable or degenerate validation logits)",
                    temperature)
    log.debug("temperature=%.4f nll_before=%.4f nll_after=%.4f", temperature, _nll(z, y), res.fun)
    return temperature


def apply_temperature(logits: ArrayLike, temperature: float) -> np.ndarray:
    """Calibrated P(fake) = sigmoid(logit / T)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    return sigmoid(np.asarray(logits, dtype=np.float64) / temperature)


@dataclass
class TemperatureScaler:
    """Fitted temperature; `save`/`load` as JSON so later predictions of a run reuse it."""

    temperature: float = 1.0
    fitted_on: str = "val"
    n_fit: int = 0

    def fit(self, logits: ArrayLike, labels: ArrayLike) -> "TemperatureScaler":
        self.temperature = fit_temperature(logits, labels)
        self.n_fit = int(np.asarray(labels).size)
        return self

    def transform(self, logits: ArrayLike) -> np.ndarray:
        return apply_temperature(logits, self.temperature)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps({"method": "temperature", **asdict(self)}, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TemperatureScaler":
        data = json.loads(Path(path).read_text())
        return cls(float(data["temperature"]), str(data.get("fitted_on", "val")), int(data.get("n_fit", 0)))


def calibration_summary(labels: ArrayLike, scores: ArrayLike, n_bins: int = N_BINS) -> dict[str, float]:
    """ece, mce, ace, log_loss (the NLL) and brier of one set of probabilities."""
    y, s = as_label_score(labels, scores, "calibration")
    ece, mce = calibration_errors(y, s, n_bins, "uniform")
    ace, _ = calibration_errors(y, s, n_bins, "quantile")
    return {"ece": ece, "mce": mce, "ace": ace, "log_loss": float(log_loss(y, s, labels=[0, 1])),
            "brier": float(brier_score_loss(y, s))}


def calibration_report(logits: ArrayLike, labels: ArrayLike, temperature: float) -> dict[str, float]:
    """Before/after temperature scaling: {ece,mce,ace,log_loss,brier}_{before,after} + temperature."""
    z = np.asarray(logits, dtype=np.float64)
    before = calibration_summary(labels, sigmoid(z))
    after = calibration_summary(labels, apply_temperature(z, temperature))
    out = {f"{k}_before": v for k, v in before.items()}
    out.update({f"{k}_after": v for k, v in after.items()})
    out["temperature"] = float(temperature)
    return out


def reliability_data(labels: ArrayLike, scores: ArrayLike, n_bins: int = N_BINS) -> pd.DataFrame:
    """Equal-width reliability bins: bin_low, bin_high, bin_center, confidence (mean P(fake)),
    accuracy (observed fake rate) and count; empty bins keep count 0 and NaN means."""
    b = calibration_bins(labels, scores, n_bins, "uniform")
    return pd.DataFrame({
        "bin_low": b["low"], "bin_high": b["high"], "bin_center": (b["low"] + b["high"]) / 2.0,
        "confidence": b["confidence"], "accuracy": b["accuracy"], "count": b["count"].astype(int),
    })
