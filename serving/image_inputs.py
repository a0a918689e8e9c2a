"""Request inputs of the image pyfunc, checked before anything is opened or decoded, request errors (HTTP 400),
and the worker-side decoding (one decode per JPEG draft size, one transform per distinct member
preprocessing) that `ImageEnsembleModel` batches with a DataLoader.

A request is a DataFrame with a `path` column (files on the server) or an `image` column (base64 of
the encoded file: JPEG, PNG, ...), or an image array. The served model runs on a machine whose files
a client must not be able to read or probe, so:

- a path is used only when, with symlinks resolved, it lies under one of the folders in
  `DFSWEEP_DATA_ROOTS` (os.pathsep-separated; unset or empty = no paths, send image bytes);
- a refused, missing, unreadable or undecodable path gets one and the same answer, so the answer
  does not tell whether a file exists;
- a request holds at most `DFSWEEP_MAX_REQUEST_ROWS` images (default 256) and
  `DFSWEEP_MAX_REQUEST_MB` megabytes of image data (default 64: file sizes, decoded base64, array bytes).

Every refusal is an MlflowException with INVALID_PARAMETER_VALUE: the scoring server answers 400.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

ROOTS_ENV, ROWS_ENV, MB_ENV = "DFSWEEP_DATA_ROOTS", "DFSWEEP_MAX_REQUEST_ROWS", "DFSWEEP_MAX_REQUEST_MB"
DEFAULT_ROWS, DEFAULT_MB = 256, 64.0


def bad_input(message: str) -> MlflowException:
    """A request error: the scoring server answers 400 with this message."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def refused_path(path: str) -> MlflowException:
    """The one answer for any path that cannot be used (outside the roots, missing, a folder, not an image)."""
    return bad_input(f"image path {path!r} is not a readable image under the server's allowed data roots "
                     f"(set by {ROOTS_ENV} where the model is served); or send the image bytes in an 'image' "
                     "column (base64)")


# ------------------------------------------------------------------------------------ limits and roots
def data_roots() -> list[Path]:
    """The resolved folders of DFSWEEP_DATA_ROOTS (empty entries ignored)."""
    return [Path(os.path.realpath(os.path.expanduser(r))) for r in os.environ.get(ROOTS_ENV, "").split(os.pathsep)
            if r.strip()]


def request_limits() -> tuple[int, int]:
    """(max rows, max bytes) of one request, from the environment."""
    try:
        rows = int(os.environ.get(ROWS_ENV) or DEFAULT_ROWS)
        mb = float(os.environ.get(MB_ENV) or DEFAULT_MB)
    except ValueError:
        raise bad_input(f"server misconfigured: {ROWS_ENV} must be an integer and {MB_ENV} a number") from None
    return rows, int(mb * 1024 * 1024)


def allowed_file(path: str, roots: Sequence[Path]) -> str:
    """The real path of `path` if it is a regular file under one of `roots`; otherwise `refused_path`."""
    try:
        real = Path(os.path.realpath(os.path.expanduser(path)))
        ok = any(real.is_relative_to(r) for r in roots) and real.is_file()
    except (OSError, ValueError):  # e.g. embedded NUL, name too long
        ok = False
    if not ok:
        raise refused_path(path)
    return str(real)


def check_size(n_rows: int, n_bytes: int) -> None:
    max_rows, max_bytes = request_limits()
    if n_rows > max_rows:
        raise bad_input(f"request has {n_rows} images; the limit is {max_rows} ({ROWS_ENV}): split it")
    if n_bytes > max_bytes:
        raise bad_input(f"request holds {n_bytes / 2**20:.1f} MB of image data; the limit is "
                        f"{max_bytes / 2**20:.1f} MB ({MB_ENV}): split it")


