"""Model factory: every preset builds and trains a step; heads, attention, names, data config."""
from __future__ import annotations

import math

import pytest
import torch
from timm.models import group_parameters
from torch import nn

from models import PRESETS, Detector, create_detector
from models.attention import FeatureMapAttention, create_attention
from models.factory import TorchvisionMobileNetV2
from models.heads import HEADS, ArcFaceHead, LinearHead, MLPHead, create_head
from models.presets import get_preset
from core.config import ModelConfig
from core.registry import UnknownNameError

SIZE = 64
# Every preset at 64 px takes about 6 CPU-seconds in all (swin_base and efficientnet_b7 ~1 s each), so none
# is marked slow; a new registry entry is tested here without new test code.


def cfg(model_type: str = "test_efficientnet", **kw: object) -> ModelConfig:
    return ModelConfig(model_type=model_type, pretrained=False, **kw)


def build(model_type: str = "test_efficientnet", num_outputs: int = 1, size: int = SIZE, **kw: object) -> Detector:
    torch.manual_seed(0)
    return create_detector(cfg(model_type, **kw), num_outputs, image_size=size)


def images(n: int = 2, size: int = SIZE) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", [n for n in PRESETS.names() if get_preset(n).kind == "image"])
def test_every_preset_builds_and_trains_a_step(name: str) -> None:
    det = build(name)
    det.train()
    out = det(images())
    assert out.shape == (2, 1) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in det.head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in det.backbone.parameters())
    assert det.is_convnet == get_preset(name).is_conv  # the probed layout agrees with the preset
    assert det.data_config["input_size"] == (3, SIZE, SIZE)
    assert det.features(images()).shape[0] == 2


def test_presets_cover_the_seed_recipes() -> None:
    expected = {"efficientnet", "efficientnet_lite0", "swin", "swin_tiny", "xception", "resnet", "resnet18",
                "mobilenetv2", "mobilenetv2_timm", "test_efficientnet", "test_vit", "test_convnext",
                *(f"efficientnet_b{i}" for i in range(8))}
    assert expected <= set(PRESETS.names())
    assert get_preset("efficientnet").backbone == "efficientnet_b0"
    assert get_preset("xception").backbone == "legacy_xception"
    assert get_preset("swin").backbone == "swin_base_patch4_window7_224"
    assert get_preset("mobilenetv2").source == "torchvision"


def test_unknown_preset_lists_valid_names() -> None:
    with pytest.raises(ValueError) as e:  # the Config checks the name against the registry
        cfg("efficientnet_b9")
    msg = str(e.value)
    with pytest.raises(UnknownNameError):  # and so does the factory, for a config built without validation
        create_detector(ModelConfig.model_construct(model_type="efficientnet_b9", pretrained=False), 1)
    assert "efficientnet_b9" in msg and "xception" in msg and "mobilenetv2" in msg and "did you mean" in msg


def test_model_name_overrides_preset_and_unknown_timm_name_is_clear() -> None:
    det = build("efficientnet", model_name="test_convnext")
    assert det.name == "test_convnext" and type(det.backbone).__name__ == "ConvNeXt"
    with pytest.raises(UnknownNameError, match="unknown timm model 'test_convnextt'.*did you mean 'test_convnext'"):
        build("efficientnet", model_name="test_convnextt")


@pytest.mark.parametrize("head,num_outputs", [("linear", 1), ("linear", 2), ("mlp", 1), ("mlp", 2), ("arcface", 2)])
def test_heads_output_shape_and_backward(head: str, num_outputs: int) -> None:
    det = build(num_outputs=num_outputs, head=head, embedding_dim=32)
    det.train()
    labels = torch.tensor([0, 1, 1])
    out = det(images(3), labels=labels)
    assert out.shape == (3, num_outputs)
    out.logsumexp(1).sum().backward()
    assert all(p.grad is not None for p in det.head.parameters())
    det.eval()
    with torch.no_grad():
        assert det(images(3)).shape == (3, num_outputs)


def test_head_registry_and_structures() -> None:
    assert HEADS.names() == ["arcface", "linear", "mlp"]
    c = cfg(dropout=0.2, embedding_dim=16)
    lin = create_head("linear", 8, 1, c)
    assert isinstance(lin, LinearHead) and lin.drop.p == 0.2 and lin.fc.in_features == 8
    mlp = create_head("mlp", 8, 2, c)
    assert isinstance(mlp, MLPHead) and isinstance(mlp.block[1], nn.BatchNorm1d) and mlp.fc.in_features == 16
    assert not lin.needs_labels and not mlp.needs_labels
    arc = create_head("arcface", 8, 9, c)
    assert isinstance(arc, ArcFaceHead) and arc.needs_labels and arc.weight.shape == (9, 16)
    assert arc.embedding.bias is not None and arc.bn.affine
    with pytest.raises(ValueError, match="loss_type=ce"):
        create_head("arcface", 8, 1, c)


def test_mlp_head_is_residual() -> None:
    torch.manual_seed(0)
    head = MLPHead(6, 1, hidden=4).eval()
    x = torch.randn(5, 6)
    h = head.proj(x)
    assert torch.allclose(head(x), head.fc(h + head.block(h)))
    nn.init.zeros_(head.block[0].weight), nn.init.zeros_(head.block[0].bias), nn.init.zeros_(head.block[1].bias)
    nn.init.zeros_(head.block[1].running_mean)  # the block now outputs 0: only the skip path remains
    assert torch.allclose(head(x), head.fc(h))


