"""Find the images and split them (dataio.loaders decodes, augments and batches them).

Layouts (`data.data_dir`):
  (a) DIR/{train,val,test}/{real,fake}/**   (val may be missing: carved out of train; test optional)
  (b) DIR/{real,fake}/**                    split stratified by `data.split` with the seed; with
      `data.group_by` ("folder" or a file-name regex) a group never straddles splits
  (c) FILE.csv with columns path,label[,group][,split][,subset] (relative paths: relative to the CSV)
Class folders match real|fake case-insensitively, also with a numeric prefix (0_real, 1_fake).
The first sub-folder under real/ or fake/ is the sample's subset (e.g. the FF++ manipulation).
Label 1 = fake. `data_dir: null` uses the generated demo set.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from core.config import DataConfig
from core.errors import DataError
from core.naming import CLASS_RE, IMAGE_EXTENSIONS, LABEL_WORDS, LABELS, SPLIT_ALIASES, SPLITS

log = logging.getLogger(__name__)

_CLASS_RE, _SPLIT_ALIASES, _LABEL_WORDS = CLASS_RE, SPLIT_ALIASES, LABEL_WORDS
EXPECTED_LAYOUT = ("expected DIR/{train,val,test}/{real,fake}/, DIR/{real,fake}/, "
                   "or a CSV with columns path,label[,group][,split][,subset]")


@dataclass(frozen=True)
class Sample:
    path: str
    label: int  # 1 = fake
    group: str | None = None
    subset: str | None = None


@dataclass
class DataIndex:
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    source: str = ""
    digest: str = ""

    def split(self, name: str) -> list[Sample]:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def class_counts(self) -> dict[str, dict[str, int]]:
        """{"train": {"real": n, "fake": m}, "val": ..., "test": ...}."""
        return {s: {name: sum(x.label == lab for x in self.split(s)) for lab, name in enumerate(LABELS)}
                for s in SPLITS}


def pos_weight(index: DataIndex) -> float:
    """n_real / n_fake on train: BCE's pos_weight for a class-balanced loss."""
    counts = index.class_counts()["train"]
    return counts["real"] / max(counts["fake"], 1)


# ------------------------------------------------------------------------------------- scanning
MIN_IMAGE_SIDE = 16  # smaller images carry no face detail (a 1x1 pixel would be trained on as a face)


def check_image(path: str) -> str | None:
    """A cheap readability check: None if fine, else the reason (zero bytes, not an image, too small, ...)."""
    try:
        if os.path.getsize(path) == 0:
            return "zero bytes"
        with Image.open(path) as img:
            fmt, (w, h) = img.format, img.size
            img.verify()
        if min(w, h) < MIN_IMAGE_SIDE:
            return f"image {w}x{h} px is smaller than {MIN_IMAGE_SIDE} px"
        if fmt == "JPEG":  # verify() does not read JPEG data: decode only when the end marker is missing
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - 1024))
                if b"\xff\xd9" not in f.read():
                    with Image.open(path) as img:
                        img.load()
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else 'unreadable'}"
    return None


def _filter_readable(samples: list[Sample], skipped: list[tuple[str, str]]) -> list[Sample]:
    with ThreadPoolExecutor(max_workers=8) as pool:
        reasons = list(pool.map(check_image, [s.path for s in samples]))
    skipped += [(s.path, r) for s, r in zip(samples, reasons) if r is not None]
    return [s for s, r in zip(samples, reasons) if r is None]


def _class_dirs(folder: Path) -> dict[int, Path]:
    out: dict[int, Path] = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        m = _CLASS_RE.match(d.name)
        if m:
            out.setdefault(_LABEL_WORDS[m.group(1).lower()], d)
    return out


def _group_key(rel: Path, group_by: str | None, pattern: re.Pattern[str] | None) -> str | None:
    if group_by is None:
        return None
    if group_by == "folder":
        return rel.parent.as_posix() if rel.parent != Path(".") else None
    m = pattern.search(rel.name) if pattern else None
    return (m.group(1) if m and m.groups() else m.group(0)) if m else None


