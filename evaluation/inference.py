"""Batched inference over a loader: logits, P(fake) scores, TTA views, MC-dropout, and the predictions table."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from core.device import to_device
from evaluation.tta import TTASpec, as_spec, average_views
from models.outputs import logit_score


@dataclass
class Predictions:
    logits: np.ndarray  # (N,) logit of "fake"
    scores: np.ndarray  # (N,) P(fake)
    labels: np.ndarray  # (N,)
    indices: np.ndarray  # (N,) index into the split's sample list
    loss: float  # mean loss over the split (NaN when no loss_fn)
    score_std: np.ndarray | None = None  # (N,) std of P(fake) over MC-dropout passes


def _batch_outputs(model: torch.nn.Module, x, spec: TTASpec, passes: int, head_only: bool) -> torch.Tensor:
    """Raw outputs (passes, views, B, K) in float32; with head_only the backbone runs once per view."""
    per_view = []
    for view in spec.views:
        xv = view(x)
        if passes > 1 and head_only:
            feats = model.features(xv)
            per_view.append(torch.stack([model.head(feats).float() for _ in range(passes)]))
        else:
            per_view.append(torch.stack([model(xv).float() for _ in range(passes)]))
    return torch.stack(per_view, dim=1)


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    loader: Iterable,
    device: torch.device,
    *,
    channels_last: bool = False,
    amp: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    loss_fn: torch.nn.Module | None = None,
    tta: bool | TTASpec | None = False,
    mc_dropout: int = 0,
    seed: int = 0,
    desc: str = "eval",
) -> Predictions:
    """Run the model over a loader in eval mode.

    tta: False = one view; True = original + horizontal flip averaged in logit space; or a TTASpec
    (evaluation.tta: flip / crops / zooms, logit or prob averaging). mc_dropout=N > 1: N passes with the
    dropout layers in train mode (RNG forked and seeded with `seed`); score = mean P(fake), score_std =
    its std. The loss (if loss_fn) is computed on the averaged prediction.
    """
    spec = as_spec(tta)
    passes = max(int(mc_dropout), 1)
    model.eval()
    logits_all, labels_all, idx_all, std_all = [], [], [], []
    loss_sum, n = 0.0, 0
    with contextlib.ExitStack() as stack:
        head_only = False
        if passes > 1:
            from evaluation.uncertainty import head_only_dropout, mc_average, mc_dropout_mode

            stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
            torch.manual_seed(seed)
            stack.enter_context(mc_dropout_mode(model))
            head_only = head_only_dropout(model)
        from dataio.loaders import loader_iter, retained_heap

        stack.enter_context(retained_heap())  # each batch's activations without fresh page faults (glibc)
        batches = loader
        if getattr(loader, "num_workers", 0):  # a DataLoader forking workers: hold SIGTERM while it does
            batches = loader_iter(loader)
        for images, labels, indices in tqdm(batches, total=_length(loader), desc=desc, leave=False, disable=None):
            if len(images) == 0:
                continue
            x = to_device(images, device, channels_last)
            with amp():
                raw = _batch_outputs(model, x, spec, passes, head_only)  # (P, V, B, K)
            per_pass = torch.stack([average_views(r, spec.space) for r in raw])  # (P, B, K)
            if passes > 1:
                out, std = mc_average(per_pass)
                std_all.append(std.cpu())
            else:
                out = per_pass[0]
            if loss_fn is not None:
                loss_sum += float(loss_fn(out, labels.to(device))) * len(images)
            n += len(images)
            logits_all.append(out.cpu())
            labels_all.append(labels)
            idx_all.append(indices)
    if n == 0:
        raise ValueError(f"{desc}: no readable images to evaluate")
    z, s = logit_score(torch.cat(logits_all))
    return Predictions(
        logits=z.numpy(), scores=s.numpy(), labels=torch.cat(labels_all).numpy().astype(int),
        indices=torch.cat(idx_all).numpy(), loss=loss_sum / n if loss_fn is not None else float("nan"),
        score_std=torch.cat(std_all).numpy() if std_all else None,
    )


def _length(loader: Iterable) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def predictions_table(preds: Predictions, samples: list) -> pd.DataFrame:
    """The per-image predictions table: path, label, score, logit[, group, subset][, score_std (MC-dropout)]."""
    rows = [samples[i] for i in preds.indices]
    df = pd.DataFrame({
        "path": [s.path for s in rows],
        "label": preds.labels,
        "score": preds.scores.astype(float),
        "logit": preds.logits.astype(float),
    })
    if any(s.group for s in rows):
        df["group"] = [s.group for s in rows]
    if any(s.subset for s in rows):
        df["subset"] = [s.subset for s in rows]
    if preds.score_std is not None:
        df["score_std"] = preds.score_std.astype(float)
    return df
