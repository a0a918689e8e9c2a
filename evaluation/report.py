"""Everything a run reports about its predictions, computed from prediction tables and written
to one folder (metrics.json, calibration.json, thresholds.csv, dashboard.html, errors.html,
optional png/). No MLflow here: core/tracking.py logs `EvalReport.metrics` and the folder.

Protocol: thresholds and the temperature are fitted on validation and applied unchanged to test.
Without a test table the "evaluated" split is validation itself (in-sample thresholds).
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from evaluation import figures as F
from evaluation.aggregation import AGGREGATORS, aggregate_groups
from evaluation.calibration import TemperatureScaler, calibration_report, logits_from_scores
from evaluation.dashboard import write_dashboard, write_pngs
from evaluation.gallery import ModelInput, subset_breakdown, write_error_gallery
from evaluation.metrics import MetricError, binary_metrics, bootstrap_ci
from evaluation.thresholds import apply_thresholds, choose_thresholds

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("path", "label", "score")
CALIBRATED_KEYS = ("ece", "mce", "ace", "log_loss", "brier")
THRESHOLD_KEYS = ("accuracy", "precision", "recall", "f1", "fpr")
HEADLINE = ("auc", "ap", "eer", "accuracy", "f1", "tpr_at_fpr_1pct", "log_loss", "brier", "ece", "n")


def gallery_thresholds(thresholds: Mapping[str, float], operating_point: str, target_fpr: float) -> dict[str, float]:
    """The error gallery's thresholds: the operating point chosen on val, 0.5, and val's low-FPR threshold."""
    names = {"default": "0.5", "target_fpr": f"val FPR<={target_fpr:g}"}
    out = {names.get(operating_point, f"val {operating_point}"): thresholds[operating_point]}
    for key in ("default", "target_fpr"):
        out.setdefault(names[key], thresholds[key])
    return out


@dataclass
class EvalReport:
    """Result of evaluate_predictions: flat metrics for MLflow, nested details, written files."""

    metrics: dict[str, float]
    details: dict[str, Any]
    thresholds: dict[str, float]
    temperature: float
    operating_point: str
    files: dict[str, Path] = field(default_factory=dict)


def _check_table(df: pd.DataFrame, split: str) -> pd.DataFrame:
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise MetricError(f"{split} predictions lack column(s) {missing}; got {list(df.columns)}")
    df = df.reset_index(drop=True).copy()
    if "logit" not in df.columns or df["logit"].isna().any():
        df["logit"] = logits_from_scores(df["score"])  # scores clipped to 1e-7 keep logits finite
    return df


def _has_groups(df: pd.DataFrame) -> bool:
    return "group" in df.columns and df["group"].notna().any()


def _safe_key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "none"


def _jsonable(obj: Any) -> Any:
    """Nested dicts/lists of numpy/pandas scalars -> JSON types (NaN/inf -> None)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, pd.DataFrame):
        return _jsonable(obj.reset_index().to_dict(orient="records"))
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _group_level(splits: dict[str, pd.DataFrame], rule: str,
                 margin: float) -> tuple[dict[str, Any], dict[str, pd.DataFrame]]:
    """Group metrics for every split by `rule`, plus an all-rules comparison on the evaluated split."""
    details: dict[str, Any] = {"rule": rule, "margin": margin}
    groups: dict[str, pd.DataFrame] = {}
    for split, df in splits.items():
        if not _has_groups(df):
            continue
        try:
            groups[split] = g = aggregate_groups(df, rule, margin)
            details[split] = binary_metrics(g["label"], g["score"])
        except MetricError as exc:
            log.warning("group_metrics=skipped split=%s reason=%s", split, exc)
    ev_name, ev = list(splits.items())[-1]
    if _has_groups(ev):
        by_rule = {}
        for name in AGGREGATORS.names():
            try:
                g = aggregate_groups(ev, name, margin)
                m = binary_metrics(g["label"], g["score"])
                by_rule[name] = {k: m[k] for k in ("auc", "ap", "eer", "accuracy", "f1", "n")}
            except MetricError as exc:
                log.warning("group_rule=%s split=%s skipped reason=%s", name, ev_name, exc)
        details["by_rule"] = by_rule
    return details, groups


