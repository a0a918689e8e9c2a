#!/usr/bin/env python
"""Inference: our predict path vs a bare channels_last forward, same model, images and batch size.

Ours: `serving.predict.score_images` with a checkpoint scorer, what `python -m serving.predict --checkpoint`
runs once the model is loaded (readability check, decoding workers, channels_last member, DataFrame out).
Bare: a plain Dataset (the same decode + eval transform) in a DataLoader with the same number of workers,
the model in channels_last under inference_mode, sigmoid. Decoding is counted on BOTH sides. Also shown:
our path with decoding in the main process (num_workers 0, as before) and a forward over pre-decoded
tensors (no decoding: the ceiling). Rounds alternate the sides; ratios are medians of per-round ratios, so
load drifting on a shared machine hits the sides of one round alike.

    python bench/inference.py [--model_type mobilenetv2] [--image_size 160] [--images 192] [--batch_size 32]
                              [--workers 2] [--rounds 5] [--only] [--data ../shared/data/lfw_faceswap]
"""
from __future__ import annotations

import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from augmentation.policies import build_transform  # noqa: E402
from core.config import REPO_ROOT, load_config  # noqa: E402
from dataio.loaders import decode_size, load_rgb  # noqa: E402
from models import create_detector  # noqa: E402
from serving.predict import collect_images, load_scorer, score_images  # noqa: E402
from serving.pyfunc_model import save_member  # noqa: E402
from core.cli import ArgumentParser  # noqa: E402

log = logging.getLogger("bench.inference")
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "lfw_faceswap"


class Files(torch.utils.data.Dataset):
    """The bare side's dataset: decode (JPEG draft as in training) + eval transform."""

    def __init__(self, paths: list[str], transform, size: int) -> None:
        self.paths, self.transform, self.size = paths, transform, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(image=load_rgb(self.paths[i], self.size))["image"]


@torch.inference_mode()
def bare(model, loader) -> np.ndarray:
    out = []
    for x in loader:
        out.append(torch.sigmoid(model(x.contiguous(memory_format=torch.channels_last))[:, 0]))
    return torch.cat(out).numpy()


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def main() -> None:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_type", default="mobilenetv2")
    p.add_argument("--image_size", type=int, default=160)
    p.add_argument("--center_crop", type=float, default=0.5)
    p.add_argument("--images", type=int, default=192)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="decoding workers on both sides")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--only", action="store_true", help="time ours and bare only (more rounds in the same time)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    log.setLevel(logging.INFO)
    paths = collect_images([args.data])
    paths = [paths[i] for i in np.linspace(0, len(paths) - 1, min(args.images, len(paths))).astype(int)]
    cfg = load_config(overrides={"model.model_type": args.model_type, "model.pretrained": True,
                                 "data.image_size": args.image_size, "data.center_crop": args.center_crop})
    torch.manual_seed(0)
    det = create_detector(cfg.model, 1, image_size=args.image_size)
    with tempfile.TemporaryDirectory(prefix="bench-inf-") as tmp:
        ckpt = save_member(det.state_dict(), cfg.model_dump(mode="json"), Path(tmp) / "member.pt")
        scorer = load_scorer(checkpoint=str(ckpt))
    det = det.eval().to(memory_format=torch.channels_last)
    dc = det.data_config
    transform = build_transform("none", args.image_size, dc["mean"], dc["std"], train=False, center_crop=args.center_crop)
    files = Files(paths, transform, decode_size(args.image_size, args.center_crop))
    loader = torch.utils.data.DataLoader(files, batch_size=args.batch_size, num_workers=args.workers)
    decoded = list(torch.utils.data.DataLoader(files, batch_size=args.batch_size, num_workers=args.workers))
    sides = {
        "ours": lambda: score_images(scorer, paths, args.batch_size, num_workers=args.workers)[0]["fake_prob"].to_numpy(),
        "bare": lambda: bare(det, loader),
        "ours, decoding in the main process": lambda: score_images(scorer, paths, args.batch_size,
                                                                   num_workers=0)[0]["fake_prob"].to_numpy(),
        "bare forward on decoded tensors": lambda: bare(det, decoded),
    }
    if args.only:
        sides = {k: sides[k] for k in ("ours", "bare")}
    seconds: dict[str, list[float]] = {k: [] for k in sides}
    scores: dict[str, np.ndarray] = {}
    for r in range(args.rounds):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            s, scores[name] = timed(sides[name])
            seconds[name].append(s)
    log.info("seconds per round: %s", {k: [round(x, 2) for x in v] for k, v in seconds.items()})
    print(f"{args.model_type} {args.image_size}px, {len(paths)} images of {args.data.name}, batch {args.batch_size}, "
          f"{args.workers} decoding workers, {torch.get_num_threads()} torch threads, {args.rounds} rounds")
    print("  side                                     img/s (median)   ratio to bare (median of per-round ratios)")
    for name, v in seconds.items():
        ratio = statistics.median(b / o for o, b in zip(v, seconds["bare"]))
        print(f"  {name:38s} {len(paths) / statistics.median(v):9.1f}   {ratio:6.2f}")
    ratio = statistics.median(b / o for o, b in zip(seconds["ours"], seconds["bare"]))
    print(f"ours / bare (decoding counted on both sides): {ratio:.2f}x; "
          f"largest score difference {np.abs(scores['ours'] - scores['bare']).max():.1e}")


if __name__ == "__main__":
    main()
