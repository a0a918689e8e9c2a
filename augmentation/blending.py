"""Self-blended pseudo-fakes (SBI-style, Shiohara & Yamasaki 2022), numpy/cv2 (+ albumentations' elastic warp).

A copy of the face is colour-jittered and slightly resampled/shifted, then blended back into the
original through a soft mask: the result carries the blending boundary and colour/frequency
inconsistencies of a face swap without needing a second identity. Images are uint8 HxWx3.

Masks: `landmark_mask` is the SBI mask built from MTCNN's 5 landmarks (a face outline hull derived from
eyes, nose and mouth corners, randomly dilated or eroded, elastically deformed, Gaussian-softened);
`soft_mask` is a face-shaped random hull inside an ellipse for images without landmarks. Outside a
mask's support (mask == 0) `blend` returns the target's pixels unchanged.
"""
from __future__ import annotations

from typing import Sequence

import albumentations as A

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
    cutoff: float = 0.0,
) -> np.ndarray:
    """A soft blending mask, float32 (h, w) in [0, 1] (values below `cutoff` set to 0).

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
    mask = _fill_hull(h, w, pts)
    k = max(1, int(round(rng.uniform(0.0, 0.05) * min(h, w))))
    mask = _erode_or_dilate(mask, k, rng)
    return _soften(mask, rng, blur_range, max_alpha_range, cutoff)


def _fill_hull(h: int, w: int, pts: np.ndarray) -> np.ndarray:
    """uint8 (h, w): 255 inside the convex hull of pts (x, y pixels)."""
    hull = cv2.convexHull(np.round(pts).astype(np.int32))
    mask = np.zeros((h, w), np.uint8)
    cv2.fillConvexPoly(mask, hull, 255, lineType=cv2.LINE_AA)
    return mask


def _erode_or_dilate(mask: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1))
    return cv2.erode(mask, kernel) if rng.random() < 0.5 else cv2.dilate(mask, kernel)


def _soften(mask: np.ndarray, rng: np.random.Generator, blur_range: tuple[float, float],
            max_alpha_range: tuple[float, float], cutoff: float = 0.0) -> np.ndarray:
    """Gaussian edge (sigma = blur_range x the short side) and a random peak: float32 in [0, 1].

    Values below `cutoff` become 0: the Gaussian's far tail (which cannot move a uint8 pixel by a level)
    is outside the mask, so the mask's support is where the blend may change pixels."""
    h, w = mask.shape
    sigma = max(0.5, rng.uniform(*blur_range) * min(h, w))
    soft = cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (0, 0), sigmaX=sigma, sigmaY=sigma)
    peak = float(soft.max())
    if peak > 0:
        soft *= rng.uniform(*max_alpha_range) / peak
    if cutoff > 0:
        soft[soft < cutoff] = 0.0
    return np.clip(soft, 0.0, 1.0).astype(np.float32)


# Face outline from MTCNN's 5 landmarks, in a frame with x along the eye line (unit: eye distance d) and y
# from the eyes' midpoint toward the mouth's (unit: eye-to-mouth distance L): roughly the hull of the
# 68-point jaw + eyebrow landmarks SBI uses (ears at eye level, jaw, chin, eyebrows).
FACE_OUTLINE = np.array([
    (-1.00, 0.00), (-0.95, 0.55), (-0.80, 1.05), (-0.45, 1.45), (0.00, 1.60),   # left ear .. chin
    (0.45, 1.45), (0.80, 1.05), (0.95, 0.55), (1.00, 0.00),                      # chin .. right ear
    (0.85, -0.45), (0.35, -0.60), (-0.35, -0.60), (-0.85, -0.45),                # eyebrows
], np.float64)


