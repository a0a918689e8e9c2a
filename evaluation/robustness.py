"""Robustness: metrics of the same model on the same images under fixed degradations.

Each perturbation is applied to the decoded uint8 RGB image (as the loader decodes it) before the eval
transform (resize + normalize), with fixed parameters and no randomness except the noise, whose seed
is derived from the image content (so results do not depend on batch order or loader workers):
  jpeg       quality 90 / 70 / 50 / 30 (OpenCV encoder, 4:2:0 like most web JPEGs)
  blur       Gaussian, sigma 1 and 2 in model-input pixels (scaled by decoded size / image_size)
  downscale  x0.5 and x0.25 (INTER_AREA) and back up to the decoded size (INTER_LINEAR)
  noise      additive Gaussian, std 0.02 and 0.05 of the 0-255 range, per channel
The table has one row per (perturbation, level) plus the clean row; accuracy is at threshold 0.5.
"""
from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import pandas as pd
import plotly.graph_objects as go

from evaluation.figures import heatmap_figure
from evaluation.metrics import MetricError, binary_metrics

log = logging.getLogger(__name__)

KINDS = ("jpeg", "blur", "downscale", "noise")
METRICS = ("auc", "ap", "accuracy", "eer")
COLUMNS = ("perturbation", "level", *METRICS, "delta_auc", "n")


@dataclass(frozen=True)
class Perturbation:
    """One fixed degradation: kind (jpeg | blur | downscale | noise) at one level."""

    kind: str
    level: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown perturbation {self.kind!r}; valid: {', '.join(KINDS)}")

    @property
    def name(self) -> str:
        unit = {"jpeg": "q", "blur": "sigma", "downscale": "x", "noise": "std"}[self.kind]
        return f"{self.kind} {unit}={self.level:g}"

    def apply(self, image: np.ndarray, image_size: int | None = None, seed: int = 0) -> np.ndarray:
        """Degrade a uint8 RGB (H, W, 3) image; returns a new uint8 image of the same shape."""
        img = np.ascontiguousarray(image, dtype=np.uint8)
        h, w = img.shape[:2]
        if self.kind == "jpeg":
            ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(self.level)])
            if not ok:
                raise RuntimeError(f"OpenCV could not JPEG-encode an image of shape {img.shape}")
            return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        if self.kind == "blur":
            sigma = self.level * max(1.0, min(h, w) / image_size) if image_size else self.level
            return cv2.GaussianBlur(img, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)
        if self.kind == "downscale":
            small = cv2.resize(img, (max(1, round(w * self.level)), max(1, round(h * self.level))),
                               interpolation=cv2.INTER_AREA)
            return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
        rng = np.random.default_rng([seed, zlib.adler32(img.tobytes())])
        noisy = img.astype(np.float32) + rng.normal(0.0, self.level * 255.0, img.shape).astype(np.float32)
        return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


DEFAULT_PERTURBATIONS: tuple[Perturbation, ...] = (
    *(Perturbation("jpeg", q) for q in (90, 70, 50, 30)),
    *(Perturbation("blur", s) for s in (1.0, 2.0)),
    *(Perturbation("downscale", f) for f in (0.5, 0.25)),
    *(Perturbation("noise", s) for s in (0.02, 0.05)),
)


class PerturbedTransform:
    """`transform(image=...)`-compatible wrapper: perturb the decoded image, then run the eval transform.
    Picklable (loader workers); attribute writes from augmentation.policies.seed_transform are harmless."""

    def __init__(self, perturbation: Perturbation, base: Any, image_size: int | None = None, seed: int = 0) -> None:
        # not `.seed`: loader workers' seed_transform overwrites that attribute with a per-worker seed
        self.perturbation, self.base, self.image_size, self.noise_seed = perturbation, base, image_size, seed

    def __call__(self, *, image: np.ndarray, **kw: Any) -> dict[str, Any]:
        return self.base(image=self.perturbation.apply(image, self.image_size, self.noise_seed), **kw)


def parse_perturbations(text: str | None) -> tuple[Perturbation, ...]:
    """'jpeg:90,blur:2' (kind:level, comma separated) -> perturbations; None/'' -> DEFAULT_PERTURBATIONS."""
    if not text:
        return DEFAULT_PERTURBATIONS
    out = []
    for item in text.split(","):
        kind, _, level = item.strip().partition(":")
        try:
            out.append(Perturbation(kind.strip().lower(), float(level)))
        except ValueError:
            raise ValueError(f"perturbation {item.strip()!r} must be kind:level with kind in "
                             f"{', '.join(KINDS)}, e.g. jpeg:50") from None
    return tuple(out)


