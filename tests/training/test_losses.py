"""Losses against hand-written references, P(fake) scores, and timm Mixup -> soft binary targets."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.config import AugConfig, ConfigError, LossConfig
from training.losses import (
    LOSSES,
    build_mixup,
    create_loss,
    mix_batch,
    soft_binary_targets,
)
from core.registry import UnknownNameError
from models.outputs import fake_prob, logits_from_prob

Z = torch.tensor([2.0, -1.0, 0.5, -3.0, 0.0, 1.5])  # one logit per image
Y = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])  # 1 = fake
Z2 = torch.tensor([[0.3, 1.2], [2.0, -0.5], [0.0, 0.0], [-1.0, 1.0], [0.7, 0.1], [1.1, 2.2]])


def _loss(loss_type: str, pos_weight: float | None = None, **kw: float) -> torch.nn.Module:
    return create_loss(LossConfig(loss_type=loss_type, **kw), pos_weight=pos_weight)


def _logits_for(loss_type: str) -> torch.Tensor:
    return Z2.clone() if loss_type == "ce" else Z[:, None].clone()


def test_the_registry_is_the_only_list_of_losses(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Config accepts exactly the registered losses, with the num_outputs each declared; a new loss is one
    registration (no Literal, no CLI choices list, no YAML comment list to edit)."""
    assert {"bce", "focal", "label_smoothing", "ce"} <= set(LOSSES.names())
    for name in LOSSES.names():
        assert LossConfig(loss_type=name).num_outputs == create_loss(LossConfig(loss_type=name)).num_outputs
    with pytest.raises(UnknownNameError, match="focal"):
        LOSSES.get("focall")
    with pytest.raises(ValueError, match="did you mean 'focal'"):
        LossConfig(loss_type="focall")
    monkeypatch.setitem(LOSSES._factories, "hinge2", lambda cfg, pos_weight=None: torch.nn.Identity())
    monkeypatch.setitem(LOSSES._meta, "hinge2", {"num_outputs": 2})
    assert LossConfig(loss_type="hinge2").num_outputs == 2
    from training.train_unified import build_parser

    assert "hinge2" in build_parser().format_help()


def test_bce_matches_manual_formula() -> None:
    p = torch.sigmoid(Z)
    ref = -(Y * torch.log(p) + (1 - Y) * torch.log(1 - p)).mean()
    torch.testing.assert_close(_loss("bce")(Z[:, None], Y), ref)
    torch.testing.assert_close(_loss("bce")(Z, Y), ref)  # (B,) logits accepted too


def test_bce_pos_weight_scales_the_fake_term() -> None:
    p = torch.sigmoid(Z)
    ref = -(3.0 * Y * torch.log(p) + (1 - Y) * torch.log(1 - p)).mean()
    torch.testing.assert_close(_loss("bce", pos_weight=3.0)(Z[:, None], Y), ref)


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.75, 1.0), (0.5, 0.0)])
def test_focal_matches_closed_form(alpha: float, gamma: float) -> None:
    p = torch.sigmoid(Z)
    p_t = torch.where(Y == 1, p, 1 - p)
    alpha_t = torch.where(Y == 1, torch.tensor(alpha), torch.tensor(1 - alpha))
    ref = (-alpha_t * (1 - p_t) ** gamma * torch.log(p_t)).mean()
    torch.testing.assert_close(_loss("focal", focal_alpha=alpha, focal_gamma=gamma)(Z[:, None], Y), ref)


@pytest.mark.parametrize("gamma", [0.5, 0.645, 2.0])
def test_focal_matches_torchvision_and_keeps_finite_gradients_when_logits_saturate(gamma: float) -> None:
    from torchvision.ops import sigmoid_focal_loss

    y = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.3, 0.8])  # soft targets (mixup) included
    z = torch.tensor([2.0, -1.5, -0.7, 3.0, 0.4, -2.2], requires_grad=True)
    ours = _loss("focal", focal_alpha=0.7, focal_gamma=gamma)(z[:, None], y)
    torch.testing.assert_close(ours, sigmoid_focal_loss(z, y, alpha=0.7, gamma=gamma, reduction="mean"))
    saturated = torch.tensor([40.0, -40.0, 17.5, -25.0], requires_grad=True)  # confidently right
    _loss("focal", focal_alpha=0.7, focal_gamma=gamma)(saturated[:, None], torch.tensor([1.0, 0.0, 1.0, 0.0])).backward()
    assert torch.isfinite(saturated.grad).all()  # torchvision's gradient is NaN here for gamma < 1


def test_focal_negative_alpha_disables_class_weighting() -> None:
    p = torch.sigmoid(Z)
    p_t = torch.where(Y == 1, p, 1 - p)
    ref = (-((1 - p_t) ** 2) * torch.log(p_t)).mean()
    torch.testing.assert_close(_loss("focal", focal_alpha=-0.5, focal_gamma=2.0)(Z[:, None], Y), ref)


