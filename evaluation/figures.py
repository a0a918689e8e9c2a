"""Plotly figures for the evaluation dashboard; each takes arrays/tables and returns a go.Figure.

Curves and histograms are computed here with numpy/sklearn (not by plotly.js from raw scores) so
the HTML stays small for large test sets. `series` arguments map a legend name (e.g. "val",
"test", "test (video)") to a (labels, scores) pair.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from numpy.typing import ArrayLike
from plotly.subplots import make_subplots
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve, average_precision_score

from evaluation.calibration import reliability_data
from evaluation.metrics import as_label_score, confusion_counts, eer_from_roc, full_roc
from evaluation.thresholds import threshold_sweep

Series = Mapping[str, tuple[ArrayLike, ArrayLike]]
TEMPLATE = "plotly_white"
_DASH = ("solid", "dash", "dot", "dashdot", "longdash")


def _layout(fig: go.Figure, title: str, x: str | None = None, y: str | None = None, **kw) -> go.Figure:
    fig.update_layout(title={"text": title}, template=TEMPLATE, margin={"l": 60, "r": 20, "t": 60, "b": 50},
                      legend={"orientation": "h", "y": -0.18}, **kw)
    if x:
        fig.update_xaxes(title_text=x)
    if y:
        fig.update_yaxes(title_text=y)
    return fig


def roc_figure(series: Series, title: str = "ROC curve") -> go.Figure:
    """ROC per series with its AUC in the legend and the EER point marked."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance",
                             line={"color": "lightgray", "dash": "dash"}, hoverinfo="skip"))
    for i, (name, (labels, scores)) in enumerate(series.items()):
        y, s = as_label_score(labels, scores, f"roc {name}")
        fpr, tpr, _ = roc_curve(y, s)  # intermediate points dropped: same curve, fewer points
        eer, eer_thr = eer_from_roc(*full_roc(y, s))
        fig.add_trace(go.Scatter(x=fpr, y=tpr, mode="lines", line={"dash": _DASH[i % len(_DASH)]},
                                 name=f"{name} (AUC={roc_auc_score(y, s):.3f})"))
        fig.add_trace(go.Scatter(x=[eer], y=[1 - eer], mode="markers", marker={"size": 10, "symbol": "x"},
                                 name=f"{name} EER={eer:.3f} @ {eer_thr:.3f}"))
    return _layout(fig, title, "False positive rate", "True positive rate",
                   xaxis={"range": [0, 1]}, yaxis={"range": [0, 1.02]})


def pr_figure(series: Series, title: str = "Precision-recall curve") -> go.Figure:
    """Precision-recall per series with AP in the legend and the prevalence baseline."""
    fig = go.Figure()
    for i, (name, (labels, scores)) in enumerate(series.items()):
        y, s = as_label_score(labels, scores, f"pr {name}")
        precision, recall, _ = precision_recall_curve(y, s)
        fig.add_trace(go.Scatter(x=recall, y=precision, mode="lines", line={"shape": "hv",
                                 "dash": _DASH[i % len(_DASH)]},
                                 name=f"{name} (AP={average_precision_score(y, s):.3f})"))
        fig.add_trace(go.Scatter(x=[0, 1], y=[y.mean()] * 2, mode="lines", hoverinfo="skip",
                                 line={"color": "lightgray", "dash": "dot"}, name=f"{name} prevalence"))
    return _layout(fig, title, "Recall", "Precision", xaxis={"range": [0, 1]}, yaxis={"range": [0, 1.02]})


