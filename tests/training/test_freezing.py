"""Freeze strategies: the two reference figures, progressive switch, partial:N stages, frozen BatchNorm."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from models import Detector, create_detector
from core.config import ModelConfig
from training.freezing import FREEZE, ParamSummary, apply_freeze, backbone_groups, parse_strategy, set_train_mode
from core.registry import UnknownNameError


def build(model_type: str = "test_efficientnet", num_outputs: int = 1, **kw: object) -> Detector:
    torch.manual_seed(0)
    return create_detector(ModelConfig(model_type=model_type, pretrained=False, **kw), num_outputs, image_size=64)


def trainable_names(det: nn.Module) -> set[str]:
    return {n for n, p in det.named_parameters() if p.requires_grad}


def test_xception_frozen_with_one_logit_trains_2049() -> None:
    summary = apply_freeze(build("xception"), "frozen", epoch=0, unfreeze_epoch=1)
    assert summary.trainable == 2_049  # 2048 weights + 1 bias
    assert summary.total == summary.trainable + summary.frozen


def test_resnet18_frozen_arcface_over_9_classes() -> None:
    det = build("resnet18", num_outputs=9, head="arcface", embedding_dim=512)
    summary = apply_freeze(det, "frozen", epoch=0, unfreeze_epoch=1)
    assert (summary.trainable, summary.total) == (268_288, 11_444_800)
    assert summary.as_dict() == {"total": 11_444_800, "trainable": 268_288, "frozen": 11_444_800 - 268_288}


def test_frozen_keeps_attention_and_head_trainable() -> None:
    det = build(head="mlp", use_attention=True)
    apply_freeze(det, "frozen")
    assert not any(p.requires_grad for p in det.backbone.parameters())
    assert all(p.requires_grad for m in (det.attention, det.head) for p in m.parameters())
    det.train()
    set_train_mode(det)
    det(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is None for p in det.backbone.parameters())


def test_full_after_frozen_trains_everything() -> None:
    det = build()
    apply_freeze(det, "frozen")
    summary = apply_freeze(det, "full")
    assert summary == ParamSummary(total=summary.total, trainable=summary.total, frozen=0)


def test_progressive_switches_at_unfreeze_epoch() -> None:
    det = build()
    total = sum(p.numel() for p in det.parameters())
    head = sum(p.numel() for p in det.head.parameters())
    counts = [apply_freeze(det, "progressive", epoch=e, unfreeze_epoch=2).trainable for e in range(4)]
    assert counts == [head, head, total, total]
    assert apply_freeze(det, "progressive", epoch=0, unfreeze_epoch=0).trainable == total


def test_partial_trains_the_last_n_stages_of_efficientnet() -> None:
    det = build()
    groups = backbone_groups(det.backbone)
    assert groups[0][0] == "conv_stem.weight" and len(groups) == 6  # stem + 5 stages (head conv in the last)
    apply_freeze(det, "partial:1")
    names = trainable_names(det)
    assert {f"backbone.{n}" for n in groups[-1]} <= names
    assert "backbone.conv_head.weight" in names and "backbone.blocks.4.0.conv_pw.weight" in names
    assert "backbone.blocks.3.0.conv_pw.weight" not in names and "backbone.conv_stem.weight" not in names
    assert all(p.requires_grad for p in det.head.parameters())
    apply_freeze(det, "partial:2")
    assert "backbone.blocks.3.0.conv_pw.weight" in trainable_names(det)
    assert "backbone.blocks.2.0.conv_exp.weight" not in trainable_names(det)


@pytest.mark.parametrize("model_type,last,before", [
    ("resnet18", "backbone.layer4.0.conv1.weight", "backbone.layer3.1.conv2.weight"),
    ("mobilenetv2", "backbone.features.17.conv.0.0.weight", "backbone.features.16.conv.0.0.weight"),
])
def test_partial_1_is_the_last_stage(model_type: str, last: str, before: str) -> None:
    det = build(model_type)
    apply_freeze(det, "partial:1")
    names = trainable_names(det)
    assert last in names and before not in names
    if model_type == "mobilenetv2":
        assert "backbone.features.18.0.weight" in names  # the 1x1 head conv belongs to the last stage


def test_partial_with_more_groups_than_stages_is_full() -> None:
    det = build()
    summary = apply_freeze(det, "partial:99")
    assert summary.frozen == 0


@pytest.mark.parametrize("bad", ["partial:0", "partial:-1", "partial:x", "partial", "partial:", "full:2"])
def test_bad_partial_forms_are_clear_errors(bad: str) -> None:
    with pytest.raises(ValueError, match="partial:N|takes no argument"):
        parse_strategy(bad)


def test_unknown_strategy_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError, match="frozen.*full.*partial.*progressive"):
        apply_freeze(build(), "thaw")
    assert FREEZE.names() == ["frozen", "full", "partial", "progressive"]


def test_frozen_batchnorm_stays_in_eval_mode_and_keeps_statistics() -> None:
    det = build(head="mlp")
    apply_freeze(det, "frozen")
    det.train()
    switched = set_train_mode(det)
    backbone_bns = [m for m in det.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert switched == len(backbone_bns) > 0
    assert not any(m.training for m in backbone_bns)
    assert all(m.training for m in det.head.modules() if isinstance(m, nn.BatchNorm1d))  # head BN still trains
    before = [m.running_mean.clone() for m in backbone_bns]
    det(torch.randn(4, 3, 64, 64) * 3 + 1)
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, backbone_bns))


def test_partial_batchnorm_modes_follow_the_stages() -> None:
    det = build()
    apply_freeze(det, "partial:1")
    det.train()
    set_train_mode(det)
    assert not det.backbone.bn1.training and not det.backbone.blocks[3][0].bn1.training
    assert det.backbone.blocks[4][0].bn1.training and det.backbone.bn2.training
    apply_freeze(det, "full")
    det.train()
    assert set_train_mode(det) == 0 and det.backbone.bn1.training