def test_label_smoothing_is_bce_on_smoothed_targets() -> None:
    eps = 0.2
    smoothed = Y * (1 - eps) + eps / 2
    assert smoothed.max().item() == pytest.approx(0.9) and smoothed.min().item() == pytest.approx(0.1)
    p = torch.sigmoid(Z)
    ref = -(smoothed * torch.log(p) + (1 - smoothed) * torch.log(1 - p)).mean()
    torch.testing.assert_close(_loss("label_smoothing", label_smoothing=eps)(Z[:, None], Y), ref)
    # eps = 0 is plain BCE
    torch.testing.assert_close(_loss("label_smoothing", label_smoothing=0.0)(Z[:, None], Y), _loss("bce")(Z, Y))


def test_ce_soft_targets_match_manual_log_softmax() -> None:
    y = torch.tensor([1.0, 0.0, 0.3, 0.8, 0.5, 1.0])
    t = torch.stack([1 - y, y], dim=1)
    ref = -(t * torch.log_softmax(Z2, dim=1)).sum(1).mean()
    torch.testing.assert_close(_loss("ce")(Z2, y), ref)
    ref_w = -(t * torch.log_softmax(Z2, dim=1) * torch.tensor([1.0, 2.5])).sum(1).mean()
    torch.testing.assert_close(_loss("ce", pos_weight=2.5)(Z2, y), ref_w)
    # hard targets: the usual integer-label cross-entropy
    torch.testing.assert_close(_loss("ce")(Z2, Y), F.cross_entropy(Z2, Y.long()))


@pytest.mark.parametrize("loss_type", ["bce", "label_smoothing", "focal", "ce"])
def test_soft_target_is_the_optimum(loss_type: str) -> None:
    """For soft target q the gradient vanishes where P(fake) = q (the smoothed q for label_smoothing)."""
    q = torch.tensor([0.3, 0.8])
    eps = 0.1
    q_eff = q * (1 - eps) + eps / 2 if loss_type == "label_smoothing" else q
    z = torch.log(q_eff / (1 - q_eff))
    logits = torch.stack([torch.zeros_like(z), z], 1) if loss_type == "ce" else z[:, None]
    logits.requires_grad_(True)
    if loss_type == "focal":  # focal's optimum moves with gamma > 0; gamma = 0, alpha off is BCE
        loss_fn = _loss("focal", focal_alpha=-1.0, focal_gamma=0.0)
    else:
        loss_fn = _loss(loss_type, label_smoothing=eps)
    loss_fn(logits, q).backward()
    torch.testing.assert_close(logits.grad, torch.zeros_like(logits), atol=1e-6, rtol=0)


@pytest.mark.parametrize("loss_type", ["bce", "label_smoothing", "focal", "ce"])
def test_every_loss_scalar_finite_with_gradient(loss_type: str) -> None:
    logits = _logits_for(loss_type).requires_grad_(True)
    soft = torch.tensor([0.9, 0.1, 0.4, 0.6, 1.0, 0.0])
    loss = _loss(loss_type)(logits, soft)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # bf16 logits (autocast) are computed in float32
    low = _loss(loss_type)(logits.detach().bfloat16(), soft)
    assert low.dtype == torch.float32 and torch.isfinite(low)


def test_wrong_number_of_logits_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="1 logit"):
        _loss("bce")(Z2, Y)
    with pytest.raises(ValueError, match="2 logits"):
        _loss("ce")(Z[:, None], Y)
    with pytest.raises(ValueError, match="targets"):
        _loss("focal")(Z[:, None], Y[:3])


def test_ce_over_more_classes_targets_real_and_fake_only() -> None:
    """loss.num_classes > 2 (seed 002's 9-class ArcFace head): same loss as 2 classes when the rest are -inf."""
    z9 = torch.randn(4, 9)
    y = torch.tensor([0.0, 1.0, 1.0, 0.0])
    wide = _loss("ce")(z9, y)
    assert torch.isfinite(wide)
    z9[:, 2:] = -1e4
    assert torch.allclose(_loss("ce")(z9, y), _loss("ce")(z9[:, :2], y), atol=1e-6)
    assert torch.allclose(fake_prob(z9), torch.softmax(z9[:, :2], 1)[:, 1])
    assert LossConfig(loss_type="ce", num_classes=9).num_outputs == 9


