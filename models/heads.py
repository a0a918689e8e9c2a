"""Classifier heads on pooled backbone features: linear, MLP (BN, dropout, residual), ArcFace.

Every head maps (B, in_features) -> logits (B, num_outputs) and takes `labels` (ignored unless the
head sets `needs_labels`). Build one by name with `create_head(name, in_features, num_outputs, cfg)`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.config import ModelConfig
from core.registry import HEADS



class LinearHead(nn.Module):
    """Dropout + Linear."""

    needs_labels = False

    def __init__(self, in_features: int, num_outputs: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_outputs)

    def forward(self, x: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        return self.fc(self.drop(x))


def _block(in_features: int, out_features: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, out_features), nn.BatchNorm1d(out_features), nn.ReLU(inplace=True), nn.Dropout(dropout)
    )


class MLPHead(nn.Module):
    """Linear-BN-ReLU-Dropout to `hidden`, a second such block added back (residual), then Linear."""

    needs_labels = False

    def __init__(self, in_features: int, num_outputs: int, hidden: int = 512, dropout: float = 0.0) -> None:
        super().__init__()
        self.proj = _block(in_features, hidden, dropout)
        self.block = _block(hidden, hidden, dropout)
        self.fc = nn.Linear(hidden, num_outputs)

    def forward(self, x: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        h = self.proj(x)
        return self.fc(h + self.block(h))


class ArcFaceHead(nn.Module):
    """Embedding (Linear with bias -> BatchNorm1d) and an additive angular margin classifier.

    logits = s * cos(theta_j), with theta_y + m for the target class when training with labels
    (Deng et al., 2019). The margin falls back to the linear `cos - m*sin(m)` where theta + m would
    pass pi, so the target logit stays monotonic in theta ("easy margin" keeps cos > 0 instead).
    """

    needs_labels = True

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        embedding_dim: int = 512,
        scale: float = 30.0,
        margin: float = 0.5,
        dropout: float = 0.0,
        easy_margin: bool = False,
    ) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.embedding = nn.Linear(in_features, embedding_dim, bias=True)
        self.bn = nn.BatchNorm1d(embedding_dim)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.xavier_uniform_(self.weight)
        self.scale, self.margin, self.easy_margin = scale, margin, easy_margin
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.th, self.mm = math.cos(math.pi - margin), math.sin(math.pi - margin) * margin

    def embed(self, x: Tensor) -> Tensor:
        """Pooled features -> BN'd embedding (B, embedding_dim)."""
        return self.bn(self.embedding(self.drop(x)))

    def cosine(self, emb: Tensor) -> Tensor:
        """Cosine similarity of each embedding to each class centre, in float32 (AMP-safe)."""
        return F.linear(F.normalize(emb.float(), dim=1), F.normalize(self.weight.float(), dim=1))

    def forward(self, x: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        cos = self.cosine(self.embed(x))
        if labels is None or not self.training:
            return self.scale * cos
        sin = (1.0 - cos.pow(2)).clamp(min=1e-7).sqrt()
        phi = cos * self.cos_m - sin * self.sin_m  # cos(theta + m)
        if self.easy_margin:
            phi = torch.where(cos > 0, phi, cos)
        else:
            phi = torch.where(cos > self.th, phi, cos - self.mm)
        target = F.one_hot(labels.round().long().view(-1), cos.shape[1]).to(cos.dtype)
        return self.scale * (target * phi + (1.0 - target) * cos)


@HEADS.register("linear")
def _linear(in_features: int, num_outputs: int, cfg: ModelConfig) -> nn.Module:
    return LinearHead(in_features, num_outputs, dropout=cfg.dropout)


@HEADS.register("mlp")
def _mlp(in_features: int, num_outputs: int, cfg: ModelConfig) -> nn.Module:
    return MLPHead(in_features, num_outputs, hidden=cfg.embedding_dim, dropout=cfg.dropout)


@HEADS.register("arcface")
def _arcface(in_features: int, num_outputs: int, cfg: ModelConfig) -> nn.Module:
    if num_outputs < 2:
        raise ValueError("model.head=arcface needs at least 2 classes; set loss.loss_type=ce")
    return ArcFaceHead(in_features, num_outputs, embedding_dim=cfg.embedding_dim, scale=cfg.arcface_scale,
                       margin=cfg.arcface_margin, dropout=cfg.dropout)


def create_head(name: str, in_features: int, num_outputs: int, cfg: ModelConfig) -> nn.Module:
    """Build the registered head `name` for `in_features` pooled features."""
    return HEADS.create(name, in_features=in_features, num_outputs=num_outputs, cfg=cfg)
