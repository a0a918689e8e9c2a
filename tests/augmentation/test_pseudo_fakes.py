"""Self-blended and artefact pseudo-fakes: local to the mask, label fake, seeded; artefact transforms; config/sweep keys."""
from __future__ import annotations

import warnings
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from optuna.trial import FixedTrial

from augmentation.artifacts import DoubleJPEG, SpectralPeaks, UpsampleTrace, artifact_fake, double_jpeg, \
    spectral_peaks, upsample_trace
from augmentation.blending import landmark_mask, self_blend_pair
from augmentation.policies import build_transform, seed_transform
from augmentation.pseudo_fakes import PseudoFakes
from core.config import ConfigError, load_config
from dataio.data import DataIndex, Sample
from dataio.loaders import build_loaders, load_rgb, pseudo_fake_landmarks, reseed_epoch
from experiments.search_space import load_sweep
from preprocessing.face_cache import LANDMARK_COLUMNS, FaceCropSettings, face_crops, landmarks

MEAN, STD = (0.5,) * 3, (0.5,) * 3


def lfw(shared: Path, cls: str, n: int) -> list[str]:
    return [str(p) for p in sorted((shared / "lfw_faceswap" / cls).glob("*.jpg"))[:n]]


def _centroid(mask: np.ndarray) -> np.ndarray:
    y, x = np.nonzero(mask > 0.5)
    return np.array([x.mean(), y.mean()])


def test_self_blend_differs_from_its_source_only_inside_the_landmark_mask(shared_data: Path, tmp_path: Path) -> None:
    path = lfw(shared_data, "real", 1)[0]
    row = face_crops([path], FaceCropSettings(size=128), tmp_path).loc[path]
    assert not row["fallback"]
    img, lm = load_rgb(row["crop_path"]), landmarks(row)
    for seed in range(4):
        rng = np.random.default_rng(seed)
        mask = landmark_mask(128, 128, lm, rng)
        fake, used = self_blend_pair(img, rng, mask=mask)
        assert used is mask and fake.shape == img.shape and fake.dtype == np.uint8
        outside, inside = mask == 0, mask > 0.5
        assert outside.mean() > 0.2 and inside.mean() > 0.1  # a face-sized region, not the whole crop
        assert np.array_equal(fake[outside], img[outside])  # untouched outside the mask, bit for bit
        assert np.abs(fake[inside].astype(int) - img[inside].astype(int)).mean() > 2  # changed inside
        # the mask sits on the face the landmarks describe and follows them
        assert np.linalg.norm(_centroid(mask) - lm.mean(axis=0)) < 0.15 * 128
    moved = landmark_mask(128, 128, lm + (20, 0), np.random.default_rng(0))
    shift = _centroid(moved) - _centroid(landmark_mask(128, 128, lm, np.random.default_rng(0)))
    assert 12 < shift[0] < 28 and abs(shift[1]) < 6


def test_loader_makes_real_training_faces_fake_with_landmark_masks(shared_data: Path, tmp_path: Path) -> None:
    real, fake = lfw(shared_data, "real", 3), lfw(shared_data, "fake", 2)
    index = DataIndex(train=[Sample(p, 0) for p in real] + [Sample(fake[0], 1)],
                      val=[Sample(real[2], 0), Sample(fake[1], 1)], test=[])
    over = {"data.face_crop": "mtcnn", "data.face_size": 64, "data.image_size": 64, "data.face_cache": str(tmp_path),
            "data.num_workers": 0, "data.batch_size": 4, "data.aug_policy": "none"}
    plain = build_loaders(index, load_config(overrides=over), MEAN, STD)
    blended = build_loaders(index, load_config(overrides={**over, "aug.self_blend_prob": 1.0}), MEAN, STD)
    ds, ref = blended["train"].dataset, plain["train"].dataset
    assert ds.pseudo_fakes is not None and ref.pseudo_fakes is None and blended["val"].dataset.pseudo_fakes is None
    assert set(ds.pseudo_fakes.landmarks) == {s.path for s in ds.samples if s.label == 0}  # crops' landmarks
    for i, s in enumerate(ds.samples):
        x, y, _ = ds[i]
        x0, y0, _ = ref[i]
        assert y == 1.0  # every real became a fake; the fake stays fake
        if s.label == 0:
            rng = np.random.default_rng([ds.seed, i])
            rng.random()  # the draw that chose self-blending
            mask = ds.pseudo_fakes.mask(load_rgb(s.path), s.path, rng)
            changed = (x != x0).any(dim=0).numpy()
            assert changed.any() and not changed[mask == 0].any()
        else:
            assert torch.equal(x, x0)
    assert all(blended["val"].dataset[i][1] == s.label for i, s in enumerate(index.val))  # eval data untouched
    again = ds[0][0]
    reseed_epoch(blended["train"], 7)
    other = ds[0][0]
    assert not torch.equal(again, other) and torch.equal(other, ds[0][0])  # per-epoch, reproducible


