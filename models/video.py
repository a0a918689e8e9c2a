"""Sequence models for video: a hand-written ConvLSTM and the dual-stream (HQ/LQ) detector.

    model = create_dual_stream(cfg.model, cfg.loss.num_outputs, image_size=cfg.data.image_size)
    logits = model(SequenceBatch(hq, lq))     # hq (B, T, 3, 224, 224), lq (B, T, 3, 112, 112) -> (B, 1)

Each stream runs a timm backbone over every frame (`forward_features`: the last feature map), a
stacked ConvLSTM over time (filters [256, 128]), takes the last hidden state, pools it and embeds it
(512-d); the two stream embeddings are fused (attention: learned softmax weights over the streams;
concat; gated) and classified 512 -> 256 -> 128 -> num_outputs with dropout [0.5, 0.3]. The model
keeps the image Detector's contract: backbone, attention, head, num_outputs, is_convnet, data_config,
parameter_groups(), classifier_modules(), forward(x, labels=None).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.registry import Registry
from dataio.sequence import SequenceBatch

log = logging.getLogger(__name__)

# Defaults of the video keys the Config gains (model.hq_backbone, ...); read with getattr until then.
VIDEO_MODEL_DEFAULTS: dict[str, Any] = {
    "hq_backbone": "efficientnet_b4", "lq_backbone": "efficientnet_b0", "fusion": "attention",
    "lstm_channels": (256, 128), "lstm_kernel": 3,
}


# ------------------------------------------------------------------------------ ConvLSTM
class ConvLSTMCell(nn.Module):
    """One ConvLSTM step: gates = conv([x, h]) split as (i, f, o, g); c' = f*c + i*g; h' = o*tanh(c')."""

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int = 3, bias: bool = True) -> None:
        super().__init__()
        self.hidden_channels = hidden_channels
        self.conv = nn.Conv2d(in_channels + hidden_channels, 4 * hidden_channels, kernel_size,
                              padding=kernel_size // 2, bias=bias)

    def init_state(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = x.new_zeros(x.shape[0], self.hidden_channels, *x.shape[2:])
        return z, z

    def forward(self, x: Tensor, state: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
        h, c = state if state is not None else self.init_state(x)
        i, f, o, g = self.conv(torch.cat([x, h], dim=1)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c


class ConvLSTM(nn.Module):
    """Stacked ConvLSTM over (B, T, C, H, W) -> every step of the last layer (B, T, C_last, H, W)."""

    def __init__(self, in_channels: int, hidden_channels: Sequence[int] = (256, 128), kernel_size: int = 3) -> None:
        super().__init__()
        if not hidden_channels:
            raise ValueError("ConvLSTM needs at least one layer (hidden_channels, e.g. [256, 128])")
        sizes = [in_channels, *hidden_channels]
        self.cells = nn.ModuleList(ConvLSTMCell(a, b, kernel_size) for a, b in zip(sizes[:-1], sizes[1:]))
        self.out_channels = sizes[-1]

    def forward(self, x: Tensor) -> Tensor:
        for cell in self.cells:
            state = None
            steps = []
            for t in range(x.shape[1]):
                state = cell(x[:, t], state)
                steps.append(state[0])
            x = torch.stack(steps, dim=1)
        return x


# ------------------------------------------------------------------------------ fusion
FUSIONS: Registry[nn.Module] = Registry("stream fusion")


@FUSIONS.register("attention")
class AttentionFusion(nn.Module):
    """Softmax weights over the streams from a shared scorer; output = weighted sum (dim)."""

    def __init__(self, dim: int, n_streams: int = 2) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, dim // 4 or 1), nn.Tanh(), nn.Linear(dim // 4 or 1, 1))
        self.out_features = dim

    def weights(self, streams: Tensor) -> Tensor:
        """(B, S, dim) -> (B, S) weights summing to 1 per sample."""
        return torch.softmax(self.score(streams).squeeze(-1), dim=1)

    def forward(self, streams: Tensor) -> Tensor:
        return (self.weights(streams).unsqueeze(-1) * streams).sum(dim=1)


@FUSIONS.register("concat")
class ConcatFusion(nn.Module):
    """Concatenate the stream embeddings (S * dim)."""

    def __init__(self, dim: int, n_streams: int = 2) -> None:
        super().__init__()
        self.out_features = dim * n_streams

    def forward(self, streams: Tensor) -> Tensor:
        return streams.flatten(1)


@FUSIONS.register("gated")
class GatedFusion(nn.Module):
    """Per-feature gate g = sigmoid(W [a, b]); output g*a + (1-g)*b (dim). Two streams only."""

    def __init__(self, dim: int, n_streams: int = 2) -> None:
        super().__init__()
        if n_streams != 2:
            raise ValueError("gated fusion mixes exactly two streams")
        self.gate = nn.Linear(2 * dim, dim)
        self.out_features = dim

    def forward(self, streams: Tensor) -> Tensor:
        g = torch.sigmoid(self.gate(streams.flatten(1)))
        return g * streams[:, 0] + (1 - g) * streams[:, 1]


# ------------------------------------------------------------------------------ the detector
class TemporalFusionHead(nn.Module):
    """Per-stream ConvLSTM -> last hidden state -> pool -> embed; fuse; classify.

    It is the part that trains when the backbones are frozen (freeze_strategy=frozen)."""

    needs_labels = False

    def __init__(self, in_channels: Sequence[int], num_outputs: int, *, lstm_channels: Sequence[int] = (256, 128),
                 lstm_kernel: int = 3, embed_dim: int = 512, fusion: str = "attention",
                 hidden: Sequence[int] = (256, 128), dropout: Sequence[float] = (0.5, 0.3)) -> None:
        super().__init__()
        self.temporal = nn.ModuleList(ConvLSTM(c, lstm_channels, lstm_kernel) for c in in_channels)
        self.embed = nn.ModuleList(nn.Sequential(nn.Linear(lstm_channels[-1], embed_dim), nn.ReLU(inplace=True))
                                   for _ in in_channels)
        self.fusion = FUSIONS.create(fusion, dim=embed_dim, n_streams=len(in_channels))
        layers: list[nn.Module] = []
        width = self.fusion.out_features
        for k, h in enumerate(hidden):
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            if k < len(dropout) and dropout[k] > 0:
                layers.append(nn.Dropout(dropout[k]))
            width = h
        layers.append(nn.Linear(width, num_outputs))
        self.classifier = nn.Sequential(*layers)

    def stream_embeddings(self, maps: Sequence[Tensor]) -> Tensor:
        """[(B, T, C, H, W) per stream] -> (B, S, embed_dim)."""
        out = []
        for fmap, lstm, embed in zip(maps, self.temporal, self.embed):
            last = lstm(fmap)[:, -1]  # (B, C_last, H, W): the state after the whole clip
            out.append(embed(last.mean(dim=(2, 3))))
        return torch.stack(out, dim=1)

    def classify(self, streams: Tensor) -> Tensor:
        """(B, S, embed_dim) stream embeddings -> fused -> logits (B, num_outputs)."""
        return self.classifier(self.fusion(streams))

    def forward(self, maps: Sequence[Tensor], labels: Optional[Tensor] = None) -> Tensor:
        return self.classify(self.stream_embeddings(maps))


class DualBackbone(nn.Module):
    """The HQ and LQ frame backbones (timm models, num_classes=0)."""

    def __init__(self, hq: nn.Module, lq: nn.Module) -> None:
        super().__init__()
        self.hq, self.lq = hq, lq

    def group_matcher(self, coarse: bool = False) -> Callable[[str], tuple[int]]:
        """timm-style matcher over both streams: stage k-from-the-end of HQ and LQ share one group,
        so freeze_strategy partial:N trains the last N stages of each backbone."""
        from timm.models import group_parameters

        rank: dict[str, int] = {}
        for prefix, net in (("hq", self.hq), ("lq", self.lq)):
            groups = group_parameters(net, net.group_matcher(coarse=coarse))
            keys = sorted(groups)
            for k, key in enumerate(keys):
                rank.update({f"{prefix}.{name}": k - len(keys) for name in groups[key]})
        return lambda name: (rank.get(name, 0),)


class DualStreamDetector(nn.Module):
    """HQ + LQ frame backbones -> TemporalFusionHead -> logits (B, num_outputs)."""

    def __init__(self, backbone: DualBackbone, head: TemporalFusionHead, num_outputs: int, *, data_config: dict,
                 hq_size: int, lq_size: int, layouts: tuple[str, str] = ("NCHW", "NCHW"),
                 lq_norm: Optional[tuple[Sequence[float], Sequence[float]]] = None, name: str = "dual_stream") -> None:
        super().__init__()
        self.backbone, self.attention, self.head = backbone, nn.Identity(), head
        self.num_outputs, self.name = num_outputs, name
        self.is_convnet = True
        self.layouts = layouts
        self.data_config, self.hq_size, self.lq_size = data_config, hq_size, lq_size
        # both streams arrive normalised with data_config's mean/std; map LQ to its backbone's own
        mean, std = torch.tensor(data_config["mean"]), torch.tensor(data_config["std"])
        lq_mean, lq_std = (torch.tensor(lq_norm[0]), torch.tensor(lq_norm[1])) if lq_norm else (mean, std)
        self.lq_renorm = not (torch.allclose(mean, lq_mean) and torch.allclose(std, lq_std))
        # 1-D buffers: model.to(memory_format=channels_last) rejects 5-D ones
        self.register_buffer("lq_scale", std / lq_std, persistent=False)
        self.register_buffer("lq_shift", (mean - lq_mean) / lq_std, persistent=False)

    def streams(self, x: SequenceBatch | tuple | Mapping | Tensor) -> tuple[Tensor, Tensor, bool]:
        """(hq, lq, channels_last) from a SequenceBatch, an (hq, lq) pair, a {"hq", "lq"} dict, or an HQ
        tensor alone (serving/export: LQ is then area-downscaled HQ without the JPEG degradation)."""
        if isinstance(x, SequenceBatch):
            return x.hq, x.lq, x.channels_last
        if isinstance(x, Mapping):
            return x["hq"], x["lq"], False
        if isinstance(x, (tuple, list)) and len(x) == 2:
            return x[0], x[1], False
        if isinstance(x, Tensor) and x.ndim == 5:
            lq = F.interpolate(x.flatten(0, 1), size=(self.lq_size, self.lq_size), mode="area")
            return x, lq.unflatten(0, x.shape[:2]), False
        raise TypeError(f"DualStreamDetector takes a SequenceBatch, (hq, lq) or a (B, T, 3, H, W) tensor; got {type(x).__name__}")

    def frame_maps(self, frames: Tensor, backbone: nn.Module, layout: str, channels_last: bool) -> Tensor:
        """(B, T, 3, H, W) -> the backbone's last feature map per frame (B, T, C, h, w)."""
        flat = frames.flatten(0, 1)
        if channels_last:
            flat = flat.contiguous(memory_format=torch.channels_last)
        fmap = backbone.forward_features(flat)
        if layout == "NHWC":
            fmap = fmap.permute(0, 3, 1, 2)
        return fmap.unflatten(0, frames.shape[:2])

    def features(self, x: SequenceBatch | tuple | Mapping | Tensor) -> Tensor:
        """Stream embeddings (B, 2, embed_dim) before fusion."""
        hq, lq, cl = self.streams(x)
        if self.lq_renorm:
            lq = lq * self.lq_scale.view(1, 1, 3, 1, 1) + self.lq_shift.view(1, 1, 3, 1, 1)
        maps = [self.frame_maps(hq, self.backbone.hq, self.layouts[0], cl),
                self.frame_maps(lq, self.backbone.lq, self.layouts[1], cl)]
        return self.head.stream_embeddings(maps)

    def forward(self, x: SequenceBatch | tuple | Mapping | Tensor, labels: Optional[Tensor] = None) -> Tensor:
        return self.head.classify(self.features(x))

    def example_input(self, batch_size: int = 2, sequence_length: int = 4) -> tuple[Tensor, Tensor]:
        """Zero (hq, lq) tensors of the right shapes (for export / model logging)."""
        return (torch.zeros(batch_size, sequence_length, 3, self.hq_size, self.hq_size),
                torch.zeros(batch_size, sequence_length, 3, self.lq_size, self.lq_size))

    def classifier_modules(self) -> list[nn.Module]:
        """What sits on top of the backbones (trainable when they are frozen)."""
        return [self.attention, self.head]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """{"backbone": both frame backbones, "classifier": ConvLSTMs + fusion + classifier}."""
        return {"backbone": list(self.backbone.parameters()),
                "classifier": [p for m in self.classifier_modules() for p in m.parameters()]}


# ------------------------------------------------------------------------------ building
def _stream_backbone(model_cfg: Any, name: str, size: int) -> tuple[nn.Module, dict, str, int]:
    """(timm backbone, data_config, layout, channels) for a preset or timm name, via the image factory
    (so offline weights, hub errors and pretrained flags behave as for image models)."""
    from models.factory import create_detector, probe_backbone
    from models.presets import PRESETS

    update = ({"model_type": name, "model_name": None} if name in PRESETS
              else {"model_type": "efficientnet", "model_name": name})
    update.update(pretrained_path=None, use_attention=False, head="linear")
    det = create_detector(model_cfg.model_copy(update=update), 1, image_size=size)
    layout, channels, _ = probe_backbone(det.backbone, size)
    if layout == "tokens":
        raise ValueError(f"dual_stream backbone {name!r} emits tokens, not a feature map; use a conv net or swin")
    return det.backbone, det.data_config, layout, channels


def create_dual_stream(model_cfg: Any, num_outputs: int, image_size: Optional[int] = None, *,
                       lq_size: Optional[int] = None, **overrides: Any) -> DualStreamDetector:
    """Build the dual-stream detector from `model_cfg` (ModelConfig; pretrained, drop_path_rate and the
    video keys hq_backbone, lq_backbone, fusion, lstm_channels, lstm_kernel; keyword overrides win).

    image_size: HQ frame size (default 224); lq_size: LQ frame size (default image_size // 2)."""
    unknown = set(overrides) - set(VIDEO_MODEL_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown dual-stream option(s) {sorted(unknown)}; valid: {sorted(VIDEO_MODEL_DEFAULTS)}")
    opt = {k: overrides.get(k, getattr(model_cfg, k, v)) for k, v in VIDEO_MODEL_DEFAULTS.items()}
    hq_size = image_size or 224
    lq_size = lq_size or max(hq_size // 2, 16)
    hq, data_config, hq_layout, hq_ch = _stream_backbone(model_cfg, opt["hq_backbone"], hq_size)
    lq, lq_config, lq_layout, lq_ch = _stream_backbone(model_cfg, opt["lq_backbone"], lq_size)
    head = TemporalFusionHead([hq_ch, lq_ch], num_outputs, lstm_channels=tuple(opt["lstm_channels"]),
                              lstm_kernel=int(opt["lstm_kernel"]), fusion=opt["fusion"])
    det = DualStreamDetector(DualBackbone(hq, lq), head, num_outputs, data_config=data_config, hq_size=hq_size,
                             lq_size=lq_size, layouts=(hq_layout, lq_layout),
                             lq_norm=(lq_config["mean"], lq_config["std"]))
    log.info("event=model_built model=dual_stream hq=%s@%d lq=%s@%d lstm=%s fusion=%s outputs=%d params=%d",
             opt["hq_backbone"], hq_size, opt["lq_backbone"], lq_size, list(opt["lstm_channels"]), opt["fusion"],
             num_outputs, sum(p.numel() for p in det.parameters()))
    return det


__all__ = ["FUSIONS", "ConvLSTM", "ConvLSTMCell", "DualBackbone", "DualStreamDetector", "SequenceBatch",
           "TemporalFusionHead", "create_dual_stream"]
