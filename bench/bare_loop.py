"""The bare PyTorch reference loop that the benchmarks compare `train(cfg)` against (shared by the bench scripts)."""
from __future__ import annotations

import contextlib
import itertools
import time
from typing import Iterable

import torch


def bare_steps(model: torch.nn.Module, batches: Iterable, steps: int, lr: float, weight_decay: float,
               channels_last: bool, bf16: bool) -> float:
    """`steps` AdamW + BCE updates on (x, y, _) batches, as a 10-line loop would do them; returns images/s."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    seen, t0 = 0, time.perf_counter()
    for x, y, _ in itertools.islice(batches, steps):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp():
            loss = loss_fn(model(x).float()[:, 0], y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen += len(x)
    return seen / (time.perf_counter() - t0)
