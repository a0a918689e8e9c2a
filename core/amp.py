"""Which mixed precision a run trains with: `train.use_amp` true | false | auto, resolved once per run.

auto: fp16 autocast + GradScaler on CUDA; on CPU bf16 autocast only where a short probe (timed
forward+backward steps of the actual model, input size, batch and thread count, fp32 vs bf16) shows
bf16 faster, else fp32. Probe results are cached in a JSON file (`amp_probe.json` under
$DFSWEEP_CACHE_DIR, default ~/.cache/dfsweep) keyed by everything the timing depends on, so each
combination is probed once per machine. bf16 convolution backward is slower than fp32 on some
CPUs and sizes (e.g. small images on this AMX CPU), hence the probe instead of a rule.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import torch

log = logging.getLogger(__name__)

AmpSetting = Union[bool, str]  # True | False | "auto"
MIN_SPEEDUP = 1.05  # bf16 must be at least this much faster than fp32 to be chosen (probe noise)
MAX_SPREAD = 1.3  # a probe whose repeated steps differ more than this (a busy machine) is used once, not cached


@dataclass(frozen=True)
class AmpChoice:
    """The resolved precision: `enabled` feeds autocast_factory / GradScaler; `reason` is logged."""

    enabled: bool
    dtype: str  # "float32" | "bfloat16" | "float16"
    reason: str

    @property
    def label(self) -> str:
        return {"float32": "off", "bfloat16": "bf16", "float16": "fp16"}[self.dtype]


@dataclass(frozen=True)
class ProbeResult:
    """Seconds per training step (forward + backward), best of the timed rounds."""

    fp32_s: float
    bf16_s: float
    spread: float = 1.0  # slowest / fastest timed step of the same dtype: how steady the machine was

    @property
    def bf16_speedup(self) -> float:
        return self.fp32_s / max(self.bf16_s, 1e-12)


def cache_dir() -> Path:
    return Path(os.environ.get("DFSWEEP_CACHE_DIR") or Path.home() / ".cache" / "dfsweep")


def cache_file() -> Path:
    return cache_dir() / "amp_probe.json"


def probe_key(model_name: str, image_size: int, batch_size: int, channels_last: bool, trainable: str,
              threads: int | None = None) -> str:
    """Everything the fp32-vs-bf16 timing depends on: model, input, batch, threads, CPU kind, torch."""
    threads = threads or torch.get_num_threads()
    return (f"{model_name}|{image_size}px|b{batch_size}|t{threads}|cl{int(channels_last)}|{trainable}|"
            f"{torch.backends.cpu.get_cpu_capability()}|torch{torch.__version__.split('+')[0]}")


def read_cache(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_cache(path: Path, key: str, result: ProbeResult) -> None:
    """Add one entry (read-merge-write, atomic rename): concurrent sweep workers lose nothing but a race."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = read_cache(path)
        data[key] = {"fp32_s": result.fp32_s, "bf16_s": result.bf16_s, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as e:  # a read-only home is no reason to fail a run
        log.warning("event=amp_probe_cache_unwritable path=%s error=%s", path, e)


def choose(setting: AmpSetting, device: torch.device, probe: Callable[[], ProbeResult] | None = None,
           key: str | None = None, cache: Path | None = None) -> AmpChoice:
    """Resolve train.use_amp for `device`. `probe` (run only on a CPU cache miss) times fp32 vs bf16."""
    half = "float16" if device.type in ("cuda", "mps") else "bfloat16"
    if setting is True:
        return AmpChoice(True, half, "train.use_amp=true")
    if setting is False:
        return AmpChoice(False, "float32", "train.use_amp=false")
    if setting != "auto":
        raise ValueError(f"train.use_amp must be true, false or auto (got {setting!r})")
    if device.type == "cuda":
        return AmpChoice(True, "float16", "auto: CUDA -> fp16 autocast + GradScaler")
    if device.type != "cpu":
        return AmpChoice(False, "float32", f"auto: {device.type} -> fp32 (no probe on this device)")
    if probe is None or key is None:
        return AmpChoice(False, "float32", "auto: cpu without a probe -> fp32")
    cache = cache or cache_file()
    hit = read_cache(cache).get(key)
    if hit is not None:
        result, source = ProbeResult(float(hit["fp32_s"]), float(hit["bf16_s"])), f"cached probe ({cache})"
    else:
        t0 = time.perf_counter()
        result = probe()
        if result.spread <= MAX_SPREAD:
            source = f"probe ({time.perf_counter() - t0:.1f}s, cached in {cache})"
            write_cache(cache, key, result)
        else:  # timings disturbed by other load: decide for this run, probe again next time
            source = f"probe ({time.perf_counter() - t0:.1f}s, steps varied {result.spread:.1f}x: not cached)"
    faster = result.bf16_speedup >= MIN_SPEEDUP
    verdict = "bf16" if faster else "fp32"
    reason = (f"auto: {source}: fp32 {result.fp32_s * 1000:.0f} ms/step, bf16 {result.bf16_s * 1000:.0f} ms/step "
              f"(bf16 {result.bf16_speedup:.2f}x) -> {verdict}")
    return AmpChoice(faster, "bfloat16" if faster else "float32", reason)


def convs_striding_past_their_input(model: torch.nn.Module, forward: Callable[[], object]) -> list[str]:
    """Names of the convolutions whose input map is smaller than their stride (e.g. a stride-2 conv on a 1x1 map:
    a CNN with total stride 32 fed under 32 px, as the LQ stream of a 32 px dual_stream run is). On CPU, torch's
    bf16 convolution backward leaves part of such a layer's weight gradient uninitialised, so training turns
    NaN at random (reproduced here with torch 2.14.1; fp32 is exact). `forward()` runs once, in eval mode
    without gradients; the model's mode is restored."""
    found: list[str] = []

    def check(name: str) -> Callable:
        def hook(module: torch.nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            stride = module.stride if isinstance(module.stride, tuple) else (module.stride,) * 2
            if isinstance(x, torch.Tensor) and x.dim() >= 3 and any(
                    size < s for size, s in zip(x.shape[-len(stride):], stride)):
                found.append(name)
        return hook

    convs = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    handles = [m.register_forward_pre_hook(check(n)) for n, m in model.named_modules() if isinstance(m, convs)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            forward()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return found


def cpu_bf16_safe(choice: AmpChoice, device: torch.device, model: torch.nn.Module,
                  forward: Callable[[], object]) -> AmpChoice:
    """`choice`, or fp32 when it is bf16 on CPU and the model has convolutions striding past their input (see
    convs_striding_past_their_input): a slower run is better than one that turns NaN at random."""
    if not (choice.enabled and device.type == "cpu"):
        return choice
    bad = convs_striding_past_their_input(model, forward)
    if not bad:
        return choice
    reason = (f"{choice.reason}; fp32 instead: {len(bad)} conv layer(s) get a map smaller than their stride "
              f"(first {bad[0]}), where CPU bf16 backward gives NaN gradients; a larger input size avoids it")
    log.warning("event=amp_bf16_unsafe layers=%d first=%s -> fp32", len(bad), bad[0])
    return AmpChoice(False, "float32", reason)


def inference_amp(setting: AmpSetting, device: torch.device) -> bool:
    """AMP for evaluation-only runs: true -> on; auto -> on for CUDA (no training step to probe); false -> off."""
    return setting is True or (setting == "auto" and device.type == "cuda")


def time_training_steps(model: torch.nn.Module, forward: Callable[[], torch.Tensor], rounds: int = 2) -> ProbeResult:
    """fp32 vs bf16-autocast `forward()` (the model on one batch) + backward of its mean on CPU, alternating,
    best of `rounds` each after one warm-up step each. The model's buffers (BatchNorm statistics), gradients and RNG are restored, so the
    probe leaves no trace in the run."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    was_training = model.training
    model.train()
    times: dict[bool, list[float]] = {False: [], True: []}
    try:
        with torch.random.fork_rng(devices=[]):
            for i in range(rounds + 1):
                for bf16 in (False, True):
                    t0 = time.perf_counter()
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        out = forward()
                    out.float().mean().backward()
                    if i:  # round 0 warms up kernels and the allocator
                        times[bf16].append(time.perf_counter() - t0)
                    model.zero_grad(set_to_none=True)
    finally:
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        model.train(was_training)
    spread = max(max(t) / min(t) for t in times.values())
    return ProbeResult(min(times[False]), min(times[True]), spread)