def _figures(splits: dict[str, pd.DataFrame], groups: dict[str, pd.DataFrame], group_rule: str,
             scaler: TemperatureScaler, thresholds: dict[str, float], operating_point: str,
             history: pd.DataFrame | None) -> dict[str, go.Figure | dict[str, go.Figure]]:
    """The standard dashboard panels for the evaluated (last) split."""
    ev_name, ev = list(splits.items())[-1]
    op_thr = thresholds[operating_point]
    series = {name: (df["label"], df["score"]) for name, df in splits.items()}
    if ev_name in groups:
        series[f"{ev_name} ({group_rule} per video)"] = (groups[ev_name]["label"], groups[ev_name]["score"])
    labels, scores = ev["label"], ev["score"]
    calibrated = scaler.transform(ev["logit"])
    figs = {
        "roc": F.roc_figure(series),
        "pr": F.pr_figure(series),
        "reliability": F.reliability_figure({ev_name: (labels, scores),
                                             f"{ev_name} calibrated (T={scaler.temperature:.2f})": (labels, calibrated)}),
        "confusion": F.confusion_figure(labels, scores, op_thr, f"Confusion matrix, {ev_name} at {operating_point}"),
        "score_distribution": F.score_distribution_figure(labels, scores, thresholds={operating_point: op_thr},
                                                          title=f"Score distribution by class ({ev_name})"),
        "threshold_sweep": F.threshold_figure(labels, scores, thresholds,
                                              title=f"Precision / recall / F1 vs threshold ({ev_name})"),
    }
    curves = F.learning_curve_figures(history) if history is not None and len(history) else {}
    if curves:
        figs["learning_curves"] = curves  # small panels, one metric each
    return figs


def _captioned(df: pd.DataFrame, caption: str) -> pd.DataFrame:
    df.attrs["caption"] = caption
    return df


def _tables(per_split: dict[str, dict[str, float]], group_details: dict[str, Any], thr_table: pd.DataFrame,
            calib: dict[str, dict[str, float]], ci: dict[str, tuple[float, float]], subsets: pd.DataFrame | None,
            ev_name: str, operating_point: str, temperature: float, n_boot: int) -> dict[str, pd.DataFrame]:
    """Dashboard tables under stable headings; the specifics go into each table's caption."""
    summary = pd.DataFrame({name: {k: m[k] for k in HEADLINE} for name, m in per_split.items()})
    for name in per_split:
        if name in group_details:
            summary[f"{name} video"] = pd.Series({k: group_details[name][k] for k in HEADLINE})
    tables = {
        "Summary": _captioned(summary, "frame-level metrics at threshold 0.5 (video columns: "
                                       f"{group_details.get('rule', '-')} of frame scores per group)"),
        "Thresholds": _captioned(thr_table.copy(), f"chosen on val, applied to {ev_name}; "
                                                   f"operating point: {operating_point}"),
        "Calibration": _captioned(pd.DataFrame(calib).drop(index="temperature"),
                                  f"temperature scaling, T={temperature:.4f} fitted on val (NLL)"),
    }
    if ci:
        tables["Bootstrap CI"] = _captioned(pd.DataFrame(
            {m: {"estimate": per_split[ev_name][m], "low": lo, "high": hi} for m, (lo, hi) in ci.items()}).T,
            f"95% percentile interval, {n_boot} stratified resamples of {ev_name}")
    if group_details.get("by_rule"):
        tables["Video aggregation rules"] = _captioned(pd.DataFrame(group_details["by_rule"]).T,
                                                       f"group-level metrics on {ev_name} by aggregation rule")
    if subsets is not None:
        tables["Subsets"] = _captioned(subsets.copy(), f"per subset on {ev_name}; accuracy at {operating_point}")
    return tables


