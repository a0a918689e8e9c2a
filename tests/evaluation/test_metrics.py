"""Metrics, thresholds and group aggregation against scikit-learn and hand-computed references."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    average_precision_score, brier_score_loss, confusion_matrix, f1_score, log_loss,
    precision_recall_fscore_support, roc_auc_score,
)

from evaluation import metrics as M
from evaluation.aggregation import AGGREGATORS, aggregate_groups
from evaluation.metrics import MetricError, binary_metrics, bootstrap_ci
from evaluation.thresholds import apply_thresholds, choose_thresholds, threshold_sweep
from core.registry import UnknownNameError

# Fixed arrays with ties across classes (0.4, 0.7) and inside a class (0.9).
LABELS = np.array([0, 0, 0, 0, 1, 0, 1, 1, 1, 0, 1, 1])
SCORES = np.array([0.05, 0.2, 0.4, 0.4, 0.4, 0.7, 0.7, 0.9, 0.9, 0.55, 0.3, 1.0])


def _ref_calibration(y, s, n_bins=15):
    """Straightforward loop: (lo, hi] equal-width bins, 0 in the first; count-weighted |acc - conf|."""
    edges = np.linspace(0, 1, n_bins + 1)
    ece, mce = 0.0, 0.0
    for b in range(n_bins):
        lo, hi = edges[b], edges[b + 1]
        in_bin = [(yi, si) for yi, si in zip(y, s) if (lo < si <= hi) or (b == 0 and si == 0.0)]
        if not in_bin:
            continue
        acc = sum(yi for yi, _ in in_bin) / len(in_bin)
        conf = sum(si for _, si in in_bin) / len(in_bin)
        ece += len(in_bin) / len(y) * abs(acc - conf)
        mce = max(mce, abs(acc - conf))
    return ece, mce


def _ref_ace(y, s, n_bins=15):
    order = sorted(range(len(s)), key=lambda i: s[i])
    total = 0.0
    for chunk in np.array_split(np.array(order), n_bins):
        if len(chunk):
            total += len(chunk) / len(s) * abs(np.mean(y[chunk]) - np.mean(s[chunk]))
    return total


def _brute_tpr_at_fpr(y, s, target):
    best = 0.0
    for t in np.r_[np.unique(s), np.inf]:
        pred = s >= t
        fpr = np.sum(pred & (y == 0)) / np.sum(y == 0)
        if fpr <= target:
            best = max(best, np.sum(pred & (y == 1)) / np.sum(y == 1))
    return best


# ----------------------------------------------------------------------------- binary_metrics
@pytest.mark.parametrize("threshold", [0.5, 0.4, 0.7])
def test_binary_metrics_match_sklearn_with_ties(threshold):
    m = binary_metrics(LABELS, SCORES, threshold)
    pred = (SCORES >= threshold).astype(int)
    p, r, f, _ = precision_recall_fscore_support(LABELS, pred, average="binary", zero_division=0)
    assert m["accuracy"] == pytest.approx(np.mean(pred == LABELS))
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((p, r, f))
    assert m["auc"] == pytest.approx(roc_auc_score(LABELS, SCORES))
    assert m["ap"] == pytest.approx(average_precision_score(LABELS, SCORES))
    assert m["log_loss"] == pytest.approx(log_loss(LABELS, SCORES))
    assert m["brier"] == pytest.approx(brier_score_loss(LABELS, SCORES))
    assert (m["n"], m["n_pos"]) == (12, 6)


def test_auc_by_hand_counts_ties_as_half():
    # pairs (pos, neg): 36; pos 0.4 vs neg {0.05,0.2} wins 2, ties 2 (0.4,0.4) ...
    pos, neg = SCORES[LABELS == 1], SCORES[LABELS == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    assert binary_metrics(LABELS, SCORES)["auc"] == pytest.approx(wins / 36)


def test_calibration_errors_match_reference_including_bin_edges():
    rng = np.random.default_rng(3)
    s = np.r_[rng.random(300), 0.0, 1.0, np.linspace(0, 1, 16)[1:-1]]  # exact edges included
    y = (rng.random(s.size) < s).astype(int)
    m = binary_metrics(y, s)
    ece, mce = _ref_calibration(y, s)
    assert m["ece"] == pytest.approx(ece, abs=1e-12)
    assert m["mce"] == pytest.approx(mce, abs=1e-12)
    assert m["ace"] == pytest.approx(_ref_ace(y, s), abs=1e-12)


def test_perfectly_calibrated_bins_give_zero_ece():
    s = np.repeat([0.1, 0.5, 0.9], 10)
    y = np.r_[[1] + [0] * 9, [1] * 5 + [0] * 5, [1] * 9 + [0]]
    assert binary_metrics(y, s)["ece"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("scores, labels, eer, thr", [
    ([0.1, 0.6, 0.4, 0.9], [0, 0, 1, 1], 0.5, 0.6),                 # exact crossing at a ROC point
    ([0.2, 0.3, 0.6, 0.5, 0.7], [0, 0, 0, 1, 1], 1 / 3, 0.5),       # crossing on a vertical segment
    ([0.2, 0.5, 0.5, 0.8], [0, 0, 1, 1], 0.25, 0.5),                # tie -> diagonal segment, interpolated
    ([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], 0.0, 0.8),                 # separable
])
def test_eer_hand_cases(scores, labels, eer, thr):
    m = binary_metrics(labels, scores)
    assert m["eer"] == pytest.approx(eer)
    assert m["eer_threshold"] == pytest.approx(thr)


def test_all_equal_scores():
    y = np.array([0, 1, 0, 1, 1])
    m = binary_metrics(y, np.full(5, 0.5))
    assert m["auc"] == pytest.approx(0.5)
    assert m["ap"] == pytest.approx(0.6)  # prevalence
    assert m["eer"] == pytest.approx(0.5)
    assert m["accuracy"] == pytest.approx(0.6)  # score >= 0.5 -> all fake
    assert m["tpr_at_fpr_1pct"] == 0.0
    assert all(math.isfinite(v) for v in m.values())


def test_tpr_at_fpr_matches_brute_force():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    s = np.round(1 / (1 + np.exp(-(2 * y - 1) - rng.normal(0, 1, 2000))), 2)  # many ties
    m = binary_metrics(y, s)
    assert m["tpr_at_fpr_1pct"] == pytest.approx(_brute_tpr_at_fpr(y, s, 0.01))
    assert m["tpr_at_fpr_0.1pct"] == pytest.approx(_brute_tpr_at_fpr(y, s, 0.001))


@pytest.mark.parametrize("labels, only", [([1, 1, 1], "fake"), ([0, 0], "real")])
def test_one_class_raises_clear_error(labels, only):
    with pytest.raises(MetricError, match=rf"needs both real and fake samples; got only {only} \(n={len(labels)}\)"):
        binary_metrics(labels, np.linspace(0.1, 0.9, len(labels)))


@pytest.mark.parametrize("labels, scores, match", [
    ([0, 1], [0.2, np.nan], "NaN"),
    ([0, 1], [0.2, 1.5], r"\[0, 1\]"),
    ([0, 1, 1], [0.2, 0.3], "differ in length"),
    ([0, 2], [0.2, 0.3], "labels must be 0"),
    ([], [], "n=0"),
])
def test_invalid_input_raises(labels, scores, match):
    with pytest.raises(MetricError, match=match):
        binary_metrics(labels, scores)


# ----------------------------------------------------------------------------- bootstrap
def test_vectorised_bootstrap_metrics_match_sklearn_sample_weights():
    rng = np.random.default_rng(1)
    y, s = LABELS, SCORES
    counts = M._stratified_counts(rng, y, 25)
    assert np.all(counts[:, y == 1].sum(axis=1) == 6) and np.all(counts[:, y == 0].sum(axis=1) == 6)
    auc, ap = M._auc_from_counts(s, y, counts), M._ap_from_counts(s, y, counts)
    for b in range(25):
        assert auc[b] == pytest.approx(roc_auc_score(y, s, sample_weight=counts[b]))
        assert ap[b] == pytest.approx(average_precision_score(y, s, sample_weight=counts[b]))


def test_bootstrap_ci_brackets_estimate_and_is_seeded(monkeypatch):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    s = 1 / (1 + np.exp(-(2 * y - 1) * 1.0 - rng.normal(0, 1.5, 2000)))
    for metric in ("auc", "ap"):
        low, high = bootstrap_ci(y, s, metric, n_boot=500, seed=7)
        point = binary_metrics(y, s)[metric]
        assert low < point < high and high - low < 0.1
        assert (low, high) == bootstrap_ci(y, s, metric, n_boot=500, seed=7)
    monkeypatch.setattr(M, "_BOOT_CELLS", 2000 * 64)  # force several chunks
    dist = M.bootstrap_distribution(y, s, "auc", n_boot=300, seed=1)
    assert dist.shape == (300,) and np.all((dist > 0.5) & (dist < 1))


def test_bootstrap_validates_input():
    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, 2000), rng.random(2000)
    with pytest.raises(MetricError, match="got only real"):
        bootstrap_ci([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="auc"):
        bootstrap_ci(y, s, "f1")


# ----------------------------------------------------------------------------- thresholds
def _val_case(seed=0, n=600):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = np.round(1 / (1 + np.exp(-(2 * y - 1) * 1.2 - rng.normal(0, 1.3, n))), 3)
    return y, s


def test_choose_thresholds_optimality_on_val():
    y, s = _val_case()
    thr = choose_thresholds(y, s, target_fpr=0.05)
    assert set(thr) == {"default", "best_f1", "youden_j", "eer", "target_fpr"} and thr["default"] == 0.5
    candidates = np.unique(s)
    f1s = [f1_score(y, s >= t, zero_division=0) for t in candidates]
    assert f1_score(y, s >= thr["best_f1"]) == pytest.approx(max(f1s))

    def rates(t):
        pred = s >= t
        return np.mean(pred[y == 0]), np.mean(pred[y == 1])

    js = [rates(t)[1] - rates(t)[0] for t in candidates]
    fpr_j, tpr_j = rates(thr["youden_j"])
    assert tpr_j - fpr_j == pytest.approx(max(js))
    fpr_t, _ = rates(thr["target_fpr"])
    assert fpr_t <= 0.05
    lower = candidates[candidates < thr["target_fpr"]]
    assert rates(lower.max())[0] > 0.05  # the next lower threshold breaks the budget: it is the lowest
    assert thr["eer"] == binary_metrics(y, s)["eer_threshold"]


def test_target_fpr_unreachable_gives_threshold_above_all_scores():
    y = np.array([0, 1, 1, 0])
    s = np.array([0.99, 0.6, 0.5, 0.1])  # the top score is real: any flag costs FPR 0.5
    thr = choose_thresholds(y, s, target_fpr=0.01)["target_fpr"]
    assert thr > s.max() and math.isfinite(thr)


def test_apply_thresholds_matches_confusion_matrix():
    y_val, s_val = _val_case(1)
    y, s = _val_case(2)
    thr = choose_thresholds(y_val, s_val)
    table = apply_thresholds(y, s, thr)
    assert list(table.index) == list(thr)
    for name, t in thr.items():
        tn, fp, fn, tp = confusion_matrix(y, (s >= t).astype(int), labels=[0, 1]).ravel()
        p, r, f, _ = precision_recall_fscore_support(y, s >= t, average="binary", zero_division=0)
        row = table.loc[name]
        assert (row["tn"], row["fp"], row["fn"], row["tp"]) == (tn, fp, fn, tp)
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((p, r, f))
        assert row["fpr"] == pytest.approx(fp / (fp + tn))


def test_threshold_sweep_matches_sklearn_on_grid():
    y, s = _val_case(3)
    sweep = threshold_sweep(y, s, n_points=21)
    for _, row in sweep.iloc[[0, 5, 10, 13, 20]].iterrows():
        pred = s >= row["threshold"]
        p, r, f, _ = precision_recall_fscore_support(y, pred, average="binary", zero_division=0)
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((p, r, f))
        assert row["fpr"] == pytest.approx(np.mean(pred[y == 0]))


# ----------------------------------------------------------------------------- aggregation
FRAMES = pd.DataFrame({
    "path": [f"f{i}.png" for i in range(8)],
    "group": ["a", "a", "a", "b", "b", "b", "c", "c"],
    "label": [1, 1, 1, 0, 0, 0, 1, 1],
    "score": [0.9, 0.6, 0.1, 0.3, 0.45, 0.2, 0.55, 0.6],
})


@pytest.mark.parametrize("rule, expected", [
    ("mean", {"a": 1.6 / 3, "b": 0.95 / 3, "c": 0.575}),
    ("median", {"a": 0.6, "b": 0.3, "c": 0.575}),
    ("max", {"a": 0.9, "b": 0.45, "c": 0.6}),
    ("confident", {"a": 0.5, "b": 0.2, "c": 0.575}),  # a: {0.9, 0.1}; b: {0.2}; c: none -> mean
])
def test_aggregate_groups_rules(rule, expected):
    out = aggregate_groups(FRAMES, rule).set_index("group")
    assert out["score"].to_dict() == pytest.approx(expected)
    assert out["label"].to_dict() == {"a": 1, "b": 0, "c": 1}
    assert out["n_frames"].to_dict() == {"a": 3, "b": 3, "c": 2}
    fn = AGGREGATORS.create(rule, **({"margin": 0.3} if rule == "confident" else {}))
    for g, part in FRAMES.groupby("group"):  # registry callable == vectorised path
        assert fn(part["score"].to_numpy()) == pytest.approx(expected[g])


def test_aggregate_groups_errors_and_missing_groups():
    bad = FRAMES.copy()
    bad.loc[0, "label"] = 0
    with pytest.raises(MetricError, match="1 group\\(s\\) mix real and fake frames: a"):
        aggregate_groups(bad)
    with pytest.raises(UnknownNameError, match="did you mean 'median'"):
        aggregate_groups(FRAMES, "mediam")
    loose = FRAMES.copy()
    loose.loc[[6, 7], "group"] = None  # frames without a group become singletons
    out = aggregate_groups(loose)
    assert len(out) == 4 and set(out["group"]) >= {"f6.png", "f7.png"}
