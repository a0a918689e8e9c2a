"""Decode, augment and batch the samples that dataio.data.scan found: datasets and DataLoaders.

Every loader is seeded (order, balanced sampler, workers, augmentation) so a run restarted from a
checkpoint sees the same batches; the trainer reseeds the train loader's streams at each epoch.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import signal
import threading
from dataclasses import replace
from functools import partial
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from augmentation.policies import build_transform, seed_transform
from augmentation.pseudo_fakes import LandmarkTable, PseudoFakes
from core.config import Config, DataConfig
from dataio.data import SPLITS, DataIndex, Sample

log = logging.getLogger(__name__)

def load_rgb(path: str, size_hint: int | None = None) -> np.ndarray:
    """Decode any PIL-readable image to uint8 RGB (H, W, 3); JPEGs are DCT-downscaled toward size_hint."""
    with Image.open(path) as img:
        if size_hint and img.format == "JPEG":
            img.draft(img.mode, (size_hint, size_hint))
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float32)
            scale = 257.0 if arr.max(initial=0) > 255 else 1.0
            img = Image.fromarray(np.clip(arr / scale + 0.5, 0, 255).astype(np.uint8), "L")
        elif img.mode == "F":
            img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
        elif img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        return np.asarray(img.convert("RGB"))


def decode_size(image_size: int, center_crop: float | None) -> int:
    """The JPEG draft size to decode at so that a central crop still covers image_size pixels."""
    return int(round(image_size / (center_crop or 1.0)))


class ImageDataset(Dataset):
    """(image tensor, label float, index) per sample; None when the file cannot be decoded.

    With `pseudo_fakes` (training), a real image may become a pseudo-fake (label 1) before the transform;
    its randomness is seeded by (epoch seed, sample index), so a resumed epoch makes the same fakes."""

    def __init__(self, samples: Sequence[Sample], transform, image_size: int,
                 pseudo_fakes: PseudoFakes | None = None, seed: int = 0) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.image_size = image_size
        self.pseudo_fakes = pseudo_fakes if pseudo_fakes is not None and pseudo_fakes.active else None
        self.seed = seed
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, float, int] | None:
        s = self.samples[i]
        label = s.label
        try:
            rgb = load_rgb(s.path, self.image_size)
            if self.pseudo_fakes is not None:
                rng = np.random.default_rng([self.seed % 2**32, i])
                rgb, label = self.pseudo_fakes(rgb, label, s.path, rng)
            image = self.transform(image=rgb)["image"]
        except Exception as e:  # a file that passed the scan but fails to decode: drop, never crash
            if s.path not in self._warned:
                self._warned.add(s.path)
                log.warning("unreadable image dropped: %s (%s: %s)", s.path, type(e).__name__, e)
            return None
        return image, float(label), i


def collate_drop_none(batch: list, image_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack (images, labels float32, indices int64), dropping None items. A batch where every item
    failed is returned empty: images (0, 3, S, S); the trainer skips it."""
    good = [b for b in batch if b is not None]
    if len(good) < len(batch):
        log.warning("dropped %d unreadable image(s) from a batch of %d", len(batch) - len(good), len(batch))
    if not good:
        return (torch.empty(0, 3, image_size, image_size), torch.empty(0), torch.empty(0, dtype=torch.int64))
    images, labels, idx = zip(*good)
    return torch.stack(images), torch.tensor(labels, dtype=torch.float32), torch.tensor(idx, dtype=torch.int64)


def _worker_sigterm(signum: int, frame) -> None:  # noqa: ARG001
    if getattr(_worker_sigterm, "seen", False):
        os._exit(128 + signum)
    _worker_sigterm.seen = True  # type: ignore[attr-defined]


def seed_worker(worker_id: int) -> None:
    """Seed numpy, random and the worker's albumentations pipeline from torch's per-worker seed.

    A worker ignores its first SIGTERM: a stop sent to the whole process group (a scheduler, `kill -- -PGID`)
    is handled by the main process, which stops the run cleanly (KILLED, resumable) and shuts its workers
    down; a worker dying of it first would fail the run with a worker traceback. A second SIGTERM (e.g.
    multiprocessing's terminate()) ends the worker. torch's worker loop already leaves SIGINT to the main process.
    """
    signal.signal(signal.SIGTERM, _worker_sigterm)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # forked with it blocked: see loader_iter
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    info = torch.utils.data.get_worker_info()
    if info is not None and getattr(info.dataset, "transform", None) is not None:  # image or clip datasets
        seed_transform(info.dataset.transform, seed)


