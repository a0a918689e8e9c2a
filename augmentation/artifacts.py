"""Frequency / up-sampling artefact augmentations (albumentations-compatible) and artefact pseudo-fakes.

Generators (GANs, diffusion decoders, face-swap pipelines) up-sample: nearest or bilinear resizing and
transposed convolutions leave a periodic grid, i.e. peaks in the spectrum; re-saved fakes are often
JPEG-compressed twice on shifted 8x8 grids. Each trace is a plain function `f(img, rng, period=...)`
(uint8 HxWx3 in and out) and an `A.ImageOnlyTransform` that draws its randomness from albumentations'
seeded generator, so `augmentation.policies.seed_transform` seeds it like any other transform:

    UpsampleTrace   down by 1/period, back up with nearest | bilinear | zero-insertion + blur
    DoubleJPEG      JPEG at q1, shift the 8x8 grid by 0-7 px, JPEG at q2, shift back
    SpectralPeaks   a faint checkerboard / periodic cosine grid (spectral peaks at period 2, 4 or 8)

`artifact_ops(p)` is the `A.OneOf` over the three that `aug.artifact_prob` appends to the training policy
(both classes: label-preserving, so neither class can be told apart by these traces);
`artifact_fake(img, rng)` makes a pseudo-fake for `aug.artifact_fake_prob` (real -> label 1).
"""
from __future__ import annotations

from typing import Any, Callable

import albumentations as A
import cv2
import numpy as np

PERIODS = (2, 4, 8)
UPSAMPLING = ("nearest", "bilinear", "zeros")


def upsample_trace(img: np.ndarray, rng: np.random.Generator, period: int | None = None,
                   mode: str | None = None) -> np.ndarray:
    """Down-scale by `period` (random 2 or 4) and up again by `mode` (random of nearest, bilinear, zeros).

    `zeros` inserts zeros between pixels and smooths with a [1 2 1]-style kernel: a transposed convolution's
    checkerboard trace."""
    period = int(period or rng.choice((2, 4)))
    mode = mode or str(rng.choice(UPSAMPLING))
    h, w = img.shape[:2]
    small = cv2.resize(img, (max(1, w // period), max(1, h // period)), interpolation=cv2.INTER_AREA)
    if mode == "nearest":
        up = cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
    elif mode == "bilinear":
        up = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    elif mode == "zeros":
        z = np.zeros((small.shape[0] * period, small.shape[1] * period, 3), np.float32)
        z[::period, ::period] = small
        k1 = np.concatenate([np.arange(1, period + 1), np.arange(period - 1, 0, -1)]).astype(np.float32)
        k1 /= k1.sum() / period  # a triangle kernel: ideal linear interpolation, imperfect in practice
        k1 *= rng.uniform(0.9, 1.1, k1.shape).astype(np.float32)  # learned kernels are not exact: a grid shows
        up = cv2.sepFilter2D(z, -1, k1, k1, borderType=cv2.BORDER_REFLECT_101)
        up = cv2.resize(up, (w, h), interpolation=cv2.INTER_NEAREST) if up.shape[:2] != (h, w) else up
    else:
        raise ValueError(f"upsample_trace: mode {mode!r} is not one of {UPSAMPLING}")
    return np.clip(up + 0.5, 0, 255).astype(np.uint8) if up.dtype != np.uint8 else up


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)


def double_jpeg(img: np.ndarray, rng: np.random.Generator, q1: tuple[int, int] = (60, 90),
                q2: tuple[int, int] = (70, 95), aligned_prob: float = 0.3) -> np.ndarray:
    """JPEG twice: the second time on an 8x8 grid shifted by 1-7 px (aligned with `aligned_prob`)."""
    h, w = img.shape[:2]
    out = _jpeg(img, int(rng.integers(q1[0], q1[1] + 1)))
    dy, dx = (0, 0) if rng.random() < aligned_prob else tuple(int(v) for v in rng.integers(1, 8, 2))
    shifted = np.pad(out, ((dy, 0), (dx, 0), (0, 0)), mode="edge")
    again = _jpeg(shifted, int(rng.integers(q2[0], q2[1] + 1)))
    return np.ascontiguousarray(again[dy:dy + h, dx:dx + w])


def spectral_peaks(img: np.ndarray, rng: np.random.Generator, period: int | None = None,
                   amplitude: tuple[float, float] = (1.5, 5.0)) -> np.ndarray:
    """Add a faint periodic grid (checkerboard at period 2, cosines at 4 or 8) of `amplitude` grey levels."""
    period = int(period or rng.choice(PERIODS))
    h, w = img.shape[:2]
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 2)
    gx, gy = np.cos(2 * np.pi * x / period + phase[0]), np.cos(2 * np.pi * y / period + phase[1])
    kind = rng.integers(3)  # product (checkerboard-like), horizontal + vertical lines, or one direction
    grid = gx * gy if kind == 0 else (gx + gy) / 2 if kind == 1 else (gx if rng.random() < 0.5 else gy)
    amp = rng.uniform(*amplitude)
    per_channel = 1.0 + rng.uniform(-0.3, 0.3, 3)
    out = img.astype(np.float32) + amp * grid[..., None] * per_channel
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


class _SeededOp(A.ImageOnlyTransform):
    """An albumentations transform around `fn(img, rng)`, its rng drawn from albumentations' seeded generator."""

    fn: Callable[..., np.ndarray]

    def get_params(self) -> dict[str, Any]:
        return {"op_seed": int(self.random_generator.integers(2**31))}

    def apply(self, img: np.ndarray, op_seed: int = 0, **params: Any) -> np.ndarray:
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"{type(self).__name__} needs uint8 HxWx3 images (got {img.dtype} {img.shape})")
        return type(self).fn(img, np.random.default_rng(op_seed))

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ()


class UpsampleTrace(_SeededOp):
    """`upsample_trace` as a transform: down by 2 or 4, up by nearest / bilinear / zero-insertion."""

    fn = staticmethod(upsample_trace)


class DoubleJPEG(_SeededOp):
    """`double_jpeg` as a transform: two JPEG compressions on shifted grids."""

    fn = staticmethod(double_jpeg)


class SpectralPeaks(_SeededOp):
    """`spectral_peaks` as a transform: a faint periodic grid (peaks at period 2, 4 or 8)."""

    fn = staticmethod(spectral_peaks)


def artifact_ops(p: float) -> A.OneOf:
    """One of the three traces with probability p (what `aug.artifact_prob` appends to the policy)."""
    return A.OneOf([UpsampleTrace(p=1.0), DoubleJPEG(p=1.0), SpectralPeaks(p=1.0)], p=p)


def artifact_fake(img: np.ndarray, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """A pseudo-fake with a generator's up-sampling trace: up-sampling, a spectral grid, or both.

    `scale` = stored pixels per model-input pixel (e.g. 4 for a 256 px crop fed at 64 px): periods are
    multiplied by it so the trace survives the loader's resize. Double JPEG is not used here: real photos
    are re-saved too, so it is no evidence of a fake."""
    s = max(1, int(round(scale)))
    out = img
    kind = rng.integers(3)
    if kind in (0, 2):
        out = upsample_trace(out, rng, period=int(rng.choice((2, 4))) * s)
    if kind in (1, 2):
        out = spectral_peaks(out, rng, period=int(rng.choice(PERIODS)) * s)
    return out
