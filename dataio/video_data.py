"""Video data: clips of T frames per video folder, splits by video, the pairs CSV, HQ and LQ streams.

Each video is a folder of frames (what preprocessing.extract_faces writes). `data.data_dir` is
  (a) DIR/{train,val,test}/{real,fake}/**/<video>/*.jpg   (val carved out of train when missing)
  (b) DIR/{real,fake}/**/<video>/*.jpg    split by video, stratified by `data.split` (the
      dual_stream preset uses [0.85, 0.15, 0.0]); `data.group_by` (a regex on the folder name,
      first group = key, e.g. '^(\\d+)' for FF++ source ids) keeps related videos in one split
  (c) a pairs CSV (training_pairs.csv): video_path,label[,split][,group][,subset]
A Sample is one video: path = the frame folder, group = its id, subset = first sub-folder under the
class folder. Batches are (SequenceBatch(hq, lq), labels float32 (B,), indices int64 (B,)) with hq
(B, T, 3, S, S) at data.image_size and lq (B, T, 3, s, s) downscaled and JPEG-degraded, both
normalised with the model's mean/std; a training clip starts at a random frame, an eval clip is centred.
"""
from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from augmentation.policies import POLICIES, parse_policy, seed_transform
from dataio.sequence import SequenceBatch
from dataio.data import (  # the same class-folder, label and split spellings as image data
    _CLASS_RE, _LABEL_WORDS as _LABELS, _SPLIT_ALIASES, IMAGE_EXTENSIONS, SPLITS, DataError, DataIndex, Sample,
    cap_split, csv_label_split, data_digest, link_problem, skipped_hint, split_samples,
)
from dataio.loaders import load_rgb, loaders_by_split

log = logging.getLogger(__name__)

VIDEO_FILE_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
PAIRS_COLUMNS = ["video_path", "label", "split", "group", "subset"]


