"""Request inputs of the image pyfunc: DataFrames of paths or image arrays, request errors (HTTP 400),
and the worker-side decoding of path inputs (one decode per JPEG draft size, one transform per distinct
member preprocessing) that `ImageEnsembleModel` batches with a DataLoader."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE


def bad_input(message: str) -> MlflowException:
    """A request error: the scoring server answers 400 with this message."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def images_from_input(model_input: Any) -> tuple[list[str] | None, list[np.ndarray] | np.ndarray]:
    """(paths, []) for path inputs; (None, images (N,H,W,3) uint8 or float32 in 0..255) for arrays.
    Bad input raises a request error (400)."""
    if isinstance(model_input, dict):
        model_input = pd.DataFrame({k: np.asarray(v).reshape(-1) for k, v in model_input.items()}) \
            if "path" in model_input else np.asarray(next(iter(model_input.values()), []))
    if isinstance(model_input, pd.Series):
        model_input = model_input.to_frame("path")
    if isinstance(model_input, (list, tuple)):
        model_input = np.asarray(model_input)
    if isinstance(model_input, pd.DataFrame):
        if "path" not in model_input.columns:
            raise bad_input(f"input needs a 'path' column of image files; got columns {list(model_input.columns)}")
        paths = model_input["path"]
        empty = [i for i, p in enumerate(paths) if not isinstance(p, str) or not p]
        if empty:
            raise bad_input(f"'path' must hold file paths; row(s) {empty[:5]} are empty or not strings")
        return [str(p) for p in paths], []
    if not isinstance(model_input, np.ndarray):
        raise bad_input(f"unsupported input type {type(model_input).__name__}; send a DataFrame with a 'path' "
                        "column, uint8 images (N,H,W,3) or float32 images (N,3,H,W) in [0, 1]")
    x = model_input
    if x.dtype.kind in "USO":
        return images_from_input(pd.DataFrame({"path": x.reshape(-1)}))
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise bad_input(f"image arrays must be (N,H,W,3) uint8 or (N,3,H,W) float in [0, 1]; got shape {x.shape}")
    if x.dtype.kind in "iu":
        if x.shape[-1] != 3 or x.min(initial=0) < 0 or x.max(initial=0) > 255:
            raise bad_input(f"integer images must be (N,H,W,3) with values 0..255; got shape {x.shape}")
        return None, x.astype(np.uint8)
    if x.dtype.kind == "f":
        if x.shape[1] != 3:
            raise bad_input(f"float images must be channels-first (N,3,H,W); got shape {x.shape}")
        if not np.isfinite(x).all() or x.min(initial=0) < 0 or x.max(initial=0) > 1:
            raise bad_input("float images must hold RGB values in [0, 1] (not normalised); "
                            f"got range [{np.nanmin(x):.3g}, {np.nanmax(x):.3g}]")
        return None, np.ascontiguousarray(x.transpose(0, 2, 3, 1), dtype=np.float32) * 255.0
    raise bad_input(f"unsupported image dtype {x.dtype}")


def load_image(path: str, size_hint: int | None = None) -> np.ndarray:
    """uint8 RGB (H,W,3) decoded as training does; a missing or undecodable file is a request error."""
    from dataio.loaders import load_rgb

    if not Path(path).is_file():
        raise bad_input(f"image not found: {path}")
    try:
        return load_rgb(path, size_hint)
    except Exception as e:  # PIL raises many types for non-images / truncated files
        raise bad_input(f"not a readable image: {path} ({type(e).__name__}: {str(e)[:120]})") from None


class DecodedPaths(torch.utils.data.Dataset):
    """Image files decoded once per JPEG draft size and transformed once per distinct member preprocessing;
    runs in DataLoader workers. An unreadable file gives its request-error message instead of tensors."""

    def __init__(self, paths: Sequence[str], preps: Sequence[tuple[Any, int]]) -> None:
        self.paths, self.preps = list(paths), list(preps)  # (albumentations transform, decode size) each

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...] | str:
        decoded: dict[int, np.ndarray] = {}
        try:
            for _, size in self.preps:
                if size not in decoded:
                    decoded[size] = load_image(self.paths[i], size)
        except MlflowException as e:
            return e.message
        return tuple(transform(image=decoded[size])["image"] for transform, size in self.preps)


def collate_decoded(items: list) -> list[torch.Tensor] | str:
    """One (B,3,H,W) batch per preprocessing, or the first unreadable file's error message."""
    errors = [x for x in items if isinstance(x, str)]
    return errors[0] if errors else [torch.stack(group) for group in zip(*items)]


def one_cv2_thread(worker_id: int) -> None:  # noqa: ARG001
    import cv2

    cv2.setNumThreads(1)  # workers decode in parallel; OpenCV threads inside each would oversubscribe


def default_workers(n_images: int, batch_size: int) -> int:
    """Decoding workers: none for a single batch (a worker costs more than it saves), else up to 4."""
    return 0 if n_images <= batch_size else min(4, os.cpu_count() or 1)
