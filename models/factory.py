"""The model factory: preset/timm name -> backbone (+ weights) -> optional attention -> head = Detector.

    det = create_detector(cfg.model, cfg.loss.num_outputs, image_size=cfg.data.image_size)
    logits = det(images)                       # (B, num_outputs)
    logits = det(images, labels=y.long())      # ArcFace: margin on the target class while training

Every backbone follows timm's contract (forward_features, forward_head(pre_logits=True),
num_features, group_matcher, pretrained_cfg); torchvision's MobileNetV2 is adapted to it.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
from typing import Optional

import timm
import timm.models
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_data_config
from timm.models._manipulate import MATCH_PREV_GROUP
from torch import Tensor, nn

from models.attention import Layout, create_attention
from models.heads import create_head
from models.presets import Source, get_preset
from models.pretrained import (
    PretrainedUnavailable, check_timm_has_weights, hub_errors, load_backbone_weights, offline_state_dict,
    offline_weights_file, read_state_dict,
)
from core.config import ModelConfig
from core.errors import ConfigError
from core.registry import UnknownNameError

log = logging.getLogger(__name__)


class TorchvisionMobileNetV2(nn.Module):
    """torchvision's mobilenet_v2 feature extractor behind timm's backbone contract (no classifier)."""

    STAGE_DEPTHS = (1, 2, 3, 4, 3, 3, 1)  # inverted-residual blocks per stage (torchvision's settings)

    def __init__(self, weights: Optional[str] = None) -> None:
        super().__init__()
        import torchvision

        net = torchvision.models.mobilenet_v2(weights=weights)
        self.features = net.features
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = self.head_hidden_size = net.last_channel
        self.pretrained_cfg = {
            "architecture": "torchvision.mobilenet_v2", "input_size": (3, 224, 224), "interpolation": "bilinear",
            "crop_pct": 0.875, "crop_mode": "center", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "num_classes": 1000, "first_conv": "features.0.0", "classifier": "classifier",
        }

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.global_pool(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return nn.Identity()

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm-style matcher: stem, then one group per block (or per stage when coarse)."""
        if not coarse:
            return {"stem": r"^features\.0\.", "blocks": r"^features\.(\d+)\."}
        stages, start = [], 1
        for stage, depth in enumerate(self.STAGE_DEPTHS):
            idx = "|".join(str(i) for i in range(start, start + depth))
            stages.append((rf"^features\.(?:{idx})\.", (stage,)))
            start += depth
        stages.append((rf"^features\.{start}\.", MATCH_PREV_GROUP))  # the 1x1 conv to 1280 joins the last stage
        return {"stem": r"^features\.0\.", "blocks": stages}


