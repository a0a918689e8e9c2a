"""Frozen-feature cache: with a frozen backbone and a deterministic train transform, every epoch would
recompute the same backbone features. They are computed once (train and val) and the epochs train the
head (and attention block) on them: `Detector.forward_cached(Detector.frozen_features(x)) == forward(x)`.

The batches keep the uncached run's order: an index-only DataLoader shares the real train loader's
sampler and generator, so `reseed_epoch` and the sampler draw the same permutation, and the global RNG
(dropout in the head) sees the same calls. Unreadable images are dropped from their batch as the
uncached loader drops them. Features are stored in the dtype the backbone produced (bf16 under CPU
autocast), in RAM up to `train.feature_cache_ram_mb`, else in a memory-mapped file in the run folder;
`release()` deletes that file. A resumed run recomputes the cache.
"""
from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from core.config import Config
from core.device import to_device

log = logging.getLogger(__name__)


def stochastic_layers(module: nn.Module) -> list[str]:
    """Modules that, in the module's current train/eval state, make one image's output random or depend
    on the rest of its batch: BatchNorm on batch statistics, dropout, DropPath/DropBlock with p > 0."""
    from timm.layers import DropBlock2d, DropPath

    found = []
    if float(getattr(module, "drop_rate", 0.0) or 0.0) > 0 and module.training:  # timm's functional head dropout
        found.append(f"<drop_rate={module.drop_rate}>")
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            random_like = m.training or not m.track_running_stats
        elif isinstance(m, nn.modules.dropout._DropoutNd):
            random_like = m.training and m.p > 0
        elif isinstance(m, (DropPath, DropBlock2d)):
            random_like = m.training and float(getattr(m, "drop_prob", 0.0)) > 0
        else:
            continue
        if random_like:
            found.append(name or type(m).__name__)
    return found


def cache_blocker(cfg: Config, model: nn.Module, train_dataset: Dataset | None = None) -> str | None:
    """Why the frozen-feature cache cannot be used for this run (None: it can). Call it with the model
    in its training state (train(), frozen BatchNorm in eval) and the freeze strategy applied; with the
    train dataset, its transform and pseudo-fakes are checked too (not only the config that built them)."""
    from augmentation.policies import is_deterministic, random_steps

    t = cfg.train
    if t.feature_cache == "off":
        return "train.feature_cache=off"
    if t.freeze_strategy != "frozen":
        return f"train.freeze_strategy={t.freeze_strategy} trains the backbone"
    if not hasattr(model, "frozen_features"):
        return f"{type(model).__name__} has no frozen_features (video models)"
    if not is_deterministic(cfg.data.aug_policy, cfg.data.image_size):
        return f"data.aug_policy={cfg.data.aug_policy} is random (use none)"
    if cfg.aug.use_mixup:
        return "aug.use_mixup mixes images"
    pseudo = [k for k in ("self_blend_prob", "artifact_fake_prob", "artifact_prob", "scale_jitter")
              if getattr(cfg.aug, k) > 0]
    if pseudo:
        return f"aug.{pseudo[0]} changes images (and labels) every epoch"
    if train_dataset is not None:  # what the loader really does, whichever setting built it
        if getattr(train_dataset, "pseudo_fakes", None) is not None:
            return "the train set makes pseudo-fakes at random"
        transform = getattr(train_dataset, "transform", None)
        steps = random_steps(transform) if transform is not None else []
        if steps:
            return f"the train transform has random steps: {', '.join(steps[:3])}"
    if any(p.requires_grad for p in model.backbone.parameters()):
        return "backbone parameters are trainable"
    stochastic = stochastic_layers(model.backbone)
    if stochastic:
        return f"the backbone is random in training: {', '.join(stochastic[:3])}"
    return None