@dataclass(frozen=True)
class VideoSettings:
    """Clip and stream settings (Config keys data.sequence_length, data.frame_skip, data.lq_size,
    data.lq_jpeg_quality once the Config has them; these defaults until then)."""

    sequence_length: int = 10
    frame_skip: int = 3
    lq_size: int | None = None  # None -> image_size // 2
    lq_jpeg_quality: tuple[int, int] = (30, 50)

    @classmethod
    def from_config(cls, cfg: Any) -> "VideoSettings":
        d = cfg.data
        values = {k: getattr(d, k) for k in cls.__dataclass_fields__ if hasattr(d, k)}
        if "lq_jpeg_quality" in values:
            values["lq_jpeg_quality"] = tuple(values["lq_jpeg_quality"])
        return cls(**values)

    def lq(self, image_size: int) -> int:
        return self.lq_size or max(image_size // 2, 16)


# ------------------------------------------------------------------------------ scanning
def list_frames(video_dir: str | Path) -> list[str]:
    """Image files directly inside a video folder, in name order (extract_faces names them %06d.jpg)."""
    with os.scandir(video_dir) as it:
        names = [e.name for e in it if e.is_file() and not e.name.startswith(".")
                 and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS]
    return [os.path.join(video_dir, n) for n in sorted(names)]


def find_videos(class_dir: Path, data_root: Path | None = None, skipped: list[tuple[str, str]] | None = None) -> list[Path]:
    """Every folder under class_dir (hidden ones excluded) that directly holds frames.

    As for photos (dataio.data), symlinks are followed only while they stay inside `data_root` (the resolved data
    folder): a linked video folder or frame outside it, or a broken link, goes to `skipped` (the video with it), and
    a link back to a folder already seen is not walked twice."""
    data_root = data_root or class_dir.resolve()
    skipped = skipped if skipped is not None else []
    out: list[Path] = []
    loose, seen = 0, set()
    for root, dirs, files in os.walk(class_dir, followlinks=True):
        here = Path(root)
        seen.add(here.resolve())
        keep = []
        for d in sorted(d for d in dirs if not d.startswith(".")):
            sub = here / d
            reason = link_problem(sub, data_root) if sub.is_symlink() else None
            if reason:
                skipped.append((str(sub), reason))
            elif sub.resolve() not in seen:
                keep.append(d)
        dirs[:] = keep
        links = {f: link_problem(here / f, data_root) for f in files if not f.startswith(".") and (here / f).is_symlink()}
        skipped += [(str(here / f), r) for f, r in sorted(links.items()) if r == "broken symlink"]
        frames = [f for f in files if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS and not f.startswith(".")
                  and links.get(f) != "broken symlink"]
        if frames and here == class_dir:
            loose += 1
            continue
        bad = next(((f, links[f]) for f in frames if links.get(f)), None)
        if bad:
            skipped.append((str(here), f"frame {bad[0]}: {bad[1]}"))
        elif frames:
            out.append(here)
    if loose:
        log.warning("ignoring images directly under %s: video data needs one folder of frames per video", class_dir)
    return out


def _group(video_id: str, group_by: str | None) -> str:
    if group_by in (None, "folder"):
        return video_id
    try:
        m = re.search(group_by, Path(video_id).name)
    except re.error as e:
        raise DataError(f"data.group_by={group_by!r} is not a valid regex ({e})") from None
    return (m.group(1) if m.groups() else m.group(0)) if m else video_id


def _scan_class_dirs(folder: Path, group_by: str | None, data_root: Path | None = None,
                     skipped: list[tuple[str, str]] | None = None) -> list[Sample]:
    dirs = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        m = _CLASS_RE.match(d.name)
        if m:
            dirs.setdefault(_LABELS[m.group(1).lower()], d)
    samples: list[Sample] = []
    for label, name in enumerate(("real", "fake")):
        if label not in dirs:
            raise DataError(f"missing folder {folder / name}: expected DIR/{{real,fake}}/<video>/<frames>.jpg")
        before = len(skipped) if skipped is not None else 0
        videos = find_videos(dirs[label], data_root, skipped)
        if not videos:
            hint = skipped_hint(skipped[before:]) if skipped is not None else ""
            raise DataError(f"empty class: no video folders with frames under {dirs[label]}{hint}")
        for v in videos:
            rel = v.relative_to(dirs[label])
            vid = f"{name}/{rel.as_posix()}"
            samples.append(Sample(str(v), label, _group(vid, group_by), rel.parts[0] if len(rel.parts) > 1 else None))
    return samples


def read_pairs(path: Path, group_by: str | None = None) -> tuple[list[Sample], list[str | None]]:
    """Rows of a pairs CSV -> (samples, split per sample or None). Relative paths: relative to the CSV."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in r.items()} for r in reader]
        cols = [c.strip().lower() for c in reader.fieldnames or []]
    col = "video_path" if "video_path" in cols else "path"
    if col not in cols or "label" not in cols:
        raise DataError(f"{path}: needs columns video_path,label (optional split,group,subset); found {','.join(cols)}")
    seen: dict[str, tuple[int, str | None]] = {}
    samples, splits = [], []
    for n, r in enumerate(rows, start=2):
        label, split = csv_label_split(r, path, n)
        p = Path(r[col]).expanduser()
        p = p if p.is_absolute() else path.parent / p
        if p.suffix.lower() in VIDEO_FILE_EXTENSIONS:
            raise DataError(f"{path} line {n}: {p} is a video file; extract its faces first "
                            "(python -m preprocessing.extract_faces) and list the frame folders")
        key = os.path.normpath(p)
        if key in seen:  # the same video twice: fine if identical, an error if it would leak across splits
            if seen[key] != (label, split):
                raise DataError(f"{path} line {n}: video {p} is listed twice with a different label or split")
            continue
        seen[key] = (label, split)
        samples.append(Sample(str(p), label, r.get("group") or _group(Path(r[col]).as_posix(), group_by),
                              r.get("subset") or None))
        splits.append(split)
    if not samples:
        raise DataError(f"{path}: no rows; expected columns video_path,label[,split][,group][,subset]")
    if any(splits) and None in splits:
        raise DataError(f"{path}: the split column is empty on some rows; fill it for every row or drop it")
    return samples, splits


def scan_videos(data_cfg: Any, seed: int) -> DataIndex:
    """Find the videos (folders of frames) of data_cfg.data_dir and split them by video."""
    if data_cfg.data_dir is None:
        raise DataError("video data needs data.data_dir: a folder of {real,fake}/<video>/ frames or a pairs CSV")
    root = Path(data_cfg.data_dir).expanduser()
    if not root.exists():
        raise DataError(f"data.data_dir not found: {root}")
    skipped: list[tuple[str, str]] = []
    fixed: dict[str, list[Sample]] | None = None
    if root.is_file():
        samples, splits = read_pairs(root, data_cfg.group_by)
        rel_root = root.parent
        if any(splits):
            fixed = {k: [s for s, sp in zip(samples, splits) if sp == k] for k in SPLITS}
    else:
        rel_root = root
        real_root = root.resolve()
        subdirs = {_SPLIT_ALIASES.get(p.name.lower()): p for p in sorted(root.iterdir()) if p.is_dir()}
        if "train" in subdirs:
            fixed = {k: _scan_class_dirs(subdirs[k], data_cfg.group_by, real_root, skipped) if k in subdirs else []
                     for k in SPLITS}
            samples = [s for k in SPLITS for s in fixed[k]]
        else:
            samples = _scan_class_dirs(root, data_cfg.group_by, real_root, skipped)
    good = set()
    for s in samples:
        reason = None if os.path.isdir(s.path) else "video folder not found"
        if reason is None and not list_frames(s.path):
            reason = "no frames"
        if reason:
            skipped.append((s.path, reason))
        else:
            good.add(s.path)
    samples = [s for s in samples if s.path in good]
    if skipped:
        log.warning("skipped %d video(s) in %s: %s", len(skipped), root, "; ".join(f"{p} ({r})" for p, r in skipped[:5]))
    for label, name in enumerate(("real", "fake")):
        if not any(s.label == label for s in samples):
            raise DataError(f"empty class: no {name} videos with frames in {root}")
    if fixed is None:
        parts = split_samples(samples, data_cfg.split, seed)
    else:
        parts = {k: [s for s in v if s.path in good] for k, v in fixed.items()}
        if not parts["val"]:
            tr, va, _ = data_cfg.split
            carve = split_samples(parts["train"], (tr / (tr + va), va / (tr + va), 0.0), seed)
            parts = {"train": carve["train"], "val": carve["val"], "test": parts["test"]}
    if data_cfg.max_samples_per_split:
        parts = {k: cap_split(v, data_cfg.max_samples_per_split, seed) for k, v in parts.items()}
    check_disjoint(parts, groups=fixed is None)  # given splits may reuse names; folders never
    for name in SPLITS:
        if (name != "test" or parts[name]) and len({s.label for s in parts[name]}) < 2:
            raise DataError(f"the {name} split of {root} needs real and fake videos ({len(parts[name])} videos); "
                            "add videos or change data.split")
    index = DataIndex(parts["train"], parts["val"], parts["test"], skipped, str(data_cfg.data_dir),
                      data_digest(parts, rel_root))
    log.info("videos=%s digest=%s skipped=%d %s", root, index.digest, len(skipped),
             " ".join(f"{k}_{c}={n}" for k, v in index.class_counts().items() for c, n in v.items()))
    return index


def check_disjoint(parts: dict[str, list[Sample]], groups: bool = True) -> None:
    """DataError if a video folder (or, with `groups`, a group) appears in two splits."""
    owner: dict[str, str] = {}
    for split, samples in parts.items():
        for s in samples:
            keys = {os.path.normpath(s.path)} | ({f"group:{s.group}"} if groups and s.group is not None else set())
            for key in keys:
                if owner.setdefault(key, split) != split:
                    raise DataError(f"{key.removeprefix('group:')} is in both the {owner[key]} and {split} splits")


def write_pairs(index: DataIndex, path: str | Path) -> Path:
    """training_pairs.csv (video_path relative to the CSV when possible, label, split, group, subset)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PAIRS_COLUMNS)
        for split in SPLITS:
            for s in index.split(split):
                rel = os.path.relpath(s.path, path.parent)
                w.writerow([Path(rel).as_posix() if not rel.startswith("..") else s.path,
                            ("real", "fake")[s.label], split, s.group or "", s.subset or ""])
    return path


