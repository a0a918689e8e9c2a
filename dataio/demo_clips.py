"""A tiny synthetic video set for the dual-stream (video) model: demo faces as short clips of frames.

Each clip is one generated face (dataio.demo_data: real, or its face-swapped / self-blended fake) seen over
`frames` frames with a small drift of position and light, JPEG-encoded per frame, in the layout
preprocessing.extract_faces writes: {real,fake}/<video>/<frame>.jpg. It lets a video model train, sweep
and be tested with no data at hand (`data.data_dir: null` with a video preset), as the demo faces do for
image models.

    python -m dataio.demo_clips [--out DIR]    # generate (once) and print the folder
"""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from core.cli import ArgumentParser
from core.config import REPO_ROOT
from dataio.demo_data import SWAP_FRACTION, draw_face, finish, make_fake, materialize

log = logging.getLogger(__name__)

GENERATOR = "dfsweep-demo-clips"
GENERATOR_VERSION = 1  # bump when the clips change: existing sets are regenerated
DEFAULT_ROOT = REPO_ROOT / "data" / "demo_clips"
DRIFT = 2.0  # pixels of camera drift per frame (random walk), both classes alike
LIGHT = 0.03  # brightness drift per frame (multiplicative random walk)


def _frame(img: np.ndarray, shift: np.ndarray, gain: float) -> np.ndarray:
    """`img` moved by `shift` pixels (reflected border) and scaled in brightness by `gain`."""
    h, w = img.shape[:2]
    moved = cv2.warpAffine(img, np.float32([[1, 0, shift[0]], [0, 1, shift[1]]]), (w, h),
                           borderMode=cv2.BORDER_REFLECT_101)
    return np.clip(moved.astype(np.float32) * gain, 0, 255).astype(np.uint8)


def generate_clips(out: Path, n_per_class: int, frames: int, size: int, seed: int) -> dict[str, int]:
    """Write real/clip_i/ and fake/clip_i/ (frames JPEGs each) into `out`; fake i is made from real i's face.
    Returns frame counts per class folder."""
    counts: dict[str, int] = {}
    for i in range(n_per_class):
        face, geom = draw_face(size, np.random.default_rng([seed, i, 0]))
        rng = np.random.default_rng([seed, i, 2])
        fake = make_fake(face, geom, rng, "faceswap" if rng.random() < SWAP_FRACTION else "selfblend")
        for label, img in (("real", face), ("fake", fake)):
            walk = np.random.default_rng([seed, i, 3, label == "fake"])
            clip = out / label / f"clip_{i:04d}"
            clip.mkdir(parents=True, exist_ok=True)
            shift, gain = np.zeros(2), 1.0
            for t in range(frames):
                shift = np.clip(shift + walk.normal(0, DRIFT, 2), -3 * DRIFT, 3 * DRIFT)
                gain = float(np.clip(gain * (1 + walk.normal(0, LIGHT)), 0.8, 1.2))
                (clip / f"frame_{t:03d}.jpg").write_bytes(finish(_frame(img, shift, gain), walk))
            counts[label] = counts.get(label, 0) + frames
    return counts


def ensure_demo_clips(root: Path = DEFAULT_ROOT, n_per_class: int = 24, frames: int = 8, size: int = 64,
                      seed: int = 0) -> Path:
    """Generate the demo clips under `root` unless the same set is already there (atomic, as the demo faces)."""
    want = {"generator": GENERATOR, "version": GENERATOR_VERSION, "seed": seed, "size": size,
            "n_per_class": n_per_class, "frames": frames}
    return materialize(Path(root), want, lambda out: generate_clips(out, n_per_class, frames, size, seed))


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description="Generate the synthetic demo clip set (once).")
    parser.add_argument("--out", type=Path, default=DEFAULT_ROOT, help="output folder (default: data/demo_clips)")
    parser.add_argument("--n_per_class", type=int, default=24)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(ensure_demo_clips(args.out, args.n_per_class, args.frames, args.size, args.seed))


if __name__ == "__main__":
    main()
