"""Optimizer with backbone/classifier LRs and no decay on norms/biases; LR schedules stepped per update.

The trainer calls `LRSchedule.step_update()` after every optimizer update (so gradient accumulation
is accounted for: `updates_per_epoch = ceil(batches / gradient_accumulation)`) and
`LRSchedule.step_epoch(metric)` after validation.
"""
from __future__ import annotations

import fnmatch
import logging
import math
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR, ReduceLROnPlateau

from core.config import OptimConfig
from core.registry import OPTIMIZERS, SCHEDULERS

log = logging.getLogger(__name__)

PART_NAMES = ("backbone", "classifier")


# ------------------------------------------------------------------------------ optimizer
def updates_per_epoch(num_batches: int, accumulation: int) -> int:
    """Optimizer updates in an epoch of `num_batches` with gradient accumulation (last window may be short)."""
    if num_batches < 1 or accumulation < 1:
        raise ValueError(f"need num_batches >= 1 and accumulation >= 1, got {num_batches}, {accumulation}")
    return math.ceil(num_batches / accumulation)


def _backbone_no_decay_ids(detector: nn.Module) -> set[int]:
    """Params a timm backbone asks to exclude from decay (`no_weight_decay()`: pos_embed, cls_token, ...)."""
    backbone = getattr(detector, "backbone", None)
    no_wd = getattr(backbone, "no_weight_decay", None)
    if not isinstance(backbone, nn.Module) or not callable(no_wd):
        return set()
    patterns = set(no_wd())
    return {
        id(p) for n, p in backbone.named_parameters()
        if any(n == pat or fnmatch.fnmatch(n, pat) for pat in patterns)
    }


def param_groups(detector: nn.Module, optim_cfg: OptimConfig) -> list[dict[str, Any]]:
    """Up to 4 groups: backbone/classifier x decay/no_decay, each with "name", "lr" and "weight_decay".

    Parameters come from `detector.parameter_groups()` and include frozen ones (they get no grad, so
    the optimizer skips them until they are unfrozen). No decay for ndim <= 1 (norms, biases).
    """
    parts: dict[str, Iterable[nn.Parameter]] = detector.parameter_groups()  # type: ignore[operator]
    unknown = set(parts) - set(PART_NAMES)
    if unknown:
        raise ValueError(f"parameter_groups() returned unknown parts {sorted(unknown)}; expected {PART_NAMES}")
    lrs = dict(zip(PART_NAMES, optim_cfg.resolved_lrs()))
    extra_no_decay = _backbone_no_decay_ids(detector)
    seen: set[int] = set()
    groups: list[dict[str, Any]] = []
    for part in PART_NAMES:
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for p in parts.get(part, []):
            if id(p) in seen:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} is listed twice in parameter_groups()")
            seen.add(id(p))
            (no_decay if p.ndim <= 1 or id(p) in extra_no_decay else decay).append(p)
        for suffix, params, wd in (("decay", decay, optim_cfg.weight_decay), ("no_decay", no_decay, 0.0)):
            if params:  # torch rejects nothing here, but empty groups only clutter logs and checkpoints
                groups.append({"name": f"{part}_{suffix}", "params": params, "lr": lrs[part], "weight_decay": wd})
    missing = [n for n, p in detector.named_parameters() if id(p) not in seen]
    if missing:
        raise ValueError(
            f"{len(missing)} parameters are in neither parameter_groups() part (e.g. {missing[:3]}); "
            "they would never train"
        )
    return groups


FUSED_DEVICES = ("cpu", "cuda")


def kernels(groups: list[dict[str, Any]]) -> dict[str, bool]:
    """torch's fused kernels (`fused=True`: one pass over every parameter a step) where every parameter is a
    float tensor on CPU or CUDA, else torch's default (foreach: several passes). Same update up to rounding;
    a step of mobilenetv2's 2.2M parameters on 2 CPU cores: AdamW 3.3 ms fused vs 10.5 ms foreach, Adam 3.9
    vs 13.3, SGD 1.9 vs 5.6. GradScaler steps fused optimizers with their own unscaling (CUDA fp16)."""
    params = [p for g in groups for p in g["params"]]
    if params and all(p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params):
        return {"fused": True}
    return {}


def load_optimizer_state(optimizer: Optimizer, state: dict) -> None:
    """`optimizer.load_state_dict(state)` that keeps this run's kernels: torch restores the saved groups'
    `fused`/`foreach` flags, so a checkpoint from another machine or version would switch them (a foreach
    group in an optimizer built fused is stepped by GradScaler as if fused, which torch refuses)."""
    chosen = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, chosen):
        group.update(flags)


@OPTIMIZERS.register("adamw")
def _adamw(groups: list[dict[str, Any]], cfg: OptimConfig) -> Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **kernels(groups))


