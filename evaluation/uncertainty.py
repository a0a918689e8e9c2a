"""MC-dropout uncertainty: N stochastic passes with only the dropout layers in train mode.

`evaluation.inference.predict(..., mc_dropout=N, seed=s)` runs the passes (inside `mc_dropout_mode`, with
the RNG forked and seeded so a given seed gives the same result) and writes per-sample mean P(fake)
(`score`) and its standard deviation over the passes (`score_std`). BatchNorm and every other layer
stay in eval mode. When all active dropout sits in a Detector's head, the backbone runs once per view
and only the head is repeated (same random stream, same numbers, N times cheaper).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from numpy.typing import ArrayLike
from sklearn.metrics import roc_auc_score
from torch import nn

from models.outputs import fake_prob, logits_from_prob

log = logging.getLogger(__name__)

DROPOUT_TYPES: tuple[type[nn.Module], ...] = (nn.modules.dropout._DropoutNd,)


def dropout_modules(model: nn.Module, active_only: bool = True) -> list[nn.Module]:
    """Dropout layers of `model` (active_only: those with p > 0)."""
    return [m for m in model.modules() if isinstance(m, DROPOUT_TYPES) and (not active_only or m.p > 0)]


@contextlib.contextmanager
def mc_dropout_mode(model: nn.Module) -> Iterator[int]:
    """Dropout layers in train mode for the block (yields how many have p > 0); their modes are restored."""
    layers = dropout_modules(model, active_only=False)
    before = [m.training for m in layers]
    n_active = sum(m.p > 0 for m in layers)
    if n_active == 0:
        log.warning("event=mc_dropout_no_dropout model has no dropout layer with p > 0: score_std will be 0 "
                    "(train with model.dropout > 0)")
    for m in layers:
        m.train()
    try:
        yield n_active
    finally:
        for m, was in zip(layers, before):
            m.train(was)


def head_only_dropout(model: nn.Module) -> bool:
    """True when `model` is a Detector whose active dropout layers all sit in its head."""
    from models.factory import Detector

    if not isinstance(model, Detector):
        return False
    in_head = {id(m) for m in dropout_modules(model.head)}
    return all(id(m) in in_head for m in dropout_modules(model))


def mc_average(outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, B, K) raw outputs of P passes -> ((B, K) raw outputs of the mean P(fake), (B,) std of P(fake))."""
    p = fake_prob(outputs)
    return logits_from_prob(p.mean(dim=0), outputs.shape[-1]), p.std(dim=0, unbiased=False)


# ------------------------------------------------------------------------------ reporting
def uncertainty_summary(labels: ArrayLike, scores: ArrayLike, score_std: ArrayLike,
                        threshold: float = 0.5) -> dict[str, float]:
    """Mean MC std overall, for correct and for wrong predictions at `threshold`, and how well std
    ranks the errors (AUROC of std for wrong vs correct; NaN when every prediction is right or wrong)."""
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    sd = np.asarray(score_std, dtype=np.float64)
    wrong = (s >= threshold).astype(int) != y
    out = {"mc_std_mean": float(sd.mean()), "mc_std_correct": float(sd[~wrong].mean()) if (~wrong).any() else np.nan,
           "mc_std_wrong": float(sd[wrong].mean()) if wrong.any() else np.nan,
           "mc_error_rate": float(wrong.mean()), "mc_std_error_auc": np.nan}
    if 0 < wrong.sum() < wrong.size:
        out["mc_std_error_auc"] = float(roc_auc_score(wrong, sd))
    return out


def uncertainty_table(summary: dict[str, float], passes: int) -> pd.DataFrame:
    """The summary as a one-column dashboard table."""
    df = pd.DataFrame({"value": summary})
    df.attrs["caption"] = (f"MC-dropout over {passes} passes: std of P(fake) per image; correct/wrong at threshold "
                           "0.5; error AUC = how well the std ranks wrong above correct predictions")
    return df


def uncertainty_figure(labels: ArrayLike, scores: ArrayLike, score_std: ArrayLike, threshold: float = 0.5,
                       n_bins: int = 30) -> go.Figure:
    """Histograms of the MC std for correct and wrong predictions."""
    y = np.asarray(labels).astype(int)
    sd = np.asarray(score_std, dtype=np.float64)
    wrong = (np.asarray(scores) >= threshold).astype(int) != y
    edges = np.linspace(0.0, max(float(sd.max()), 1e-6), n_bins + 1)
    fig = go.Figure()
    for mask, name, color in ((~wrong, "correct", "#2ca02c"), (wrong, "wrong", "#d62728")):
        hist, _ = np.histogram(sd[mask], bins=edges)
        fig.add_trace(go.Bar(x=(edges[:-1] + edges[1:]) / 2, y=hist / max(hist.sum(), 1), width=edges[1] - edges[0],
                             opacity=0.55, marker_color=color, name=f"{name} (n={int(mask.sum())})"))
    fig.update_layout(title={"text": "MC-dropout std of P(fake): correct vs wrong"}, barmode="overlay",
                      template="plotly_white", xaxis_title="std of P(fake) over passes", yaxis_title="Fraction")
    return fig


def uncertainty_panels(table: pd.DataFrame, passes: int) -> tuple[go.Figure, pd.DataFrame, dict[str, float]]:
    """Dashboard figure, table and flat metrics from a predictions table with a score_std column."""
    summary = uncertainty_summary(table["label"], table["score"], table["score_std"])
    return (uncertainty_figure(table["label"], table["score"], table["score_std"]), uncertainty_table(summary, passes),
            summary)
