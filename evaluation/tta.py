"""Test-time augmentation on normalized image batches: which views, and how their predictions are averaged.

    spec = parse_tta("flip,crop,scale", space="logit")   # 16 views: (identity, 5 crops, 2 zooms) x (as is, flipped)
    preds = evaluation.inference.predict(model, loader, device, tta=spec)

Every view maps a batch (B, 3, S, S) to a batch of the same shape, so fixed-size models (ViT, Swin) work
too. Views are applied on the device after the eval transform (resize + normalize):
  flip   horizontal flip (combined with every other view: ten-crop style)
  crop   centre + 4 corner crops covering 0.9 of each side, resized back to S (bilinear)
  scale  the face rescaled on an S x S canvas: 1.1 zooms in (resize, centre crop), 0.9 zooms out (resize
         with antialiasing, reflect-pad)
Averaging: "logit" = mean of the raw logits (a 2-output model: mean logit difference); "prob" = mean of
P(fake), returned as the logits whose sigmoid/softmax is that mean. A flip on a video SequenceBatch is
supported (models.video); crops and zooms need plain image batches.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from models.outputs import fake_prob, logits_from_prob

Space = Literal["logit", "prob"]
SPACES: tuple[str, ...] = ("logit", "prob")
CROP_FRACTION = 0.9
ZOOMS = (0.9, 1.1)
CORNERS = {"center": (0.5, 0.5), "top_left": (0.0, 0.0), "top_right": (0.0, 1.0),
           "bottom_left": (1.0, 0.0), "bottom_right": (1.0, 1.0)}
GROUPS = ("flip", "crop", "scale")
_ALIASES = {"flip": "flip", "hflip": "flip", "crop": "crop", "crops": "crop", "multicrop": "crop",
            "five_crop": "crop", "scale": "scale", "scales": "scale", "multiscale": "scale", "zoom": "scale"}


@dataclass(frozen=True)
class View:
    """One deterministic view of a batch: an optional crop (fraction, relative y, relative x) or zoom, then a flip."""

    name: str
    flip: bool = False
    crop: tuple[float, float, float] | None = None
    zoom: float = 1.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.crop is not None or self.zoom != 1.0:
            if not isinstance(x, torch.Tensor) or x.ndim != 4:
                raise ValueError(f"TTA view {self.name!r} needs image batches (B, C, H, W); "
                                 "video models support the flip view only (--tta flip)")
            x = _crop(x, *self.crop) if self.crop is not None else _zoom(x, self.zoom)
        return torch.flip(x, dims=[3]) if self.flip else x  # dims=[3]: what models.video.SequenceBatch accepts


def _crop(x: torch.Tensor, fraction: float, ry: float, rx: float) -> torch.Tensor:
    h, w = x.shape[-2:]
    ch, cw = max(1, round(h * fraction)), max(1, round(w * fraction))
    y0, x0 = round((h - ch) * ry), round((w - cw) * rx)
    patch = x[..., y0:y0 + ch, x0:x0 + cw]
    return F.interpolate(patch, size=(h, w), mode="bilinear", align_corners=False)


def _zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    h, w = x.shape[-2:]
    nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
    y = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=factor < 1)
    if factor > 1:
        top, left = (nh - h) // 2, (nw - w) // 2
        return y[..., top:top + h, left:left + w]
    pad_h, pad_w = h - nh, w - nw
    mode = "reflect" if pad_h < nh and pad_w < nw else "replicate"
    return F.pad(y, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), mode=mode)


@dataclass(frozen=True)
class TTASpec:
    """The views to average (identity first) and the space they are averaged in."""

    views: tuple[View, ...]
    space: Space = "logit"
    groups: tuple[str, ...] = ()  # the view groups it was built from (for logs and params)

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise ValueError(f"TTA space must be one of {SPACES}; got {self.space!r}")
        if not self.views:
            raise ValueError("a TTA spec needs at least one view")

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.views]

    def describe(self) -> str:
        """Short text for logs/params, e.g. 'flip+crop: 12 views, logit'."""
        return f"{'+'.join(self.groups) or 'none'}: {len(self.views)} views, {self.space}"


NO_TTA = TTASpec((View("identity"),))


def build_spec(groups: tuple[str, ...] | list[str] = ("flip",), space: Space = "logit") -> TTASpec:
    """Views for the chosen groups (subset of flip, crop, scale); no group = the identity view only."""
    base = [View("identity")]
    if "crop" in groups:
        base += [View(f"crop_{k}", crop=(CROP_FRACTION, ry, rx)) for k, (ry, rx) in CORNERS.items()]
    if "scale" in groups:
        base += [View(f"zoom_{z:g}", zoom=z) for z in ZOOMS]
    views = list(base)
    if "flip" in groups:
        views += [View(("" if v.name == "identity" else f"{v.name}+") + "flip", flip=True, crop=v.crop, zoom=v.zoom)
                  for v in base]
    if len(views) == 1:
        return NO_TTA  # one view: nothing to average, the space does not matter
    return TTASpec(tuple(views), space, tuple(g for g in GROUPS if g in groups))


FLIP = build_spec(("flip",))  # what train.use_tta has always meant: original + flipped, mean logit


def parse_tta(text: str | None, space: Space = "logit") -> TTASpec:
    """'flip,crop,scale' (any subset, aliases crops/multiscale/...) -> TTASpec; '' or 'none' -> identity only."""
    groups: list[str] = []
    for raw in (text or "").replace("+", ",").split(","):
        word = raw.strip().lower()
        if word in ("", "none", "identity"):
            continue
        if word not in _ALIASES:
            close = difflib.get_close_matches(word, list(_ALIASES), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown TTA view {raw.strip()!r}{hint}; valid: {', '.join(GROUPS)}")
        if _ALIASES[word] not in groups:
            groups.append(_ALIASES[word])
    return build_spec(tuple(groups), space)


def as_spec(tta: "bool | TTASpec | None") -> TTASpec:
    """predict()'s tta argument: False/None -> identity, True -> flip (logit), a TTASpec as is."""
    if isinstance(tta, TTASpec):
        return tta
    return FLIP if tta else NO_TTA


# ------------------------------------------------------------------------------ averaging
def average_views(outputs: torch.Tensor, space: Space = "logit") -> torch.Tensor:
    """(V, B, K) raw outputs of V views -> (B, K) raw outputs of the averaged prediction."""
    if space == "logit" or outputs.shape[0] == 1:
        return outputs.mean(dim=0)
    return logits_from_prob(fake_prob(outputs).mean(dim=0), outputs.shape[-1])
