"""Shared test fixtures: offline hub, tiny configs, real data paths."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ["DFSWEEP_CACHE_DIR"] = tempfile.mkdtemp(prefix="dfsweep-test-cache-")  # AMP probes: never ~/.cache

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


# The one tiny configuration for tests that train: a tiny timm model, 32 px, 64 images per split, CPU.
TINY = {
    "model.model_type": "test_efficientnet", "model.pretrained": False, "data.image_size": 32,
    "data.batch_size": 16, "data.num_workers": 0, "data.max_samples_per_split": 64, "train.num_epochs": 2,
    "optim.lr": 3e-3, "train.use_amp": False,
}


def make_tiny_cfg(root: Path, **extra):
    """TINY composed like the CLI does (core.config.compose), with outputs and the MLflow store under `root`."""
    from core.config import load_config

    return load_config(overrides={**TINY, "train.output_dir": str(root / "outputs"),
                                  "tracking.tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
                                  "tracking.experiment_name": "test", **extra})


make_tiny_cfg.overrides = TINY  # type: ignore[attr-defined]


@pytest.fixture
def tiny_cfg():
    """`tiny_cfg(root, **overrides)` -> a tiny Config whose outputs and MLflow store live under `root`."""
    return make_tiny_cfg


@pytest.fixture
def heap_depth():
    """`heap_depth()` -> how many dataio.loaders.retained_heap() blocks are open right now (its own count)."""
    import dataio.loaders as loaders_module

    return lambda: loaders_module._heap_depth
