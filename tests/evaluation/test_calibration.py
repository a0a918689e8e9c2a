"""Temperature scaling and reliability data."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from evaluation.calibration import (
    TemperatureScaler, apply_temperature, calibration_report, fit_temperature, logits_from_scores,
    reliability_data, sigmoid,
)
from evaluation.metrics import MetricError, binary_metrics


def _synthetic(scale: float, n: int = 20_000, seed: int = 0):
    """Labels drawn from sigmoid(true logits); the model reports scale * true logits."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(0.0, 2.0, n)
    labels = (rng.random(n) < sigmoid(true_logits)).astype(int)
    return scale * true_logits, labels


def test_temperature_fixes_overconfident_model():
    logits, labels = _synthetic(5.0)
    t = fit_temperature(logits, labels)
    assert 4.0 < t < 6.0  # the true miscalibration factor is 5
    before, after = sigmoid(logits), apply_temperature(logits, t)
    assert log_loss(labels, after) < log_loss(labels, before) - 0.1
    assert roc_auc_score(labels, after) == pytest.approx(roc_auc_score(labels, before), abs=1e-12)
    rep = calibration_report(logits, labels, t)
    assert rep["ece_after"] < rep["ece_before"] / 3
    assert rep["log_loss_after"] < rep["log_loss_before"] and rep["brier_after"] < rep["brier_before"]
    assert rep["temperature"] == t


def test_temperature_sharpens_underconfident_model():
    logits, labels = _synthetic(0.3)
    assert fit_temperature(logits, labels) < 0.5


def test_fitted_temperature_is_the_nll_minimum():
    logits, labels = _synthetic(2.0, n=3000, seed=1)
    t = fit_temperature(logits, labels)
    grid = np.exp(np.linspace(np.log(0.2), np.log(10), 400))
    nll = [log_loss(labels, apply_temperature(logits, g)) for g in grid]
    assert log_loss(labels, apply_temperature(logits, t)) <= min(nll) + 1e-9
    assert abs(np.log(t) - np.log(grid[int(np.argmin(nll))])) < 0.02


def test_apply_temperature_stable_and_validated():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow in exp
        p = apply_temperature(np.array([-1000.0, 0.0, 1000.0]), 1.0)
    assert p.tolist() == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="> 0"):
        apply_temperature([0.0], 0.0)
    s = np.array([0.01, 0.3, 0.5, 0.97])
    assert sigmoid(logits_from_scores(s)) == pytest.approx(s)


def test_one_class_and_bad_input_raise():
    with pytest.raises(MetricError, match="got only fake"):
        fit_temperature([1.0, 2.0], [1, 1])
    with pytest.raises(MetricError, match="differ in length"):
        fit_temperature([1.0, 2.0, 3.0], [0, 1])
    with pytest.raises(MetricError, match="finite"):
        fit_temperature([1.0, np.nan], [0, 1])


def test_scaler_roundtrip(tmp_path):
    logits, labels = _synthetic(3.0, n=2000)
    scaler = TemperatureScaler().fit(logits, labels)
    loaded = TemperatureScaler.load(scaler.save(tmp_path / "calibration.json"))
    assert loaded == scaler and loaded.n_fit == 2000
    assert loaded.transform(logits) == pytest.approx(apply_temperature(logits, scaler.temperature))


def test_reliability_data_consistent_with_ece():
    rng = np.random.default_rng(2)
    s = rng.random(500) * 0.5  # upper bins stay empty
    y = (rng.random(500) < s).astype(int)
    rel = reliability_data(y, s)
    assert len(rel) == 15 and rel["count"].sum() == 500
    assert rel["bin_center"].iloc[0] == pytest.approx(1 / 30)
    empty = rel[rel["count"] == 0]
    assert len(empty) >= 6 and empty["accuracy"].isna().all()
    full = rel[rel["count"] > 0]
    ece = np.sum(full["count"] / 500 * (full["accuracy"] - full["confidence"]).abs())
    assert ece == pytest.approx(binary_metrics(y, s)["ece"])
    first = (s > 0) & (s <= 1 / 15)
    assert full["accuracy"].iloc[0] == pytest.approx(y[first].mean())
    assert full["confidence"].iloc[0] == pytest.approx(s[first].mean())
