"""Binary real/fake losses by name (each declares its num_outputs) and timm Mixup with soft binary targets.

Every loss takes `logits` (B, num_outputs) and float `targets` (B,) in [0, 1] (soft targets from
mixup allowed; 1 = fake) and returns a scalar mean. Losses run in float32 even under autocast.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.config import AugConfig, ConfigError, LossConfig
from core.registry import LOSSES

if TYPE_CHECKING:  # timm (and torchvision) load only when mixup is built: Config validation lists losses fast
    from timm.data import Mixup

log = logging.getLogger(__name__)



def _single_logit(logits: Tensor, loss_name: str) -> Tensor:
    """(B, 1) or (B,) logits -> (B,) float32; anything else is a wiring error."""
    if logits.ndim == 2 and logits.shape[1] == 1:
        logits = logits[:, 0]
    if logits.ndim != 1:
        raise ValueError(
            f"loss {loss_name!r} expects 1 logit per image, got logits of shape {tuple(logits.shape)}; "
            "use loss_type=ce for a 2-output head"
        )
    return logits.float()


def _check_targets(targets: Tensor, batch: int) -> Tensor:
    targets = targets.reshape(-1).float()
    if targets.numel() != batch:
        raise ValueError(f"got {targets.numel()} targets for a batch of {batch} logits")
    return targets


def _on(buffer: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """A class-weight buffer on the logits' device (works even if the loss module was not moved)."""
    return None if buffer is None else buffer.to(like.device)


class BinaryLoss(nn.Module):
    """Base: holds the expected number of logits per image."""

    num_outputs: int = 1


class BCELoss(BinaryLoss):
    """BCE with logits; `pos_weight` scales the fake (positive) term."""

    def __init__(self, pos_weight: Optional[float] = None) -> None:
        super().__init__()
        self.register_buffer("pos_weight", None if pos_weight is None else torch.tensor(float(pos_weight)))

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        z = _single_logit(logits, "bce")
        return F.binary_cross_entropy_with_logits(
            z, _check_targets(targets, len(z)), pos_weight=_on(self.pos_weight, z)
        )


class LabelSmoothingBCELoss(BCELoss):
    """BCE on targets pulled towards 0.5: y * (1 - eps) + eps / 2."""

    def __init__(self, smoothing: float, pos_weight: Optional[float] = None) -> None:
        super().__init__(pos_weight)
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = float(smoothing)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        z = _single_logit(logits, "label_smoothing")
        t = _check_targets(targets, len(z)) * (1.0 - self.smoothing) + self.smoothing / 2.0
        return F.binary_cross_entropy_with_logits(z, t, pos_weight=_on(self.pos_weight, z))


class FocalLoss(BinaryLoss):
    """Sigmoid focal loss (mean), torchvision's formula; alpha < 0 turns the class weighting off.

    (1 - p_t) ** gamma is computed as exp(gamma * log(1 - p_t)) with log(1 - p_t) from log-sigmoids:
    torchvision.ops.sigmoid_focal_loss returns NaN gradients for gamma < 1 once a logit saturates
    (|z| > ~17 in float32, where 1 - p_t == 0 and the slope of x ** gamma is infinite), which a sweep
    over focal_gamma reaches at high learning rates. Soft targets (mixup) work as in torchvision.
    """

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0) -> None:
        super().__init__()
        self.alpha = -1.0 if alpha < 0 else float(alpha)
        self.gamma = float(gamma)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        z = _single_logit(logits, "focal")
        y = _check_targets(targets, len(z))
        loss = F.binary_cross_entropy_with_logits(z, y, reduction="none")
        if self.gamma:
            # 1 - p_t = y * sigmoid(-z) + (1 - y) * sigmoid(z), in log space (log 0 = -inf drops a term)
            log_1m_pt = torch.logaddexp(torch.log(y) + F.logsigmoid(-z), torch.log1p(-y) + F.logsigmoid(z))
            loss = loss * torch.exp(self.gamma * log_1m_pt)
        if self.alpha >= 0:
            loss = (self.alpha * y + (1 - self.alpha) * (1 - y)) * loss
        return loss.mean()


