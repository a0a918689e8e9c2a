"""Augmentation policies by name (albumentations 2.0.8 argument names only).

`build_transform(name, image_size, mean, std, train)` returns an `A.Compose` that always starts with
`Resize(image_size)` (everything after works on small images, so the loader stays cheap) and ends in
`Normalize` + `ToTensorV2`. The eval transform (train=False) is resize + normalize only.

A policy name may carry integer arguments after colons: `randaugment:3:12` = N=3 ops of magnitude 12.
"""
from __future__ import annotations

import random
from typing import Callable, Sequence

import albumentations as A
import cv2
import numpy as np
from albumentations.core.composition import BaseCompose
from albumentations.pytorch import ToTensorV2

from core.registry import AUG_POLICIES

TransformList = list[A.BasicTransform | BaseCompose]
POLICIES = AUG_POLICIES  # name -> fn(image_size, *int args) -> list of albumentations transforms
_MAX_MAGNITUDE = 30  # torchvision's RandAugment uses 31 magnitude bins (0..30)


@POLICIES.register("none")
def none_policy(image_size: int) -> TransformList:
    """No augmentation (resize + normalize only)."""
    return []


@POLICIES.register("basic")
def basic_policy(image_size: int) -> TransformList:
    """Flip, a mild crop/affine and brightness/contrast: safe for any face detector."""
    return [
        A.HorizontalFlip(p=0.5),
        A.RandomResizedCrop(size=(image_size, image_size), scale=(0.85, 1.0), ratio=(0.9, 1.1), p=0.5),
        A.Affine(rotate=(-8, 8), translate_percent=(-0.04, 0.04), border_mode=cv2.BORDER_REFLECT_101, p=0.3),
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
    ]


@POLICIES.register("advanced")
def advanced_policy(image_size: int) -> TransformList:
    """Basic plus the degradations that hide or mimic forgery traces: JPEG, noise, blur, downscale,
    coarse dropout and colour shifts."""
    return basic_policy(image_size) + [
        A.ImageCompression(quality_range=(40, 95), compression_type="jpeg", p=0.4),
        A.OneOf(
            [
                A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.3, 1.5), p=1.0),
                A.MotionBlur(blur_limit=(3, 5), p=1.0),
            ],
            p=0.2,
        ),
        A.GaussNoise(std_range=(0.01, 0.05), mean_range=(0.0, 0.0), per_channel=True, p=0.25),
        A.Downscale(
            scale_range=(0.5, 0.9),
            interpolation_pair={"downscale": cv2.INTER_AREA, "upscale": cv2.INTER_LINEAR},
            p=0.2,
        ),
        A.OneOf(
            [
                A.HueSaturationValue(hue_shift_limit=8, sat_shift_limit=20, val_shift_limit=12, p=1.0),
                A.ColorJitter(brightness=(0.85, 1.15), contrast=(0.85, 1.15), saturation=(0.8, 1.2),
                              hue=(-0.03, 0.03), p=1.0),
            ],
            p=0.4,
        ),
        A.ToGray(num_output_channels=3, p=0.05),
        A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(0.05, 0.2),
                        hole_width_range=(0.05, 0.2), fill=0, p=0.3),
    ]


def randaugment_ops(magnitude: int) -> TransformList:
    """RandAugment's op set at one magnitude (0..30, as torchvision), each applied with p=1."""
    m = min(max(magnitude, 0), _MAX_MAGNITUDE) / _MAX_MAGNITUDE
    border = cv2.BORDER_CONSTANT
    return [
        A.NoOp(p=1.0),
        A.Affine(shear={"x": (-17 * m, 17 * m), "y": (0, 0)}, border_mode=border, p=1.0),
        A.Affine(shear={"x": (0, 0), "y": (-17 * m, 17 * m)}, border_mode=border, p=1.0),
        A.Affine(translate_percent={"x": (-0.45 * m, 0.45 * m), "y": (0, 0)}, border_mode=border, p=1.0),
        A.Affine(translate_percent={"x": (0, 0), "y": (-0.45 * m, 0.45 * m)}, border_mode=border, p=1.0),
        A.Affine(rotate=(-30 * m, 30 * m), border_mode=border, p=1.0),
        A.RandomBrightnessContrast(brightness_limit=0.9 * m, contrast_limit=0.0, p=1.0),
        A.RandomBrightnessContrast(brightness_limit=0.0, contrast_limit=0.9 * m, p=1.0),
        A.ColorJitter(brightness=(1, 1), contrast=(1, 1), saturation=(max(0.0, 1 - 0.9 * m), 1 + 0.9 * m),
                      hue=(0, 0), p=1.0),
        A.Sharpen(alpha=(0.0, min(1.0, 0.9 * m + 1e-3)), lightness=(1.0, 1.0), p=1.0),
        A.Posterize(num_bits=(max(1, 8 - int(round(4 * m))), 8), p=1.0),
        A.Solarize(threshold_range=(1.0 - m, 1.0), p=1.0),
        A.AutoContrast(p=1.0),
        A.Equalize(p=1.0),
    ]


