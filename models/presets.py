"""Model presets: a short name (`--model_type`) -> which backbone to build and where its weights live.

A preset is data, not code: the factory (models.factory) reads it. `model.model_name` (any timm name)
overrides a preset's backbone; the preset's offline weights then apply only if the name is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal, Optional

from core.registry import MODEL_PRESETS

Source = Literal["timm", "torchvision"]
Kind = Literal["image", "video"]


@dataclass(frozen=True)
class ModelPreset:
    """What `--model_type NAME` builds.

    backbone: a timm model name (source "timm") or a torchvision builder name (source "torchvision").
    offline_weights: key in models.pretrained.OFFLINE_WEIGHTS (an installed pip package with ImageNet
        weights) used instead of the hub when `pretrained` is on; None -> timm/torchvision hub.
    is_conv: the backbone emits an NCHW feature map (channels_last helps; attention applies).
    kind: "image" (one photo/frame at a time) or "video" (clips; dataio.pipeline reads clips and
        models.build builds the dual-stream model from model.hq_backbone / model.lq_backbone).
    """

    name: str
    backbone: str
    source: Source = "timm"
    offline_weights: Optional[str] = None
    is_conv: bool = True
    kind: Kind = "image"


PRESETS = MODEL_PRESETS


def _add(name: str, backbone: str, **kw: object) -> None:
    PRESETS.register(name, partial(ModelPreset, name=name, backbone=backbone, **kw), kind=kw.get("kind", "image"))


_add("efficientnet", "efficientnet_b0")
for _i in range(6):
    _add(f"efficientnet_b{_i}", f"efficientnet_b{_i}")
# timm has ImageNet weights for b6/b7 only in the TF-ported variants (efficientnet_b6/b7 are untrained)
_add("efficientnet_b6", "tf_efficientnet_b6")
_add("efficientnet_b7", "tf_efficientnet_b7")
# The offline lite0 weights come from a TF port (same padding, BN eps 1e-3): the tf_ variant has
# identical keys and fits them better (flip-consistent top-1 on 64 photos 0.80 vs 0.67).
_add("efficientnet_lite0", "tf_efficientnet_lite0", offline_weights="efficientnet_lite0_pkg")
_add("swin", "swin_base_patch4_window7_224", is_conv=False)
_add("swin_tiny", "swin_tiny_patch4_window7_224", is_conv=False)
_add("xception", "legacy_xception")
_add("resnet", "resnet50")
_add("resnet18", "resnet18")
_add("mobilenetv2", "mobilenet_v2", source="torchvision", offline_weights="mobilenet_v2_pkg")
_add("mobilenetv2_timm", "mobilenetv2_100")
# tiny models for tests and CI (use with pretrained=False)
_add("test_efficientnet", "test_efficientnet")
_add("test_vit", "test_vit", is_conv=False)
_add("test_convnext", "test_convnext")
# video: HQ + LQ frame streams, ConvLSTM, fusion (models.video); its backbones are model.hq_backbone/lq_backbone
_add("dual_stream", "efficientnet_b4", kind="video")


def get_preset(name: str) -> ModelPreset:
    """The preset called `name`; an unknown name raises UnknownNameError listing the valid ones."""
    return PRESETS.create(name)