def test_fake_prob_of_one_and_two_output_heads() -> None:
    """models.outputs.fake_prob: the one logits -> P(fake) used by training, evaluation, TTA and serving."""
    torch.testing.assert_close(fake_prob(Z[:, None]), torch.sigmoid(Z))
    s2 = fake_prob(Z2)
    assert s2.shape == (6,)
    torch.testing.assert_close(s2, torch.softmax(Z2, 1)[:, 1])
    assert fake_prob(Z2.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="outputs"):
        fake_prob(torch.zeros(4, 0))
    p = torch.tensor([0.1, 0.5, 0.9])
    for k in (1, 2, 9):  # P(fake) -> raw outputs -> P(fake), also through a softmax over all K
        torch.testing.assert_close(fake_prob(logits_from_prob(p, k)), p)
    torch.testing.assert_close(torch.softmax(logits_from_prob(p, 9), 1)[:, 1], p)


# ------------------------------------------------------------------------------ mixup
LABELS = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0])


def _images(n: int = 10) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_build_mixup_off_and_invalid() -> None:
    assert build_mixup(AugConfig(use_mixup=False)) is None
    with pytest.raises(ConfigError, match="mixup_alpha"):
        build_mixup(AugConfig(use_mixup=True, mixup_alpha=0.0, cutmix_alpha=0.0))
    m = build_mixup(AugConfig(use_mixup=True, mixup_alpha=0.4))
    assert m is not None and m.num_classes == 2 and m.label_smoothing == 0.0


@pytest.mark.parametrize("seed", [0, 3, 5])  # seeds whose Beta(0.4, 0.4) draw is not ~0 or ~1
def test_mixup_targets_follow_the_image_mix(seed: int) -> None:
    np.random.seed(seed)
    mixup = build_mixup(AugConfig(use_mixup=True, mixup_alpha=0.4))
    x0 = _images()
    x, t = mix_batch(mixup, x0.clone(), LABELS)
    lam = ((x[0] - x0[-1]) / (x0[0] - x0[-1])).median().item()  # x = lam * x0 + (1 - lam) * flip(x0)
    assert 0.0 <= lam <= 1.0 and lam != 1.0
    torch.testing.assert_close(x, lam * x0 + (1 - lam) * x0.flip(0), atol=1e-5, rtol=1e-5)
    assert t.shape == (10,) and t.dtype == torch.float32 and ((t >= 0) & (t <= 1)).all()
    torch.testing.assert_close(t, lam * LABELS + (1 - lam) * LABELS.flip(0), atol=1e-6, rtol=1e-6)
    assert t.mean().item() == pytest.approx(LABELS.mean().item(), abs=1e-6)  # flip-mixing keeps the class mix
    assert ((t > 0) & (t < 1)).any()  # genuinely soft


def test_cutmix_targets_equal_pasted_area_fraction() -> None:
    np.random.seed(3)
    mixup = build_mixup(AugConfig(use_mixup=True, mixup_alpha=0.0, cutmix_alpha=1.0))
    x0 = _images()
    x, t = mix_batch(mixup, x0.clone(), LABELS)
    kept = (x[0] == x0[0]).all(dim=0).float().mean().item()  # fraction of pixels left as the original
    torch.testing.assert_close(t, kept * LABELS + (1 - kept) * LABELS.flip(0), atol=1e-6, rtol=1e-6)
    assert t.mean().item() == pytest.approx(LABELS.mean().item(), abs=1e-6)


def test_mixup_odd_batch_is_left_unmixed() -> None:
    mixup = build_mixup(AugConfig(use_mixup=True, mixup_alpha=0.4))
    x0 = _images(7)
    x, t = mix_batch(mixup, x0.clone(), LABELS[:7])
    torch.testing.assert_close(x, x0)
    torch.testing.assert_close(t, LABELS[:7])


def test_mixup_prob_zero_and_none_keep_hard_targets() -> None:
    np.random.seed(0)
    x0 = _images()
    x, t = mix_batch(build_mixup(AugConfig(use_mixup=True, mixup_prob=0.0)), x0.clone(), LABELS.long())
    torch.testing.assert_close(x, x0)
    torch.testing.assert_close(t, LABELS)
    x, t = mix_batch(None, x0.clone(), LABELS)
    torch.testing.assert_close(t, LABELS)


def test_soft_binary_targets_is_column_one() -> None:
    onehot = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    torch.testing.assert_close(soft_binary_targets(onehot), torch.tensor([0.75, 0.0]))
    with pytest.raises(ValueError, match="shape"):
        soft_binary_targets(torch.ones(3))


@pytest.mark.parametrize("loss_type", ["bce", "label_smoothing", "focal", "ce"])
def test_mixed_targets_train_every_loss(loss_type: str) -> None:
    np.random.seed(5)
    mixup = build_mixup(AugConfig(use_mixup=True, mixup_alpha=1.0))
    _, t = mix_batch(mixup, _images(), LABELS)
    logits = torch.randn(10, 2 if loss_type == "ce" else 1, requires_grad=True)
    loss = _loss(loss_type)(logits, t)
    loss.backward()
    assert math.isfinite(loss.item()) and logits.grad is not None and logits.grad.abs().sum() > 0