def test_pseudo_fake_rate_and_fallback_to_ellipse() -> None:
    img = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    maker = PseudoFakes(self_blend_prob=0.3, artifact_fake_prob=0.2, image_size=48)
    labels = [maker(img, 0, "x.png", np.random.default_rng(i))[1] for i in range(400)]
    assert 0.42 < np.mean(labels) < 0.58
    assert maker(img, 1, "x.png", np.random.default_rng(0)) == (img, 1)
    ellipse = maker.mask(img, "no-landmarks.png", np.random.default_rng(0))  # no landmarks: centred ellipse hull
    assert ellipse[24, 24] > 0.3 and ellipse[0, 0] == 0 and ellipse[47, 47] == 0
    with pytest.raises(ValueError, match="<= 1"):
        PseudoFakes(self_blend_prob=0.8, artifact_fake_prob=0.4)


def test_landmarks_map_back_to_the_whole_image_without_face_crop() -> None:
    lm = np.array([[20, 24], [44, 24], [32, 36], [22, 46], [42, 46]], np.float64)  # crop pixels, face_size 64
    table = pd.DataFrame([{"path": "a.jpg", "crop_path": "a.png", "width": 250, "height": 200, "x1": 100, "y1": 40,
                           "x2": 228, "y2": 168, "det_score": 0.99, "fallback": False,
                           **dict(zip(LANDMARK_COLUMNS, lm.reshape(-1)))},
                          {"path": "b.jpg", "crop_path": "b.png", "width": 250, "height": 200, "x1": 0, "y1": 0,
                           "x2": 200, "y2": 200, "det_score": np.nan, "fallback": True,
                           **dict.fromkeys(LANDMARK_COLUMNS, np.nan)}]).set_index("path")
    samples = [Sample("a.jpg", 0), Sample("b.jpg", 0)]
    cfg = load_config(overrides={"aug.self_blend_prob": 0.5, "aug.self_blend_mask": "landmarks", "data.face_size": 64})
    out = pseudo_fake_landmarks(samples, cfg, table)
    assert set(out) == {"a.jpg"}  # a fallback crop has no landmarks: ellipse mask
    points, size = out["a.jpg"]
    assert size == (250, 200) and np.allclose(points, (100, 40) + lm * 2.0)
    cfg_crop = load_config(overrides={"aug.self_blend_prob": 0.5, "data.face_crop": "mtcnn", "data.face_size": 64})
    points, size = pseudo_fake_landmarks(samples, cfg_crop, table)["a.png"]
    assert size == (64, 64) and np.allclose(points, lm)
    assert pseudo_fake_landmarks(samples, load_config(overrides={"aug.self_blend_prob": 0.5}), table) == {}


def test_artifact_traces() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    up = upsample_trace(img, rng, period=2, mode="nearest")
    assert np.array_equal(up[0::2, 0::2], up[1::2, 1::2])  # 2x2 blocks
    zeros = upsample_trace(img, rng, period=2, mode="zeros")
    assert zeros.shape == img.shape and not np.array_equal(zeros, img)
    flat = np.full((64, 64, 3), 128, np.uint8)
    peaks = spectral_peaks(flat, rng, period=8).astype(np.float32).mean(axis=2)
    spectrum = np.abs(np.fft.fft2(peaks - peaks.mean()))
    k = np.unravel_index(spectrum.argmax(), spectrum.shape)
    assert {min(k[0], 64 - k[0]), min(k[1], 64 - k[1])} <= {0, 8}  # a peak at 64/8 cycles
    jpg = double_jpeg(img, rng)
    assert jpg.shape == img.shape and jpg.dtype == np.uint8 and not np.array_equal(jpg, img)
    big = np.full((256, 256, 3), 128, np.uint8)
    assert artifact_fake(big, np.random.default_rng(1), scale=4).shape == big.shape


