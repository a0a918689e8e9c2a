"""Validation batches are decoded once and reused across epochs, identically, within a memory budget."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from dataio.loaders import CachedEvalLoader


class CountingDataset(Dataset):
    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        self.calls += 1
        return torch.full((3, 4, 4), float(i)), float(i % 2), i


def passes(loader, k: int) -> list[list[torch.Tensor]]:
    return [[x.clone() for x, _, _ in loader] for _ in range(k)]


def test_second_pass_reads_memory_and_equals_the_first() -> None:
    ds = CountingDataset(10)
    cached = CachedEvalLoader(DataLoader(ds, batch_size=4), max_bytes=2**20)
    first, second, third = passes(cached, 3)
    assert ds.calls == 10  # decoded once
    assert len(cached) == 3 and cached.dataset is ds
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(first, second, third))


def test_over_budget_decodes_every_pass() -> None:
    ds = CountingDataset(10)
    cached = CachedEvalLoader(DataLoader(ds, batch_size=4), max_bytes=200)  # one batch is 768 bytes
    a, b = passes(cached, 2)
    assert ds.calls == 20 and all(torch.equal(x, y) for x, y in zip(a, b))


def test_an_interrupted_pass_is_not_kept() -> None:
    ds = CountingDataset(10)
    cached = CachedEvalLoader(DataLoader(ds, batch_size=4), max_bytes=2**20)
    next(iter(cached))
    assert cached.batches is None
    passes(cached, 2)
    assert ds.calls == 4 + 10