@OPTIMIZERS.register("adam")
def _adam(groups: list[dict[str, Any]], cfg: OptimConfig) -> Optimizer:
    # L2, as in the seed recipes
    return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **kernels(groups))


@OPTIMIZERS.register("sgd")
def _sgd(groups: list[dict[str, Any]], cfg: OptimConfig) -> Optimizer:
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **kernels(groups))


def build_optimizer(detector: nn.Module, optim_cfg: OptimConfig) -> Optimizer:
    """`optim_cfg.optimizer` over `param_groups(detector, optim_cfg)`."""
    groups = param_groups(detector, optim_cfg)
    opt = OPTIMIZERS.create(optim_cfg.optimizer, groups=groups, cfg=optim_cfg)
    for g in opt.param_groups:
        n = sum(p.numel() for p in g["params"])
        log.info("optimizer=%s group=%s params=%d lr=%.3g weight_decay=%.3g fused=%s",
                 optim_cfg.optimizer, g["name"], n, g["lr"], g["weight_decay"], bool(g.get("fused")))
    return opt


# ------------------------------------------------------------------------------ schedules
class LRSchedule:
    """A per-update torch scheduler and/or a per-epoch ReduceLROnPlateau behind one interface.

    `per_update` is stepped after each optimizer update while fewer than `update_limit` steps were
    taken (None = always); `plateau` is stepped at epoch end, once warmup (`warmup_updates`) is over.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        name: str,
        per_update: Optional[LRScheduler] = None,
        plateau: Optional[ReduceLROnPlateau] = None,
        update_limit: Optional[int] = None,
        warmup_updates: int = 0,
    ) -> None:
        self.optimizer = optimizer
        self.name = name
        self.per_update = per_update
        self.plateau = plateau
        self.update_limit = update_limit
        self.warmup_updates = warmup_updates
        self.updates = 0
        self.epochs = 0

    def step_update(self) -> None:
        """Call after every optimizer update."""
        self.updates += 1
        if self.per_update is not None and (self.update_limit is None or self.updates <= self.update_limit):
            self.per_update.step()

    def step_epoch(self, metric: Optional[float] = None) -> None:
        """Call at the end of each epoch with the monitored validation metric (used by plateau)."""
        self.epochs += 1
        if self.plateau is None:
            return
        if metric is None:
            raise ValueError("scheduler 'plateau' needs the monitored metric at the end of each epoch")
        if self.updates < self.warmup_updates:
            log.debug("plateau step skipped: still in warmup update=%d/%d", self.updates, self.warmup_updates)
            return
        self.plateau.step(float(metric))

    def lrs(self) -> dict[str, float]:
        """Current LR of each param group, by group name."""
        return {str(g.get("name", i)): float(g["lr"]) for i, g in enumerate(self.optimizer.param_groups)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "updates": self.updates,
            "epochs": self.epochs,
            "lrs": [float(g["lr"]) for g in self.optimizer.param_groups],
            "per_update": None if self.per_update is None else self.per_update.state_dict(),
            "plateau": None if self.plateau is None else self.plateau.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counters, torch scheduler states and the current LRs (load the optimizer's state too)."""
        if state["name"] != self.name:
            raise ValueError(f"checkpoint has scheduler {state['name']!r} but this run uses {self.name!r}")
        if len(state["lrs"]) != len(self.optimizer.param_groups):
            raise ValueError(
                f"checkpoint scheduler has {len(state['lrs'])} param groups, optimizer has "
                f"{len(self.optimizer.param_groups)}"
            )
        self.updates, self.epochs = int(state["updates"]), int(state["epochs"])
        if self.per_update is not None and state["per_update"] is not None:
            self.per_update.load_state_dict(state["per_update"])
        if self.plateau is not None and state["plateau"] is not None:
            self.plateau.load_state_dict(state["plateau"])
        for g, lr in zip(self.optimizer.param_groups, state["lrs"]):
            g["lr"] = lr


def _warmup_factor(warmup: int) -> Callable[[int], float]:
    """LR multiplier for update u: linear (u + 1) / (warmup + 1) up to 1 at update `warmup`, then 1."""
    return lambda u: (u + 1) / (warmup + 1) if u < warmup else 1.0