def test_artifact_transforms_are_albumentations_compatible_and_seeded() -> None:
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no invalid-argument warnings
        for t in (UpsampleTrace(p=1.0), DoubleJPEG(p=1.0), SpectralPeaks(p=1.0)):
            pipe = A.Compose([t])
            seed_transform(pipe, 3)
            a = pipe(image=img)["image"]
            seed_transform(pipe, 3)
            assert np.array_equal(a, pipe(image=img)["image"]) and not np.array_equal(a, img)
        on = build_transform("none", 32, MEAN, STD, True, seed=0, artifact_prob=1.0)
        off = build_transform("none", 32, MEAN, STD, True, seed=0)
        assert not torch.equal(on(image=img)["image"], off(image=img)["image"])
        evaluation = build_transform("none", 32, MEAN, STD, False, seed=0, artifact_prob=1.0)
        assert torch.equal(evaluation(image=img)["image"], off(image=img)["image"])  # never at evaluation


def test_config_keys_and_sweep_space(tmp_path: Path) -> None:
    cfg = load_config(overrides={"aug.self_blend_prob": 0.4, "aug.artifact_fake_prob": 0.2})
    assert cfg.aug.self_blend_mask == "auto" and cfg.aug.artifact_prob == 0
    with pytest.raises(ConfigError, match="self_blend_prob"):
        load_config(overrides={"aug.self_blend_prob": 0.8, "aug.artifact_fake_prob": 0.4})
    with pytest.raises(ConfigError, match="artifact_prob"):
        load_config(overrides={"aug.artifact_prob": 0.3, "aug.artifact_fake_prob": 0.3})
    with pytest.raises(ConfigError, match="aug.self_blend_mask"):
        load_config(overrides={"aug.self_blend_mask": "hull"})
    sweep = tmp_path / "sbi.yaml"
    sweep.write_text(yaml.safe_dump({
        "study": {"name": "sbi", "n_trials": 2},
        "base": {"model": {"model_type": "test_efficientnet", "pretrained": False}, "data": {"image_size": 32}},
        "space": {"aug.self_blend_prob": {"type": "categorical", "choices": [0.0, 0.3, 0.5]},
                  "aug.self_blend_mask": {"type": "categorical", "choices": ["auto", "ellipse"]},
                  "aug.artifact_prob": {"type": "float", "low": 0.0, "high": 0.5}}}))
    spec = load_sweep(sweep)
    params = spec.sample(FixedTrial({"aug.self_blend_prob": 0.5, "aug.self_blend_mask": "ellipse",
                                     "aug.artifact_prob": 0.25}))
    trial = spec.trial_config(params)
    assert trial.aug.self_blend_prob == 0.5 and trial.aug.self_blend_mask == "ellipse"
    assert trial.aug.artifact_prob == 0.25


def test_landmarks_mode_detects_once_and_maps_to_the_whole_photo(shared_data: Path, tmp_path: Path) -> None:
    real = lfw(shared_data, "real", 2)
    index = DataIndex(train=[Sample(real[0], 0), Sample(real[1], 0), Sample(lfw(shared_data, "fake", 1)[0], 1)],
                      val=[], test=[])
    cfg = load_config(overrides={"aug.self_blend_prob": 1.0, "aug.self_blend_mask": "landmarks", "data.image_size": 64,
                                 "data.face_cache": str(tmp_path), "data.num_workers": 0, "data.batch_size": 3})
    ds = build_loaders(index, cfg, MEAN, STD)["train"].dataset
    assert [s.path for s in ds.samples] == [s.path for s in index.train]  # whole photos are read, not crops
    table = face_crops(real, FaceCropSettings(), tmp_path)  # what the loader detected (now cached)
    for path in real:
        lm, size = ds.pseudo_fakes.landmarks[path]
        assert size == (250, 250) and np.allclose(lm, table.loc[path, ["x1", "y1"]].to_numpy(float)
                                                  + landmarks(table.loc[path]) * (table.loc[path, "x2"]
                                                                                  - table.loc[path, "x1"]) / 256)
        img = load_rgb(path, ds.image_size)  # JPEG draft decode: may be smaller than the file
        mask = ds.pseudo_fakes.mask(img, path, np.random.default_rng(0))
        scaled = lm * (img.shape[1] / 250, img.shape[0] / 250)
        assert np.linalg.norm(_centroid(mask) - scaled.mean(axis=0)) < 0.1 * img.shape[0]