def frame_samples(videos: Sequence[Sample], max_frames_per_video: int | None = None) -> list[Sample]:
    """One Sample per frame (group = the video's group, or its path), at most N evenly spaced per video."""
    out = []
    for v in videos:
        files = list_frames(v.path)
        if max_frames_per_video and len(files) > max_frames_per_video:
            files = [files[int(i)] for i in np.linspace(0, len(files) - 1, max_frames_per_video).round()]
        out += [Sample(f, v.label, v.group or v.path, v.subset) for f in files]
    return out


def expand_to_frames(index: DataIndex, max_frames_per_video: int | None = None) -> DataIndex:
    """The same split, one Sample per frame: for a single-frame model whose predictions are then
    aggregated per video (evaluation.video_scoring); pass it to train(cfg, index=...)."""
    return DataIndex(*(frame_samples(index.split(k), max_frames_per_video) for k in SPLITS),
                     skipped=list(index.skipped), source=index.source, digest=index.digest + "-frames")


# ------------------------------------------------------------------------------ clips
def clip_indices(n_frames: int, length: int, skip: int, start: int | None = None) -> list[int]:
    """`length` frame positions every `skip` frames from `start` (None: centred). A video too short for
    the stride uses a smaller one; one too short for `length` frames repeats its last frame."""
    if n_frames <= 0:
        raise ValueError("a clip needs at least one frame")
    if length > 1:
        skip = max(1, min(skip, (n_frames - 1) // (length - 1)))
    max_start = max(0, n_frames - ((length - 1) * skip + 1))
    start = max_start // 2 if start is None else min(max(start, 0), max_start)
    return [min(start + k * skip, n_frames - 1) for k in range(length)]


def degrade_lq(frames: np.ndarray, size: int, quality: int) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB -> (T, size, size, 3): area-downscaled and JPEG-compressed at `quality`."""
    out = np.empty((len(frames), size, size, 3), np.uint8)
    for t, f in enumerate(frames):
        small = cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        out[t] = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if ok else small  # channel order is irrelevant to JPEG
    return out


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[:2] == (size, size):
        return img
    interp = cv2.INTER_AREA if max(img.shape[:2]) > size else cv2.INTER_CUBIC
    return cv2.resize(img, (size, size), interpolation=interp)


class VideoClipDataset(Dataset):
    """(hq (T, 3, S, S), lq (T, 3, s, s), label, index) per video; None when no frame can be read.

    The same augmentation (data.aug_policy) is applied to every frame of a clip; the LQ stream is made
    from the augmented frames (JPEG quality drawn from lq_jpeg_quality in training, its middle in eval)."""

    def __init__(self, samples: Sequence[Sample], settings: VideoSettings, image_size: int, mean: Sequence[float],
                 std: Sequence[float], *, train: bool = False, aug_policy: str = "none", seed: int = 0) -> None:
        self.samples, self.settings, self.train = list(samples), settings, train
        self.size, self.lq_size = image_size, settings.lq(image_size)
        self.mean = np.asarray(mean, np.float32).reshape(1, 1, 1, 3) * 255
        self.std = np.asarray(std, np.float32).reshape(1, 1, 1, 3) * 255
        middle: list = []
        if train and aug_policy != "none":
            base, args = parse_policy(aug_policy)
            middle = POLICIES.get(base)(image_size, *args)
        self.transform = A.Compose(middle) if middle else None
        if self.transform is not None:
            seed_transform(self.transform, seed)
        self._frames: dict[int, list[str]] = {}
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def frames(self, i: int) -> list[str]:
        if i not in self._frames:
            self._frames[i] = list_frames(self.samples[i].path)
        return self._frames[i]

    def _tensor(self, clip: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((clip.astype(np.float32) - self.mean) / self.std).transpose(0, 3, 1, 2).copy())

    def _read(self, path: str) -> np.ndarray | None:
        try:
            return _resize(load_rgb(path, self.size), self.size)
        except Exception as e:  # an unreadable frame: the clip uses its neighbour instead
            if path not in self._warned:
                self._warned.add(path)
                log.warning("unreadable frame skipped: %s (%s)", path, type(e).__name__)
            return None

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, float, int] | None:
        s, st = self.samples[i], self.settings
        files = self.frames(i)
        if not files:
            return None
        start = None
        if self.train:
            span = (st.sequence_length - 1) * st.frame_skip + 1
            start = int(np.random.randint(0, max(1, len(files) - span + 1)))
        picks = clip_indices(len(files), st.sequence_length, st.frame_skip, start)
        decoded = {k: self._read(files[k]) for k in sorted(set(picks))}
        good = [decoded[k] for k in picks if decoded[k] is not None]
        if not good:
            return None
        clip, last = [], good[0]
        for k in picks:
            last = decoded[k] if decoded[k] is not None else last
            clip.append(last)
        hq = np.stack(clip)
        if self.transform is not None:
            hq = self.transform(images=hq)["images"]
        lo, hi = st.lq_jpeg_quality
        quality = np.random.randint(lo, hi + 1) if self.train else (lo + hi) // 2
        lq = degrade_lq(hq, self.lq_size, quality)
        return self._tensor(hq), self._tensor(lq), float(s.label), i


def collate_clips(batch: list, length: int, size: int, lq_size: int) -> tuple[SequenceBatch, torch.Tensor, torch.Tensor]:
    """(SequenceBatch, labels float32, indices int64), dropping unreadable videos; an all-bad batch is
    empty (len 0) and the trainer skips it."""
    good = [b for b in batch if b is not None]
    if len(good) < len(batch):
        log.warning("dropped %d unreadable video(s) from a batch of %d", len(batch) - len(good), len(batch))
    if not good:
        return (SequenceBatch(torch.empty(0, length, 3, size, size), torch.empty(0, length, 3, lq_size, lq_size)),
                torch.empty(0), torch.empty(0, dtype=torch.int64))
    hq, lq, labels, idx = zip(*good)
    return (SequenceBatch(torch.stack(hq), torch.stack(lq)), torch.tensor(labels, dtype=torch.float32),
            torch.tensor(idx, dtype=torch.int64))


def build_video_loaders(index: DataIndex, cfg: Any, mean: Sequence[float], std: Sequence[float], *,
                        device_type: str = "cpu", settings: VideoSettings | None = None) -> dict[str, DataLoader]:
    """Loaders "train", "val", "test" (if non-empty) over clips; the same contract as dataio.loaders.build_loaders."""
    d = cfg.data
    settings = settings or VideoSettings.from_config(cfg)
    collate = partial(collate_clips, length=settings.sequence_length, size=d.image_size,
                      lq_size=settings.lq(d.image_size))

    def dataset(samples: list[Sample], train: bool, seed: int) -> VideoClipDataset:
        return VideoClipDataset(samples, settings, d.image_size, mean, std, train=train,
                                aug_policy=d.aug_policy if train else "none", seed=seed)

    return loaders_by_split(index, cfg, dataset, collate, device_type)