# ------------------------------------------------------------------------------ the table
ScoreFn = Callable[[Perturbation | None], pd.DataFrame]


def _row(name: str, level: float, table: pd.DataFrame) -> dict[str, Any]:
    try:
        m = binary_metrics(table["label"], table["score"])
        values = {k: m[k] for k in METRICS}
    except MetricError as e:
        log.warning("robustness=%s level=%g metrics unavailable: %s", name, level, e)
        values = {k: math.nan for k in METRICS}
    return {"perturbation": name, "level": level, **values, "n": len(table)}


def robustness_table(score: ScoreFn, perturbations: Sequence[Perturbation] = DEFAULT_PERTURBATIONS,
                     clean: pd.DataFrame | None = None) -> pd.DataFrame:
    """Metrics per perturbation: `score(p)` returns a predictions table (label, score) for the data
    degraded by p (None = clean; `clean` skips that pass). delta_auc = auc - clean auc."""
    clean = score(None) if clean is None else clean
    rows = [_row("clean", math.nan, clean)]
    for p in perturbations:
        log.info("event=robustness perturbation=%s", p.name)
        rows.append(_row(p.kind, p.level, score(p)))
    df = pd.DataFrame(rows)
    df["delta_auc"] = df["auc"] - df.loc[0, "auc"]
    return df[list(COLUMNS)]


def score_robustness(trained, samples: list, *, tta: Any = False,
                     perturbations: Sequence[Perturbation] = DEFAULT_PERTURBATIONS, max_images: int | None = 2000,
                     seed: int = 0, batch_size: int = 64, num_workers: int = 2,
                     clean: pd.DataFrame | None = None) -> pd.DataFrame:
    """robustness_table for a models.build.TrainedModel on (a stratified cap of) `samples`, scored
    like the evaluation (same TTA, no MC-dropout). `clean`: that evaluation's predictions, reused when
    no cap applies."""
    from dataio.data import cap_split
    from evaluation.scoring import score_samples

    if max_images and len(samples) > max_images:
        samples, clean = cap_split(samples, max_images, seed), None
    size = trained.config.data.image_size

    def score(p: Perturbation | None) -> pd.DataFrame:
        wrap = (lambda base: PerturbedTransform(p, base, size, seed)) if p is not None else None
        return score_samples(trained, samples, batch_size=batch_size, num_workers=num_workers, tta=tta,
                             wrap_transform=wrap, seed=seed, desc=p.name if p else "clean")[1]

    return robustness_table(score, perturbations, clean)


def condition_labels(table: pd.DataFrame) -> list[str]:
    """Row labels such as 'clean', 'jpeg q=50', 'blur sigma=2'."""
    return ["clean" if k == "clean" else Perturbation(k, lv).name for k, lv in zip(table["perturbation"], table["level"])]


def robustness_figure(table: pd.DataFrame) -> go.Figure:
    """Heatmap panel: one row per condition, one column per metric (AUC, AP, accuracy, EER)."""
    grid = table[list(METRICS)].copy()
    grid.index = pd.Index(condition_labels(table), name="condition")
    grid.columns = pd.Index([c.upper() if c in ("auc", "ap", "eer") else c for c in METRICS], name="metric")
    return heatmap_figure(grid, "Robustness: metrics under degradations", zmin=0.0, zmax=1.0)


def robustness_metrics(table: pd.DataFrame, prefix: str = "robust") -> dict[str, float]:
    """Flat MLflow metrics, e.g. robust_jpeg_q50_auc, robust_jpeg_q50_delta_auc (finite values only)."""
    out: dict[str, float] = {}
    for label, (_, row) in zip(condition_labels(table), table.iterrows()):
        key = label.replace(" ", "_").replace("=", "").replace(".", "p")
        for col in (*METRICS, "delta_auc"):
            if label != "clean" or col != "delta_auc":
                v = float(row[col])
                if math.isfinite(v):
                    out[f"{prefix}_{key}_{col}"] = v
    return out


def captioned_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table for the dashboard, with its caption."""
    df = table.copy()
    df.index = pd.Index(condition_labels(table), name="condition")
    df.attrs["caption"] = ("same images, degraded before resize + normalize; accuracy at threshold 0.5; "
                           "delta_auc = auc - clean auc")
    return df


def robustness_panels(table: pd.DataFrame) -> tuple[go.Figure, pd.DataFrame, dict[str, float]]:
    """Dashboard heatmap, captioned table and flat metrics of a robustness table."""
    return robustness_figure(table), captioned_table(table), robustness_metrics(table)
