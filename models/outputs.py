"""Raw model outputs <-> P(fake): the one place that knows a 1-output head is sigmoid and a 2-output head softmax.

Used by training (validation scores), evaluation (predict, TTA, MC-dropout), serving (pyfunc, ensembles).
"""
from __future__ import annotations

import torch

_EPS = 1e-7


def fake_logit(outputs: torch.Tensor) -> torch.Tensor:
    """Raw outputs (..., K) -> logit of "fake" (...): z for 1 output; z1 - z0 for K >= 2 (label 0 real, 1 fake;
    further classes only widen a margin head, e.g. seed 002's 9-class ArcFace, and do not enter P(fake))."""
    if outputs.ndim < 1 or outputs.shape[-1] < 1:
        raise ValueError(f"expected raw outputs (..., K) with K >= 1, got shape {tuple(outputs.shape)}")
    return outputs[..., 0] if outputs.shape[-1] == 1 else outputs[..., 1] - outputs[..., 0]


def fake_prob(outputs: torch.Tensor) -> torch.Tensor:
    """Raw outputs (..., K) -> P(fake) (...): sigmoid of the fake logit (softmax over (real, fake) == sigmoid of
    z1 - z0)."""
    return torch.sigmoid(fake_logit(outputs.float()))


def logit_score(outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logit, P(fake)) per sample from raw outputs (B, K), in float32."""
    z = fake_logit(outputs.float())
    return z, torch.sigmoid(z)


def logits_from_prob(p: torch.Tensor, num_outputs: int) -> torch.Tensor:
    """P(fake) (B,) -> raw outputs (B, K) whose P(fake) (fake_prob) is p (clipped to 1e-7); classes past the
    first two get -1e4, so a softmax over all K is the same as over (real, fake)."""
    q = p.double().clamp(_EPS, 1 - _EPS)
    z = (torch.log(q) - torch.log1p(-q)).to(torch.float32)
    if num_outputs == 1:
        return z[:, None]
    rest = torch.full((len(z), num_outputs - 2), -1e4, dtype=z.dtype, device=z.device)
    return torch.cat([torch.zeros_like(z)[:, None], z[:, None], rest], dim=1)


class ScoreModel(torch.nn.Module):
    """Wraps a detector so it maps its input (images (N,3,H,W) or clips) to P(fake) (N,1): the logged model."""

    def __init__(self, detector: torch.nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_prob(self.detector(x))[:, None]