def chunks(paths: Sequence[str]) -> Iterator[list[str]]:
    """Consecutive groups of local files that each fit the request limits (for clients such as serving.predict)."""
    max_rows, max_bytes = request_limits()
    group: list[str] = []
    size = 0
    for p in paths:
        b = os.path.getsize(p) if os.path.isfile(p) else 0
        if group and (len(group) >= max_rows or size + b > max_bytes):
            yield group
            group, size = [], 0
        group.append(p)
        size += b
    if group:
        yield group


# ------------------------------------------------------------------------------------ parsing
@dataclass
class ImageRequest:
    """One request, checked: `sources` (a real file path or encoded bytes per row) or decoded `arrays`."""

    paths: list[str] | None = None  # the client's paths, echoed in the answer
    sources: list[str | bytes] = field(default_factory=list)
    arrays: np.ndarray | None = None  # (N,H,W,3) uint8, or float32 in 0..255

    def __len__(self) -> int:
        return len(self.sources) if self.arrays is None else len(self.arrays)


def _b64(value: Any, row: int) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("ascii", "replace")
    if not isinstance(value, str) or not value:
        raise bad_input(f"'image' row {row} is empty or not a base64 string")
    if value.startswith("data:") and "," in value:  # a data URL: data:image/jpeg;base64,....
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise bad_input(f"'image' row {row} is not valid base64") from None


def _from_frame(df: pd.DataFrame) -> ImageRequest:
    cols = [c for c in ("path", "image") if c in df.columns]
    if len(cols) != 1:
        raise bad_input("input needs exactly one of a 'path' column (files under the server's data roots) or an "
                        f"'image' column (base64 image bytes); got columns {list(df.columns)}")
    check_size(len(df), 0)
    if cols == ["image"]:
        data = [_b64(v, i) for i, v in enumerate(df["image"])]
        check_size(len(data), sum(len(d) for d in data))
        return ImageRequest(sources=data)
    paths = df["path"]
    empty = [i for i, p in enumerate(paths) if not isinstance(p, str) or not p]
    if empty:
        raise bad_input(f"'path' must hold file paths; row(s) {empty[:5]} are empty or not strings")
    roots = data_roots()
    real = [allowed_file(str(p), roots) for p in paths]
    check_size(len(real), sum(os.path.getsize(p) for p in real))
    return ImageRequest(paths=[str(p) for p in paths], sources=real)


def parse_request(model_input: Any) -> ImageRequest:
    """A checked request from what pyfunc.predict received; bad or oversized input raises a request error (400)."""
    if isinstance(model_input, dict):
        if "path" in model_input or "image" in model_input:
            model_input = pd.DataFrame({k: np.asarray(v).reshape(-1) for k, v in model_input.items()})
        else:
            model_input = np.asarray(next(iter(model_input.values()), []))
    if isinstance(model_input, pd.Series):
        model_input = model_input.to_frame(model_input.name if model_input.name in ("path", "image") else "path")
    if isinstance(model_input, (list, tuple)):
        model_input = np.asarray(model_input)
    if isinstance(model_input, pd.DataFrame):
        return _from_frame(model_input)
    if not isinstance(model_input, np.ndarray):
        raise bad_input(f"unsupported input type {type(model_input).__name__}; send a DataFrame with a 'path' or "
                        "'image' (base64) column, uint8 images (N,H,W,3) or float32 images (N,3,H,W) in [0, 1]")
    x = model_input
    if x.dtype.kind in "USO":
        return _from_frame(pd.DataFrame({"path": x.reshape(-1)}))
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise bad_input(f"image arrays must be (N,H,W,3) uint8 or (N,3,H,W) float in [0, 1]; got shape {x.shape}")
    check_size(len(x), x.nbytes)
    if x.dtype.kind in "iu":
        if x.shape[-1] != 3 or x.min(initial=0) < 0 or x.max(initial=0) > 255:
            raise bad_input(f"integer images must be (N,H,W,3) with values 0..255; got shape {x.shape}")
        return ImageRequest(arrays=x.astype(np.uint8))
    if x.dtype.kind == "f":
        if x.shape[1] != 3:
            raise bad_input(f"float images must be channels-first (N,3,H,W); got shape {x.shape}")
        if not np.isfinite(x).all() or x.min(initial=0) < 0 or x.max(initial=0) > 1:
            raise bad_input("float images must hold RGB values in [0, 1] (not normalised); "
                            f"got range [{np.nanmin(x):.3g}, {np.nanmax(x):.3g}]")
        return ImageRequest(arrays=np.ascontiguousarray(x.transpose(0, 2, 3, 1), dtype=np.float32) * 255.0)
    raise bad_input(f"unsupported image dtype {x.dtype}")