def loader_iter(loader) -> Iterator:
    """iter(loader), with SIGTERM held while a loader whose workers unblock it (seed_worker) forks them: every
    dataio loader, train or eval, at each fork (train: each epoch; persistent eval workers: their first pass).

    A stop sent to the process group in that window would kill a worker before seed_worker installs its handler
    (the run then fails with a worker traceback instead of stopping KILLED), or reach the main process before
    the worker exists, so the worker later takes multiprocessing's terminate() for the group's SIGTERM and
    ignores it. Workers inherit the blocked mask and unblock it once their handler is in place; a SIGTERM held
    meanwhile arrives then. Other iterables and loaders are iterated as they are: a worker forked with SIGTERM
    blocked and no seed_worker to unblock it would ignore terminate()."""
    if not (getattr(loader, "num_workers", 0) and getattr(loader, "worker_init_fn", None) is seed_worker):
        return iter(loader)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def trim_heap() -> bool:
    """Return the heap's freed memory to the OS (glibc's malloc_trim); False where there is no glibc.

    Called before a train loader forks its workers (each epoch): memory the training process freed but still held
    (the AMP probe's activations, the last validation pass) would otherwise be shared copy-on-write with the new
    workers, and the process's next writes there fault page by page. After a run's AMP probe the first epoch
    trained at 38-40 img/s instead of 44-50 (mobilenetv2, 160 px, 2 cores, one worker; bench/whole_run.py's
    set-up); with this, 45-47."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


# glibc mallopt() parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
_heap_lock = threading.Lock()
_heap_depth = 0  # retained_heap() blocks open in this process (nested: a val pass inside fit; threads: serving)


@contextlib.contextmanager
def retained_heap() -> Iterator[bool]:
    """Keep freed memory in the process while it trains or scores (glibc: big blocks from the heap, not mmap; no
    trimming under 2 GiB free); yields whether it could (False without glibc). When the outermost block (over
    nesting and threads) is left, glibc's mmap and trimming are back (at 32 MiB and 64 MiB, where its own
    adjustment settles with big tensors) and the memory is given back.

    glibc serves a block over 32 MiB (a batch's activations: mobilenetv2 at 160 px, batch 32 has several) with
    a fresh mmap and unmaps it when freed, so every step page-faults its activations in again and the kernel
    zeroes them: 2.4-3.3M page faults in 30 steps. With the heap kept, 0.43M and a third less CPU time; steps
    of 627-782 ms instead of 840-968 (a bare loop, either way; 2-core AMD EPYC, lfw_faceswap). Forward passes
    alone gain as much: 12 eval batches in 2.06 s instead of 2.5-3.8 s. Train loader workers forked meanwhile
    inherit it; trim_heap() still gives free memory back before they fork."""
    global _heap_depth
    libc = _glibc()
    if libc is None:
        yield False
        return
    with _heap_lock:
        if _heap_depth == 0:
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
        _heap_depth += 1
    try:
        yield True
    finally:
        with _heap_lock:
            _heap_depth -= 1
            if _heap_depth == 0:
                libc.mallopt(M_MMAP_MAX, 65536)
                libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
                libc.mallopt(M_TRIM_THRESHOLD, 64 * 2**20)
                libc.malloc_trim(0)


@functools.cache
def _glibc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim this way
        return None


def reseed_epoch(loader: DataLoader, epoch_seed: int) -> None:
    """Restart a loader's random streams (order, sampler, workers, augmentation) from epoch_seed: an epoch
    sees the same batches whether or not the run was stopped and resumed before it (image and clip data)."""
    for gen in {getattr(loader, "generator", None), getattr(loader.sampler, "generator", None)} - {None}:
        gen.manual_seed(epoch_seed)
    if getattr(loader.dataset, "transform", None) is not None:
        seed_transform(loader.dataset.transform, epoch_seed)
    if hasattr(loader.dataset, "pseudo_fakes"):  # per-sample pseudo-fake streams follow the epoch too
        loader.dataset.seed = epoch_seed


def balanced_sampler(samples: Sequence[Sample], generator: torch.Generator) -> WeightedRandomSampler:
    """Draw classes equally often (with replacement), len(samples) draws per epoch."""
    labels = torch.tensor([s.label for s in samples])
    counts = torch.bincount(labels, minlength=2).clamp(min=1).double()
    return WeightedRandomSampler((1.0 / counts)[labels], num_samples=len(samples), replacement=True,
                                 generator=generator)


# An evaluation split of at most this many batches is decoded in the training process: starting a worker (a fork
# of a process holding torch, the model and the optimizer; its first batch not overlapped) and then sharing the
# cores with the forward pass cost more than decoding a few batches here (bench/whole_run.py: a 3-batch val or
# test pass at 160 px took 1.5 s with one worker, 0.5 s without, on 2 cores). Train loaders keep their workers.
EVAL_IN_PROCESS_BATCHES = 4


def make_loader(dataset: Dataset, samples: Sequence[Sample], cfg: Config, *, train: bool, seed: int,
                collate_fn: Callable, device_type: str = "cpu") -> DataLoader:
    """The DataLoader every split of image or clip data gets: seeded order, balanced sampler, seeded workers."""
    d = cfg.data
    gen = torch.Generator().manual_seed(seed)
    sampler = balanced_sampler(samples, gen) if train and d.balance == "sampler" else None
    workers = d.num_workers if train or len(samples) > EVAL_IN_PROCESS_BATCHES * d.batch_size else 0
    return DataLoader(
        dataset, batch_size=d.batch_size, shuffle=train and sampler is None, sampler=sampler,
        num_workers=workers, collate_fn=collate_fn, pin_memory=device_type == "cuda",
        drop_last=train and len(samples) > d.batch_size, generator=gen, worker_init_fn=seed_worker,
        # the train loader's workers restart each epoch so they pick up the epoch's seed (exact resume)
        persistent_workers=workers > 0 and not train,
    )


def loaders_by_split(index: DataIndex, cfg: Config, dataset_fn: Callable[[list[Sample], bool, int], Dataset],
                     collate_fn: Callable, device_type: str = "cpu") -> dict[str, DataLoader]:
    """One seeded loader per non-empty split; dataset_fn(samples, train, seed) builds that split's dataset."""
    loaders: dict[str, DataLoader] = {}
    for k, name in enumerate(SPLITS):
        samples, train, seed = index.split(name), name == "train", cfg.train.seed + k
        if samples:
            loaders[name] = make_loader(dataset_fn(samples, train, seed), samples, cfg, train=train, seed=seed,
                                        collate_fn=collate_fn, device_type=device_type)
    return loaders


def face_crop_table(samples: Sequence[Sample], data_cfg: DataConfig):
    """The cached MTCNN crop table (preprocessing.face_cache) of these samples, or None with face_crop=none."""
    if data_cfg.face_crop == "none":
        return None
    from preprocessing.face_cache import FaceCropSettings, face_crops

    settings = FaceCropSettings(margin=data_cfg.face_margin, size=data_cfg.face_size, border=data_cfg.face_border)
    return face_crops([s.path for s in samples], settings, data_cfg.face_cache)


def model_input_samples(samples: Sequence[Sample], data_cfg: DataConfig) -> list[Sample]:
    """The samples as the model reads them: each path replaced by its face crop when face_crop is on."""
    table = face_crop_table(samples, data_cfg)
    if table is None:
        return list(samples)
    crop = table["crop_path"].to_dict()
    return [replace(s, path=crop[s.path]) for s in samples]


def pseudo_fake_landmarks(samples: Sequence[Sample], cfg: Config, table=None) -> LandmarkTable:
    """MTCNN landmarks of the training images for the self-blend mask, keyed by the path the dataset reads.

    aug.self_blend_mask: auto -> the face-crop cache's landmarks (crop pixels) when data.face_crop=mtcnn,
    none otherwise (ellipse masks); landmarks -> the same cache, run once (cached) even without face_crop,
    its crop-pixel landmarks mapped back to the whole image; ellipse -> none. Fallback crops (no face) have
    NaN landmarks and get the ellipse."""
    d, a = cfg.data, cfg.aug
    if a.self_blend_prob == 0 or a.self_blend_mask == "ellipse" or (a.self_blend_mask == "auto" and d.face_crop == "none"):
        return {}
    from preprocessing.face_cache import LANDMARK_COLUMNS

    if table is None:
        table = face_crop_table([s for s in samples if s.label == 0], d.model_copy(update={"face_crop": "mtcnn"}))
    paths = {s.path for s in samples if s.label == 0}  # only reals are ever blended
    table = table[table.index.isin(paths) & ~table["fallback"].astype(bool)]
    lm = table[LANDMARK_COLUMNS].to_numpy(np.float64).reshape(-1, 5, 2)
    if d.face_crop == "mtcnn":  # the dataset reads the crops: crop pixels as stored
        return {c: (p, (d.face_size, d.face_size)) for c, p in zip(table["crop_path"], lm)}
    side = (table["x2"] - table["x1"]).to_numpy(np.float64)[:, None, None] / d.face_size
    lm = table[["x1", "y1"]].to_numpy(np.float64)[:, None, :] + lm * side
    return {path: (p, (int(w), int(h))) for path, p, w, h in zip(table.index, lm, table["width"], table["height"])}


def build_loaders(index: DataIndex, cfg: Config, mean: Sequence[float], std: Sequence[float], *,
                  device_type: str = "cpu") -> dict[str, DataLoader]:
    """DataLoaders "train", "val" and "test" (if non-empty); batches are (images, labels, indices).
    With data.face_crop the datasets read the cached face crops (indices still point into the index);
    with aug.self_blend_prob / artifact_fake_prob some real training images become pseudo-fakes."""
    d = cfg.data
    every = [s for name in SPLITS for s in index.split(name)]
    table = face_crop_table(every, d)
    crop = table["crop_path"].to_dict() if table is not None else {s.path: s.path for s in every}

    def dataset(samples: list[Sample], train: bool, seed: int) -> ImageDataset:
        transform = build_transform(d.aug_policy if train else "none", d.image_size, mean, std, train, seed=seed,
                                    center_crop=d.center_crop, artifact_prob=cfg.aug.artifact_prob,
                                    scale_jitter=cfg.aug.scale_jitter)
        fakes = None
        if train and (cfg.aug.self_blend_prob > 0 or cfg.aug.artifact_fake_prob > 0):
            landmarks = pseudo_fake_landmarks(samples, cfg, table)
            fakes = PseudoFakes(cfg.aug.self_blend_prob, cfg.aug.artifact_fake_prob, landmarks,
                                crop_fraction=d.center_crop or 1.0, image_size=d.image_size)
            log.info("event=pseudo_fakes self_blend_prob=%g artifact_fake_prob=%g landmark_masks=%d of %d reals",
                     cfg.aug.self_blend_prob, cfg.aug.artifact_fake_prob, len(landmarks),
                     sum(s.label == 0 for s in samples))
        return ImageDataset([replace(s, path=crop[s.path]) for s in samples], transform,
                            decode_size(d.image_size, d.center_crop), fakes, seed)

    return loaders_by_split(index, cfg, dataset, partial(collate_drop_none, image_size=d.image_size), device_type)


class CachedEvalLoader:
    """A val/test loader whose first complete pass is kept in memory: later passes (every epoch's validation)
    yield the same decoded, transformed batches without decoding again.

    Only for loaders with a fixed order and a deterministic transform (the image eval transform: resize,
    crop, normalize). If a pass would exceed `max_bytes` the cache is dropped and the loader decodes as usual.
    Anything else (dataset, batch_size, ...) is the wrapped DataLoader's.
    """

    def __init__(self, loader: DataLoader, max_bytes: int) -> None:
        self.loader, self.max_bytes = loader, max_bytes
        self.batches: list[tuple] | None = None
        self.too_big = False

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["loader"], name)

    def __iter__(self):
        if self.batches is not None:
            yield from self.batches
            return
        kept: list[tuple] | None = None if self.too_big else []
        size = 0
        for batch in loader_iter(self.loader):  # its workers are forked here (a generator: not at iter(self))
            if kept is not None:
                size += sum(t.element_size() * t.nelement() for t in batch if isinstance(t, torch.Tensor))
                if size > self.max_bytes:
                    log.info("event=eval_cache_off reason=over_budget max_mb=%d", self.max_bytes // 2**20)
                    kept, self.too_big = None, True
                else:
                    kept.append(batch)
            yield batch
        if kept is not None:  # a complete pass (a break leaves the cache empty)
            self.batches = kept
            log.debug("event=eval_cache batches=%d mb=%.1f", len(kept), size / 2**20)
