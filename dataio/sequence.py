"""`SequenceBatch`: one batch of clips in both streams (HQ frames and their LQ copies), as the video loaders
yield it and the dual-stream model (models.video) takes it."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class SequenceBatch:
    """Both streams of a batch of clips. Moves like a tensor for the trainer (`len`, `.to`,
    `.pin_memory`, `.contiguous(memory_format=...)`, and `torch.flip(x, dims=[3])` = horizontal flip
    of every frame, as the image TTA does on NCHW)."""

    hq: Tensor  # (B, T, 3, H, W)
    lq: Tensor  # (B, T, 3, h, w)
    channels_last: bool = False  # frames go through the backbones channels_last

    def __len__(self) -> int:
        return int(self.hq.shape[0])

    def to(self, *args: Any, **kwargs: Any) -> "SequenceBatch":
        return replace(self, hq=self.hq.to(*args, **kwargs), lq=self.lq.to(*args, **kwargs))

    def pin_memory(self) -> "SequenceBatch":
        return replace(self, hq=self.hq.pin_memory(), lq=self.lq.pin_memory())

    def contiguous(self, memory_format: torch.memory_format = torch.contiguous_format) -> "SequenceBatch":
        # 5-D tensors cannot be channels_last: remember the wish, the model applies it per frame
        return replace(self, channels_last=memory_format is torch.channels_last)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        kwargs = kwargs or {}
        if func is torch.flip and isinstance(args[0], SequenceBatch):
            dims = kwargs.get("dims", args[1] if len(args) > 1 else None)
            if list(dims) not in ([3], [-1]):
                raise TypeError(f"SequenceBatch supports torch.flip(x, dims=[3]) (horizontal) only; got dims={dims}")
            x = args[0]
            return replace(x, hq=torch.flip(x.hq, dims=[-1]), lq=torch.flip(x.lq, dims=[-1]))
        return NotImplemented