def test_arcface_adds_angular_margin_to_target_class_only() -> None:
    torch.manual_seed(0)
    s, m = 30.0, 0.5
    head = ArcFaceHead(8, 3, embedding_dim=6, scale=s, margin=m).train()
    x, labels = torch.randn(16, 8), torch.randint(0, 3, (16,))
    cos = head.cosine(head.embed(x))  # same batch -> same BN batch statistics
    out = head(x, labels)
    theta = torch.acos(cos.clamp(-1, 1))
    expected_target = torch.where(theta + m < math.pi, torch.cos(theta + m), cos - math.sin(math.pi - m) * m)
    rows = torch.arange(16)
    assert torch.allclose(out[rows, labels], s * expected_target[rows, labels], atol=1e-4)
    mask = torch.ones_like(cos, dtype=torch.bool)
    mask[rows, labels] = False
    assert torch.allclose(out[mask], s * cos[mask], atol=1e-5)
    assert (out[rows, labels] < s * cos[rows, labels]).all()  # the margin makes the target harder
    plain = head(x)  # no labels: scaled cosine
    assert torch.allclose(plain, s * head.cosine(head.embed(x)), atol=1e-5) and plain.abs().max() <= s + 1e-4
    head.eval()
    assert torch.allclose(head(x, labels), head(x))  # eval: no margin even with labels


def test_arcface_easy_margin_is_finite_at_extremes() -> None:
    head = ArcFaceHead(4, 2, embedding_dim=4, easy_margin=True).train()
    x = torch.randn(8, 4, requires_grad=True)
    out = head(x, torch.tensor([0, 1] * 4))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("kind", ["se", "cbam"])
@pytest.mark.parametrize("model_type", ["test_efficientnet", "test_convnext", "mobilenetv2"])
def test_attention_on_conv_feature_maps(kind: str, model_type: str) -> None:
    det = build(model_type, use_attention=True, attention_type=kind)
    block = det.attention.block
    assert type(block).__name__ == ("SEModule" if kind == "se" else "CbamModule")
    det.train()
    det(images()).sum().backward()
    assert all(p.grad is not None for p in det.attention.parameters())
    assert det.parameter_groups()["classifier"][0] is next(det.attention.parameters())


@pytest.mark.parametrize("kind", ["se", "cbam"])
def test_attention_on_swin_nhwc_feature_map(kind: str) -> None:
    det = build("swin_tiny", use_attention=True, attention_type=kind)
    assert det.layout == "NHWC" and det.attention.channels_last_dim
    det.train()
    det(images()).sum().backward()
    assert all(p.grad is not None for p in det.attention.parameters())


def test_nhwc_attention_matches_nchw() -> None:
    torch.manual_seed(0)
    nchw = create_attention("cbam", 16, "NCHW", "x")
    nhwc = FeatureMapAttention(nchw.block, channels_last_dim=True)
    x = torch.randn(2, 16, 5, 5)
    assert torch.allclose(nhwc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), nchw(x), atol=1e-6)


def test_attention_on_token_vit_is_an_error() -> None:
    with pytest.raises(ValueError) as e:
        build("test_vit", use_attention=True)
    assert str(e.value) == "use_attention needs a backbone with a spatial feature map; test_vit has tokens"


def test_vit_and_swin_take_any_image_size() -> None:
    vit = build("test_vit", size=32)
    assert vit(images(2, 32)).shape == (2, 1) and vit.data_config["input_size"] == (3, 32, 32)
    assert not vit.is_convnet and vit.layout == "tokens"


def test_parameter_groups_hold_every_parameter_once() -> None:
    det = build(head="mlp", use_attention=True)
    groups = det.parameter_groups()
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(det.parameters()))
    assert {id(p) for p in groups["backbone"]} == {id(p) for p in det.backbone.parameters()}


def test_torchvision_mobilenet_follows_timm_contract() -> None:
    det = build("mobilenetv2")
    bb = det.backbone
    assert isinstance(bb, TorchvisionMobileNetV2) and det.is_convnet and bb.num_features == 1280
    assert det.data_config["mean"] == (0.485, 0.456, 0.406) and det.data_config["interpolation"] == "bilinear"
    fmap = bb.forward_features(images())
    assert fmap.shape == (2, 1280, 2, 2) and bb.forward_head(fmap, pre_logits=True).shape == (2, 1280)
    # coarse stages line up with timm's own mobilenetv2_100 (stem, 7 stages with the 1x1 head conv in the last)
    tv_sizes = [len(g) for g in group_parameters(bb, bb.group_matcher(coarse=True)).values()]
    timm_bb = build("mobilenetv2_timm").backbone
    assert tv_sizes == [len(g) for g in group_parameters(timm_bb, timm_bb.group_matcher(coarse=True)).values()]
    fine = group_parameters(bb, bb.group_matcher(coarse=False))
    assert len(fine) == 19  # stem + 17 blocks + head conv


def test_drop_path_rate_reaches_timm() -> None:
    det = build("test_vit", drop_path_rate=0.1)
    assert any(type(m).__name__ == "DropPath" for m in det.backbone.modules())


def test_creation_is_deterministic_under_a_seed() -> None:
    a, b = build(head="mlp").eval(), build(head="mlp").eval()
    with torch.no_grad():
        assert torch.equal(a(images()), b(images()))


def test_unsupported_timm_option_and_bad_tag_are_clear() -> None:
    with pytest.raises(ValueError, match="legacy_xception does not accept 'drop_path_rate'"):
        build("xception", drop_path_rate=0.1)
    with pytest.raises(UnknownNameError, match="Invalid pretrained tag"):
        build("efficientnet", model_name="resnet18.bogus")
