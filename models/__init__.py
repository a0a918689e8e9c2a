"""Models: presets by name, timm/torchvision backbones, heads, attention, pretrained weights."""
from models.factory import Detector, create_detector
from models.presets import PRESETS, ModelPreset
from models.pretrained import PretrainedUnavailable

__all__ = ["PRESETS", "Detector", "ModelPreset", "PretrainedUnavailable", "create_detector"]
