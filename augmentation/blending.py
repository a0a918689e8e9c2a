"""Self-blended pseudo-fakes (SBI-style, Shiohara & Yamasaki 2022), pure numpy/cv2.

A copy of the face is colour-jittered and slightly resampled/shifted, then blended back into the
original through a soft mask: the result carries the blending boundary and colour/frequency
inconsistencies of a face swap without needing a second identity. Images are uint8 HxWx3.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np


def soft_mask(
    h: int,
    w: int,
    rng: np.random.Generator,
    *,
    center: tuple[float, float] | None = None,
    axes: tuple[float, float] | None = None,
    angle: float = 0.0,
    hull_points: int = 8,
    blur_range: tuple[float, float] = (0.04, 0.12),
    max_alpha_range: tuple[float, float] = (0.75, 1.0),
) -> np.ndarray:
    """A soft blending mask, float32 (h, w) in [0, 1].

    The shape is the convex hull of `hull_points` random points inside an ellipse (`center`/`axes`
    as fractions of w/h; random around the image centre if omitted), randomly eroded or dilated,
    with its edge blurred by a Gaussian of sigma `blur_range` x min(h, w) and its peak scaled to a
    random value in `max_alpha_range`.
    """
    cx, cy = center if center is not None else (0.5 + rng.uniform(-0.05, 0.05), 0.5 + rng.uniform(-0.05, 0.05))
    ax, ay = axes if axes is not None else (rng.uniform(0.22, 0.32), rng.uniform(0.28, 0.38))
    t = (np.arange(hull_points) + rng.uniform(0, 1, hull_points)) * 2 * np.pi / hull_points  # all around
    r = np.sqrt(rng.uniform(0.55, 1.0, hull_points))  # stay near the rim: a face-sized region
    pts = np.stack([r * np.cos(t) * ax * w, r * np.sin(t) * ay * h], axis=1)
    a = np.deg2rad(angle)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    pts = pts @ rot.T + np.array([cx * w, cy * h])
    hull = cv2.convexHull(np.round(pts).astype(np.int32))
    mask = np.zeros((h, w), np.uint8)
    cv2.fillConvexPoly(mask, hull, 255, lineType=cv2.LINE_AA)
    k = max(1, int(round(rng.uniform(0.0, 0.05) * min(h, w))))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1))
    mask = cv2.erode(mask, kernel) if rng.random() < 0.5 else cv2.dilate(mask, kernel)
    sigma = max(0.5, rng.uniform(*blur_range) * min(h, w))
    soft = cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (0, 0), sigmaX=sigma, sigmaY=sigma)
    peak = float(soft.max())
    if peak > 0:
        soft *= rng.uniform(*max_alpha_range) / peak
    return np.clip(soft, 0.0, 1.0).astype(np.float32)


def blend(target: np.ndarray, source: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """target * (1 - mask) + source * mask, uint8 (mask float (h, w) or (h, w, 1) in [0, 1])."""
    if target.shape != source.shape:
        raise ValueError(f"blend: target {target.shape} and source {source.shape} differ")
    m = mask.astype(np.float32)
    if m.ndim == 2:
        m = m[..., None]
    out = target.astype(np.float32) * (1.0 - m) + source.astype(np.float32) * m
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def color_jitter(img: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Per-channel gain/offset and a brightness/contrast change; `strength` scales all ranges."""
    x = img.astype(np.float32)
    gain = 1.0 + rng.uniform(-0.12, 0.12, 3) * strength
    offset = rng.uniform(-14, 14, 3) * strength
    contrast = 1.0 + rng.uniform(-0.15, 0.15) * strength
    mean = x.mean(axis=(0, 1), keepdims=True)
    x = (x - mean) * contrast + mean
    x = x * gain + offset
    return np.clip(x, 0, 255).astype(np.uint8)


def resample(
    img: np.ndarray,
    rng: np.random.Generator,
    scale_range: tuple[float, float] = (0.4, 0.8),
    upsampling: Sequence[int] = (cv2.INTER_LINEAR, cv2.INTER_CUBIC),
) -> np.ndarray:
    """Down-scale by a random factor and back up with a random one of `upsampling` (cv2 flags):
    removes high frequencies like a low-resolution swap; INTER_NEAREST adds blocky upsampling traces."""
    h, w = img.shape[:2]
    s = rng.uniform(*scale_range)
    small = cv2.resize(img, (max(2, int(w * s)), max(2, int(h * s))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=int(upsampling[rng.integers(len(upsampling))]))


def jitter_geometry(img: np.ndarray, rng: np.random.Generator, max_shift: float = 0.03,
                    max_scale: float = 0.05) -> np.ndarray:
    """A small random scale about the centre and shift (fractions of the image size)."""
    h, w = img.shape[:2]
    s = 1.0 + rng.uniform(-max_scale, max_scale)
    tx, ty = rng.uniform(-max_shift, max_shift, 2) * (w, h)
    m = np.array([[s, 0, (1 - s) * w / 2 + tx], [0, s, (1 - s) * h / 2 + ty]], np.float32)
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def self_blend(
    img: np.ndarray,
    rng: np.random.Generator,
    *,
    mask: np.ndarray | None = None,
    strength: float = 1.0,
) -> np.ndarray:
    """A self-blended pseudo-fake of `img` (uint8 HxWx3): jittered copy blended through a soft mask.

    `strength` (0..1+) scales the colour mismatch; `mask` defaults to `soft_mask` around the centre.
    """
    h, w = img.shape[:2]
    source = color_jitter(img, rng, strength)
    if rng.random() < 0.7:
        source = resample(source, rng)
    source = jitter_geometry(source, rng)
    if mask is None:
        mask = soft_mask(h, w, rng)
    return blend(img, source, mask)
