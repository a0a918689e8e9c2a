"""Channel/spatial attention (timm's SE and CBAM) on the backbone's last feature map.

The block always sees NCHW; NHWC maps (Swin) are permuted in and out. Token sequences (ViT) have
no spatial map, so asking for attention on them is an error.
"""
from __future__ import annotations

from typing import Literal

from timm.layers import SEModule
from timm.layers.cbam import CbamModule  # not re-exported by timm.layers
from torch import Tensor, nn

from core.registry import Registry

Layout = Literal["NCHW", "NHWC", "tokens"]
ATTENTION: Registry[nn.Module] = Registry("attention")
ATTENTION.register("se", lambda channels: SEModule(channels, rd_ratio=1.0 / 16))
ATTENTION.register("cbam", lambda channels: CbamModule(channels, rd_ratio=1.0 / 16))


class FeatureMapAttention(nn.Module):
    """Apply an NCHW attention block to an NCHW or NHWC feature map, keeping the layout."""

    def __init__(self, block: nn.Module, channels_last_dim: bool = False) -> None:
        super().__init__()
        self.block = block
        self.channels_last_dim = channels_last_dim

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last_dim:
            return self.block(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.block(x)


def create_attention(name: str, channels: int, layout: Layout, backbone_name: str) -> nn.Module:
    """timm SE/CBAM block `name` over `channels` for a feature map in `layout`."""
    if layout == "tokens":
        raise ValueError(
            f"use_attention needs a backbone with a spatial feature map; {backbone_name} has tokens")
    return FeatureMapAttention(ATTENTION.create(name, channels=channels), channels_last_dim=layout == "NHWC")
