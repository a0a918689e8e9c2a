"""Helpers shared by tests in several package folders (tests/ is on sys.path through conftest.py)."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import torch

from core.checkpoints import atomic_save
from core.config import load_config
from models import create_detector


def tiny_checkpoint(path: Path, seed: int = 0, dropout: float = 0.0) -> Path:
    """A test_efficientnet checkpoint as train() writes it (weights + config), without training."""
    cfg = load_config(overrides={"model.model_type": "test_efficientnet", "model.pretrained": False,
                                 "model.dropout": dropout, "data.image_size": 32, "data.num_workers": 0})
    torch.manual_seed(seed)
    det = create_detector(cfg.model, cfg.loss.num_outputs, image_size=32)
    return atomic_save({"model": det.state_dict(), "config": cfg.model_dump(mode="json")}, path)


def subset_csv(root: Path, out: Path, per_class: int) -> Path:
    """A CSV index over the first `per_class` real and fake images of a shared data set (no copies)."""
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for cls in ("real", "fake"):
            for p in sorted((root / cls).glob("*.jpg"))[:per_class]:
                w.writerow([str(p), cls])
    return out


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie is gone, only not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