def evaluate_predictions(
    val_df: pd.DataFrame,
    test_df: pd.DataFrame | None = None,
    history_df: pd.DataFrame | None = None,
    out_dir: str | Path = "evaluation",
    *,
    n_boot: int = 1000,
    seed: int = 0,
    target_fpr: float = 0.01,
    operating_point: str = "eer",
    group_rule: str = "mean",
    group_margin: float = 0.3,
    gallery_k: int = 8,
    write_png: bool = False,
    extra_figures: Mapping[str, go.Figure] | None = None,
    extra_tables: Mapping[str, pd.DataFrame] | None = None,
    title: str = "Evaluation",
    model_input: ModelInput | None = None,
    figures: bool = True,
) -> EvalReport:
    """Compute every metric, threshold, calibration and figure from prediction tables; write files.

    `operating_point` (a name from choose_thresholds) picks the threshold for the confusion matrix
    and the error gallery. `extra_figures` / `extra_tables` (e.g. robustness or cross-dataset
    heatmaps) are appended to the dashboard. The error gallery shows the operating point, 0.5 and the val
    threshold at `target_fpr`; `model_input(paths)` (evaluation.gallery.model_input_images) puts what the
    model saw beside each file. `figures=False` writes the metrics files only (metrics.json, calibration.json,
    thresholds.csv; the same metrics), without the dashboard and the error gallery, which cost most of the
    time. Raises MetricError when validation has one class.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    AGGREGATORS.get(group_rule)  # fail fast on an unknown rule
    val = _check_table(val_df, "val")
    test = _check_table(test_df, "test") if test_df is not None and len(test_df) else None
    splits = {"val": val} if test is None else {"val": val, "test": test}
    ev_name, ev = list(splits.items())[-1]

    per_split = {name: binary_metrics(df["label"], df["score"]) for name, df in splits.items()}
    thresholds = choose_thresholds(val["label"], val["score"], target_fpr)
    if operating_point not in thresholds:
        raise ValueError(f"operating_point must be one of {sorted(thresholds)}; got {operating_point!r}")
    op_thr = thresholds[operating_point]
    thr_table = apply_thresholds(ev["label"], ev["score"], thresholds)
    ci = {m: bootstrap_ci(ev["label"], ev["score"], m, n_boot, seed) for m in ("auc", "ap")} if n_boot else {}

    scaler = TemperatureScaler().fit(val["logit"], val["label"])
    calib = {name: calibration_report(df["logit"], df["label"], scaler.temperature) for name, df in splits.items()}

    group_details, groups = _group_level(splits, group_rule, group_margin)
    subsets = (subset_breakdown(ev, op_thr) if "subset" in ev.columns and ev["subset"].notna().any() else None)

    # ---- flat metrics for MLflow
    flat: dict[str, float] = {"temperature": scaler.temperature, "operating_threshold": op_thr}
    for name, m in per_split.items():
        flat.update({f"{name}_{k}": v for k, v in m.items()})
        flat.update({f"{name}_{k}_calibrated": calib[name][f"{k}_after"] for k in CALIBRATED_KEYS})
        if name in group_details:
            flat.update({f"{name}_video_{k}": v for k, v in group_details[name].items()})
    for m, (low, high) in ci.items():
        flat[f"{ev_name}_{m}_ci_low"], flat[f"{ev_name}_{m}_ci_high"] = low, high
    for name, row in thr_table.iterrows():
        flat[f"threshold_{name}"] = float(row["threshold"])
        flat.update({f"{ev_name}_{k}_at_{name}": float(row[k]) for k in THRESHOLD_KEYS})
    if subsets is not None:
        for name, row in subsets.iterrows():
            flat.update({f"{ev_name}_subset_{_safe_key(name)}_{k}": float(row[k]) for k in ("auc", "ap", "accuracy")})
    flat = {k: float(v) for k, v in flat.items() if v is not None and math.isfinite(float(v))}

    details = {
        "evaluated_split": ev_name, "operating_point": operating_point, "metrics": per_split,
        "bootstrap": {"n_boot": n_boot, "seed": seed, "alpha": 0.05,
                      **{m: {"low": lo, "high": hi} for m, (lo, hi) in ci.items()}},
        "thresholds": {"chosen_on": "val", "target_fpr": target_fpr, "values": thresholds,
                       f"applied_to_{ev_name}": thr_table},
        "calibration": {"method": "temperature", "temperature": scaler.temperature, "fitted_on": "val", **calib},
        "group": group_details if groups else None,
        "subsets": subsets,
    }

    # ---- files
    files = {
        "metrics_json": out_dir / "metrics.json",
        "calibration_json": scaler.save(out_dir / "calibration.json"),
        "thresholds_csv": out_dir / "thresholds.csv",
    }
    files["metrics_json"].write_text(json.dumps(_jsonable({"flat": flat, **details}), indent=2))
    thr_table.to_csv(files["thresholds_csv"])
    if not figures:
        log.info("evaluation split=%s auc=%.4f metrics only seconds=%.2f out=%s", ev_name, per_split[ev_name]["auc"],
                 time.perf_counter() - t0, out_dir)
        return EvalReport(flat, _jsonable(details), thresholds, scaler.temperature, operating_point, files)

    # ---- figures and tables
    figs = _figures(splits, groups, group_rule, scaler, thresholds, operating_point, history_df)
    figs.update(extra_figures or {})
    tables = _tables(per_split, group_details, thr_table, calib, ci, subsets, ev_name, operating_point,
                     scaler.temperature, n_boot)
    tables.update(extra_tables or {})
    files["dashboard_html"] = write_dashboard(out_dir / "dashboard.html", figs, tables, title,
                                              subtitle=f"evaluated split: {ev_name}; thresholds and T fitted on val",
                                              links={"Most confident errors (errors.html)": "errors.html"})
    files["errors_html"] = write_error_gallery(
        out_dir / "errors.html", ev, gallery_thresholds(thresholds, operating_point, target_fpr), gallery_k,
        f"{title}: errors on {ev_name} at val-chosen thresholds", model_input=model_input, subset_threshold=op_thr)
    if write_png:
        for p in write_pngs(figs, out_dir / "png"):
            files[f"png_{p.stem}"] = p
    log.info("evaluation split=%s auc=%.4f ap=%.4f eer=%.4f temperature=%.3f seconds=%.2f out=%s", ev_name,
             per_split[ev_name]["auc"], per_split[ev_name]["ap"], per_split[ev_name]["eer"],
             scaler.temperature, time.perf_counter() - t0, out_dir)
    return EvalReport(flat, _jsonable(details), thresholds, scaler.temperature, operating_point, files)
