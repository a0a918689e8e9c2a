"""Augmentation policies (albumentations 2.0.8 names, no deprecated-argument warnings) and blending."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from augmentation.blending import blend, resample, self_blend, soft_mask
from augmentation.policies import POLICIES, build_transform, parse_policy, seed_transform
from core.registry import UnknownNameError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ALL_POLICIES = POLICIES.names() + ["randaugment:3:20"]


def _image(h: int = 70, w: int = 50, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_required_policies_registered() -> None:
    assert {"none", "basic", "advanced", "randaugment"} <= set(POLICIES.names())


@pytest.mark.parametrize("name", ALL_POLICIES)
@pytest.mark.parametrize("train", [True, False])
def test_policy_builds_and_runs_without_warnings(name: str, train: bool) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        transform = build_transform(name, 48, MEAN, STD, train, seed=0)
        outs = [transform(image=_image(seed=i))["image"] for i in range(30)]
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "not valid for transform" in m or "deprecated" in m.lower()], messages
    for out in outs:
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
        assert out.shape == (3, 48, 48)
        assert torch.isfinite(out).all()


def test_eval_transform_is_resize_and_normalize() -> None:
    img = np.full((20, 30, 3), 128, np.uint8)
    out = build_transform("advanced", 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), train=False)(image=img)["image"]
    expected = (128 / 255 - 0.5) / 0.25
    assert out.shape == (3, 16, 16)
    assert torch.allclose(out, torch.full_like(out, expected), atol=1e-5)


def test_train_policy_changes_images_and_none_does_not() -> None:
    img = _image(48, 48)
    plain = build_transform("none", 48, MEAN, STD, train=True, seed=0)(image=img)["image"]
    reference = build_transform("none", 48, MEAN, STD, train=False)(image=img)["image"]
    assert torch.equal(plain, reference)
    aug = build_transform("advanced", 48, MEAN, STD, train=True, seed=0)
    assert any(not torch.equal(aug(image=img)["image"], reference) for _ in range(5))


def test_seeded_transforms_repeat_and_gates_are_independent() -> None:
    img = _image(32, 32)
    a = build_transform("advanced", 32, MEAN, STD, True, seed=3)
    b = build_transform("advanced", 32, MEAN, STD, True, seed=3)
    assert all(torch.equal(a(image=img)["image"], b(image=img)["image"]) for _ in range(10))
    # Compose(seed=s) would give every child the same stream: flip and gray would always co-occur
    import albumentations as A

    t = A.Compose([A.HorizontalFlip(p=0.5), A.ToGray(p=0.5)], save_applied_params=True)
    seed_transform(t, 0)
    combos = set()
    for _ in range(40):
        applied = t(image=img)["applied_transforms"]
        combos.add(tuple(sorted(name for name, _ in applied)))
    assert ("HorizontalFlip",) in combos and ("ToGray",) in combos


def test_unknown_policy_names_valid_ones() -> None:
    with pytest.raises(UnknownNameError, match="randaugment"):
        build_transform("randaug", 32, MEAN, STD, train=True)
    assert parse_policy("randaugment:2:9") == ("randaugment", [2, 9])
    with pytest.raises(ValueError, match="integers"):
        parse_policy("randaugment:x")


def test_soft_mask_range_and_shape() -> None:
    m = soft_mask(64, 48, np.random.default_rng(0))
    assert m.shape == (64, 48) and m.dtype == np.float32
    assert 0.0 <= m.min() and m.max() <= 1.0 and m.max() > 0.7
    assert m[0, 0] < 0.05 and m[32, 24] > 0.5  # centred, soft towards the corners
    assert np.any((m > 0.05) & (m < 0.7))  # a blurred edge, not a hard one


def test_blend_endpoints() -> None:
    t, s = np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 200, np.uint8)
    assert np.array_equal(blend(t, s, np.zeros((8, 8), np.float32)), t)
    assert np.array_equal(blend(t, s, np.ones((8, 8), np.float32)), s)
    assert np.all(blend(t, s, np.full((8, 8), 0.5, np.float32)) == 100)
    with pytest.raises(ValueError):
        blend(t, s[:4], np.zeros((8, 8), np.float32))


def test_self_blend_is_deterministic_and_local() -> None:
    img = _image(64, 64)
    a = self_blend(img, np.random.default_rng(1))
    b = self_blend(img, np.random.default_rng(1))
    assert a.dtype == np.uint8 and a.shape == img.shape and np.array_equal(a, b)
    diff = np.abs(a.astype(int) - img.astype(int)).sum(axis=2)
    assert diff[28:36, 28:36].mean() > diff[:4, :4].mean()  # changed in the middle, not the corners
    assert resample(img, np.random.default_rng(0)).shape == img.shape


def _disc_area(out: torch.Tensor) -> int:
    """Pixels of the bright disc in a normalised (3, h, w) output."""
    return int((out[0] > 0).sum())


def test_scale_jitter_zooms_every_image_and_is_off_by_default() -> None:
    import cv2

    img = np.zeros((64, 64, 3), np.uint8)
    cv2.circle(img, (32, 32), 14, (255, 255, 255), -1)  # a "face" of fixed size in the middle of the crop
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    off = build_transform("none", 64, mean, std, train=True, seed=0)
    assert len({_disc_area(off(image=img)["image"]) for _ in range(10)}) == 1
    assert not [t for t in off.transforms if type(t).__name__ == "Affine"]
    on = build_transform("none", 64, mean, std, train=True, seed=0, scale_jitter=0.3)
    areas = [_disc_area(on(image=img)["image"]) for _ in range(40)]
    base = _disc_area(off(image=img)["image"])
    assert min(areas) < 0.8 * base and max(areas) > 1.2 * base  # zoomed out and in: (1 +- 0.3)^2 in area
    evaluation = build_transform("none", 64, mean, std, train=False, seed=0, scale_jitter=0.3)
    assert _disc_area(evaluation(image=img)["image"]) == base  # never at evaluation
