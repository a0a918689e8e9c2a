"""`train(cfg)`: the single way a run happens (CLI, sweeps, tests and benchmarks all call it).

Order as in timm's train.py: device -> data -> model -> AMP -> EMA -> optimizer -> scheduler -> loop.
Every epoch: train, validate, step the plateau scheduler, log, checkpoint (atomic), early-stop check.
At the end: best weights -> test predictions -> evaluation report -> MLflow artifacts and model.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
import random
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from core.checkpoints import atomic_save, load_checkpoint, model_state
from core.config import Config, save_config
from core.errors import ConfigError
from core.device import autocast_factory, resolve_device, to_device
from dataio.pipeline import data_config, make_loaders, scan_data
from evaluation.inference import predict, predictions_table
from evaluation.scoring import split_metrics
from models.build import build_model
from training.run_io import TrainResult, epoch_curves, finish_run, index_table, start_tags

if TYPE_CHECKING:
    from core.amp import AmpChoice

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class StopRequest:
    """Which stop signal arrived, if any. Inside the epoch loop (`defer`) the SIGTERM handler only records it and
    the loop raises KeyboardInterrupt between batches and epochs: raised at an arbitrary point, Python drops it
    inside an at-fork hook (the train loader forks its workers every epoch) and torch prints a traceback for a
    half-built loader iterator. Elsewhere the handler raises at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.defer = False

    def check(self) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"signal {self.signum}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[StopRequest]:
    """A SIGTERM (kill, scheduler pre-emption) unwinds like Ctrl-C so the run closes cleanly."""
    stop = StopRequest()

    def _raise(signum, frame):  # noqa: ARG001
        stop.signum = signum
        if not stop.defer:
            raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, _raise)
    except ValueError:  # not in the main thread (e.g. a sweep worker thread)
        yield stop
        return
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


