"""Which cue does a trained face-crop detector use? Rescore test splits under controlled changes.

    python bench/probe_cues.py --checkpoint outputs/bench_generalisation/runs/face_crop/<run>/best.pt
    python bench/probe_cues.py --linear_probe              # frozen ImageNet features + logistic regression

--checkpoint: for each data set (default lfw_faceswap and hardfake_vs_real, their test splits as the run splits
them) the run's own face crops are scored as they are, after re-saving the SOURCE image as JPEG at quality 95 /
90 / 75 (LFW reals are all quality 90, its swaps 95: does the model read the quantisation?), and zoomed out
(mirrored border) or in (central crop) by 0.55-1.8 (does it read the face's size in the crop?). It prints the
AUC and the mean score per class for each.
--linear_probe: ImageNet EfficientNet-Lite0 (offline weights), frozen; its pooled features of the face crops
(margin 0.3, 128 px) -> a logistic regression fit on lfw_faceswap's train split -> AUC on its test split and on
hardfake_vs_real's val and test splits, for a few regularisation strengths.
Single-threaded inference only (about a minute each).
"""
from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.cli import ArgumentParser  # noqa: E402
from core.config import REPO_ROOT  # noqa: E402

DATA = REPO_ROOT.parent / "shared" / "data"
SETS = [str(DATA / "lfw_faceswap"), str(DATA / "hardfake_vs_real")]


def jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def zoom(crop: np.ndarray, factor: float) -> np.ndarray:
    """> 1: the central 1/factor of the crop; < 1: the crop inside a mirrored border (same output size)."""
    n = crop.shape[0]
    if factor >= 1:
        k = int(round(n / factor))
        o = (n - k) // 2
        return crop[o:o + k, o:o + k]
    p = int(round(n * (1 / factor - 1) / 2))
    return cv2.copyMakeBorder(crop, p, p, p, p, cv2.BORDER_REFLECT_101)


PROBES: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    # name: (change of the source image before cropping, change of the crop)
    "as is": (lambda s: s, lambda c: c),
    **{f"source JPEG q{q}": ((lambda s, q=q: jpeg(s, q)), lambda c: c) for q in (95, 90, 75)},
    **{f"zoom x{z}": ((lambda s: s), (lambda c, z=z: zoom(c, z))) for z in (0.55, 0.75, 1.35, 1.8)},
}


def model_input(crop: np.ndarray, size: int, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """The eval transform (INTER_AREA resize + normalise), CHW float32."""
    x = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    return ((x - mean) / std).transpose(2, 0, 1).astype(np.float32)


@torch.no_grad()
def scores(model: torch.nn.Module, batch: np.ndarray) -> np.ndarray:
    """P(fake) per image, as evaluation.inference reads the model's outputs."""
    from models.outputs import logit_score

    out = torch.cat([model(torch.from_numpy(batch[i:i + 64])) for i in range(0, len(batch), 64)])
    return logit_score(out)[1].numpy()


def probe_checkpoint(checkpoint: str, sets: list[str]) -> pd.DataFrame:
    from sklearn.metrics import roc_auc_score

    from evaluation.scoring import scan_for
    from models.build import load_trained_model
    from preprocessing.face_cache import FaceCropSettings, _cut, face_crops, read_rgb

    trained = load_trained_model(checkpoint, "cpu")
    d = trained.config.data
    if d.face_crop != "mtcnn":
        raise SystemExit(f"error: {checkpoint} was trained without data.face_crop=mtcnn; probe a face-crop run")
    dc = trained.model.data_config
    mean, std = np.asarray(dc["mean"], np.float32), np.asarray(dc["std"], np.float32)
    settings = FaceCropSettings(margin=d.face_margin, size=d.face_size, border=d.face_border)
    rows = []
    for folder in sets:
        samples = scan_for(trained, folder).test
        table = face_crops([s.path for s in samples], settings, d.face_cache)
        y = np.array([s.label for s in samples])
        for name, (on_source, on_crop) in PROBES.items():
            batch = []
            for s in samples:
                rec = table.loc[s.path, ["x1", "y1", "x2", "y2"]].astype(int).to_dict()
                crop = on_crop(_cut(on_source(read_rgb(s.path)), rec, d.face_size))
                batch.append(model_input(crop, d.image_size, mean, std))
            sc = scores(trained.model, np.stack(batch))
            rows.append({"set": Path(folder).name, "probe": name, "auc": roc_auc_score(y, sc),
                         "real_mean_score": sc[y == 0].mean(), "fake_mean_score": sc[y == 1].mean()})
    return pd.DataFrame(rows)


def linear_probe(image_size: int = 128) -> pd.DataFrame:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from core.config import load_config
    from dataio.pipeline import scan_data
    from models.build import build_model
    from preprocessing.face_cache import FaceCropSettings, face_crops

    cfg = load_config(overrides={"model.model_type": "efficientnet_lite0", "model.pretrained": True,
                                 "data.image_size": image_size})
    model = build_model(cfg).eval()
    dc = model.data_config
    mean, std = np.asarray(dc["mean"], np.float32), np.asarray(dc["std"], np.float32)

    @torch.no_grad()
    def features(samples: list) -> tuple[np.ndarray, np.ndarray]:
        table = face_crops([s.path for s in samples], FaceCropSettings())
        x = np.stack([model_input(np.asarray(Image.open(table.loc[s.path, "crop_path"]).convert("RGB")), image_size,
                                  mean, std) for s in samples])
        f = [model.backbone.forward_features(torch.from_numpy(x[i:i + 64])).float().mean((2, 3))
             for i in range(0, len(x), 64)]
        return torch.cat(f).numpy(), np.array([s.label for s in samples])

    def scan(name: str):
        return scan_data(cfg.with_overrides({"data.data_dir": str(DATA / name)}, "--data_dir"))

    lfw, gan = scan("lfw_faceswap"), scan("hardfake_vs_real")
    xtr, ytr = features(lfw.train)
    evals = {"lfw_test": features(lfw.test), "gan_val": features(gan.val), "gan_test": features(gan.test)}
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    rows = []
    for c in (0.01, 0.1, 1.0):
        clf = LogisticRegression(C=c, max_iter=3000).fit((xtr - mu) / sd, ytr)
        auc = {k: roc_auc_score(y, clf.decision_function((x - mu) / sd)) for k, (x, y) in evals.items()}
        rows.append({"C": c, **auc})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="best.pt of a face-crop run (train(cfg) writes it)")
    p.add_argument("--sets", nargs="+", default=SETS)
    p.add_argument("--linear_probe", action="store_true")
    a = p.parse_args(argv)
    if not a.checkpoint and not a.linear_probe:
        p.error("give --checkpoint and/or --linear_probe")
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        if a.checkpoint:
            print(probe_checkpoint(a.checkpoint, a.sets).to_string(index=False))
        if a.linear_probe:
            print(linear_probe().to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
