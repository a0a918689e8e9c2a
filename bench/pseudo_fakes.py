"""What a pseudo-fake costs the loader: one training sample with and without self-blending, alternating.

    python bench/pseudo_fakes.py                 # 60 lfw_faceswap reals, face crops (MTCNN, cached), 5 rounds
    python bench/pseudo_fakes.py --n 30 --rounds 3 --image_size 128

Each round times, image by image, the training dataset's work for a real sample (PNG crop decode -> basic
policy -> normalise) plainly and with `aug.self_blend_prob=1` (landmark-hull self-blend first), then with
`aug.artifact_fake_prob=1`; the order alternates per round so machine load hits all sides alike. Prints
ms per sample and the ratio to the plain sample.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.config import REPO_ROOT, load_config  # noqa: E402
from dataio.data import DataIndex, Sample  # noqa: E402
from dataio.loaders import build_loaders  # noqa: E402
from core.cli import ArgumentParser  # noqa: E402

DATA = REPO_ROOT.parent / "shared" / "data" / "lfw_faceswap"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def main() -> None:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=60, help="real images")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--image_size", type=int, default=128)
    a = p.parse_args()
    reals = sorted((DATA / "real").glob("*.jpg"))[:a.n]
    index = DataIndex(train=[Sample(str(r), 0) for r in reals], val=[], test=[])
    base = {"data.face_crop": "mtcnn", "data.image_size": a.image_size, "data.num_workers": 0,
            "data.aug_policy": "basic"}
    variants = {"plain": {}, "self_blend": {"aug.self_blend_prob": 1.0}, "artifact_fake": {"aug.artifact_fake_prob": 1.0}}
    datasets = {k: build_loaders(index, load_config(overrides={**base, **v}), MEAN, STD)["train"].dataset
                for k, v in variants.items()}
    for ds in datasets.values():
        ds[0]  # warm up (imports, caches)
    totals = dict.fromkeys(datasets, 0.0)
    for r in range(a.rounds):
        order = list(datasets) if r % 2 == 0 else list(datasets)[::-1]
        for i in range(len(reals)):
            for name in order:
                t = time.perf_counter()
                datasets[name][i]
                totals[name] += time.perf_counter() - t
    n = a.rounds * len(reals)
    plain = totals["plain"] / n
    print(f"{len(reals)} lfw_faceswap reals x {a.rounds} rounds, face crop {256} px -> {a.image_size} px")
    for name, total in totals.items():
        print(f"{name:14s} {1000 * total / n:7.2f} ms/sample   ratio to plain {total / n / plain:5.2f}")


if __name__ == "__main__":
    main()