def reliability_figure(series: Series, n_bins: int = 15, title: str = "Reliability diagram") -> go.Figure:
    """Observed fake rate vs mean P(fake) per equal-width bin (top) and bin counts (bottom)."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.7, 0.3], vertical_spacing=0.06)
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect calibration",
                             line={"color": "lightgray", "dash": "dash"}, hoverinfo="skip"), row=1, col=1)
    width = 1.0 / n_bins
    for i, (name, (labels, scores)) in enumerate(series.items()):
        rel = reliability_data(labels, scores, n_bins)
        full = rel[rel["count"] > 0]
        fig.add_trace(go.Scatter(x=full["confidence"], y=full["accuracy"], mode="lines+markers", name=name,
                                 line={"dash": _DASH[i % len(_DASH)]}, legendgroup=name,
                                 customdata=full[["count"]].to_numpy(),
                                 hovertemplate="conf=%{x:.3f}<br>fake rate=%{y:.3f}<br>n=%{customdata[0]}"),
                      row=1, col=1)
        fig.add_trace(go.Bar(x=rel["bin_center"], y=rel["count"], width=width, name=f"{name} count",
                             legendgroup=name, opacity=0.6, showlegend=False), row=2, col=1)
    fig.update_layout(barmode="overlay")
    fig.update_xaxes(title_text="Mean predicted P(fake)", range=[0, 1], row=2, col=1)
    fig.update_yaxes(title_text="Observed fake rate", range=[0, 1.02], row=1, col=1)
    fig.update_yaxes(title_text="Count", row=2, col=1)
    return _layout(fig, title)


def confusion_figure(labels: ArrayLike, scores: ArrayLike, threshold: float,
                     title: str = "Confusion matrix") -> go.Figure:
    """2x2 confusion matrix (rows true, columns predicted) at `threshold`."""
    y, s = as_label_score(labels, scores, "confusion")
    c = confusion_counts(y, s, threshold)
    z = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
    rows = z.sum(axis=1, keepdims=True)
    pct = np.divide(z, rows, out=np.zeros(z.shape), where=rows > 0)
    text = [[f"{z[i, j]}<br>({pct[i, j]:.1%})" for j in range(2)] for i in range(2)]
    fig = go.Figure(go.Heatmap(z=pct, x=["pred real", "pred fake"], y=["true real", "true fake"],
                               text=text, texttemplate="%{text}", colorscale="Blues", zmin=0, zmax=1,
                               showscale=False, hovertemplate="%{y} / %{x}: %{text}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, f"{title} (threshold={threshold:.3f})")


def score_distribution_figure(labels: ArrayLike, scores: ArrayLike, n_bins: int = 50,
                              thresholds: Mapping[str, float] | None = None,
                              title: str = "Score distribution by class") -> go.Figure:
    """Overlaid density histograms of P(fake) for real and fake samples."""
    y, s = as_label_score(labels, scores, "score distribution")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    fig = go.Figure()
    for cls, name, color in ((0, "real", "#1f77b4"), (1, "fake", "#d62728")):
        hist, _ = np.histogram(s[y == cls], bins=edges)
        frac = hist / max(hist.sum(), 1)
        fig.add_trace(go.Bar(x=(edges[:-1] + edges[1:]) / 2, y=frac, width=1.0 / n_bins, opacity=0.55,
                             marker_color=color, name=f"{name} (n={int(hist.sum())})"))
    _threshold_lines(fig, thresholds, top=max([1e-9] + [float(np.max(t.y)) for t in fig.data]))
    fig.update_layout(barmode="overlay")
    return _layout(fig, title, "P(fake)", "Fraction of class")


def threshold_figure(labels: ArrayLike, scores: ArrayLike, thresholds: Mapping[str, float] | None = None,
                     title: str = "Precision / recall / F1 vs threshold") -> go.Figure:
    """Precision, recall (TPR), F1 and FPR over thresholds, chosen thresholds as vertical lines."""
    sweep = threshold_sweep(labels, scores)
    fig = go.Figure()
    for col in ("precision", "recall", "f1", "fpr"):
        fig.add_trace(go.Scatter(x=sweep["threshold"], y=sweep[col], mode="lines", name=col))
    _threshold_lines(fig, thresholds)
    return _layout(fig, title, "Threshold (fake if score >= t)", "Value", yaxis={"range": [0, 1.02]})


def _threshold_lines(fig: go.Figure, thresholds: Mapping[str, float] | None, top: float = 1.0) -> None:
    """Chosen thresholds as dotted vertical lines named in the legend ("eer = 0.512"): close thresholds
    never print their labels over each other, and a click on the legend hides one."""
    items = sorted(((t, n) for n, t in (thresholds or {}).items() if 0.0 <= t <= 1.0))
    for i, (t, name) in enumerate(items):
        fig.add_trace(go.Scatter(x=[t, t], y=[0, top], mode="lines", name=f"{name} = {t:.3f}",
                                 line={"dash": "dot", "width": 1.5, "color": _THRESHOLD_COLORS[i % len(_THRESHOLD_COLORS)]},
                                 hovertemplate=f"{name}: threshold {t:.4f}<extra></extra>"))


_THRESHOLD_COLORS = ("#555555", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
# One small panel per metric: (key, title, y-axis, columns it may draw: exact names or a prefix/suffix rule)
_CURVE_PANELS = (
    ("loss", "Loss", "loss"), ("auc", "ROC AUC", "AUC"), ("ap", "Average precision", "AP"),
    ("eer", "Equal error rate", "EER"), ("f1", "F1 at 0.5", "F1"), ("lr", "Learning rate", "lr"),
    ("throughput", "Training throughput", "images/s"),
)


def _curve_columns(history: pd.DataFrame, key: str) -> list[str]:
    """The training_log columns one learning-curve panel draws (same metric, several splits or sets)."""
    numeric = [c for c in history.columns if pd.api.types.is_numeric_dtype(history[c])]
    if key == "loss":
        return [c for c in ("train_loss", "val_loss") if c in numeric]
    if key in ("auc", "ap"):  # the run's val split, then every data.extra_val set and their means
        return [c for c in numeric if c.startswith("val_") and c.endswith(f"_{key}")]
    if key in ("eer", "f1"):
        return [c for c in (f"val_{key}",) if c in numeric]
    if key == "lr":  # the head's lr, then parameter groups whose schedule differs from every one already drawn
        cols: list[str] = []
        for c in [c for c in numeric if c == "lr"] + [c for c in numeric if c.startswith("lr_")]:
            if not any(np.allclose(history[c], history[d], equal_nan=True) for d in cols):
                cols.append(c)
        return cols
    return [c for c in ("images_per_s",) if c in numeric]


def learning_curve_figures(history: pd.DataFrame, height: int = 260) -> dict[str, go.Figure]:
    """Small figures, one metric each (loss, AUC, AP, EER, F1, learning rate, throughput), from a
    training_log table; a panel whose columns the run did not log is left out."""
    x = history["epoch"] if "epoch" in history.columns else pd.Series(range(len(history)))
    out: dict[str, go.Figure] = {}
    for key, title, axis in _CURVE_PANELS:
        cols = _curve_columns(history, key)
        if not cols:
            continue
        fig = go.Figure()
        for i, col in enumerate(cols):
            fig.add_trace(go.Scatter(x=x, y=history[col], mode="lines+markers", name=col,
                                     line={"dash": _DASH[i % len(_DASH)]}))
        fig.update_layout(title={"text": title}, template=TEMPLATE, height=height, showlegend=len(cols) > 1,
                          margin={"l": 55, "r": 10, "t": 40, "b": 40},
                          legend={"orientation": "h", "y": -0.3, "font": {"size": 10}})
        fig.update_xaxes(title_text="Epoch", dtick=1 if len(x) <= 12 else None)
        fig.update_yaxes(title_text=axis, type="log" if key == "lr" else None)
        out[key] = fig
    return out


def heatmap_figure(df: pd.DataFrame, title: str, fmt: str = ".3f", zmin: float | None = None,
                   zmax: float | None = None, colorscale: str = "Viridis") -> go.Figure:
    """Annotated heatmap of a numeric table (rows = index, columns = columns): robustness
    (corruption x metric or severity) and cross-dataset (run x dataset AUC) matrices."""
    values = df.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    text = [[("" if np.isnan(v) else format(v, fmt)) for v in row] for row in values]
    fig = go.Figure(go.Heatmap(z=values, x=[str(c) for c in df.columns], y=[str(i) for i in df.index],
                               text=text, texttemplate="%{text}", zmin=zmin, zmax=zmax, colorscale=colorscale,
                               hovertemplate="%{y} / %{x}: %{text}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, title, df.columns.name, df.index.name, height=max(300, 60 + 40 * len(df)))