class _Positions(Dataset):
    """0..n-1: what an index-only loader draws."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


@dataclass
class FeatureStore:
    """Features (N, ...) of one split, their labels and which samples decoded (valid)."""

    features: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    file: Path | None = None

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()


class CachedBatches:
    """Iterates (features, labels, indices) batches in the order `loader` would yield its images.

    `loader` and `sampler` / `generator` are the real loader's, so reseeding it reseeds this."""

    def __init__(self, store: FeatureStore, like: DataLoader) -> None:
        self.store = store
        shuffle_or_sampler = {"sampler": like.sampler} if not _sequential(like) else {}
        self.index_loader = DataLoader(_Positions(len(store.labels)), batch_size=like.batch_size,
                                       drop_last=like.drop_last, generator=like.generator,
                                       collate_fn=lambda idx: torch.tensor(idx, dtype=torch.int64),
                                       **shuffle_or_sampler)
        self.generator, self.sampler, self.dataset = like.generator, like.sampler, self.index_loader.dataset

    def __len__(self) -> int:
        return len(self.index_loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        s = self.store
        for idx in self.index_loader:
            idx = idx[s.valid[idx]]
            yield s.features[idx], s.labels[idx], idx


def _sequential(loader: DataLoader) -> bool:
    return isinstance(loader.sampler, torch.utils.data.SequentialSampler)


class CachedForward(nn.Module):
    """`detector` as a model over cached features (what `evaluation.inference.predict` calls)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, cached: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.detector.forward_cached(cached, labels)


def _allocate(n: int, shape: tuple[int, ...], dtype: torch.dtype, ram_bytes: int, file: Path) -> tuple[torch.Tensor, Path | None]:
    numel = n * math.prod(shape)
    if numel * torch.empty((), dtype=dtype).element_size() <= ram_bytes:
        return torch.empty((n, *shape), dtype=dtype), None
    file.parent.mkdir(parents=True, exist_ok=True)
    file.unlink(missing_ok=True)
    return torch.from_file(str(file), shared=True, size=numel, dtype=dtype).view(n, *shape), file


@torch.no_grad()
def compute_features(model: nn.Module, loader: DataLoader, device: torch.device, *, channels_last: bool,
                     amp: Callable[[], contextlib.AbstractContextManager], ram_bytes: int, file: Path) -> FeatureStore:
    """Run `model.frozen_features` once over `loader`'s dataset (in its order-free index space).

    The caller sets the model's train/eval state to the one the uncached path would use."""
    from dataio.loaders import loader_iter

    dataset = loader.dataset
    n = len(dataset)
    once = DataLoader(dataset, batch_size=loader.batch_size, shuffle=False, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn)
    features: torch.Tensor | None = None
    path = None
    labels, valid = torch.zeros(n, dtype=torch.float32), torch.zeros(n, dtype=torch.bool)
    for images, y, idx in loader_iter(once):
        if len(images) == 0:
            continue
        with amp():
            f = model.frozen_features(to_device(images, device, channels_last))
        if features is None:
            features, path = _allocate(n, tuple(f.shape[1:]), f.dtype, ram_bytes, file)
        features[idx] = f.to("cpu", memory_format=torch.contiguous_format)
        labels[idx], valid[idx] = y, True
    if features is None:
        raise ValueError(f"{file.stem}: no readable images to cache")
    return FeatureStore(features, labels, valid, path)


class FeatureCache:
    """The cached train (and val, when it has no TTA) splits of one run."""

    def __init__(self, stores: dict[str, FeatureStore], loaders: dict[str, DataLoader], folder: Path) -> None:
        self.stores, self.folder = stores, folder
        self.batches = {split: CachedBatches(store, loaders[split]) for split, store in stores.items()}

    @classmethod
    def build(cls, trainer, splits: tuple[str, ...]) -> "FeatureCache":
        """Features of `splits` with the trainer's model in the state each split is run in (train: train() with
        frozen BatchNorm in eval; val: eval()), its device, channels_last and autocast."""
        from training.freezing import set_train_mode

        folder = trainer.run_dir / "feature_cache"
        ram_left = trainer.cfg.train.feature_cache_ram_mb * 2**20
        stores = {}
        for split in splits:
            t0 = time.perf_counter()
            model = trainer.model if split == "train" else trainer.eval_model
            if split == "train":
                model.train()
                set_train_mode(model)
            else:
                model.eval()
            store = compute_features(model, trainer.loaders[split], trainer.device, channels_last=trainer.channels_last,
                                     amp=trainer.amp, ram_bytes=ram_left, file=folder / f"{split}.bin")
            ram_left -= 0 if store.file else store.nbytes
            stores[split] = store
            log.info("event=feature_cache split=%s images=%d shape=%s dtype=%s mb=%.1f storage=%s seconds=%.2f",
                     split, int(store.valid.sum()), tuple(store.features.shape[1:]), store.features.dtype,
                     store.nbytes / 2**20, store.file or "ram", time.perf_counter() - t0)
        return cls(stores, trainer.loaders, folder)

    def describe(self) -> str:
        where = "disk" if any(s.file for s in self.stores.values()) else "ram"
        return f"on ({'+'.join(self.stores)}, {where})"

    def release(self) -> None:
        """Drop the tensors and delete the memory-mapped files."""
        self.stores.clear()
        self.batches.clear()
        if self.folder.exists():
            shutil.rmtree(self.folder, ignore_errors=True)
