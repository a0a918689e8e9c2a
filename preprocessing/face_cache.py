"""One face crop for every data set (`data.face_crop: mtcnn`): MTCNN runs once per image, results are cached.

    table = face_crops(paths, FaceCropSettings(margin=0.3, size=256))   # DataFrame indexed by path

Each image gets the largest face MTCNN finds (probability >= min_score); its box grown by `margin` into a
square is, with border="shift" (default), shifted inside the image (a square bigger than the image shrinks to
the image's shorter side: never padding, so no black border for a model to learn) and resized to `size` x
`size`. With border="reflect" the square is never moved or shrunk: the part outside the frame is mirrored
(cv2.BORDER_REFLECT_101), so every face has the same size in its crop whatever the source's framing (a face
filling its photo is otherwise shown bigger than a face with room around it: a data-set cue). The crop is a
lossless PNG (no second JPEG compression on top of the data set's own). A face filling the whole frame
(which MTCNN misses) is looked for again on a grey-padded copy. An image with no face is kept:
its crop is a centred square whose side is the median face-square/short-side ratio of the faces found in
the same call (the whole short side when none was found), marked `fallback` and named in a warning.

Cache (default ~/.cache/dfsweep/faces, or $DFSWEEP_FACE_CACHE, or data.face_cache):
    <root>/<settings key>/<file key>.png    the crop
    <root>/<settings key>/<file key>.json   its record (written last: a crop without one is redone)
    <root>/<settings key>/index-<set key>.parquet   the whole table of one path list (fast path)
The file key is sha1(absolute path, size, mtime_ns): an edited or replaced image is detected again; the
settings key covers margin, size, min_score, detect_max_side and CACHE_VERSION. Writes are atomic (temp + rename), so
concurrent sweep workers at worst detect the same image twice.

The table (the contract dataio.loaders, self-blending and the error gallery rely on), one row per path:
    path (index)      the original image, as given
    crop_path         the PNG crop, size x size RGB
    width, height     the original image's size in pixels
    x1, y1, x2, y2    the crop square in the original image's pixels (x2 - x1 == y2 - y1; inside the image,
                      0 <= x1 < x2 <= width, except with border="reflect", where it may extend past the frame)
    det_score         MTCNN probability of the face kept (NaN for a fallback)
    fallback          True when no face was found (centred crop; landmarks NaN)
    lm0_x, lm0_y, ... lm4_x, lm4_y   MTCNN's 5 landmarks in CROP pixels (0..size), in MTCNN's order: eye at
                      smaller x, other eye, nose tip, mouth corner at smaller x, other mouth corner.
                      `landmarks(table.loc[path])` -> float array (5, 2).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from preprocessing.faces import pick_face, shifted_square, square_box

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when the crop procedure changes: old entries are then not reused
LANDMARK_COLUMNS = [f"lm{i}_{a}" for i in range(5) for a in ("x", "y")]
COLUMNS = ["crop_path", "width", "height", "x1", "y1", "x2", "y2", "det_score", "fallback", *LANDMARK_COLUMNS]


class Detector(Protocol):
    def detect_landmarks(self, frames: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]: ...


@dataclass(frozen=True)
class FaceCropSettings:
    """How every crop is made; the same for training and every evaluation set of a run."""

    margin: float = 0.3  # square side = (1 + margin) * the face box's longer side
    size: int = 256  # crop side in pixels
    min_score: float = 0.9  # MTCNN probability below which a detection is ignored
    detect_max_side: int = 640  # images are downscaled to this for detection (boxes mapped back)
    border: str = "shift"  # shift: square moved/shrunk inside the frame; reflect: same face scale, mirrored border

    def __post_init__(self) -> None:
        if self.border not in ("shift", "reflect"):
            raise ValueError(f"face crop border must be 'shift' or 'reflect'; got {self.border!r}")

    def key(self) -> str:
        doc = {**asdict(self), "version": CACHE_VERSION}
        if self.border == "shift":  # the default leaves the key (and the crops cached before it existed) as it was
            del doc["border"]
        return "mtcnn-" + hashlib.sha1(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]


def default_cache_root() -> Path:
    return Path(os.environ.get("DFSWEEP_FACE_CACHE") or Path.home() / ".cache" / "dfsweep" / "faces")


def landmarks(row: pd.Series) -> np.ndarray:
    """The (5, 2) landmarks of one table row, crop pixels (NaN for a fallback)."""
    return row[LANDMARK_COLUMNS].to_numpy(dtype=np.float64).reshape(5, 2)


def file_key(path: str | Path) -> str:
    p = Path(path).expanduser().resolve()
    st = p.stat()
    return hashlib.sha1(f"{p}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:24]


def read_rgb(path: str | Path) -> np.ndarray:
    """uint8 RGB (H, W, 3), EXIF orientation applied (what the crop is cut from)."""
    with Image.open(path) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _save_png(path: Path, rgb: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(rgb).save(tmp, format="PNG", compress_level=1)
    tmp.replace(path)


def _face_record(rgb: np.ndarray, boxes: np.ndarray, scores: np.ndarray, points: np.ndarray,
                 settings: FaceCropSettings) -> dict | None:
    """Crop square + landmarks of the largest confident face, or None."""
    k = pick_face(boxes, scores, min_score=settings.min_score)
    if k is None:
        return None
    h, w = rgb.shape[:2]
    if settings.border == "reflect":
        sq = square_box(boxes[k], settings.margin)
        x1, y1, side = int(round(sq[0])), int(round(sq[1])), max(1, int(round(sq[2] - sq[0])))
    else:
        x1, y1, side = shifted_square(boxes[k], settings.margin, w, h)
    lm = (points[k] - np.array([x1, y1])) * (settings.size / side)
    return {"x1": x1, "y1": y1, "x2": x1 + side, "y2": y1 + side, "det_score": float(scores[k]), "fallback": False,
            **{c: float(v) for c, v in zip(LANDMARK_COLUMNS, lm.reshape(-1))}}


def _fallback_record(w: int, h: int, ratio: float) -> dict:
    side = max(1, min(int(round(min(w, h) * ratio)), w, h))
    x1, y1 = (w - side) // 2, (h - side) // 2
    return {"x1": x1, "y1": y1, "x2": x1 + side, "y2": y1 + side, "det_score": float("nan"), "fallback": True,
            **{c: float("nan") for c in LANDMARK_COLUMNS}}


def _cut(rgb: np.ndarray, rec: dict, size: int) -> np.ndarray:
    import cv2

    h, w = rgb.shape[:2]
    x1, y1, x2, y2 = (int(rec[k]) for k in ("x1", "y1", "x2", "y2"))
    left, top, right, bottom = max(0, -x1), max(0, -y1), max(0, x2 - w), max(0, y2 - h)
    if left or top or right or bottom:  # only with border="reflect": mirror what lies outside the frame
        rgb = cv2.copyMakeBorder(rgb, top, bottom, left, right, cv2.BORDER_REFLECT_101)
        x1, y1, x2, y2 = x1 + left, y1 + top, x2 + left, y2 + top
    crop = rgb[y1:y2, x1:x2]
    interp = cv2.INTER_AREA if crop.shape[0] > size else cv2.INTER_CUBIC
    return cv2.resize(crop, (size, size), interpolation=interp)


def _write(folder: Path, key: str, rgb: np.ndarray, rec: dict, size: int) -> None:
    _save_png(folder / f"{key}.png", _cut(rgb, rec, size))
    h, w = rgb.shape[:2]
    _atomic_write_bytes(folder / f"{key}.json", json.dumps({**rec, "width": w, "height": h}).encode())


def _detect_missing(todo: list[tuple[str, str]], folder: Path, settings: FaceCropSettings, detector: Detector,
                    batch_size: int, chunk: int = 256) -> None:
    """Detect, crop and write the (path, file key) pairs in `todo`, `chunk` images in memory at a time
    (same-size images batched together); images without a face are written last (their centred square
    uses the median face-square ratio of the call)."""
    from tqdm.auto import tqdm

    sides: list[float] = []
    no_face: list[tuple[str, str]] = []
    bar = tqdm(total=len(todo), desc="MTCNN face crops", leave=False, disable=None)
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        images = {p: read_rgb(p) for p, _ in part}
        by_shape: dict[tuple[int, ...], list[tuple[str, str]]] = {}
        for p, k in part:
            by_shape.setdefault(images[p].shape, []).append((p, k))
        for group in by_shape.values():
            for i in range(0, len(group), batch_size):
                batch = group[i:i + batch_size]
                results = detector.detect_landmarks(np.stack([images[p] for p, _ in batch]))
                for (p, k), (boxes, scores, points) in zip(batch, results):
                    rec = _face_record(images[p], boxes, scores, points, settings)
                    if rec is None:
                        no_face.append((p, k))
                        continue
                    sides.append((rec["x2"] - rec["x1"]) / min(images[p].shape[:2]))
                    _write(folder, k, images[p], rec, settings.size)
        bar.update(len(part))
    bar.close()
    ratio = float(np.median(sides)) if sides else 1.0
    for p, k in no_face:
        rgb = read_rgb(p)
        rec = _detect_padded(rgb, settings, detector)
        _write(folder, k, rgb, rec or _fallback_record(rgb.shape[1], rgb.shape[0], ratio), settings.size)


def _detect_padded(rgb: np.ndarray, settings: FaceCropSettings, detector: Detector) -> dict | None:
    """Second try for a face that fills the frame (MTCNN misses those): detect on a grey-padded copy and map
    the box back. The padding is only for detection; the crop is cut from the image itself."""
    h, w = rgb.shape[:2]
    pad = int(round(0.25 * max(h, w)))
    padded = np.pad(rgb, ((pad, pad), (pad, pad), (0, 0)), constant_values=127)
    boxes, scores, points = detector.detect_landmarks(padded[None])[0]
    return _face_record(rgb, boxes - pad, scores, points - pad, settings) if len(boxes) else None


def face_crops(paths: Sequence[str], settings: FaceCropSettings = FaceCropSettings(),
               cache_root: str | Path | None = None, *, detector: Detector | None = None,
               batch_size: int = 16) -> pd.DataFrame:
    """The crop table of `paths` (see the module docstring), detecting only images not cached yet."""
    folder = Path(cache_root or default_cache_root()).expanduser() / settings.key()
    folder.mkdir(parents=True, exist_ok=True)
    paths = list(dict.fromkeys(str(p) for p in paths))
    keys = [file_key(p) for p in paths]
    set_key = hashlib.sha1("\n".join(sorted(f"{p}\t{k}" for p, k in zip(paths, keys))).encode()).hexdigest()[:16]
    index_file = folder / f"index-{set_key}.parquet"
    if index_file.is_file():
        table = pd.read_parquet(index_file).loc[paths]  # in the order asked for
        if table["crop_path"].map(os.path.isfile).all():
            _report(table)
            return table
    todo = [(p, k) for p, k in zip(paths, keys) if not (folder / f"{k}.json").is_file()
            or not (folder / f"{k}.png").is_file()]
    if todo:
        log.info("event=face_detect images=%d cached=%d cache=%s", len(todo), len(paths) - len(todo), folder)
        if detector is None:
            from preprocessing.faces import FaceDetector

            detector = FaceDetector(detect_max_side=settings.detect_max_side)
        _detect_missing(todo, folder, settings, detector, batch_size)
    rows = [{"path": p, "crop_path": str(folder / f"{k}.png"), **json.loads((folder / f"{k}.json").read_text())}
            for p, k in zip(paths, keys)]
    table = pd.DataFrame(rows).set_index("path")[COLUMNS]
    tmp = index_file.with_name(f".{index_file.name}.{os.getpid()}.tmp")
    table.to_parquet(tmp)
    tmp.replace(index_file)
    _report(table)
    return table


def _report(table: pd.DataFrame) -> None:
    bad = table.index[table["fallback"]].tolist()
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        log.warning("no face found in %d of %d image(s); centre crop used: %s%s", len(bad), len(table),
                    ", ".join(bad[:5]), more)


class FaceCropper:
    """uint8 RGB image -> its face crop (size x size), made as face_crops makes it, without the cache: for
    images that arrive as arrays (serving). A missing face gives the centred square of the short side.
    Picklable (the detector is built lazily in each process)."""

    def __init__(self, settings: FaceCropSettings, detector: Detector | None = None) -> None:
        self.settings, self._detector = settings, detector

    def __getstate__(self) -> dict:
        return {"settings": self.settings, "_detector": None}

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        if self._detector is None:
            from preprocessing.faces import FaceDetector

            self._detector = FaceDetector(detect_max_side=self.settings.detect_max_side)
        s, h, w = self.settings, rgb.shape[0], rgb.shape[1]
        as_uint8 = np.clip(rgb, 0, 255).astype(np.uint8) if rgb.dtype != np.uint8 else rgb
        boxes, scores, points = self._detector.detect_landmarks(as_uint8[None])[0]
        rec = (_face_record(rgb, boxes, scores, points, s) or _detect_padded(as_uint8, s, self._detector)
               or _fallback_record(w, h, 1.0))
        return _cut(rgb, rec, s.size)
