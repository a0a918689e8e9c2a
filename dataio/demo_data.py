"""A deterministic synthetic real/fake face set for demos, tests and first runs.

Real: procedural faces (skin tone, face ellipse, hair, ears, eyes, brows, nose, mouth, background
gradient, directional light, pose/scale jitter, sensor noise, JPEG). Fake, two manipulation types
(subsets, as FaceForensics++ has): `faceswap` = the inner face of ANOTHER generated face warped onto
the target, partly colour-corrected, resampled and blended through a blurred soft mask; `selfblend` =
SBI-style self-blending (augmentation.blending). Both classes get the same post-processing, so only
the blending artefacts tell them apart.

    python -m dataio.demo_data [--out DIR]    # generate (once) and print the folder
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from augmentation.blending import blend, resample, self_blend, soft_mask
from core.config import REPO_ROOT
from core.cli import ArgumentParser

log = logging.getLogger(__name__)

GENERATOR = "dfsweep-demo-faces"
GENERATOR_VERSION = 2  # bump when the images change: existing sets are regenerated
DEFAULT_ROOT = REPO_ROOT / "data" / "demo"
MANIFEST = "manifest.json"
SPLIT = (0.7, 0.15, 0.15)
SWAP_FRACTION = 0.85  # the rest of the fakes are self-blended (subtle)
# difficulty knobs (tuned so a tiny CNN reaches val AUC ~0.9 in 5 CPU epochs at 64 px)
COLOR_CORRECTION = (0.0, 0.3)  # fraction of the donor/target colour gap removed
SWAP_RESAMPLE = (0.35, 0.7)  # down/up-scale factor of the swapped region
SAME_TONE_P = 0.0  # swaps whose donor has the target's skin tone (very subtle for a tiny CNN)
SWAP_SATURATION = (1.0, 1.25)  # colour cast of the swapped region
SWAP_UPSAMPLING = (cv2.INTER_LINEAR, cv2.INTER_CUBIC)
SWAP_MASK_BLUR = (0.005, 0.02)  # mask edge sigma, fraction of the image size
SELFBLEND_STRENGTH = (1.0, 1.6)  # colour jitter scale of self-blends
BG_SATURATION = 1.0
BG_BLOBS = 18.0
GRAIN = (2.0, 4.0)  # per-pixel noise std of every drawn face: resampled regions lose it
JPEG_QUALITY = (75, 96)
GLOBAL_RESAMPLE_P = 0.2  # both classes: whole-image resampling, so blur alone is no cue
_SHIFT = 4  # cv2 sub-pixel drawing: coordinates carry 4 fractional bits
_SKIN = np.array([[255, 224, 196], [234, 192, 160], [205, 150, 115], [160, 110, 80], [105, 70, 50]], np.float32)
_HAIR = np.array([[20, 15, 10], [60, 40, 25], [110, 75, 40], [190, 150, 90], [120, 120, 120], [150, 50, 30]],
                 np.float32)
_IRIS = np.array([[70, 45, 25], [40, 30, 20], [60, 100, 150], [70, 110, 70], [110, 90, 60]], np.float32)

Geometry = dict[str, Any]


# ------------------------------------------------------------------------------------- drawing
def _ellipse(img: np.ndarray, center: np.ndarray, axes: tuple[float, float], angle: float,
             color: np.ndarray, start: float = 0, end: float = 360, thickness: int = -1) -> None:
    c = tuple(int(round(v * (1 << _SHIFT))) for v in center)
    a = tuple(max(1, int(round(v * (1 << _SHIFT)))) for v in axes)
    cv2.ellipse(img, c, a, angle, start, end, tuple(float(v) for v in color), thickness, cv2.LINE_AA, _SHIFT)


def _background(s: int, rng: np.random.Generator) -> np.ndarray:
    c1, c2 = rng.uniform(20, 235, (2, 3)).astype(np.float32)
    c1, c2 = [c.mean() + BG_SATURATION * (c - c.mean()) for c in (c1, c2)]
    t = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s - 0.5
    g = np.clip(0.5 + np.cos(t) * xx + np.sin(t) * yy, 0, 1)[..., None]
    bg = c1 * (1 - g) + c2 * g
    blobs = cv2.resize(rng.normal(0, BG_BLOBS, (4, 4, 3)).astype(np.float32), (s, s), interpolation=cv2.INTER_CUBIC)
    return np.clip(bg + blobs, 0, 255)


def draw_face(s: int, rng: np.random.Generator, tone: int | None = None) -> tuple[np.ndarray, Geometry]:
    """One procedural face, uint8 (s, s, 3) RGB, and its geometry (centre, axes, angle, skin tone).

    `tone` picks the skin palette entry (random if None)."""
    img = _background(s, rng)
    tone = int(rng.integers(len(_SKIN))) if tone is None else tone % len(_SKIN)
    skin = _SKIN[tone] * rng.uniform(0.9, 1.05) + rng.normal(0, 8, 3)
    hair = _HAIR[rng.integers(len(_HAIR))] + rng.normal(0, 10, 3)
    cloth = rng.uniform(10, 240, 3)
    center = np.array([s / 2 + rng.normal(0, 0.035 * s), s * 0.5 + rng.normal(0, 0.035 * s)])
    ax = s * rng.uniform(0.24, 0.31)
    ay = ax * rng.uniform(1.18, 1.4)
    angle = float(rng.uniform(-12, 12))
    rad = np.deg2rad(angle)
    rot = np.array([[np.cos(rad), -np.sin(rad)], [np.sin(rad), np.cos(rad)]])

    def at(u: float, v: float) -> np.ndarray:  # face-local (fractions of the axes) -> pixels
        return center + rot @ np.array([u * ax, v * ay])

    _ellipse(img, np.array([s / 2, s * 1.08]), (s * rng.uniform(0.45, 0.6), s * 0.3), 0, cloth)
    cv2.rectangle(img, (int(center[0] - 0.45 * ax), int(center[1] + 0.5 * ay)), (int(center[0] + 0.45 * ax), s),
                  tuple(float(v) for v in skin * 0.85), -1, cv2.LINE_AA)
    long_hair = rng.random() < 0.4
    _ellipse(img, at(0, -0.12), (ax * 1.17, ay * (1.25 if long_hair else 1.08)), angle, hair)
    for side in (-1, 1):
        _ellipse(img, at(side * 0.98, 0.02), (ax * 0.14, ay * 0.19), angle, skin * 0.93)
    _ellipse(img, center, (ax, ay), angle, skin)
    fringe = rng.uniform(0.3, 0.6)
    _ellipse(img, at(0, -0.62), (ax * 1.03, ay * fringe), angle, hair, 180, 360)

    eye_v, eye_u = rng.uniform(-0.16, -0.04), rng.uniform(0.33, 0.42)
    eye_ax, eye_ay = ax * rng.uniform(0.14, 0.2), ay * rng.uniform(0.06, 0.09)
    iris = _IRIS[rng.integers(len(_IRIS))] + rng.normal(0, 8, 3)
    gaze = rng.uniform(-0.3, 0.3) * eye_ax
    brow_t = max(1, int(round(s / 60)))
    for side in (-1, 1):
        e = at(side * eye_u, eye_v)
        _ellipse(img, e, (eye_ax, eye_ay), angle, np.array([240, 238, 232]))
        _ellipse(img, e + rot @ np.array([gaze, 0]), (eye_ay * 0.95, eye_ay * 0.95), 0, iris)
        _ellipse(img, e + rot @ np.array([gaze, 0]), (eye_ay * 0.4, eye_ay * 0.4), 0, np.array([10, 10, 10]))
        _ellipse(img, e, (eye_ax, eye_ay), angle, skin * 0.55, 180, 360, max(1, brow_t - 1))
        tilt = side * rng.uniform(-8, 12)
        _ellipse(img, at(side * eye_u, eye_v - rng.uniform(0.13, 0.2)), (eye_ax * 1.2, eye_ay * 0.9),
                 angle + tilt, hair * 0.9, 190, 350, brow_t)
    nose_len = rng.uniform(0.22, 0.34)
    nose_col = skin * 0.78
    p0, p1 = at(0.02, eye_v + 0.06), at(0.03, eye_v + 0.06 + nose_len)
    cv2.line(img, tuple(int(v) for v in p0), tuple(int(v) for v in p1), tuple(float(v) for v in nose_col),
             max(1, brow_t - 1), cv2.LINE_AA)
    for side in (-1, 1):
        _ellipse(img, at(side * 0.09, eye_v + 0.08 + nose_len), (ax * 0.05, ay * 0.025), angle, nose_col)
    mouth_v = eye_v + 0.08 + nose_len + rng.uniform(0.16, 0.24)
    mouth_w = ax * rng.uniform(0.28, 0.42)
    lips = skin * np.array([0.85, 0.55, 0.55]) + rng.normal(0, 6, 3)
    smile = rng.uniform(-0.3, 1.0)
    _ellipse(img, at(0, mouth_v), (mouth_w, ay * 0.05 * (1 + abs(smile))), angle, lips, 0, 180)
    _ellipse(img, at(0, mouth_v), (mouth_w, ay * 0.025), angle, lips * 0.9)
    _ellipse(img, at(0, mouth_v), (mouth_w * 0.95, ay * 0.02 * (1 + smile)), angle, lips * 0.55, 0, 180, 1)

    # directional light + soft shading toward the face rim, then skin-like blur and noise
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s - 0.5
    lt = rng.uniform(0, 2 * np.pi)
    light = 1.0 + rng.uniform(0.05, 0.3) * (np.cos(lt) * xx + np.sin(lt) * yy) * 2
    img = img * light[..., None]
    img = cv2.GaussianBlur(img, (0, 0), sigmaX=rng.uniform(0.4, 0.8))
    img += rng.normal(0, rng.uniform(*GRAIN), img.shape).astype(np.float32)  # camera grain
    geom = {"center": center, "axes": (ax, ay), "angle": angle, "rot": rot, "eye_v": eye_v, "tone": tone}
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), geom


# ------------------------------------------------------------------------------------- fakes
def _affine_between(src: Geometry, dst: Geometry) -> np.ndarray:
    """Affine map taking src's face ellipse frame onto dst's (centre and both rotated axes)."""
    def frame(g: Geometry) -> np.ndarray:
        c, (ax, ay), rot = g["center"], g["axes"], g["rot"]
        return np.float32([c, c + rot @ np.array([ax, 0]), c + rot @ np.array([0, ay])])
    return cv2.getAffineTransform(frame(src), frame(dst))


def face_swap(target: np.ndarray, tgeom: Geometry, donor: np.ndarray, dgeom: Geometry,
              rng: np.random.Generator) -> np.ndarray:
    """Blend the donor's inner face onto the target: warp, partial colour correction, resampling,
    blurred soft mask."""
    s = target.shape[0]
    warped = cv2.warpAffine(donor, _affine_between(dgeom, tgeom), (s, s), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_REFLECT_101)
    ax, ay = tgeom["axes"]
    inner = tgeom["center"] + tgeom["rot"] @ np.array([0, ay * 0.12])
    mask = soft_mask(s, s, rng, center=(inner[0] / s, inner[1] / s),
                     axes=(ax * rng.uniform(0.7, 0.85) / s, ay * rng.uniform(0.62, 0.75) / s),
                     angle=tgeom["angle"], blur_range=SWAP_MASK_BLUR, max_alpha_range=(0.85, 1.0))
    core = mask > 0.5
    if core.any():  # colour correction towards the target leaves a random residual mismatch
        shift = target[core].mean(0) - warped[core].mean(0)
        warped = np.clip(warped + shift * rng.uniform(*COLOR_CORRECTION), 0, 255).astype(np.uint8)
    warped = saturate(warped, rng.uniform(*SWAP_SATURATION))
    if rng.random() < 0.8:
        warped = resample(warped, rng, scale_range=SWAP_RESAMPLE, upsampling=SWAP_UPSAMPLING)
    return blend(target, warped, mask)


def saturate(img: np.ndarray, factor: float) -> np.ndarray:
    """Scale colour saturation (a swap model's colour cast); 1 = unchanged."""
    x = img.astype(np.float32)
    gray = x.mean(axis=2, keepdims=True)
    return np.clip(gray + (x - gray) * factor + 0.5, 0, 255).astype(np.uint8)


def make_fake(target: np.ndarray, tgeom: Geometry, rng: np.random.Generator, kind: str) -> np.ndarray:
    """A fake of `kind` ("faceswap": donor drawn from `rng`, or "selfblend") made from `target`."""
    s = target.shape[0]
    if kind == "faceswap":
        shift = int(rng.integers(1, len(_SKIN))) if rng.random() > SAME_TONE_P else 0
        donor, dgeom = draw_face(s, rng, tone=tgeom["tone"] + shift)
        return face_swap(target, tgeom, donor, dgeom, rng)
    ax, ay = tgeom["axes"]
    c = tgeom["center"] + tgeom["rot"] @ np.array([0, ay * 0.1])
    mask = soft_mask(s, s, rng, center=(c[0] / s, c[1] / s), axes=(ax * 0.85 / s, ay * 0.8 / s),
                     angle=tgeom["angle"], blur_range=(0.03, 0.08))
    return self_blend(target, rng, mask=mask, strength=rng.uniform(*SELFBLEND_STRENGTH))


def finish(img: np.ndarray, rng: np.random.Generator) -> bytes:
    """Shared post-processing for both classes (global resampling, noise) -> JPEG bytes."""
    if rng.random() < GLOBAL_RESAMPLE_P:
        img = resample(img, rng, scale_range=(0.6, 0.9))
    noisy = img.astype(np.float32) + rng.normal(0, rng.uniform(0.5, 2.5), img.shape).astype(np.float32)
    bgr = cv2.cvtColor(np.clip(noisy + 0.5, 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(*JPEG_QUALITY))])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