def decode(source: str | bytes, size_hint: int | None, row: int, client_path: str | None) -> np.ndarray:
    """uint8 RGB (H,W,3) decoded as training does; an undecodable image is a request error."""
    from dataio.loaders import load_rgb

    try:
        return load_rgb(io.BytesIO(source) if isinstance(source, bytes) else source, size_hint)  # type: ignore[arg-type]
    except Exception:  # PIL raises many types for non-images / truncated files
        if client_path is not None:
            raise refused_path(client_path) from None
        raise bad_input(f"'image' row {row} is not a readable image (JPEG, PNG, WebP, BMP or TIFF bytes)") from None


# ------------------------------------------------------------------------------------ worker-side decoding
class DecodedPaths(torch.utils.data.Dataset):
    """Images (checked file paths or encoded bytes, see `parse_request`) decoded once per JPEG draft size and
    transformed once per distinct member preprocessing; runs in decoding threads (`decoded_batches`). An unreadable image
    gives its request-error message instead of tensors."""

    def __init__(self, sources: Sequence[str | bytes], preps: Sequence[tuple[Any, int]],
                 client_paths: Sequence[str] | None = None) -> None:
        self.sources, self.preps = list(sources), list(preps)  # (albumentations transform, decode size) each
        self.client_paths = list(client_paths) if client_paths is not None else None

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...] | str:
        decoded: dict[int, np.ndarray] = {}
        try:
            for _, size in self.preps:
                if size not in decoded:
                    decoded[size] = decode(self.sources[i], size, i, self.client_paths[i] if self.client_paths else None)
        except MlflowException as e:
            return e.message
        return tuple(transform(image=decoded[size])["image"] for transform, size in self.preps)


def collate_decoded(items: list) -> list[torch.Tensor] | str:
    """One (B,3,H,W) batch per preprocessing, or the first unreadable file's error message."""
    errors = [x for x in items if isinstance(x, str)]
    return errors[0] if errors else [torch.stack(group) for group in zip(*items)]


def decoded_batches(dataset: DecodedPaths, batch_size: int, workers: int) -> Iterator[list[torch.Tensor] | str]:
    """`collate_decoded` batches in order; with `workers` > 0 a thread pool decodes the next batch while the
    caller scores this one. Threads, not forked DataLoader processes: a fork taken while another thread of a
    long-lived server holds a lock (MLflow, OpenCV's pool, a thread pool) deadlocks the child. PIL/OpenCV
    decoding and the albumentations resize release the GIL, so threads overlap them with the forward."""
    starts = range(0, len(dataset), batch_size)
    if workers <= 0:
        for s in starts:
            yield collate_decoded([dataset[i] for i in range(s, min(s + batch_size, len(dataset)))])
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        def submit(s: int):
            return [pool.submit(dataset.__getitem__, i) for i in range(s, min(s + batch_size, len(dataset)))]

        pending = submit(0) if len(dataset) else []
        for s in starts:
            items = [f.result() for f in pending]
            pending = submit(s + batch_size) if s + batch_size < len(dataset) else []
            yield collate_decoded(items)


def default_workers(n_images: int, batch_size: int) -> int:
    """Decoding workers: none for a single batch (a worker costs more than it saves), else up to 4."""
    return 0 if n_images <= batch_size else min(4, os.cpu_count() or 1)