def link_problem(link: Path, root: Path) -> str | None:
    """Why a symlink under the data folder is not followed (broken, or it leaves `root`, the resolved data
    folder), else None. Photo and video scans share this rule."""
    target = link.resolve()
    if not target.exists():
        return "broken symlink"
    if not target.is_relative_to(root):
        return f"symlink leaves the data root {root}"
    return None


def skipped_hint(skipped: list[tuple[str, str]]) -> str:
    """'; N entries skipped, e.g. PATH: REASON' for an empty-class error, so a folder of links out of the data
    root (a split made of symlinks) or of unsupported files says why it is empty; '' when nothing was skipped."""
    if not skipped:
        return ""
    path, reason = skipped[0]
    return f"; {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} skipped, e.g. {path}: {reason}"


def _image_files(d: Path, root: Path, skipped: list[tuple[str, str]]) -> list[Path]:
    """Image files under class folder `d`; every other entry that is not a plain folder goes to `skipped`.

    Symlinks are followed only when they stay inside `root` (the resolved data root): a link out of the data
    folder could make a run read (and log) files elsewhere on the machine. Hidden entries are ignored.
    """
    files: list[Path] = []
    for p in sorted(d.rglob("*")):
        if any(part.startswith(".") for part in p.relative_to(d).parts):
            continue
        if p.is_symlink() and (problem := link_problem(p, root)):
            skipped.append((str(p), problem))
            continue
        is_image = p.suffix.lower() in IMAGE_EXTENSIONS
        if p.is_dir():
            if is_image:
                skipped.append((str(p), "a directory, not an image file"))
        elif not p.is_file():
            skipped.append((str(p), "not a regular file"))
        elif not is_image:
            skipped.append((str(p), f"unsupported type {p.suffix.lower() or '(no extension)'} "
                                    f"(images: {', '.join(sorted(IMAGE_EXTENSIONS))})"))
        else:
            files.append(p)
    return files


def _scan_class_dirs(folder: Path, data_cfg: DataConfig, root: Path,
                     skipped: list[tuple[str, str]]) -> list[Sample]:
    dirs = _class_dirs(folder)
    for label, name in enumerate(LABELS):
        if label not in dirs:
            raise DataError(f"missing folder {folder / name}: {EXPECTED_LAYOUT}")
    pattern = _compile_group(data_cfg.group_by)
    samples: list[Sample] = []
    for label, d in sorted(dirs.items()):
        before = len(skipped)
        files = _image_files(d, root, skipped)
        if not files:
            raise DataError(f"empty class: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {d}"
                            f"{skipped_hint(skipped[before:])}")
        for p in files:
            rel = p.relative_to(d)
            subset = rel.parts[0] if len(rel.parts) > 1 else None
            samples.append(Sample(str(p), label, _group_key(rel, data_cfg.group_by, pattern), subset))
    return samples


def _compile_group(group_by: str | None) -> re.Pattern[str] | None:
    if group_by in (None, "folder"):
        return None
    try:
        return re.compile(group_by)
    except re.error as e:
        raise DataError(f"data.group_by={group_by!r} is not a valid regex ({e}); use 'folder' or a pattern "
                        r"whose first group is the key, e.g. '^(.+)_\d+\.jpg$'") from None


def csv_label_split(row: dict[str, str], path: Path, line: int) -> tuple[int, str | None]:
    """(label, canonical split or None) of one CSV index row; a bad value is a DataError naming the line."""
    label = _LABEL_WORDS.get(row["label"].lower())
    if label is None:
        raise DataError(f"{path} line {line}: label {row['label']!r} must be real/fake or 0/1")
    split = row.get("split") or None
    if split is not None and split.lower() not in _SPLIT_ALIASES:
        raise DataError(f"{path} line {line}: split {split!r} must be train, val or test")
    return label, _SPLIT_ALIASES[split.lower()] if split else None


