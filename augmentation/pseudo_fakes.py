"""Turn a fraction of real training images into labelled pseudo-fakes (label 1), before the albumentations policy.

    maker = PseudoFakes(self_blend_prob=0.3, landmarks=table_landmarks)     # one per training dataset
    image, label = maker(image, label, path, rng)                          # real -> maybe fake

Self-blending (`aug.self_blend_prob`, augmentation.blending): the mask is the landmark hull
(`landmark_mask`) when `landmarks` has the image's 5 MTCNN landmarks, else the face-shaped random hull
inside a centred ellipse (`soft_mask`, scaled by `crop_fraction` for uncropped photos).
Artefact fakes (`aug.artifact_fake_prob`, augmentation.artifacts): the whole image gets one
up-sampling / spectral trace a generator leaves (see `artifact_fake`).

Randomness comes from the `rng` the caller passes (dataio.loaders derives it from the epoch seed and the
sample index), so a resumed run makes the same pseudo-fakes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from augmentation.blending import landmark_mask, self_blend_pair, soft_mask

# path -> (landmarks (5, 2) in pixels of the stored image, (width, height) of the stored image)
LandmarkTable = Mapping[str, tuple[np.ndarray, tuple[int, int]]]


@dataclass
class PseudoFakes:
    """Real images -> pseudo-fakes with these probabilities (disjoint: at most one kind per image)."""

    self_blend_prob: float = 0.0
    artifact_fake_prob: float = 0.0
    landmarks: LandmarkTable = field(default_factory=dict)
    crop_fraction: float = 1.0  # the central fraction the loader keeps (data.center_crop): ellipse axes x this
    image_size: int | None = None  # the model's input size: artefact periods are scaled to survive the resize

    def __post_init__(self) -> None:
        if self.self_blend_prob + self.artifact_fake_prob > 1.0:
            raise ValueError("self_blend_prob + artifact_fake_prob must be <= 1")

    @property
    def active(self) -> bool:
        return self.self_blend_prob > 0 or self.artifact_fake_prob > 0

    def mask(self, image: np.ndarray, path: str, rng: np.random.Generator) -> np.ndarray:
        """The blending mask of one image: landmark hull when its landmarks are known, else an ellipse hull."""
        h, w = image.shape[:2]
        entry = self.landmarks.get(path)
        if entry is not None and np.isfinite(entry[0]).all():
            lm, (sw, sh) = entry
            return landmark_mask(h, w, np.asarray(lm) * (w / sw, h / sh), rng)  # decoded size may differ
        s = self.crop_fraction
        return soft_mask(h, w, rng, axes=(rng.uniform(0.22, 0.32) * s, rng.uniform(0.28, 0.38) * s),
                         cutoff=1 / 255)

    def __call__(self, image: np.ndarray, label: int, path: str,
                 rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """(image, label) unchanged for fakes; for reals, a pseudo-fake with label 1 at the set rates."""
        if label != 0 or not self.active:
            return image, label
        u = rng.random()
        if u < self.self_blend_prob:
            fake, _ = self_blend_pair(image, rng, mask=self.mask(image, path, rng))
            return fake, 1
        if u < self.self_blend_prob + self.artifact_fake_prob:
            from augmentation.artifacts import artifact_fake

            scale = min(image.shape[:2]) * self.crop_fraction / self.image_size if self.image_size else 1.0
            return artifact_fake(image, rng, scale=scale), 1
        return image, label