class Detector(nn.Module):
    """backbone -> attention (or Identity) on the feature map -> pooled features -> head -> logits."""

    def __init__(self, backbone: nn.Module, attention: nn.Module, head: nn.Module, num_outputs: int, *,
                 name: str, layout: Layout, data_config: dict, pretrained_source: str = "none") -> None:
        super().__init__()
        self.backbone, self.attention, self.head = backbone, attention, head
        self.num_outputs = num_outputs
        self.name, self.layout, self.pretrained_source = name, layout, pretrained_source
        self.is_convnet = layout == "NCHW"
        self.data_config = data_config

    def features(self, x: Tensor) -> Tensor:
        """Pooled features (B, num_features) after the attention block."""
        return self.backbone.forward_head(self.attention(self.backbone.forward_features(x)), pre_logits=True)

    def forward(self, x: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        return self.head(self.features(x), labels)

    @property
    def caches_pooled(self) -> bool:
        """True when a frozen-feature cache holds pooled features (no attention block to train on the map)."""
        return isinstance(self.attention, nn.Identity)

    def frozen_features(self, x: Tensor) -> Tensor:
        """The backbone's share of `forward` that a frozen-feature cache stores: pooled features
        (B, num_features) without an attention block, else the feature map the attention block trains on."""
        fmap = self.backbone.forward_features(x)
        return self.backbone.forward_head(fmap, pre_logits=True) if self.caches_pooled else fmap

    def forward_cached(self, cached: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """The rest of `forward` from `frozen_features(x)`: forward_cached(frozen_features(x)) == forward(x)."""
        if self.caches_pooled:
            return self.head(cached, labels)
        return self.head(self.backbone.forward_head(self.attention(cached), pre_logits=True), labels)

    def classifier_modules(self) -> list[nn.Module]:
        """What sits on top of the backbone (trainable when the backbone is frozen)."""
        return [self.attention, self.head]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """{"backbone": [...], "classifier": [...attention + head]}: every parameter exactly once."""
        return {"backbone": list(self.backbone.parameters()),
                "classifier": [p for m in self.classifier_modules() for p in m.parameters()]}


# ------------------------------------------------------------------------------ building
def _check_timm_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownNameError(f"unknown timm model {name!r}{hint}; any name from timm.list_models() works")


def build_backbone(name: str, source: Source, *, hub: bool = False, image_size: Optional[int] = None,
                   drop_path_rate: float = 0.0) -> nn.Module:
    """A headless backbone (num_classes=0); `hub` downloads timm/torchvision ImageNet weights."""
    if source == "torchvision":
        if name != "mobilenet_v2":
            raise UnknownNameError(f"unknown torchvision backbone {name!r}; valid: mobilenet_v2")
        with hub_errors(name) if hub else contextlib.nullcontext():
            return TorchvisionMobileNetV2(weights="IMAGENET1K_V1" if hub else None)
    _check_timm_name(name)
    kwargs: dict = {"num_classes": 0}
    if drop_path_rate > 0:
        kwargs["drop_path_rate"] = drop_path_rate
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as e:  # a valid architecture with an unknown ".tag"
        raise UnknownNameError(f"unknown timm model {name!r}: {e}") from None
    if image_size and cfg is not None and cfg.fixed_input_size:  # ViT/Swin: position tables depend on size
        kwargs["img_size"] = image_size
    if hub:
        check_timm_has_weights(name)
    try:
        with hub_errors(name) if hub else contextlib.nullcontext():
            return timm.create_model(name, pretrained=hub, **kwargs)
    except TypeError as e:  # e.g. drop_path_rate on an architecture without stochastic depth
        if "unexpected keyword argument" not in str(e):
            raise
        raise ValueError(f"timm model {name} does not accept {str(e).split('argument')[-1].strip()} "
                         f"(from model.drop_path_rate / image size)") from None


def probe_backbone(backbone: nn.Module, image_size: int) -> tuple[Layout, int, int]:
    """(feature map layout, channels of the last feature map, pooled feature size) from one tiny forward."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            fmap = backbone.forward_features(torch.zeros(1, 3, image_size, image_size))
            pooled = backbone.forward_head(fmap, pre_logits=True)
    finally:
        backbone.train(was_training)
    if fmap.ndim == 3:
        return "tokens", fmap.shape[-1], pooled.shape[-1]
    nhwc = str(getattr(backbone, "output_fmt", "NCHW")).upper().endswith("NHWC")
    return ("NHWC", fmap.shape[-1], pooled.shape[-1]) if nhwc else ("NCHW", fmap.shape[1], pooled.shape[-1])


def _load_weights(backbone: nn.Module, model_cfg: ModelConfig, offline: Optional[str], name: str) -> str:
    """Weights not from the hub: pretrained_path first, else the preset's installed offline package."""
    if model_cfg.pretrained_path:
        path = model_cfg.pretrained_path
        load_backbone_weights(backbone, read_state_dict(path), f"pretrained_path {path}", name)
        return f"file:{path}"
    if model_cfg.pretrained and offline:
        load_backbone_weights(backbone, offline_state_dict(offline, backbone), f"offline weights {offline}", name)
        return f"offline:{offline}"
    return "none"


def create_detector(model_cfg: ModelConfig, num_outputs: int, image_size: Optional[int] = None) -> Detector:
    """Build the Detector for `model_cfg` with `num_outputs` logits (1 for BCE-style losses, 2 for CE).

    image_size (data.image_size) sizes ViT/Swin position tables and the data_config; None -> model default.
    Raises UnknownNameError (preset/timm name), PretrainedUnavailable (weights), ValueError (attention on tokens).
    """
    preset = get_preset(model_cfg.model_type)
    if preset.kind != "image":
        raise ConfigError(f"model.model_type={preset.name} is a {preset.kind} preset; build it with "
                          "models.build.build_model(cfg)")
    name = model_cfg.model_name or preset.backbone
    source: Source = "timm" if model_cfg.model_name else preset.source
    # weights by priority: pretrained_path > the preset's offline package (if installed) > hub
    offline = preset.offline_weights if name == preset.backbone else None
    if offline and offline_weights_file(offline) is None:
        log.info("event=offline_weights_missing source=%s fallback=hub", offline)
        offline = None
    use_hub = model_cfg.pretrained and not model_cfg.pretrained_path and not offline
    backbone = build_backbone(name, source, hub=use_hub, image_size=image_size,
                              drop_path_rate=model_cfg.drop_path_rate)
    weights = "hub" if use_hub else _load_weights(backbone, model_cfg, offline, name)
    data_config = resolve_data_config(
        args={"input_size": (3, image_size, image_size)} if image_size else {}, model=backbone)
    layout, channels, pooled = probe_backbone(backbone, image_size or data_config["input_size"][-1])
    attention = (create_attention(model_cfg.attention_type, channels, layout, name)
                 if model_cfg.use_attention else nn.Identity())
    head = create_head(model_cfg.head, pooled, num_outputs, model_cfg)
    det = Detector(backbone, attention, head, num_outputs, name=name, layout=layout, data_config=data_config,
                   pretrained_source=weights)
    log.info("event=model_built preset=%s backbone=%s layout=%s features=%d head=%s attention=%s outputs=%d "
             "weights=%s", preset.name, name, layout, pooled, model_cfg.head,
             model_cfg.attention_type if model_cfg.use_attention else "none", num_outputs, weights)
    return det


__all__ = ["Detector", "PretrainedUnavailable", "TorchvisionMobileNetV2", "build_backbone", "create_detector",
           "probe_backbone"]
