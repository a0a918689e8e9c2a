"""What separates real from fake in the face crops a model sees, and does it point the same way on two sets?

    python bench/crop_stats.py                                  # lfw_faceswap vs hardfake_vs_real, 128 px
    python bench/crop_stats.py --sets ../shared/data/lfw_faceswap --image_size 96 --limit 200

For each data set (every image, both classes) it reads the cached MTCNN face crops (data.face_crop=mtcnn,
detected once if not cached), resizes them to the model's input size as the eval transform does (INTER_AREA),
and measures simple statistics per image:
  jpeg_quality   IJG quality estimated from the source JPEG's luminance quantisation table
  face_px        the crop square's side in the source image (pixels of real detail behind the crop)
  upscale        face_size / face_px (>1: the stored crop was interpolated up from fewer pixels)
  face_scale     distance between MTCNN's two eye landmarks / crop side (how big the face is in what the model sees)
  lap_var        variance of the Laplacian of the grey model input (sharpness)
  hf_energy      share of the grey model input's spectral power above half the Nyquist frequency
  block8         JPEG blockiness of the source image (mean |step| across 8x8 block borders / elsewhere)
  luma_mean, luma_std, sat_mean, r_minus_b   brightness, contrast, saturation, warmth of the model input
It prints per set and class the median of each statistic and the AUC of the statistic as a fake score
(0.5 = no signal; > 0.5: larger means fake). A statistic whose AUC is far from 0.5 on the training set and on
the other side of 0.5 on the test set is a cue a detector can learn that points the wrong way there.
Single-threaded, no training; about a minute for the two sets here.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.cli import ArgumentParser  # noqa: E402
from core.config import REPO_ROOT  # noqa: E402

DATA = REPO_ROOT.parent / "shared" / "data"
# IJG standard luminance table (quality 50), in the same zig-zag order PIL reports
STD_LUMA = np.array([16, 11, 12, 14, 12, 10, 16, 14, 13, 14, 18, 17, 16, 19, 24, 40, 26, 24, 22, 22, 24, 49, 35, 37,
                     29, 40, 58, 51, 61, 60, 57, 51, 56, 55, 64, 72, 92, 78, 64, 68, 87, 69, 55, 56, 80, 109, 81, 87,
                     95, 98, 103, 104, 103, 62, 77, 113, 121, 112, 100, 120, 92, 101, 103, 99], dtype=np.float64)
STATS = ["jpeg_quality", "face_px", "upscale", "face_scale", "lap_var", "hf_energy", "block8", "luma_mean", "luma_std",
         "sat_mean", "r_minus_b"]


def jpeg_quality(img: Image.Image) -> float:
    """IJG quality (1-100) whose scaled standard table best matches the image's luminance table; NaN if not JPEG."""
    tables = getattr(img, "quantization", None)
    if not tables:
        return float("nan")
    q = np.asarray(tables[0], dtype=np.float64)
    best, err = float("nan"), np.inf
    for quality in range(1, 101):
        scale = 5000 / quality if quality < 50 else 200 - 2 * quality
        table = np.clip(np.floor((STD_LUMA * scale + 50) / 100), 1, 255)
        e = np.abs(np.sort(table) - np.sort(q)).sum()
        if e < err:
            best, err = float(quality), e
    return best


def blockiness(grey: np.ndarray) -> float:
    """Mean absolute step across 8x8 block borders over the mean step elsewhere (1.0: no JPEG grid)."""
    dx = np.abs(np.diff(grey.astype(np.float64), axis=1))
    on = dx[:, 7::8].mean()
    off = np.delete(dx, np.s_[7::8], axis=1).mean()
    return float(on / max(off, 1e-9))


