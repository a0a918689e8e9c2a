"""Models: presets by name, timm/torchvision backbones, heads, attention, pretrained weights.

The public names are imported on first use, so `import models.presets` (what Config validation needs to
list the presets) does not import timm.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"Detector": "models.factory", "create_detector": "models.factory", "PRESETS": "models.presets",
            "ModelPreset": "models.presets", "PretrainedUnavailable": "models.pretrained",
            "build_model": "models.build", "load_trained_model": "models.build", "TrainedModel": "models.build",
            "fake_prob": "models.outputs", "fake_logit": "models.outputs"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
