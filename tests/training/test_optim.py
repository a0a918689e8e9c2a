"""Optimizer param groups (LRs, decay, frozen params) and LR schedule curves, accumulation, resume."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest
import torch
from torch import nn

from core.config import OptimConfig
from training.optim import (
    OPTIMIZERS,
    SCHEDULERS,
    LRSchedule,
    build_optimizer,
    build_scheduler,
    load_optimizer_state,
    updates_per_epoch,
)
from core.registry import UnknownNameError

BB_LR, CLS_LR, MIN_LR = 1e-4, 1e-3, 1e-6


class TinyDetector(nn.Module):
    """Stand-in for models.Detector: a backbone, a head, and `parameter_groups()`."""

    def __init__(self, head_bias: bool = True) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.head = nn.Sequential(nn.Dropout(0.0), nn.Linear(4, 1, bias=head_bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"backbone": list(self.backbone.parameters()), "classifier": list(self.head.parameters())}


def _cfg(**kw: object) -> OptimConfig:
    base = dict(backbone_lr=BB_LR, classifier_lr=CLS_LR, min_lr=MIN_LR, weight_decay=0.05)
    base.update(kw)
    return OptimConfig(**base)


def _groups(opt: torch.optim.Optimizer) -> dict[str, dict]:
    return {g["name"]: g for g in opt.param_groups}


def _ids(params: list[nn.Parameter]) -> set[int]:
    return {id(p) for p in params}


# ------------------------------------------------------------------------------ optimizer
def test_registries_match_config_choices() -> None:
    assert {"adamw", "adam", "sgd"} <= set(OPTIMIZERS.names())
    assert {"cosine", "plateau", "onecycle", "none"} <= set(SCHEDULERS.names())
    for name in SCHEDULERS.names():  # the Config accepts exactly the registered names
        assert OptimConfig(scheduler=name).scheduler == name
    with pytest.raises(UnknownNameError, match="cosine"):
        SCHEDULERS.get("cosin")
    with pytest.raises(ValueError, match="did you mean 'cosine'"):
        OptimConfig(scheduler="cosin")


@pytest.mark.parametrize("name,cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)])
def test_groups_lrs_and_no_decay_on_norms_and_biases(name: str, cls: type) -> None:
    det = TinyDetector()
    opt = build_optimizer(det, _cfg(optimizer=name))
    assert isinstance(opt, cls)
    g = _groups(opt)
    assert set(g) == {"backbone_decay", "backbone_no_decay", "classifier_decay", "classifier_no_decay"}
    conv, bn, lin = det.backbone[0], det.backbone[1], det.head[1]
    assert _ids(g["backbone_decay"]["params"]) == {id(conv.weight)}
    assert _ids(g["backbone_no_decay"]["params"]) == {id(bn.weight), id(bn.bias)}
    assert _ids(g["classifier_decay"]["params"]) == {id(lin.weight)}
    assert _ids(g["classifier_no_decay"]["params"]) == {id(lin.bias)}
    assert g["backbone_decay"]["weight_decay"] == g["classifier_decay"]["weight_decay"] == 0.05
    assert g["backbone_no_decay"]["weight_decay"] == g["classifier_no_decay"]["weight_decay"] == 0.0
    assert g["backbone_decay"]["lr"] == g["backbone_no_decay"]["lr"] == BB_LR
    assert g["classifier_decay"]["lr"] == g["classifier_no_decay"]["lr"] == CLS_LR
    if name == "sgd":
        assert all(grp["momentum"] == 0.9 for grp in opt.param_groups)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_fused_kernels_update_as_torchs_default_and_keep_through_a_foreach_checkpoint(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU every optimizer is built with torch's fused kernels (a 3x faster step); the update equals torch's
    default (foreach) to rounding, with a GradScaler too (the CUDA fp16 path, which torch also runs on CPU); a
    checkpoint written by a foreach optimizer resumes into a fused one that stays fused and steps."""
    import copy

    import training.optim as optim_module

    torch.manual_seed(0)
    det = TinyDetector()
    ref, start = copy.deepcopy(det), copy.deepcopy(det)
    opt = build_optimizer(det, _cfg(optimizer=name))
    assert all(g["fused"] for g in opt.param_groups)
    with monkeypatch.context() as m:
        m.setattr(optim_module, "kernels", lambda groups: {})
        opt_ref = build_optimizer(ref, _cfg(optimizer=name))
    assert not any(g["fused"] for g in opt_ref.param_groups)
    x = torch.randn(6, 3, 8, 8)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2)]
    for step in range(4):
        for model, o, scaler in ((det, opt, scalers[0]), (ref, opt_ref, scalers[1])):
            loss = model(x * (step + 1)).square().mean()
            if step % 2:  # plain steps and scaled ones alternate
                scaler.scale(loss).backward()
                scaler.step(o)
                scaler.update()
            else:
                loss.backward()
                o.step()
            o.zero_grad(set_to_none=True)
    for p, q in zip(det.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert all(not torch.equal(p, q) for p, q in zip(det.parameters(), start.parameters()))  # all trained

    load_optimizer_state(opt, opt_ref.state_dict())  # e.g. a last.pt from before fused kernels
    assert all(g["fused"] and not g.get("foreach") for g in opt.param_groups)
    det(x).square().mean().mul(scalers[0].get_scale()).backward()
    scalers[0].step(opt)
    assert all(torch.isfinite(p).all() for p in det.parameters())


def test_single_lr_applies_to_both_parts_and_empty_groups_are_dropped() -> None:
    opt = build_optimizer(TinyDetector(head_bias=False), OptimConfig(lr=3e-4))
    g = _groups(opt)
    assert set(g) == {"backbone_decay", "backbone_no_decay", "classifier_decay"}  # no classifier bias/norm
    assert {grp["lr"] for grp in opt.param_groups} == {3e-4}


def test_frozen_params_are_included_and_train_once_unfrozen() -> None:
    torch.manual_seed(0)
    det = TinyDetector()
    for p in det.backbone.parameters():
        p.requires_grad_(False)
    opt = build_optimizer(det, _cfg(weight_decay=0.5))
    in_opt = {id(p) for grp in opt.param_groups for p in grp["params"]}
    assert in_opt == {id(p) for p in det.parameters()}

    x, y = torch.randn(4, 3, 8, 8), torch.tensor([[1.0], [0.0], [1.0], [0.0]])

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.binary_cross_entropy_with_logits(det(x), y).backward()
        opt.step()

    bb0 = [p.detach().clone() for p in det.backbone.parameters()]
    head0 = [p.detach().clone() for p in det.head.parameters()]
    step()
    assert all(torch.equal(a, b) for a, b in zip(bb0, det.backbone.parameters()))  # untouched, even by decay
    assert not all(torch.equal(a, b) for a, b in zip(head0, det.head.parameters()))
    for p in det.backbone.parameters():  # progressive unfreezing: same optimizer, no rebuild
        p.requires_grad_(True)
    step()
    assert not torch.equal(bb0[0], det.backbone[0].weight)


def test_backbone_no_weight_decay_names_are_respected() -> None:
    det = TinyDetector()
    det.backbone.pos_embed = nn.Parameter(torch.zeros(1, 4, 4))  # 3-D, but timm says: no decay
    det.backbone.no_weight_decay = lambda: {"pos_embed"}  # type: ignore[method-assign]
    g = _groups(build_optimizer(det, _cfg()))
    assert id(det.backbone.pos_embed) in _ids(g["backbone_no_decay"]["params"])


def test_params_outside_or_twice_in_parameter_groups_raise() -> None:
    det = TinyDetector()
    det.parameter_groups = lambda: {"backbone": list(det.backbone.parameters()), "classifier": []}  # type: ignore
    with pytest.raises(ValueError, match="neither"):
        build_optimizer(det, _cfg())
    det.parameter_groups = lambda: {"backbone": list(det.parameters()), "classifier": list(det.head.parameters())}  # type: ignore
    with pytest.raises(ValueError, match="twice"):
        build_optimizer(det, _cfg())


def test_real_detector_groups() -> None:
    factory = pytest.importorskip("models.factory")
    from core.config import ModelConfig

    det = factory.create_detector(ModelConfig(model_type="test_efficientnet", pretrained=False), num_outputs=1)
    opt = build_optimizer(det, _cfg())
    in_opt = [p for grp in opt.param_groups for p in grp["params"]]
    assert len(in_opt) == len({id(p) for p in in_opt}) == len(list(det.parameters()))
    g = _groups(opt)
    assert {n for n in g if n.startswith("classifier")} and {n for n in g if n.startswith("backbone")}
    decayed = [p for n, grp in g.items() if not n.endswith("no_decay") for p in grp["params"]]
    assert decayed and all(p.ndim > 1 for p in decayed)
    assert {grp["lr"] for n, grp in g.items() if n.startswith("backbone")} == {BB_LR}


# ------------------------------------------------------------------------------ schedules
def _make(scheduler: str, per_epoch: int, epochs: int, monitor_mode: str = "max",
          **kw: object) -> tuple[torch.optim.Optimizer, LRSchedule]:
    torch.manual_seed(0)
    cfg = _cfg(scheduler=scheduler, **kw)
    opt = build_optimizer(TinyDetector(), cfg)
    return opt, build_scheduler(opt, cfg, per_epoch, epochs, monitor_mode)


def _run_updates(opt: torch.optim.Optimizer, sched: LRSchedule, n: int) -> list[list[float]]:
    """LR of each group in effect for each of `n` updates."""
    out = []
    for _ in range(n):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()  # no grads: a no-op that keeps torch's step-order check quiet
        sched.step_update()
    return out


def _cls(curve: list[list[float]], opt: torch.optim.Optimizer) -> list[float]:
    i = [g["name"] for g in opt.param_groups].index("classifier_decay")
    return [row[i] for row in curve]


def test_updates_per_epoch() -> None:
    assert [updates_per_epoch(b, 4) for b in (1, 4, 5, 8, 10)] == [1, 1, 2, 2, 3]
    assert updates_per_epoch(7, 1) == 7
    with pytest.raises(ValueError):
        updates_per_epoch(0, 4)


def test_cosine_warmup_peak_and_floor() -> None:
    opt, sched = _make("cosine", per_epoch=10, epochs=3, warmup_epochs=0.5)  # 5 warmup updates of 30
    curve = _run_updates(opt, sched, 30)
    cls = _cls(curve, opt)
    assert sched.warmup_updates == 5
    assert all(a < b for a, b in zip(cls[:6], cls[1:6]))  # strictly rising warmup
    assert cls[0] == pytest.approx(CLS_LR / 6)
    assert cls[5] == pytest.approx(CLS_LR)  # base LR at the end of warmup
    assert all(a >= b for a, b in zip(cls[5:], cls[6:]))  # then non-increasing
    assert cls[-1] == pytest.approx(MIN_LR)  # min_lr at the last update
    by_name = dict(zip([g["name"] for g in opt.param_groups], zip(*curve)))
    assert by_name["backbone_decay"][5] == pytest.approx(BB_LR)
    assert by_name["backbone_decay"][-1] == pytest.approx(MIN_LR)
    assert by_name["backbone_no_decay"] == by_name["backbone_decay"]


def test_cosine_without_warmup_starts_at_base() -> None:
    opt, sched = _make("cosine", per_epoch=4, epochs=2)
    cls = _cls(_run_updates(opt, sched, 8), opt)
    assert cls[0] == pytest.approx(CLS_LR) and cls[-1] == pytest.approx(MIN_LR)
    sched.step_update()  # an extra update past the plan stays at the floor
    assert sched.lrs()["classifier_decay"] == pytest.approx(MIN_LR)


def test_accumulation_gives_ceil_updates_per_epoch() -> None:
    batches, accum, epochs = 10, 4, 3
    per_epoch = updates_per_epoch(batches, accum)
    assert per_epoch == 3
    opt, sched = _make("cosine", per_epoch=per_epoch, epochs=epochs, warmup_epochs=1.0)
    lrs_by_epoch: list[list[float]] = []
    for _ in range(epochs):  # the trainer's loop: update every `accum` batches and at the epoch's end
        lrs_by_epoch.append([])
        for i in range(batches):
            if (i + 1) % accum == 0 or i == batches - 1:
                lrs_by_epoch[-1].append(sched.lrs()["classifier_decay"])
                opt.step()
                sched.step_update()
        sched.step_epoch(0.5)
    assert [len(e) for e in lrs_by_epoch] == [3, 3, 3]
    flat = [lr for e in lrs_by_epoch for lr in e]
    assert sched.updates == 9 and sched.warmup_updates == 3
    assert flat[3] == pytest.approx(CLS_LR) and flat[-1] == pytest.approx(MIN_LR)


def test_onecycle_peaks_and_ends_low() -> None:
    opt, sched = _make("onecycle", per_epoch=10, epochs=4)
    cls = _cls(_run_updates(opt, sched, 40), opt)
    peak = max(range(40), key=cls.__getitem__)
    assert cls[peak] == pytest.approx(CLS_LR)
    assert 8 <= peak <= 14  # ~30 % of 40 updates
    assert cls[0] == pytest.approx(CLS_LR / 25)
    assert cls[-1] < CLS_LR / 1000 and cls[-1] == min(cls)
    sched.step_update()  # one past the plan must not raise
    assert sched.lrs()["classifier_decay"] == pytest.approx(cls[-1])


@pytest.mark.parametrize("mode", ["max", "min"])
def test_plateau_reduces_after_patience_bad_epochs(mode: str) -> None:
    opt, sched = _make("plateau", per_epoch=5, epochs=20, monitor_mode=mode, plateau_patience=2, plateau_factor=0.5)
    good, bad = (0.9, 0.5) if mode == "max" else (0.1, 0.5)
    lrs = []
    for metric in [bad, good, bad, bad, bad, bad]:
        _run_updates(opt, sched, 5)
        sched.step_epoch(metric)
        lrs.append(sched.lrs()["classifier_decay"])
    # best at epoch 2; epochs 3-4 are within patience 2; epoch 5 is the 3rd bad one -> halve
    assert lrs[:4] == [CLS_LR] * 4
    assert lrs[4] == pytest.approx(CLS_LR / 2)
    assert sched.lrs()["backbone_decay"] == pytest.approx(BB_LR / 2)


def test_plateau_mode_decides_what_improvement_is() -> None:
    falling = [1.0, 0.9, 0.8, 0.7, 0.6]
    final = {}
    for mode in ("max", "min"):
        opt, sched = _make("plateau", per_epoch=2, epochs=10, monitor_mode=mode, plateau_patience=1)
        for m in falling:
            _run_updates(opt, sched, 2)
            sched.step_epoch(m)
        final[mode] = sched.lrs()["classifier_decay"]
    assert final["min"] == CLS_LR and final["max"] < CLS_LR


def test_plateau_floor_warmup_and_metric_required() -> None:
    opt, sched = _make("plateau", per_epoch=4, epochs=30, plateau_patience=0, plateau_factor=0.1,
                       warmup_epochs=2.0)
    cls = _cls(_run_updates(opt, sched, 8), opt)
    sched.step_epoch(0.9)  # the epoch that ends warmup is fed to the plateau scheduler (best = 0.9)
    assert cls[0] == pytest.approx(CLS_LR / 9) and sched.lrs()["classifier_decay"] == pytest.approx(CLS_LR)
    for _ in range(10):
        _run_updates(opt, sched, 4)
        sched.step_epoch(0.1)
    assert sched.lrs()["classifier_decay"] == pytest.approx(MIN_LR)  # never below min_lr
    with pytest.raises(ValueError, match="metric"):
        sched.step_epoch(None)


def test_plateau_ignores_epochs_inside_warmup() -> None:
    opt, sched = _make("plateau", per_epoch=2, epochs=10, plateau_patience=0, warmup_epochs=3.0)
    for m in (0.9, 0.1, 0.1):  # bad epochs, but all inside the 6 warmup updates
        _run_updates(opt, sched, 2)
        sched.step_epoch(m)
    assert sched.lrs()["classifier_decay"] == pytest.approx(CLS_LR)


@pytest.mark.parametrize("warmup", [0.0, 1.0])
def test_none_is_constant_after_warmup(warmup: float) -> None:
    opt, sched = _make("none", per_epoch=3, epochs=3, warmup_epochs=warmup)
    cls = _cls(_run_updates(opt, sched, 9), opt)
    w = int(warmup * 3)
    assert cls[w:] == [CLS_LR] * (9 - w)
    assert all(lr < CLS_LR for lr in cls[:w])


def _plan(scheduler: str) -> list[Optional[float]]:
    """Per-epoch metrics fed to step_epoch (None: scheduler ignores it)."""
    return [0.5, 0.6, 0.6, 0.6, 0.6, 0.4] if scheduler == "plateau" else [None] * 6


@pytest.mark.parametrize("scheduler", ["cosine", "onecycle", "plateau", "none"])
def test_state_dict_round_trip_resumes_identical_lrs(scheduler: str, tmp_path: Path) -> None:
    kw = dict(warmup_epochs=0.5, plateau_patience=1)
    per_epoch, epochs = 4, 6

    def run_epochs(opt: torch.optim.Optimizer, sched: LRSchedule, metrics: list) -> list[list[float]]:
        out = []
        for m in metrics:
            out += _run_updates(opt, sched, per_epoch)
            sched.step_epoch(m)
        out.append([g["lr"] for g in opt.param_groups])
        return out

    opt, sched = _make(scheduler, per_epoch, epochs, **kw)
    full = run_epochs(opt, sched, _plan(scheduler))

    opt, sched = _make(scheduler, per_epoch, epochs, **kw)
    first = run_epochs(opt, sched, _plan(scheduler)[:3])
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp_path / "last.pt")
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    opt2, sched2 = _make(scheduler, per_epoch, epochs, **kw)  # fresh objects, as on --resume
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    assert sched2.updates == 12 and sched2.epochs == 3
    rest = run_epochs(opt2, sched2, _plan(scheduler)[3:])
    assert first[:-1] + rest == full  # exact, not approximate
    if scheduler == "plateau":
        assert full[-1][0] < full[0][0]  # the plan really reduced the LR


def test_load_state_dict_rejects_another_scheduler() -> None:
    _, cosine = _make("cosine", 4, 2)
    _, plateau = _make("plateau", 4, 2)
    with pytest.raises(ValueError, match="cosine"):
        plateau.load_state_dict(cosine.state_dict())


def test_build_scheduler_rejects_bad_sizes() -> None:
    opt = build_optimizer(TinyDetector(), _cfg())
    with pytest.raises(ValueError):
        build_scheduler(opt, _cfg(), 0, 3)
    with pytest.raises(ValueError, match="monitor_mode"):
        build_scheduler(opt, _cfg(), 2, 3, monitor_mode="up")