def _warmup_cosine_factor(warmup: int, total: int, floor: float) -> Callable[[int], float]:
    """Linear warmup, then cosine from 1 at update `warmup` to `floor` at update `total - 1`."""
    span = max(1, total - 1 - warmup)

    def factor(u: int) -> float:
        if u < warmup:
            return (u + 1) / (warmup + 1)
        progress = min(1.0, (u - warmup) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _warmup_updates(optim_cfg: OptimConfig, per_epoch: int, total: int) -> int:
    warmup = round(optim_cfg.warmup_epochs * per_epoch)
    if warmup >= total:
        log.warning("warmup_updates=%d >= total_updates=%d: the whole run is warmup", warmup, total)
    return warmup


def _floors(optimizer: Optimizer, min_lr: float) -> list[float]:
    """min_lr per group, never above the group's own base LR."""
    return [min(min_lr, float(g["lr"])) for g in optimizer.param_groups]


@SCHEDULERS.register("cosine")
def _cosine(optimizer: Optimizer, optim_cfg: OptimConfig, per_epoch: int, num_epochs: int,
            monitor_mode: str) -> LRSchedule:
    total = per_epoch * num_epochs
    warmup = _warmup_updates(optim_cfg, per_epoch, total)
    lambdas = [
        _warmup_cosine_factor(warmup, total, floor / g["lr"])
        for floor, g in zip(_floors(optimizer, optim_cfg.min_lr), optimizer.param_groups)
    ]
    return LRSchedule(optimizer, "cosine", per_update=LambdaLR(optimizer, lambdas), warmup_updates=warmup)


@SCHEDULERS.register("none")
def _constant(optimizer: Optimizer, optim_cfg: OptimConfig, per_epoch: int, num_epochs: int,
              monitor_mode: str) -> LRSchedule:
    warmup = _warmup_updates(optim_cfg, per_epoch, per_epoch * num_epochs)
    sched = LambdaLR(optimizer, _warmup_factor(warmup)) if warmup else None
    return LRSchedule(optimizer, "none", per_update=sched, update_limit=warmup, warmup_updates=warmup)


@SCHEDULERS.register("plateau")
def _plateau(optimizer: Optimizer, optim_cfg: OptimConfig, per_epoch: int, num_epochs: int,
             monitor_mode: str) -> LRSchedule:
    warmup = _warmup_updates(optim_cfg, per_epoch, per_epoch * num_epochs)
    floors = _floors(optimizer, optim_cfg.min_lr)
    # warmup stops stepping at its last update, so it never overwrites a plateau reduction
    warm = LambdaLR(optimizer, _warmup_factor(warmup)) if warmup else None
    plateau = ReduceLROnPlateau(optimizer, mode=monitor_mode,  # type: ignore[arg-type]
                                factor=optim_cfg.plateau_factor, patience=optim_cfg.plateau_patience,
                                min_lr=floors)
    return LRSchedule(optimizer, "plateau", per_update=warm, plateau=plateau, update_limit=warmup,
                      warmup_updates=warmup)


@SCHEDULERS.register("onecycle")
def _onecycle(optimizer: Optimizer, optim_cfg: OptimConfig, per_epoch: int, num_epochs: int,
              monitor_mode: str) -> LRSchedule:
    total = per_epoch * num_epochs
    # warmup_epochs, when set, is the rising phase; otherwise torch's default 30 %
    pct = min(0.9, max(optim_cfg.warmup_epochs / num_epochs, 0.05)) if optim_cfg.warmup_epochs > 0 else 0.3
    cycle_momentum = optim_cfg.optimizer != "sgd" or optim_cfg.momentum > 0
    sched = OneCycleLR(optimizer, max_lr=[float(g["lr"]) for g in optimizer.param_groups], total_steps=total,
                       pct_start=pct, cycle_momentum=cycle_momentum)
    # step t sets the LR of update t; the LR after the last update (t = total) is never used
    return LRSchedule(optimizer, "onecycle", per_update=sched, update_limit=total - 1,
                      warmup_updates=round(pct * total))


def build_scheduler(
    optimizer: Optimizer,
    optim_cfg: OptimConfig,
    updates_per_epoch: int,
    num_epochs: int,
    monitor_mode: str = "max",
) -> LRSchedule:
    """`optim_cfg.scheduler` over `updates_per_epoch * num_epochs` optimizer updates.

    Build it right after the optimizer (it reads each group's LR as its base). `updates_per_epoch`
    is `updates_per_epoch(len(train_loader), accumulation)`, capped by train.max_steps_per_epoch.
    """
    if updates_per_epoch < 1 or num_epochs < 1:
        raise ValueError(f"need updates_per_epoch >= 1 and num_epochs >= 1, got {updates_per_epoch}, {num_epochs}")
    if monitor_mode not in ("max", "min"):
        raise ValueError(f"monitor_mode must be 'max' or 'min', got {monitor_mode!r}")
    sched = SCHEDULERS.create(optim_cfg.scheduler, optimizer=optimizer, optim_cfg=optim_cfg,
                              per_epoch=updates_per_epoch, num_epochs=num_epochs, monitor_mode=monitor_mode)
    log.info("scheduler=%s updates_per_epoch=%d total_updates=%d warmup_updates=%d",
             sched.name, updates_per_epoch, updates_per_epoch * num_epochs, sched.warmup_updates)
    return sched
