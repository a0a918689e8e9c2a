"""Robustness: fixed degradations of decoded images, and the metrics table on a tiny model."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from augmentation.policies import build_transform
from evaluation.robustness import (
    COLUMNS, DEFAULT_PERTURBATIONS, Perturbation, PerturbedTransform, parse_perturbations, robustness_figure,
    robustness_metrics, score_robustness,
)
from dataio.loaders import load_rgb
from evaluation.metrics import binary_metrics
from evaluation.scoring import score_dataset, score_samples
from models.build import load_trained_model
from helpers import subset_csv, tiny_checkpoint  # noqa: F401  (re-exported for test_evaluate, test_crosseval)


def test_every_perturbation_changes_pixels_deterministically(shared_data: Path) -> None:
    image = load_rgb(str(next((shared_data / "lfw_faceswap" / "real").glob("*.jpg"))))
    errors = {}
    for p in DEFAULT_PERTURBATIONS:
        out = p.apply(image, image_size=64)
        assert out.shape == image.shape and out.dtype == np.uint8, p.name
        errors[p.name] = float(np.abs(out.astype(np.int16) - image).mean())
        assert (out != image).any(), f"{p.name} left the image unchanged"  # q90 on a q90-ish JPEG: small but real
        np.testing.assert_array_equal(out, p.apply(image, image_size=64))  # noise too: seeded by content
    assert errors["jpeg q=90"] < errors["jpeg q=50"] < errors["jpeg q=30"]
    assert errors["blur sigma=1"] < errors["blur sigma=2"]
    assert errors["downscale x=0.5"] < errors["downscale x=0.25"]
    assert errors["noise std=0.02"] < errors["noise std=0.05"]
    assert [(p.kind, p.level) for p in parse_perturbations("jpeg:50, blur:2")] == [("jpeg", 50.0), ("blur", 2.0)]
    with pytest.raises(ValueError, match="kind:level"):
        parse_perturbations("jpg:50")


def test_perturbed_transform_feeds_the_model_degraded_pixels(shared_data: Path) -> None:
    image = load_rgb(str(next((shared_data / "hardfake_vs_real" / "fake").glob("*.jpg"))), 32)
    base = build_transform("none", 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), train=False)
    clean = base(image=image)["image"]
    jpeg = PerturbedTransform(Perturbation("jpeg", 30), base, 32)(image=image)["image"]
    assert jpeg.shape == clean.shape == (3, 32, 32) and (jpeg - clean).abs().mean() > 0.01


def test_robustness_table_on_a_tiny_model(tmp_path: Path, shared_data: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "best.pt")
    data = subset_csv(shared_data / "lfw_faceswap", tmp_path / "lfw.csv", per_class=8)
    trained = load_trained_model(ckpt, "cpu")
    scored = score_dataset(trained, data, num_workers=0, batch_size=16)
    table = score_robustness(trained, scored.samples, num_workers=0, batch_size=16, clean=scored.table)
    assert list(table.columns) == list(COLUMNS)
    assert list(zip(table["perturbation"], table["level"]))[1:] == [(p.kind, p.level) for p in DEFAULT_PERTURBATIONS]
    assert table.loc[0, "perturbation"] == "clean" and math.isnan(table.loc[0, "level"])
    assert (table["n"] == 16).all() and table["auc"].between(0, 1).all() and table["eer"].between(0, 1).all()
    np.testing.assert_allclose(table["delta_auc"], table["auc"] - table.loc[0, "auc"])
    # the clean row is the evaluated predictions themselves; a degraded pass really sees other pixels
    assert table.loc[0, "auc"] == pytest.approx(binary_metrics(scored.table["label"], scored.table["score"])["auc"])
    capped = score_robustness(trained, scored.samples, perturbations=(Perturbation("jpeg", 30),), max_images=8,
                              num_workers=0)
    assert list(capped["n"]) == [8, 8] and list(capped["perturbation"]) == ["clean", "jpeg"]
    wrap = lambda base: PerturbedTransform(Perturbation("jpeg", 30), base, 32)  # noqa: E731
    _, degraded = score_samples(trained, scored.samples, num_workers=0, wrap_transform=wrap)
    assert np.abs(degraded["score"].to_numpy() - scored.table["score"].to_numpy()).max() > 0
    fig = robustness_figure(table)
    assert len(fig.data[0].y) == len(DEFAULT_PERTURBATIONS) + 1
    metrics = robustness_metrics(table)
    assert {"robust_clean_auc", "robust_jpeg_q30_delta_auc", "robust_noise_std0p05_auc"} <= set(metrics)


def test_noise_is_the_same_with_loader_workers(tmp_path: Path, shared_data: Path) -> None:
    """Workers re-seed transforms (seed_transform); the noise seed must survive that."""
    trained = load_trained_model(tiny_checkpoint(tmp_path / "best.pt"), "cpu")
    scored = score_dataset(trained, subset_csv(shared_data / "hardfake_vs_real", tmp_path / "hf.csv", 4), num_workers=0)
    wrap = lambda base: PerturbedTransform(Perturbation("noise", 0.05), base, 32, seed=3)  # noqa: E731
    _, inline = score_samples(trained, scored.samples, num_workers=0, batch_size=4, wrap_transform=wrap)
    _, workers = score_samples(trained, scored.samples, num_workers=2, batch_size=4, wrap_transform=wrap)
    np.testing.assert_array_equal(inline["score"].to_numpy(), workers["score"].to_numpy())
    assert np.abs(inline["score"].to_numpy() - scored.table["score"].to_numpy()).max() > 0
