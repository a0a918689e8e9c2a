"""Device and mixed precision, chosen once per run: `resolve_device`, `autocast_factory`, `to_device`."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from core.errors import ConfigError


def resolve_device(name: str | torch.device) -> torch.device:
    """auto -> cuda if available, else mps, else cpu; an explicit unavailable device is an error."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use --device auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("train.device=mps but MPS is not available; use --device auto or cpu")
    return torch.device(name)


def autocast_factory(device: torch.device, enabled: bool) -> Callable[[], contextlib.AbstractContextManager]:
    """Chosen once: fp16 autocast on CUDA (with a GradScaler), bf16 on CPU (AMX), nothing when disabled."""
    if not enabled:
        return contextlib.nullcontext
    dtype = torch.float16 if device.type in ("cuda", "mps") else torch.bfloat16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """Move a batch to the device, channels_last when the model runs that way: image batches (N,3,H,W) and
    clip batches (dataio.sequence.SequenceBatch, which applies it per frame); other shapes (cached features) as is."""
    x = x.to(device, non_blocking=device.type == "cuda")
    if channels_last and (not isinstance(x, torch.Tensor) or x.ndim == 4):
        return x.contiguous(memory_format=torch.channels_last)
    return x