def face_outline(landmarks: np.ndarray, rng: np.random.Generator | None = None, jitter: float = 0.1) -> np.ndarray:
    """Face outline points (13, 2) in pixels from 5 landmarks (eye, eye, nose, mouth, mouth; MTCNN's order).

    Follows roll and scale of the face; `jitter` moves each point by up to that fraction of its offset."""
    lm = np.asarray(landmarks, np.float64).reshape(5, 2)
    eyes, mouth = lm[:2].mean(axis=0), lm[3:].mean(axis=0)
    ex = lm[1] - lm[0]
    if ex[0] < 0:  # eye order by x: keep the frame's x axis along +x in the image
        ex = -ex
    d = max(float(np.hypot(*ex)), 1.0)
    ey = mouth - eyes
    L = max(float(np.hypot(*ey)), 0.5 * d)
    ux = ex / d
    uy = np.array([-ux[1], ux[0]])  # perpendicular to the eye line, pointing down (image y grows down)
    if np.dot(uy, ey) < 0:
        uy = -uy
    offsets = FACE_OUTLINE.copy()
    if rng is not None and jitter > 0:
        offsets *= 1.0 + rng.uniform(-jitter, jitter, offsets.shape)
    return eyes + offsets[:, :1] * d * ux + offsets[:, 1:] * L * uy


_ELASTIC = A.ElasticTransform(alpha=30.0, sigma=6.0, p=1.0)


def landmark_mask(
    h: int,
    w: int,
    landmarks: np.ndarray,
    rng: np.random.Generator,
    *,
    blur_range: tuple[float, float] = (0.02, 0.06),
    max_alpha_range: tuple[float, float] = (0.6, 1.0),
    elastic: bool = True,
    cutoff: float = 1 / 255,
    work_px: int = 128,
) -> np.ndarray:
    """SBI's mask from 5 landmarks: face outline hull, random erode/dilate, elastic warp, soft edges.

    float32 (h, w) in [0, 1]; the peak is a random blend ratio in `max_alpha_range`. The (smooth) mask is
    drawn with its short side at most `work_px` and resized up: 4x less work for a 256 px crop."""
    f = min(1.0, work_px / min(h, w))
    sh, sw = max(8, int(round(h * f))), max(8, int(round(w * f)))
    lm = np.asarray(landmarks, np.float64).reshape(5, 2) * (sw / w, sh / h)
    mask = _fill_hull(sh, sw, face_outline(lm, rng))
    span = float(np.ptp(face_outline(lm), axis=0).max())
    k = max(1, int(round(rng.uniform(0.0, 0.08) * span)))
    mask = _erode_or_dilate(mask, k, rng)
    if elastic and mask.any():
        _ELASTIC.set_random_seed(int(rng.integers(2**31)))
        scale = min(sh, sw) / 64.0  # displacement ~ alpha / sigma: the same relative warp at any size
        _ELASTIC.alpha, _ELASTIC.sigma = 30.0 * scale * scale, 6.0 * scale
        mask = _ELASTIC(image=mask)["image"]
    soft = _soften(mask, rng, blur_range, max_alpha_range, cutoff)
    if (sh, sw) != (h, w):
        soft = cv2.resize(soft, (w, h), interpolation=cv2.INTER_LINEAR)
        soft[soft < cutoff] = 0.0
    return soft


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


def self_blend_pair(
    img: np.ndarray,
    rng: np.random.Generator,
    *,
    mask: np.ndarray | None = None,
    strength: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(pseudo-fake, mask): a colour/geometry-jittered copy of `img` (uint8 HxWx3) blended through `mask`.

    `strength` (0..1+) scales the colour mismatch; `mask` defaults to `soft_mask` around the centre.
    Pixels where mask == 0 are the original's, exactly."""
    h, w = img.shape[:2]
    source = color_jitter(img, rng, strength)
    if rng.random() < 0.7:
        source = resample(source, rng)
    source = jitter_geometry(source, rng)
    if mask is None:
        mask = soft_mask(h, w, rng)
    return blend(img, source, mask), mask


def self_blend(
    img: np.ndarray,
    rng: np.random.Generator,
    *,
    mask: np.ndarray | None = None,
    strength: float = 1.0,
) -> np.ndarray:
    """A self-blended pseudo-fake of `img` (see `self_blend_pair`), without the mask."""
    return self_blend_pair(img, rng, mask=mask, strength=strength)[0]