# ------------------------------------------------------------------------------------- on disk
def _wanted(n_per_class: int, size: int, seed: int) -> dict[str, Any]:
    return {"generator": GENERATOR, "version": GENERATOR_VERSION, "seed": seed, "size": size,
            "n_per_class": n_per_class}


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _is_current(root: Path, want: dict[str, Any]) -> bool:
    m = _read_manifest(root)
    return m is not None and all(m.get(k) == v for k, v in want.items())


def pair_splits(n: int, seed: int, fractions: tuple[float, float, float] = SPLIT) -> list[str]:
    """The split of each pair index: a seeded 70/15/15 permutation (pairs never straddle splits)."""
    order = np.random.default_rng([seed, 7]).permutation(n)
    n_train, n_val = int(round(n * fractions[0])), int(round(n * fractions[1]))
    names = np.array(["train"] * n_train + ["val"] * n_val + ["test"] * (n - n_train - n_val))
    out = np.empty(n, dtype=object)
    out[order] = names
    return out.tolist()


def generate(out: Path, n_per_class: int, size: int, seed: int) -> dict[str, int]:
    """Write {train,val,test}/real/real_i.jpg and .../fake/{faceswap,selfblend}/fake_i.jpg into `out`.

    fake_i is made from real_i's face (as FaceForensics++ fakes are made from its real videos), so
    content is no cue; each pair stays in one split. Returns counts per folder.
    """
    counts: dict[str, int] = {}
    for i, split in enumerate(pair_splits(n_per_class, seed)):
        face, geom = draw_face(size, np.random.default_rng([seed, i, 0]))
        rng = np.random.default_rng([seed, i, 2])
        kind = "faceswap" if rng.random() < SWAP_FRACTION else "selfblend"
        fake = make_fake(face, geom, rng, kind)
        for sub, name, img, post in ((f"{split}/real", f"real_{i:05d}.jpg", face, np.random.default_rng([seed, i, 1])),
                                     (f"{split}/fake/{kind}", f"fake_{i:05d}.jpg", fake, rng)):
            (out / sub).mkdir(parents=True, exist_ok=True)
            (out / sub / name).write_bytes(finish(img, post))
            counts[sub] = counts.get(sub, 0) + 1
    return dict(sorted(counts.items()))


