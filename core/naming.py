"""How a data set is spelled on disk: class folders, split folders, label words, image types.

Shared by preprocessing (which writes face crops in this layout) and dataio (which reads it).
"""
from __future__ import annotations

import re

LABELS = ("real", "fake")  # label 0, label 1
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
CLASS_RE = re.compile(r"^(?:\d+[_-])?(real|fake)$", re.IGNORECASE)  # real, fake, 0_real, 1-fake
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "dev": "val", "test": "test", "testing": "test"}
LABEL_WORDS = {"real": 0, "0": 0, "fake": 1, "1": 1}
