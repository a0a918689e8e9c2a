"""Frozen-feature cache: a cached run equals the uncached one; it is off whenever the backbone's input or
output is random (augmentation, mixup, drop path) or the backbone trains; it survives kill-and-resume."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from core.checkpoints import load_checkpoint
from core.config import load_config
from models import create_detector
from training.feature_cache import cache_blocker
from training.freezing import apply_freeze, set_train_mode
from training.trainer import train

FROZEN = {
    "model.model_type": "test_efficientnet", "model.pretrained": False, "model.dropout": 0.5,
    "data.image_size": 32, "data.batch_size": 16, "data.num_workers": 0, "data.max_samples_per_split": 48,
    "data.aug_policy": "none", "train.freeze_strategy": "frozen", "train.num_epochs": 3, "optim.lr": 1e-2,
    "train.use_amp": False, "tracking.enabled": False,
}


def cfg_for(tmp_path: Path, name: str, **extra):
    return load_config(overrides={**FROZEN, "train.output_dir": str(tmp_path / name), **extra})


def used_cache(result) -> bool:
    return "feature_cache_seconds" in pd.read_csv(result.output_dir / "training_log.csv").columns


def assert_same_run(a, b) -> None:
    for key in ("val_auc", "val_loss", "val_accuracy"):
        assert a.val_metrics[key] == pytest.approx(b.val_metrics[key], abs=1e-5), key
    wa, wb = load_checkpoint(a.output_dir / "last.pt")["model"], load_checkpoint(b.output_dir / "last.pt")["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("extra", [
    {},  # linear head with dropout 0.5 on cached pooled features
    {"model.head": "mlp", "model.use_attention": True, "data.balance": "sampler", "train.feature_cache_ram_mb": 0},
], ids=["pooled-ram", "feature-map-on-disk"])
def test_cached_run_equals_uncached_run(tmp_path: Path, extra: dict) -> None:
    cached = train(cfg_for(tmp_path, "cached", **extra))
    plain = train(cfg_for(tmp_path, "plain", **{**extra, "train.feature_cache": "off"}))
    assert used_cache(cached) and not used_cache(plain)
    assert_same_run(cached, plain)
    assert not (cached.output_dir / "feature_cache").exists()  # the memory-mapped files are deleted
    # the head really trained (equal weights are not two untouched initialisations)
    cfg = cfg_for(tmp_path, "x", **extra)
    torch.manual_seed(cfg.train.seed)  # as train() seeds before building the model
    start = create_detector(cfg.model, 1, image_size=32).state_dict()
    head = load_checkpoint(cached.output_dir / "last.pt")["model"]
    assert any(not torch.equal(head[k], start[k]) for k in head if k.startswith("head."))


def test_killed_cached_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    full = train(cfg_for(tmp_path, "full"))

    def stop_after_first(epoch: int, row: dict) -> None:
        if epoch == 0:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(tmp_path, "killed"), epoch_callback=stop_after_first)
    last = next((tmp_path / "killed").glob("*/last.pt"))
    resumed = train(load_config(overrides={**FROZEN, "train.resume": str(last)}))
    assert resumed.epochs_run == 3 and used_cache(resumed)
    assert_same_run(full, resumed)


def in_training_state(cfg):
    """The detector as a training epoch runs it: freeze applied, train(), frozen BatchNorm in eval."""
    det = create_detector(cfg.model, cfg.loss.num_outputs, image_size=cfg.data.image_size)
    apply_freeze(det, cfg.train.freeze_strategy)
    det.train()
    set_train_mode(det)
    return det


def train_dataset(cfg):
    from dataio.data import scan
    from dataio.loaders import build_loaders
    from dataio.pipeline import data_config

    return build_loaders(scan(data_config(cfg), cfg.train.seed), cfg, (0.5,) * 3, (0.5,) * 3)["train"].dataset


def test_frozen_deterministic_run_can_cache(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path, "x")
    assert cache_blocker(cfg, in_training_state(cfg), train_dataset(cfg)) is None


def test_random_train_transform_blocks_the_cache_whatever_the_config_says(tmp_path: Path) -> None:
    import albumentations as A

    cfg = cfg_for(tmp_path, "x")
    ds = train_dataset(cfg)
    ds.transform = A.Compose([A.HorizontalFlip(p=0.5), *ds.transform.transforms])
    assert "random steps: HorizontalFlip" in cache_blocker(cfg, in_training_state(cfg), ds)


@pytest.mark.parametrize("override, reason", [
    ({"data.aug_policy": "basic"}, "aug_policy=basic is random"),
    ({"data.aug_policy": "randaugment:2:9"}, "is random"),
    ({"aug.use_mixup": True}, "mixup"),
    ({"aug.self_blend_prob": 0.3}, "aug.self_blend_prob changes images"),
    ({"aug.artifact_prob": 0.3}, "aug.artifact_prob changes images"),
    ({"aug.scale_jitter": 0.2}, "aug.scale_jitter changes images"),
    ({"model.drop_path_rate": 0.2}, "random in training"),
    ({"train.freeze_strategy": "progressive"}, "trains the backbone"),
    ({"train.feature_cache": "off"}, "feature_cache=off"),
])
def test_cache_is_off_when_backbone_features_change(tmp_path: Path, override: dict, reason: str) -> None:
    cfg = cfg_for(tmp_path, "x", **override)
    assert reason in (cache_blocker(cfg, in_training_state(cfg)) or "")


@pytest.mark.parametrize("override", [{"data.aug_policy": "basic"}, {"aug.use_mixup": True},
                                      {"train.max_steps_per_epoch": 1}], ids=["aug", "mixup", "partial-pass"])
def test_runs_with_augmentation_or_mixup_recompute_features(tmp_path: Path, override: dict) -> None:
    result = train(cfg_for(tmp_path, "aug", **{**override, "train.num_epochs": 1}))
    assert not used_cache(result)