def hf_energy(grey: np.ndarray) -> float:
    """Share of spectral power (DC removed) above half the Nyquist radius."""
    f = np.abs(np.fft.fftshift(np.fft.fft2(grey - grey.mean()))) ** 2
    h, w = grey.shape
    yy, xx = np.mgrid[-(h // 2):h - h // 2, -(w // 2):w - w // 2]
    r = np.sqrt((yy / (h / 2)) ** 2 + (xx / (w / 2)) ** 2)
    return float(f[r > 0.5].sum() / max(f.sum(), 1e-12))


def image_stats(path: str, crop_path: str, face_px: float, eye_px: float, face_size: int,
                image_size: int) -> dict[str, float]:
    with Image.open(path) as img:
        quality = jpeg_quality(img)
        source_grey = np.asarray(img.convert("L"))
    crop = np.asarray(Image.open(crop_path).convert("RGB"))
    x = cv2.resize(crop, (image_size, image_size), interpolation=cv2.INTER_AREA)
    grey = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).astype(np.float64)
    hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)
    return {"jpeg_quality": quality, "face_px": face_px, "upscale": face_size / face_px,
            "face_scale": eye_px / face_size,
            "lap_var": float(cv2.Laplacian(grey, cv2.CV_64F).var()), "hf_energy": hf_energy(grey),
            "block8": blockiness(source_grey), "luma_mean": float(grey.mean()), "luma_std": float(grey.std()),
            "sat_mean": float(hsv[..., 1].mean()),
            "r_minus_b": float(x[..., 0].astype(np.float64).mean() - x[..., 2].astype(np.float64).mean())}


def set_stats(folder: Path, settings, image_size: int, limit: int | None) -> pd.DataFrame:
    from preprocessing.face_cache import face_crops, landmarks

    paths = {label: sorted(str(p) for p in (folder / name).glob("*.jpg"))[:limit]
             for label, name in ((0, "real"), (1, "fake"))}
    every = paths[0] + paths[1]
    table = face_crops(every, settings)
    rows = []
    for label, group in paths.items():
        for p in group:
            r = table.loc[p]
            rows.append({"set": folder.name, "label": label, "fallback": bool(r["fallback"]),
                         **image_stats(p, r["crop_path"], float(r["x2"] - r["x1"]),
                                       float(np.linalg.norm(np.diff(landmarks(r)[:2], axis=0))), settings.size,
                                       image_size)})
    return pd.DataFrame(rows)


def summary(stats: pd.DataFrame) -> pd.DataFrame:
    """Per set: median of each statistic per class and its AUC as a fake score."""
    from sklearn.metrics import roc_auc_score

    out = []
    for name, g in stats.groupby("set", sort=False):
        for s in STATS:
            v = g[s]
            ok = v.notna()
            auc = roc_auc_score(g.loc[ok, "label"], v[ok]) if g.loc[ok, "label"].nunique() == 2 else float("nan")
            out.append({"set": name, "stat": s, "real_median": v[g["label"] == 0].median(),
                        "fake_median": v[g["label"] == 1].median(), "auc_fake": auc})
    return pd.DataFrame(out)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", nargs="+", default=[str(DATA / "lfw_faceswap"), str(DATA / "hardfake_vs_real")])
    p.add_argument("--face_margin", type=float, default=0.3)
    p.add_argument("--face_size", type=int, default=256)
    p.add_argument("--face_border", choices=["shift", "reflect"], default="shift")
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--limit", type=int, default=None, help="at most this many images per class")
    p.add_argument("--out", default="outputs/crop_stats.csv", help="per-image statistics")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    folders = [Path(s) for s in a.sets]
    missing = [str(f) for f in folders if not (f / "real").is_dir() or not (f / "fake").is_dir()]
    if missing:
        print(f"error: no real/ and fake/ folders in {', '.join(missing)}", file=sys.stderr)
        return 2
    cv2.setNumThreads(1)
    from preprocessing.face_cache import FaceCropSettings

    settings = FaceCropSettings(margin=a.face_margin, size=a.face_size, border=a.face_border)
    stats = pd.concat([set_stats(f, settings, a.image_size, a.limit) for f in folders])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    stats.to_csv(a.out, index=False)
    table = summary(stats).pivot(index="stat", columns="set").reindex(STATS)
    table = table.reorder_levels([1, 0], axis=1).sort_index(axis=1, level=0, sort_remaining=False)
    with pd.option_context("display.width", 250, "display.float_format", "{:.3f}".format):
        print(table.to_string())
    print(f"fallback crops (no face found): {stats.groupby(['set', 'label'])['fallback'].sum().to_dict()}")
    print(f"per-image statistics: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