@POLICIES.register("randaugment")
def randaugment_policy(image_size: int, num_ops: int = 2, magnitude: int = 9) -> TransformList:
    """RandAugment-style: flip, then `num_ops` ops drawn with replacement, each at `magnitude`."""
    if num_ops < 1:
        raise ValueError(f"randaugment needs num_ops >= 1 (got {num_ops})")
    return [
        A.HorizontalFlip(p=0.5),
        A.SomeOf(randaugment_ops(magnitude), n=num_ops, replace=True, p=1.0),
    ]


def parse_policy(name: str) -> tuple[str, list[int]]:
    """'randaugment:3:12' -> ('randaugment', [3, 12])."""
    base, *args = name.split(":")
    try:
        return base, [int(a) for a in args]
    except ValueError:
        raise ValueError(f"augmentation policy {name!r}: arguments after ':' must be integers") from None


# steps that map one image to one output, whatever the random state (what eval transforms are made of)
DETERMINISTIC_STEPS = (A.Compose, A.Resize, A.CropAndPad, A.CenterCrop, A.LongestMaxSize, A.SmallestMaxSize,
                       A.PadIfNeeded, A.Normalize, A.NoOp, ToTensorV2)


def random_steps(transform: A.BasicTransform | BaseCompose) -> list[str]:
    """Names of the steps in a transform tree that are not known to be deterministic (empty: the transform
    gives an image the same tensor every time). Unknown steps count as random."""
    found: list[str] = []

    def _walk(node: A.BasicTransform | BaseCompose) -> None:
        if type(node) not in DETERMINISTIC_STEPS or (isinstance(node, A.BasicTransform) and node.p < 1):
            found.append(type(node).__name__)
            return
        for child in getattr(node, "transforms", []) or []:
            _walk(child)

    _walk(transform)
    return found


def check_policy(name: str) -> None:
    """A valid policy value ('basic', 'randaugment:3:12'): a registered name whose arguments it accepts."""
    base, args = parse_policy(name)
    factory = POLICIES.get(base)
    try:
        factory(224, *args)
    except TypeError:
        raise ValueError(f"augmentation policy {name!r}: {base} does not take {len(args)} argument(s)") from None


POLICIES.set_parser(check_policy)


def is_deterministic(name: str, image_size: int) -> bool:
    """True when policy `name` adds no random transform, so its train transform is the eval transform
    (a frozen backbone then gives every image the same features each epoch: training.feature_cache)."""
    base, args = parse_policy(name)
    return not POLICIES.get(base)(image_size, *args)


def build_transform(
    name: str,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    *,
    seed: int | None = None,
    center_crop: float | None = None,
    artifact_prob: float = 0.0,
    scale_jitter: float = 0.0,
) -> A.Compose:
    """[central crop] -> Resize -> policy `name` [-> artefact trace] (train only) -> Normalize -> ToTensorV2.

    `center_crop` keeps that central fraction of each side first (e.g. 0.5 for whole LFW photos);
    `artifact_prob` > 0 adds one up-sampling / double-JPEG / spectral trace (augmentation.artifacts) with
    that probability after the policy, at the model's input size; `scale_jitter` > 0 zooms every training image
    by a random factor in [1 - j, 1 + j] (mirrored border) so the face's size in its crop is no cue."""
    first: TransformList = []
    if center_crop is not None and center_crop < 1:
        first = [A.CropAndPad(percent=-(1 - center_crop) / 2, keep_size=False, p=1.0)]
    middle: TransformList = []
    if train:
        base, args = parse_policy(name)
        factory: Callable[..., TransformList] = POLICIES.get(base)
        middle = factory(image_size, *args)
        if scale_jitter > 0:
            middle.append(A.Affine(scale=(1 - scale_jitter, 1 + scale_jitter), keep_ratio=True,
                                   border_mode=cv2.BORDER_REFLECT_101, p=1.0))
        if artifact_prob > 0:
            from augmentation.artifacts import artifact_ops

            middle.append(artifact_ops(artifact_prob))
    transform = A.Compose(
        [
            *first,
            A.Resize(height=image_size, width=image_size, interpolation=cv2.INTER_AREA),
            *middle,
            A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0),
            ToTensorV2(),
        ]
    )
    if seed is not None:
        seed_transform(transform, seed)
    return transform


def seed_transform(transform: A.BasicTransform | BaseCompose, seed: int) -> None:
    """Seed every node of a transform tree with its own stream.

    `A.Compose(seed=s)` / `set_random_seed(s)` give every child the SAME seed, so all `p` gates fire
    together (a flip always comes with a colour jitter); this spawns an independent seed per node.
    """
    nodes: list[A.BasicTransform | BaseCompose] = []

    def _walk(node: A.BasicTransform | BaseCompose) -> None:
        nodes.append(node)
        for child in getattr(node, "transforms", []) or []:
            _walk(child)

    _walk(transform)
    children = np.random.SeedSequence(seed).spawn(len(nodes))
    for node, seq in zip(nodes, children):
        node_seed = int(seq.generate_state(1)[0])
        # set the node's own generators directly (BaseCompose.set_random_seed would overwrite children)
        node.seed = node_seed
        node.random_generator = np.random.default_rng(node_seed)
        node.py_random = random.Random(node_seed)
