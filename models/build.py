"""One way to build a detector from a Config (`build_model`) and one way to rebuild a trained one from a
checkpoint (`load_trained_model`); training, evaluation, TTA, pyfunc and ensembles all use these."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from core.checkpoints import load_checkpoint
from core.config import Config
from core.device import autocast_factory, resolve_device
from core.errors import CheckpointError


def build_model(cfg: Config, pretrained: bool | None = None) -> torch.nn.Module:
    """The detector the config describes, by its preset's kind: an image Detector, or the dual-stream video model."""
    model_cfg = cfg.model if pretrained is None else cfg.model.model_copy(update={"pretrained": pretrained})
    if cfg.model.kind == "video":
        from models.video import create_dual_stream

        return create_dual_stream(model_cfg, cfg.loss.num_outputs, image_size=cfg.data.image_size, lq_size=cfg.data.lq_size)
    from models.factory import create_detector

    return create_detector(model_cfg, cfg.loss.num_outputs, image_size=cfg.data.image_size)


@dataclass
class TrainedModel:
    """A detector rebuilt from a checkpoint, on its device, with what scoring it needs."""

    model: torch.nn.Module
    config: Config  # the training config stored in the checkpoint
    device: torch.device
    channels_last: bool
    amp: Callable[[], contextlib.AbstractContextManager]
    info: dict[str, Any] = field(default_factory=dict)  # checkpoint metadata: path, run_id, epoch, best_metric

    @property
    def run_id(self) -> str | None:
        return self.info.get("run_id")


def load_trained_model(ref: str | Path, device: str | torch.device = "auto", use_amp: bool | str = False,
                       fallback_config: Config | None = None) -> TrainedModel:
    """Rebuild the model of a checkpoint (file, run folder or runs:/ URI) in eval mode, without downloading
    weights. A bare state_dict needs `fallback_config`; anything unreadable raises CheckpointError."""
    ckpt = load_checkpoint(ref)
    if "config" in ckpt:
        trained = Config.model_validate(ckpt["config"])
    elif fallback_config is not None:
        trained = fallback_config
    else:
        raise CheckpointError(f"{ckpt['path']} stores no config; use a checkpoint written by train(cfg) (best.pt)")
    model = build_model(trained.with_overrides({"model.pretrained_path": None}, "checkpoint"), pretrained=False)
    model.load_state_dict(ckpt.pop("model"))
    dev = resolve_device(device)
    channels_last = model.is_convnet if trained.model.channels_last is None else trained.model.channels_last
    model.to(dev, memory_format=torch.channels_last if channels_last else torch.preserve_format).eval()
    info = {k: ckpt.get(k) for k in ("path", "run_id", "epoch", "best_metric")}
    from core.amp import inference_amp  # "auto" (the training default): fp16 on CUDA, fp32 elsewhere

    return TrainedModel(model, trained, dev, channels_last, autocast_factory(dev, inference_amp(use_amp, dev)), info)
