"""evaluation.inference.predict: TTA views and averaging, MC-dropout passes (evaluation.tta / uncertainty), its heap."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation import uncertainty
from evaluation.tta import FLIP, NO_TTA, View, average_views, parse_tta
from models.outputs import logits_from_prob
from models import create_detector
from core.config import load_config
from dataio.data import Sample
from evaluation.inference import predict, predictions_table

CPU = torch.device("cpu")


def tiny_model(dropout: float = 0.0, head_gain: float = 1.0, loss: str = "bce", seed: int = 0) -> torch.nn.Module:
    cfg = load_config(overrides={"model.model_type": "test_efficientnet", "model.pretrained": False,
                                 "model.dropout": dropout, "data.image_size": 32, "loss.loss_type": loss})
    torch.manual_seed(seed)
    model = create_detector(cfg.model, cfg.loss.num_outputs, image_size=32)
    with torch.no_grad():  # spread the logits so logit- and probability-space averages differ visibly
        model.head.fc.weight.mul_(head_gain)
    return model.eval()


def batches(x: torch.Tensor, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    labels = (torch.arange(len(x)) % 2).float()
    return [(x[i:i + size], labels[i:i + size], torch.arange(i, min(i + size, len(x)))) for i in range(0, len(x), size)]


def test_flip_on_a_horizontally_symmetric_input_equals_no_tta() -> None:
    model = tiny_model(head_gain=20.0)
    a = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    symmetric = a + torch.flip(a, dims=[3])  # mirror image of itself left-right, not top-bottom
    plain, flipped = predict(model, batches(symmetric), CPU), predict(model, batches(symmetric), CPU, tta=True)
    np.testing.assert_allclose(flipped.logits, plain.logits, rtol=1e-5, atol=1e-5)
    # a vertical flip (the wrong axis) of the same input is another image: the model sees the difference
    upside_down = predict(model, batches(torch.flip(symmetric, dims=[2])), CPU)
    assert np.abs(upside_down.logits - plain.logits).max() > 1e-3
    # on an asymmetric input the flip view changes the result, and the average is the mean logit
    plain_a, tta_a = predict(model, batches(a), CPU), predict(model, batches(a), CPU, tta=FLIP)
    mirror = predict(model, batches(torch.flip(a, dims=[3])), CPU)
    assert np.abs(tta_a.logits - plain_a.logits).max() > 1e-3
    np.testing.assert_allclose(tta_a.logits, (plain_a.logits + mirror.logits) / 2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("space", ["logit", "prob"])
def test_multicrop_averages_in_the_chosen_space(space: str) -> None:
    model = tiny_model(head_gain=1000.0)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    spec = parse_tta("crop,scale", space=space)
    assert spec.names[0] == "identity" and len(spec.views) == 8 and spec.groups == ("crop", "scale")
    with torch.no_grad():
        z = torch.stack([model(view(x))[:, 0] for view in spec.views]).numpy()  # (views, B)
    got = predict(model, batches(x), CPU, tta=spec)
    if space == "logit":
        np.testing.assert_allclose(got.logits, z.mean(0), rtol=1e-4, atol=1e-4)
    else:
        np.testing.assert_allclose(got.scores, (1 / (1 + np.exp(-z))).mean(0), rtol=1e-5, atol=1e-6)
    other = predict(model, batches(x), CPU, tta=parse_tta("crop,scale", space="prob" if space == "logit" else "logit"))
    assert np.abs(other.scores - got.scores).max() > 1e-3, "the two spaces should differ on spread logits"


def test_views_keep_the_shape_and_crop_where_they_say() -> None:
    ramp = torch.linspace(0, 1, 40).expand(2, 3, 40, 40).contiguous()  # brighter to the right
    views = {v.name: v for v in parse_tta("flip,crop,scale").views}
    assert len(views) == 16 and {"identity", "flip", "crop_top_left", "zoom_1.1+flip"} <= set(views)
    for view in views.values():
        assert view(ramp).shape == ramp.shape
    left, right = views["crop_top_left"](ramp).mean(), views["crop_top_right"](ramp).mean()
    assert left < ramp.mean() < right
    assert torch.allclose(views["flip"](ramp), torch.flip(ramp, dims=[3]))
    assert torch.allclose(views["zoom_1.1"](ramp).mean(), ramp.mean(), atol=0.02)
    with pytest.raises(ValueError, match="did you mean 'flip'"):
        parse_tta("flp")
    with pytest.raises(ValueError, match="image batches"):
        View("crop", crop=(0.9, 0.5, 0.5))(torch.zeros(2, 4, 3, 8, 8))  # a clip batch
    assert parse_tta("none", space="prob") == NO_TTA and parse_tta("hflip") == FLIP


def test_prob_space_round_trip_for_one_and_two_outputs() -> None:
    p = torch.tensor([1e-9, 0.2, 0.5, 0.9, 1.0])
    torch.testing.assert_close(torch.sigmoid(logits_from_prob(p, 1)[:, 0]), p.clamp(1e-7, 1 - 1e-7))
    torch.testing.assert_close(torch.softmax(logits_from_prob(p, 2), dim=1)[:, 1], p.clamp(1e-7, 1 - 1e-7))
    out = torch.tensor([[[0.0, 2.0]], [[0.0, -2.0]]])  # two views of one sample, 2 logits: P(fake) .88 / .12
    torch.testing.assert_close(torch.softmax(average_views(out, "prob"), 1)[0, 1], torch.tensor(0.5))
    model = tiny_model(head_gain=10.0, loss="ce")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert predict(model, batches(x), CPU, tta=parse_tta("flip", "prob")).scores.shape == (4,)


def test_mc_dropout_without_dropout_has_zero_std() -> None:
    model = tiny_model(dropout=0.0)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    mc = predict(model, batches(x), CPU, mc_dropout=5, seed=0)
    assert mc.score_std is not None and float(mc.score_std.max()) == 0.0
    np.testing.assert_allclose(mc.scores, predict(model, batches(x), CPU).scores, rtol=1e-5, atol=1e-6)


def test_mc_dropout_std_is_positive_seeded_and_keeps_batchnorm_in_eval(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model(dropout=0.5, head_gain=5.0)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    stats = bn.running_mean.clone()
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    rng_before = torch.get_rng_state()
    a = predict(model, batches(x), CPU, mc_dropout=8, seed=7)
    assert torch.equal(torch.get_rng_state(), rng_before), "MC passes must not consume the global RNG"
    b = predict(model, batches(x), CPU, mc_dropout=8, seed=7)
    c = predict(model, batches(x), CPU, mc_dropout=8, seed=8)
    assert (a.score_std > 0).all()
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.score_std, b.score_std)
    assert np.abs(a.scores - c.scores).max() > 0
    assert torch.equal(bn.running_mean, stats) and not model.training
    assert all(not m.training for m in uncertainty.dropout_modules(model))
    # the head-only shortcut (backbone once, head N times) gives the numbers of N full passes
    assert uncertainty.head_only_dropout(model)
    monkeypatch.setattr(uncertainty, "head_only_dropout", lambda m: False)
    full = predict(model, batches(x), CPU, mc_dropout=8, seed=7)
    np.testing.assert_allclose(full.scores, a.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(full.score_std, a.score_std, rtol=1e-4, atol=1e-6)
    table = predictions_table(a, [Sample(f"img{i}.png", i % 2) for i in range(6)])
    assert list(table.columns) == ["path", "label", "score", "logit", "score_std"]
    summary = uncertainty.uncertainty_summary(table["label"], table["score"], table["score_std"])
    assert summary["mc_std_mean"] > 0 and {"mc_std_correct", "mc_std_wrong", "mc_std_error_auc"} <= set(summary)


def test_predict_scores_every_batch_in_a_retained_heap_then_gives_it_back(heap_depth) -> None:
    """evaluate, crosseval and the val/test passes score through predict: each batch's activations reuse heap
    pages (dataio.loaders.retained_heap, no fresh page faults per batch); glibc's defaults are back after."""
    forwards_in_heap: list[bool] = []
    model = tiny_model()
    model.register_forward_pre_hook(lambda module, args: forwards_in_heap.append(heap_depth() > 0))
    preds = predict(model, batches(torch.randn(10, 3, 32, 32)), CPU)
    assert preds.scores.shape == (10,) and forwards_in_heap == [True] * 3 and heap_depth() == 0