class SoftTargetCELoss(BinaryLoss):
    """Cross-entropy on K >= 2 logits (real, fake, unused...) with soft targets [1 - y, y, 0...]; also for ArcFace.

    `pos_weight` becomes class weights [1, pos_weight, 1...] (same effect as BCE's pos_weight). K > 2 only
    widens the head (loss.num_classes, seed 002); the extra classes are never a target.
    """

    num_outputs = 2

    def __init__(self, pos_weight: Optional[float] = None) -> None:
        super().__init__()
        weight = None if pos_weight is None else torch.tensor([1.0, float(pos_weight)])
        self.register_buffer("weight", weight)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        if logits.ndim != 2 or logits.shape[1] < 2:
            raise ValueError(
                f"loss 'ce' expects at least 2 logits per image, got logits of shape {tuple(logits.shape)}; "
                "build the model with loss_cfg.num_outputs"
            )
        y = _check_targets(targets, len(logits))
        k = logits.shape[1]
        probs = F.pad(torch.stack([1.0 - y, y], dim=1), (0, k - 2))
        weight = _on(self.weight, logits)
        if weight is not None and k > 2:
            weight = F.pad(weight, (0, k - 2), value=1.0)
        return F.cross_entropy(logits.float(), probs, weight=weight)


@LOSSES.register("bce", num_outputs=1)
def _bce(cfg: LossConfig, pos_weight: Optional[float] = None) -> nn.Module:
    return BCELoss(pos_weight)


@LOSSES.register("label_smoothing", num_outputs=1)
def _label_smoothing(cfg: LossConfig, pos_weight: Optional[float] = None) -> nn.Module:
    return LabelSmoothingBCELoss(cfg.label_smoothing, pos_weight)


@LOSSES.register("focal", num_outputs=1)
def _focal(cfg: LossConfig, pos_weight: Optional[float] = None) -> nn.Module:
    if pos_weight is not None:
        log.info("loss=focal pos_weight=%.4g ignored: focal_alpha=%s balances the classes", pos_weight, cfg.focal_alpha)
    return FocalLoss(cfg.focal_alpha, cfg.focal_gamma)


@LOSSES.register("ce", num_outputs=lambda cfg: cfg.num_classes)
def _ce(cfg: LossConfig, pos_weight: Optional[float] = None) -> nn.Module:
    return SoftTargetCELoss(pos_weight)


def create_loss(loss_cfg: LossConfig, pos_weight: Optional[float] = None) -> nn.Module:
    """The loss named by `loss_cfg.loss_type`; `pos_weight` = n_real / n_fake when data.balance=pos_weight."""
    loss = LOSSES.create(loss_cfg.loss_type, cfg=loss_cfg, pos_weight=pos_weight)
    log.debug("loss=%s pos_weight=%s", loss_cfg.loss_type, pos_weight)
    return loss


# ------------------------------------------------------------------------------ mixup
def build_mixup(aug_cfg: AugConfig) -> Optional[Mixup]:
    """timm Mixup/CutMix over 2 classes with no label smoothing (the loss does that), or None when off.

    timm mixes a batch with its flipped self, so it needs an even batch: use `mix_batch`, which
    leaves odd batches unmixed. Its random draws come from numpy's global RNG (seeded by the trainer).
    """
    if not aug_cfg.use_mixup:
        return None
    if aug_cfg.mixup_alpha <= 0 and aug_cfg.cutmix_alpha <= 0:
        raise ConfigError("aug.use_mixup needs aug.mixup_alpha > 0 or aug.cutmix_alpha > 0 (both are 0)")
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=aug_cfg.mixup_alpha,
        cutmix_alpha=aug_cfg.cutmix_alpha,
        prob=aug_cfg.mixup_prob,
        switch_prob=aug_cfg.switch_prob,
        mode="batch",
        label_smoothing=0.0,
        num_classes=2,
    )


def soft_binary_targets(mixed_onehot: Tensor) -> Tensor:
    """timm's mixed one-hot targets (B, 2) -> P(fake) targets (B,) = column 1."""
    if mixed_onehot.ndim != 2 or mixed_onehot.shape[1] != 2:
        raise ValueError(f"expected mixed one-hot targets of shape (B, 2), got {tuple(mixed_onehot.shape)}")
    return mixed_onehot[:, 1].float()


def mix_batch(mixup: Optional[Mixup], images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(images, float targets (B,)) after mixup; unmixed when mixup is None or the batch is odd.

    Mixes `images` in place (timm does); labels are 0/1 (float or long).
    """
    targets = labels.reshape(-1).float()
    if mixup is None:
        return images, targets
    if len(images) % 2:
        log.debug("mixup skipped: odd batch size=%d", len(images))
        return images, targets
    images, mixed = mixup(images, labels.reshape(-1).round().long())
    return images, soft_binary_targets(mixed).to(targets.device)