class Trainer:
    """Holds the objects one run needs; `fit()` runs the loop. Built by `train(cfg)`."""

    def __init__(self, cfg: Config, index, run_dir: Path | None, resumed_amp: str | None = None) -> None:
        from dataio.data import pos_weight
        from training.losses import build_mixup, create_loss
        from training.optim import build_optimizer, build_scheduler, updates_per_epoch

        self.cfg, self.index, self.run_dir = cfg, index, run_dir
        t = cfg.train
        seed_everything(t.seed)
        torch.backends.cudnn.benchmark = not t.deterministic  # autotuned CUDA kernels are not bit-reproducible
        torch.backends.cudnn.deterministic = t.deterministic
        self.device = resolve_device(t.device)
        self.model = build_model(cfg)
        if t.checkpoint_in:
            state = load_checkpoint(t.checkpoint_in)["model"]
            self.model.load_state_dict(state)
            log.info("event=checkpoint_in path=%s", t.checkpoint_in)
        self.channels_last = cfg.model.channels_last if cfg.model.channels_last is not None else self.model.is_convnet
        self.model.to(self.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        self.needs_labels = bool(getattr(self.model.head, "needs_labels", False))
        self.amp_choice = self.choose_amp(resumed_amp)
        log.info("event=amp_choice amp=%s reason=%r", self.amp_choice.label, self.amp_choice.reason)
        self.amp = autocast_factory(self.device, self.amp_choice.enabled)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_choice.enabled and self.device.type == "cuda")
        self.ema = None
        if t.use_ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=t.ema_decay)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        dc = self.model.data_config
        self.loaders = make_loaders(index, cfg, dc["mean"], dc["std"], device_type=self.device.type)
        from training.extra_val import build_extra_sets

        self.extra_sets = build_extra_sets(cfg, dc["mean"], dc["std"], self.device.type)
        if "val" in self.loaders and cfg.data.eval_cache_mb and not cfg.model.is_video:
            from dataio.loaders import CachedEvalLoader  # image eval transforms are deterministic: decode once

            self.loaders["val"] = CachedEvalLoader(self.loaders["val"], cfg.data.eval_cache_mb * 2**20)
        self.batches_per_epoch = len(self.loaders["train"])
        if t.max_steps_per_epoch:
            self.batches_per_epoch = min(self.batches_per_epoch, t.max_steps_per_epoch * cfg.optim.gradient_accumulation)
        self.updates_per_epoch = updates_per_epoch(self.batches_per_epoch, cfg.optim.gradient_accumulation)
        self.schedule = build_scheduler(self.optimizer, cfg.optim, self.updates_per_epoch, t.num_epochs, t.monitor_mode)
        pw = pos_weight(index) if cfg.data.balance == "pos_weight" else None
        self.loss_fn = create_loss(cfg.loss, pos_weight=pw).to(self.device)
        self.mixup = build_mixup(cfg.aug) if cfg.aug.use_mixup else None
        self.start_epoch, self.updates = 0, 0
        self.best_metric = -math.inf if t.monitor_mode == "max" else math.inf
        self.best_epoch, self.bad_epochs = -1, 0
        self.history: list[dict[str, float]] = []
        self.best_val_table: pd.DataFrame | None = None
        self.best_val_metrics: dict[str, float] = {}
        self.best_state: dict | None = None  # the best checkpoint, in memory when the run is not resumable
        self.feature_cache = None  # training.feature_cache.FeatureCache, built when fit() starts
        self.stop = StopRequest()  # train() hands in the one its SIGTERM handler sets

    def choose_amp(self, resumed: str | None) -> "AmpChoice":
        """train.use_amp resolved for this device (core.amp); a resumed run keeps the precision it began with."""
        from core import amp

        if resumed is not None:
            dtype = {"off": "float32", "bf16": "bfloat16", "fp16": "float16"}[resumed]
            return amp.AmpChoice(resumed != "off", dtype, f"resumed run: {resumed} as when it started")
        t, d, m = self.cfg.train, self.cfg.data, self.cfg.model

        def forward_on(x: torch.Tensor | tuple, n: int) -> Callable[[], torch.Tensor]:
            y = torch.zeros(n, dtype=torch.long, device=self.device)
            return (lambda: self.model(x, labels=y)) if self.needs_labels else (lambda: self.model(x))

        if t.use_amp != "auto" or self.device.type != "cpu" or m.is_video:
            choice = amp.choose(t.use_amp, self.device)
        else:
            from training.freezing import apply_freeze

            apply_freeze(self.model, t.freeze_strategy, 0, t.unfreeze_epoch)  # time what epoch 0 trains
            name = f"{m.model_type}:{m.model_name or ''}:{m.head}:{m.attention_type if m.use_attention else 'noatt'}"
            key = amp.probe_key(name, d.image_size, d.batch_size, self.channels_last, t.freeze_strategy)
            x = torch.randn(d.batch_size, 3, d.image_size, d.image_size, generator=torch.Generator().manual_seed(0))
            forward = forward_on(to_device(x, self.device, self.channels_last), d.batch_size)

            def probe() -> "amp.ProbeResult":
                from core.tracking import wait_background

                wait_background(self.cfg.tracking)  # MLflow's warm-up (a new store's schema) would skew the timing
                return amp.time_training_steps(self.model, forward)

            choice = amp.choose("auto", self.device, probe, key)

        def one_sample_forward() -> torch.Tensor:  # the map-size check's input, built only when the check runs
            if m.is_video:  # one clip of two frames: every layer's map size, as training sees it
                x: torch.Tensor | tuple = tuple(v.to(self.device) for v in self.model.example_input(1, 2))
            else:
                x = to_device(torch.zeros(1, 3, d.image_size, d.image_size), self.device, self.channels_last)
            return forward_on(x, 1)()

        return amp.cpu_bf16_safe(choice, self.device, self.model, one_sample_forward)

    # ------------------------------------------------------------------ state
    @property
    def eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def state(self, epoch: int, run_id: str | None) -> dict:
        return {
            "format_version": 1, "model": model_state(self.model), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(), "scaler": self.scaler.state_dict(),
            "ema": model_state(self.ema.module) if self.ema is not None else None,
            "epoch": epoch, "updates": self.updates, "best_metric": self.best_metric, "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs, "history": self.history, "config": self.cfg.model_dump(mode="json"),
            "run_id": run_id, "amp": self.amp_choice.label,
        }

    def load_state(self, ckpt: dict) -> None:
        from training.optim import load_optimizer_state

        self.model.load_state_dict(ckpt["model"])
        load_optimizer_state(self.optimizer, ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.module.load_state_dict(ckpt["ema"])
        self.start_epoch, self.updates = ckpt["epoch"] + 1, ckpt["updates"]
        self.best_metric, self.best_epoch, self.bad_epochs = ckpt["best_metric"], ckpt["best_epoch"], ckpt["bad_epochs"]
        self.history = list(ckpt["history"])
        best = self.run_dir / "predictions" / "val_best.parquet"
        if best.exists():
            self.best_val_table = pd.read_parquet(best)
        if self.history and self.best_epoch >= 0:
            self.best_val_metrics = {k: v for k, v in self.history[self.best_epoch].items() if k.startswith("val_")}

    # ------------------------------------------------------------------ epoch
    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        from training.freezing import set_train_mode
        from dataio.loaders import loader_iter, reseed_epoch, trim_heap
        from training.losses import mix_batch

        cfg, accum = self.cfg, self.cfg.optim.gradient_accumulation
        # Every random stream restarts from (seed, epoch): shuffling, augmentation, mixup and dropout are the
        # same whether or not the run was stopped and resumed before this epoch.
        epoch_seed = cfg.train.seed * 1000 + epoch
        seed_everything(epoch_seed)
        cached = self.feature_cache is not None
        loader = self.feature_cache.batches["train"] if cached else self.loaders["train"]
        net = self.model.forward_cached if cached else self.model  # cached: frozen backbone features in, logits out
        reseed_epoch(loader, epoch_seed)
        if getattr(loader, "num_workers", 0):  # workers are forked below: give freed memory back first
            trim_heap()
        self.model.train()
        set_train_mode(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, seen, t0 = torch.zeros((), device=self.device), 0, time.perf_counter()
        n = self.batches_per_epoch
        batches = itertools.islice(loader_iter(loader), n)  # the workers are forked here
        bar = tqdm(batches, total=n, desc=f"epoch {epoch + 1}/{cfg.train.num_epochs}", leave=False, disable=None,
                   mininterval=0.5)
        shown = -math.inf  # when the bar's loss was last refreshed (reading it syncs the device)
        for i, (images, labels, _) in enumerate(bar):
            self.stop.check()
            if len(images) == 0:
                continue
            x, y = to_device(images, self.device, self.channels_last), labels.to(self.device)
            x, y = mix_batch(self.mixup, x, y)
            with self.amp():
                logits = net(x, labels=y.long()) if self.needs_labels else net(x)
                loss = self.loss_fn(logits.float(), y)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"loss is {loss.item()} at epoch {epoch} batch {i}; lower the LR or turn AMP off")
            self.scaler.scale(loss / accum).backward()
            if (i + 1) % accum == 0 or i + 1 == n:
                self._optimizer_update()
            loss_sum += loss.detach() * len(x)
            seen += len(x)
            if not bar.disable and time.monotonic() - shown >= bar.mininterval:  # the running mean, live
                bar.set_postfix(loss=f"{float(loss_sum) / max(seen, 1):.4f}", refresh=False)
                shown = time.monotonic()
        seconds = time.perf_counter() - t0
        return {"train_loss": float(loss_sum) / max(seen, 1), "epoch_seconds": seconds,
                "images_per_s": seen / max(seconds, 1e-9)}

    def _optimizer_update(self) -> None:
        clip = self.cfg.optim.gradient_clip
        if clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None], clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step_update()
        self.updates += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.updates)

    def validate(self, split: str = "val") -> tuple[dict[str, float], pd.DataFrame]:
        model, loader = self.eval_model, self.loaders[split]
        if self.feature_cache is not None and split in self.feature_cache.batches:
            from training.feature_cache import CachedForward

            model, loader = CachedForward(model), self.feature_cache.batches[split]
        preds = predict(model, loader, self.device, channels_last=self.channels_last,
                        amp=self.amp, loss_fn=self.loss_fn, tta=self.cfg.train.use_tta, desc=split)
        samples = getattr(self.index, split)
        return split_metrics(split, preds), predictions_table(preds, samples)

    def improved(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        return value > self.best_metric if self.cfg.train.monitor_mode == "max" else value < self.best_metric

    def start_feature_cache(self, tracker) -> float | None:
        """Build the frozen-feature cache when the run allows one (training.feature_cache); its seconds."""
        from training.feature_cache import FeatureCache, cache_blocker
        from training.freezing import set_train_mode

        self.model.train()
        set_train_mode(self.model)
        reason = cache_blocker(self.cfg, self.model, self.loaders["train"].dataset)
        epochs_left = self.cfg.train.num_epochs - self.start_epoch
        if reason is None and epochs_left * self.batches_per_epoch < len(self.loaders["train"]):
            reason = "the run draws fewer batches than one pass over the train split (train.max_steps_per_epoch)"
        if reason is not None:
            if self.cfg.train.freeze_strategy == "frozen":
                log.info("event=feature_cache_off reason=%s", reason)
                tracker.set_tags({"feature_cache": f"off: {reason}"})
            return None
        t0 = time.perf_counter()
        splits = ("train",) + (("val",) if "val" in self.loaders and not self.cfg.train.use_tta else ())
        self.feature_cache = FeatureCache.build(self, splits)
        tracker.set_tags({"feature_cache": self.feature_cache.describe()})
        return time.perf_counter() - t0

    def keep_best(self, epoch: int, run_id: str | None) -> None:
        """Keep the new best weights. A resumable run (train.save_last) writes best.pt and the val predictions
        now: a resumed run reloads them. Otherwise (sweep trials: a killed trial is retried, not resumed) they
        stay in memory as a CPU copy and finish_run writes best.pt once, instead of a write + fsync per
        improving epoch and a reload at the end."""
        best = {"model": model_state(self.eval_model), "config": self.cfg.model_dump(mode="json"), "epoch": epoch,
                "best_metric": self.best_metric, "run_id": run_id}
        if self.cfg.train.save_last:
            self.best_val_table.to_parquet(self.run_dir / "predictions" / "val_best.parquet")
            atomic_save(best, self.run_dir / "best.pt")
        else:
            self.best_state = best

    # ------------------------------------------------------------------ loop
    def fit(self, tracker, epoch_callback: Callable[[int, dict[str, float]], None] | None) -> str:
        """Run epochs from start_epoch; returns COMPLETE or EARLY_STOPPED."""
        self.stop.defer = True
        try:
            status = self._fit(tracker, epoch_callback)
            self.stop.check()  # a stop during the last epoch's validation: still KILLED, resumable
            return status
        finally:
            self.stop.defer = False
            if self.feature_cache is not None:
                self.feature_cache.release()
                self.feature_cache = None

    def _fit(self, tracker, epoch_callback: Callable[[int, dict[str, float]], None] | None) -> str:
        from training.extra_val import add_means, score_extra
        from training.freezing import apply_freeze

        t, pred_dir = self.cfg.train, self.run_dir / "predictions"
        pred_dir.mkdir(parents=True, exist_ok=True)
        for epoch in range(self.start_epoch, t.num_epochs):
            self.stop.check()
            summary = apply_freeze(self.model, t.freeze_strategy, epoch, t.unfreeze_epoch)
            if not self.history or self.history[-1].get("trainable_params") != summary.trainable:
                log.info("event=parameters epoch=%d total=%d trainable=%d frozen=%d strategy=%s",
                         epoch, summary.total, summary.trainable, summary.frozen, t.freeze_strategy)
            cache_seconds = self.start_feature_cache(tracker) if epoch == self.start_epoch else None
            row: dict[str, float] = {"epoch": epoch, **self.train_one_epoch(epoch)}
            if cache_seconds is not None:
                row["feature_cache_seconds"] = cache_seconds
            val_metrics, val_table = self.validate("val")
            extra_metrics, _ = score_extra(self, "val")
            val_metrics.update(extra_metrics)
            add_means(val_metrics, [e.name for e in self.extra_sets])
            row.update(val_metrics)
            row["trainable_params"], row["frozen_params"] = summary.trainable, summary.frozen
            lrs = self.schedule.lrs()
            row.update({f"lr_{name}": lr for name, lr in lrs.items()})
            row["lr"] = lrs.get("classifier_decay", next(iter(lrs.values())))  # the head always trains
            monitored = row.get(t.monitor, math.nan)
            self.schedule.step_epoch(monitored)
            if self.improved(monitored):
                self.best_metric, self.best_epoch, self.bad_epochs = monitored, epoch, 0
                self.best_val_table, self.best_val_metrics = val_table, val_metrics
                self.keep_best(epoch, tracker.run_id)
            else:
                self.bad_epochs += 1
            self.history.append(row)
            pd.DataFrame(self.history).to_csv(self.run_dir / "training_log.csv", index=False)
            # the short set of curves (the full row is training_log.csv); before last.pt: a resumed run never
            # lacks an epoch's curve
            tracker.log_metrics(epoch_curves(row, t.monitor), step=epoch)
            if t.save_last:  # sweeps skip it: a killed trial is retried by Optuna, not resumed
                atomic_save(self.state(epoch, tracker.run_id), self.run_dir / "last.pt")
            log.info("epoch=%d train_loss=%.4f val_loss=%.4f %s=%.4f lr=%.2e images_per_s=%.1f trainable=%d",
                     epoch, row["train_loss"], row.get("val_loss", math.nan), t.monitor, monitored, row["lr"],
                     row["images_per_s"], summary.trainable)
            if epoch_callback is not None:
                epoch_callback(epoch, dict(row))
            if t.early_stopping_patience and self.bad_epochs >= t.early_stopping_patience:
                log.info("event=early_stop epoch=%d best_epoch=%d", epoch, self.best_epoch)
                return "EARLY_STOPPED"
        return "COMPLETE"


def train(cfg: Config, *, index=None, epoch_callback: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train one model as configured; everything lands in MLflow."""
    if cfg.train.eval_only:
        raise ConfigError("train.eval_only evaluates a checkpoint: use the training CLI's --eval_only or "
                          "evaluation.evaluate.evaluate_config(cfg)")
    resume = load_checkpoint(cfg.train.resume) if cfg.train.resume else None
    if resume is not None:
        resumed_cfg = Config.model_validate(resume["config"])
        cfg = resumed_cfg.with_overrides({"train.resume": cfg.train.resume}, "--resume")
    from core.tracking import RunTracker, warm_up
    from dataio.loaders import retained_heap

    # MLflow's import and store open run in a thread while the data is scanned and the model and loaders are
    # built (library callers; the training CLI's helper process has done them already, core.mlflow_backend). timm is imported first: both imports are Python, so run side by side they only take turns at the
    # GIL, and the switching made runs ~0.6 s slower (bench/whole_run.py, paired runs); after it, the thread
    # overlaps the scan's file I/O and the model's weight init instead.
    import timm  # noqa: F401

    warm_up(cfg.tracking)
    data_cfg = data_config(cfg)
    if index is None:
        index = scan_data(cfg)
    run_dir: Path | None = Path(resume["path"]).parent if resume else None
    with sigterm_as_interrupt() as stop:
        # Built before the MLflow run exists: bad weights or data fail without leaving an empty FAILED run.
        trainer = Trainer(cfg, index, run_dir, resumed_amp=(resume or {}).get("amp"))
        trainer.stop = stop
        with RunTracker(cfg, resume_run_id=(resume or {}).get("run_id")) as tracker:
            if run_dir is None:
                run_dir = Path(cfg.train.output_dir) / (tracker.run_id or time.strftime("run-%Y%m%d-%H%M%S"))
            run_dir.mkdir(parents=True, exist_ok=True)
            trainer.run_dir = run_dir
            try:
                if resume is not None:
                    trainer.load_state(resume)
                    log.info("event=resume epoch=%d run_id=%s", trainer.start_epoch, tracker.run_id)
                save_config(cfg, run_dir / "config.yaml")
                if resume is None:
                    tracker.log_start({**start_tags(cfg, index), "amp_reason": trainer.amp_choice.reason},
                                      trainer_params(trainer))
                    tracker.log_dataset(index_table(index), source=str(data_cfg.data_dir),
                                        name=Path(str(data_cfg.data_dir)).name or "data", digest=index.digest)
                with retained_heap():  # no page faults for each step's activations (glibc), test pass included
                    status = trainer.fit(tracker, epoch_callback)
                    return finish_run(trainer, tracker, status)
            except BaseException as e:
                e.output_dir = run_dir  # type: ignore[attr-defined]  # the sweep deletes pruned trials' folders
                raise


def trainer_params(trainer: Trainer) -> dict[str, object]:
    """Run facts logged as params next to the flattened config."""
    return {"params_total": sum(p.numel() for p in trainer.model.parameters()), "device": trainer.device.type,
            "channels_last": trainer.channels_last, "amp": trainer.amp_choice.label, "updates_per_epoch": trainer.updates_per_epoch,
            "effective_batch_size": trainer.cfg.data.batch_size * trainer.cfg.optim.gradient_accumulation}