def _scan_csv(path: Path) -> tuple[list[Sample], list[str | None]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        cols = [c.strip().lower() for c in reader.fieldnames or []]
        if "path" not in cols or "label" not in cols:
            raise DataError(f"{path}: needs columns path,label (optional group,split,subset); found {','.join(cols) or 'none'}")
        rows = [{k.strip().lower(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    samples, splits = [], []
    for n, r in enumerate(rows, start=2):
        label, split = csv_label_split(r, path, n)
        p = Path(r["path"]).expanduser()
        samples.append(Sample(str(p if p.is_absolute() else path.parent / p), label,
                              r.get("group") or None, r.get("subset") or None))
        splits.append(split)
    if not samples:
        raise DataError(f"{path}: no rows; expected columns path,label[,group][,split][,subset]")
    if "split" in cols and None in splits and any(splits):
        raise DataError(f"{path}: the split column is empty on some rows; fill it for every row or drop it")
    return samples, splits


def scan(data_cfg: DataConfig, seed: int) -> DataIndex:
    """Find, check and split the images of `data_cfg.data_dir` (None: the demo set)."""
    if data_cfg.data_dir is None:
        from dataio.demo_data import ensure_demo_data

        root = ensure_demo_data()
    else:
        root = Path(data_cfg.data_dir).expanduser()
    source = str(data_cfg.data_dir) if data_cfg.data_dir is not None else str(root)
    if not root.exists():
        raise DataError(f"data.data_dir not found: {root} ({EXPECTED_LAYOUT})")
    skipped: list[tuple[str, str]] = []
    fixed: dict[str, list[Sample]] | None = None
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise DataError(f"data.data_dir {root} is a file but not a .csv; {EXPECTED_LAYOUT}")
        rel_root = root.parent
        samples, splits = _scan_csv(root)
        missing = [s for s in samples if not os.path.isfile(s.path)]
        skipped += [(s.path, "a directory, not an image file" if os.path.isdir(s.path) else "file not found")
                    for s in missing]
        keep = {id(s) for s in _filter_readable([s for s in samples if os.path.isfile(s.path)], skipped)}
        if any(splits):
            fixed = {k: [s for s, sp in zip(samples, splits) if sp == k and id(s) in keep] for k in SPLITS}
        samples = [s for s in samples if id(s) in keep]
    else:
        rel_root, real_root = root, root.resolve()
        subdirs = {_SPLIT_ALIASES.get(p.name.lower()): p for p in sorted(root.iterdir()) if p.is_dir()}
        if "train" in subdirs:
            fixed = {k: _filter_readable(_scan_class_dirs(subdirs[k], data_cfg, real_root, skipped), skipped)
                     if k in subdirs else [] for k in SPLITS}
            samples = [s for k in SPLITS for s in fixed[k]]
        elif _class_dirs(root):
            samples = _filter_readable(_scan_class_dirs(root, data_cfg, real_root, skipped), skipped)
        else:
            raise DataError(f"unknown layout in {root}: {EXPECTED_LAYOUT}")
    _warn_skipped(skipped, source)
    if not samples:
        raise DataError(f"no readable images in {source}; {EXPECTED_LAYOUT}")
    for label, name in enumerate(LABELS):
        if not any(s.label == label for s in samples):
            raise DataError(f"empty class: no readable {name} images in {source}")
    if fixed is None:
        parts = split_samples(samples, data_cfg.split, seed)
    elif not fixed["val"]:  # only train (and maybe test) given: carve val out of train
        tr, va, _ = data_cfg.split
        carve = split_samples(fixed["train"], (tr / (tr + va), va / (tr + va), 0.0), seed)
        parts = {"train": carve["train"], "val": carve["val"], "test": fixed["test"]}
    else:
        parts = fixed
    if data_cfg.max_samples_per_split:
        parts = {k: cap_split(v, data_cfg.max_samples_per_split, seed) for k, v in parts.items()}
    for name in SPLITS:
        _check_split(name, parts[name], source, required=name != "test")
    index = DataIndex(parts["train"], parts["val"], parts["test"], skipped, source,
                      data_digest(parts, rel_root))
    log.info("data=%s digest=%s skipped=%d %s", source, index.digest, len(skipped),
             " ".join(f"{k}_{c}={n}" for k, v in index.class_counts().items() for c, n in v.items()))
    return index


def _warn_skipped(skipped: list[tuple[str, str]], source: str) -> None:
    if skipped:
        first = "; ".join(f"{p} ({r})" for p, r in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        log.warning("skipped %d file(s) in %s (all in the run's skipped_files.csv): %s%s", len(skipped), source,
                    first, more)


def _check_split(name: str, samples: list[Sample], source: str, required: bool) -> None:
    if not samples:
        if required:
            raise DataError(f"the {name} split of {source} is empty; add images or change data.split")
        return
    n_fake = sum(s.label for s in samples)
    if n_fake in (0, len(samples)):
        only = "fake" if n_fake else "real"
        raise DataError(f"the {name} split of {source} has only {only} images ({len(samples)}); "
                        f"both classes are needed: add images or change data.split/data.group_by")


def data_digest(parts: dict[str, list[Sample]], root: Path) -> str:
    """Short sha1 over sorted (relative path, label, split) lines."""
    lines = sorted(f"{os.path.relpath(s.path, root)}\t{s.label}\t{k}" for k, v in parts.items() for s in v)
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------- splitting
def _quota(n: int, fractions: Sequence[float]) -> list[int]:
    """Integer shares of n by fractions (largest remainder), summing to n."""
    raw = [n * f for f in fractions]
    out = [int(x) for x in raw]
    for i in sorted(range(len(raw)), key=lambda j: out[j] - raw[j])[: n - sum(out)]:
        out[i] += 1
    return out


def split_samples(samples: Sequence[Sample], fractions: Sequence[float], seed: int) -> dict[str, list[Sample]]:
    """Seeded split stratified by label; samples sharing a group stay in one split.

    Groups (ungrouped samples are groups of one) are visited in random order and each goes to the
    split whose per-class counts it brings closest to the targets (chi-square-like cost), so an
    ungrouped split hits the per-class targets exactly.
    """
    units: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        units.setdefault(s.group if s.group is not None else f"\0{i:09d}", []).append(i)
    keys = sorted(units)
    labels = np.array([s.label for s in samples])
    target = np.array([_quota(int((labels == c).sum()), fractions) for c in (0, 1)], float).T  # (split, class)
    weight = 1.0 / np.maximum(target, 1.0)
    cur = np.zeros_like(target)
    allowed = np.array(fractions) > 0
    assign = np.zeros(len(samples), int)
    for j in np.random.default_rng(seed).permutation(len(keys)):
        members = units[keys[j]]
        g = np.bincount(labels[members], minlength=2)
        cost = (((cur + g - target) ** 2 - (cur - target) ** 2) * weight).sum(1)
        k = int(np.argmin(np.where(allowed, cost, np.inf)))
        cur[k] += g
        assign[members] = k
    return {name: [s for s, a in zip(samples, assign) if a == k] for k, name in enumerate(SPLITS)}


def cap_split(samples: list[Sample], cap: int, seed: int) -> list[Sample]:
    """At most `cap` samples, drawn per class in proportion (each present class keeps >= 1), seeded."""
    if len(samples) <= cap:
        return samples
    labels = np.array([s.label for s in samples])
    counts = [int((labels == c).sum()) for c in (0, 1)]
    quota = _quota(cap, [n / len(samples) for n in counts])
    for c in (0, 1):  # a rare class must not vanish from the split
        if counts[c] and not quota[c]:
            quota[c], quota[1 - c] = 1, quota[1 - c] - 1
    rng = np.random.default_rng(seed)
    keep = np.concatenate([rng.choice(np.flatnonzero(labels == c), quota[c], replace=False) for c in (0, 1)])
    return [samples[i] for i in sorted(keep.tolist())]