def ensure_demo_data(root: Path = DEFAULT_ROOT, n_per_class: int = 300, size: int = 96, seed: int = 0) -> Path:
    """Generate the demo set under `root` unless an identical one (same manifest) is already there.

    Atomic: written into a temp folder beside `root`, then renamed into place. A non-empty folder at
    `root` without our manifest is never replaced.
    """
    return materialize(Path(root), _wanted(n_per_class, size, seed), lambda out: generate(out, n_per_class, size, seed))


def materialize(root: Path, want: dict[str, Any], build: Callable[[Path], dict[str, int]]) -> Path:
    """`build(tmp)` writes a generated set into a temp folder, renamed to `root` with a manifest (`want` plus
    counts), unless `root` already holds the same one. Shared by the demo faces and the demo clips."""
    if _is_current(root, want):
        return root
    if root.exists() and any(root.iterdir()) and (_read_manifest(root) or {}).get("generator") != want["generator"]:
        raise FileExistsError(f"{root} exists and is not a generated demo set; choose another folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        t0 = time.perf_counter()
        counts = build(tmp)
        (tmp / MANIFEST).write_text(json.dumps({**want, "counts": counts}, indent=2, sort_keys=True))
        if root.exists():
            root.rename(old)  # a stale version (or an empty folder) of ours
        try:
            tmp.rename(root)
        except OSError:  # another process renamed its copy into place first
            if not _is_current(root, want):
                raise
        log.info("demo_data=generated path=%s %s seconds=%.1f", root,
                 " ".join(f"{k}={v}" for k, v in want.items() if k != "generator"), time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description="Generate the synthetic demo face set (once).")
    parser.add_argument("--out", type=Path, default=DEFAULT_ROOT, help="output folder (default: data/demo)")
    parser.add_argument("--n_per_class", type=int, default=300)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(ensure_demo_data(args.out, n_per_class=args.n_per_class, size=args.size, seed=args.seed))


if __name__ == "__main__":
    main()
