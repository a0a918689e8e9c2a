"""Which parameters train: full | frozen | progressive | partial:N, applied per epoch.

    summary = apply_freeze(detector, "partial:2", epoch, unfreeze_epoch)   # -> ParamSummary
    model.train(); set_train_mode(model)   # frozen BatchNorm layers keep their running statistics

The classifier side (attention + head, and the backbone's own timm classifier if it has one) is
found through the Detector structure and timm's get_classifier(), never by parameter names; the
backbone's stages come from timm's group_matcher(coarse=True) via timm.models.group_parameters.
"""
from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

from torch import nn

from core.registry import FREEZE_STRATEGIES

log = logging.getLogger(__name__)

FREEZE = FREEZE_STRATEGIES  # name -> fn(detector, epoch, unfreeze_epoch, arg) that sets requires_grad
_STRATEGY_RE = re.compile(r"^(?P<name>[a-z_]+)(?::(?P<arg>.*))?$")


@dataclass(frozen=True)
class ParamSummary:
    """Parameter counts after a freeze strategy was applied."""

    total: int
    trainable: int
    frozen: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def param_summary(model: nn.Module) -> ParamSummary:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ParamSummary(total=total, trainable=trainable, frozen=total - trainable)


def _set(params: Iterable[nn.Parameter], trainable: bool) -> None:
    for p in params:
        p.requires_grad_(trainable)


def classifier_parameters(detector: nn.Module) -> list[nn.Parameter]:
    """Attention + head (Detector.classifier_modules) and the backbone's timm classifier, if any."""
    modules = list(detector.classifier_modules())  # type: ignore[operator]
    get_classifier = getattr(detector.backbone, "get_classifier", None)
    if callable(get_classifier):
        classifier = get_classifier()
        if isinstance(classifier, nn.Module):
            modules.append(classifier)
    return [p for m in modules for p in m.parameters()]


def backbone_groups(backbone: nn.Module) -> list[list[str]]:
    """Backbone parameter names in coarse stage groups (stem first), via timm's group_matcher."""
    matcher = getattr(backbone, "group_matcher", None)
    if not callable(matcher):
        raise ValueError(f"partial:N needs a backbone with timm's group_matcher; {type(backbone).__name__} has none")
    from timm.models import group_parameters  # here, not at import: Config validation lists strategies fast

    groups = group_parameters(backbone, matcher(coarse=True))
    return [groups[k] for k in sorted(groups)]


@FREEZE.register("full")
def _full(detector: nn.Module, epoch: int, unfreeze_epoch: int, arg: Optional[int]) -> None:
    _set(detector.parameters(), True)


@FREEZE.register("frozen")
def _frozen(detector: nn.Module, epoch: int, unfreeze_epoch: int, arg: Optional[int]) -> None:
    _set(detector.backbone.parameters(), False)
    _set(classifier_parameters(detector), True)


@FREEZE.register("progressive")
def _progressive(detector: nn.Module, epoch: int, unfreeze_epoch: int, arg: Optional[int]) -> None:
    (_full if epoch >= unfreeze_epoch else _frozen)(detector, epoch, unfreeze_epoch, arg)


@FREEZE.register("partial")
def _partial(detector: nn.Module, epoch: int, unfreeze_epoch: int, arg: Optional[int]) -> None:
    assert arg is not None
    groups = backbone_groups(detector.backbone)
    trainable = {name for group in groups[-arg:] for name in group}
    for name, p in detector.backbone.named_parameters():
        p.requires_grad_(name in trainable)
    _set(classifier_parameters(detector), True)


def parse_strategy(strategy: str) -> tuple[str, Optional[int]]:
    """"partial:3" -> ("partial", 3); "frozen" -> ("frozen", None). Bad forms raise ValueError."""
    m = _STRATEGY_RE.match(strategy.strip())
    name = m["name"] if m else strategy
    FREEZE.get(name)  # unknown name -> UnknownNameError listing the valid ones
    raw = m["arg"] if m else None
    if name != "partial":
        if raw is not None:
            raise ValueError(f"freeze strategy {name!r} takes no argument (got {strategy!r})")
        return name, None
    if raw is None or not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"freeze strategy {strategy!r}: use partial:N with N >= 1 backbone stages to train")
    return name, int(raw)


FREEZE.set_parser(parse_strategy)  # the Config checks "partial:N" forms through it


def apply_freeze(detector: nn.Module, strategy: str, epoch: int = 0, unfreeze_epoch: int = 1) -> ParamSummary:
    """Set requires_grad on `detector` for `strategy` at `epoch`; returns the parameter counts."""
    name, arg = parse_strategy(strategy)
    FREEZE.create(name, detector=detector, epoch=epoch, unfreeze_epoch=unfreeze_epoch, arg=arg)
    summary = param_summary(detector)
    log.debug("event=freeze strategy=%s epoch=%d total=%d trainable=%d frozen=%d",
              strategy, epoch, summary.total, summary.trainable, summary.frozen)
    return summary


def set_train_mode(detector: nn.Module) -> int:
    """Put BatchNorm layers whose parameters are all frozen into eval mode (call after model.train()).

    Returns how many layers were switched. BatchNorm without affine parameters is left alone.
    """
    switched = 0
    for module in detector.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()
                switched += 1
    return switched
