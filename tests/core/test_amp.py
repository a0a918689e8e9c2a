"""train.use_amp=auto: CUDA -> fp16; CPU -> bf16 only where the probe finds it faster; probes cached."""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch

from core import amp
from core.checkpoints import load_checkpoint
from core.config import load_config
from training.trainer import train

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def no_probe() -> amp.ProbeResult:
    raise AssertionError("the probe must not run here")


def test_cpu_auto_picks_bf16_only_when_the_probe_shows_it_faster(tmp_path: Path) -> None:
    cache = tmp_path / "amp.json"
    fast = amp.choose("auto", CPU, lambda: amp.ProbeResult(fp32_s=1.0, bf16_s=0.6), "net|64px", cache)
    assert fast.enabled and fast.dtype == "bfloat16" and fast.label == "bf16"
    assert "1000 ms" in fast.reason and "600 ms" in fast.reason and fast.reason.endswith("bf16")
    slow = amp.choose("auto", CPU, lambda: amp.ProbeResult(fp32_s=1.0, bf16_s=1.7), "net|160px", cache)
    assert not slow.enabled and slow.label == "off" and slow.reason.endswith("fp32")
    # within noise (under MIN_SPEEDUP) is not "faster"
    tie = amp.choose("auto", CPU, lambda: amp.ProbeResult(fp32_s=1.0, bf16_s=0.98), "net|96px", cache)
    assert not tie.enabled
    assert set(json.loads(cache.read_text())) == {"net|64px", "net|160px", "net|96px"}


def test_a_cached_probe_is_reused_without_timing_again(tmp_path: Path) -> None:
    cache = tmp_path / "amp.json"
    amp.choose("auto", CPU, lambda: amp.ProbeResult(fp32_s=2.0, bf16_s=1.0), "k", cache)
    again = amp.choose("auto", CPU, no_probe, "k", cache)
    assert again.enabled and "cached probe" in again.reason
    other_key = amp.choose("auto", CPU, lambda: amp.ProbeResult(fp32_s=1.0, bf16_s=3.0), "k2", cache)
    assert not other_key.enabled  # a different model/size/threads/batch is probed on its own


def test_a_noisy_probe_decides_this_run_but_is_not_cached(tmp_path: Path) -> None:
    cache = tmp_path / "amp.json"
    noisy = amp.choose("auto", CPU, lambda: amp.ProbeResult(fp32_s=1.0, bf16_s=0.5, spread=3.0), "k", cache)
    assert noisy.enabled and "not cached" in noisy.reason and not cache.exists()
    steady = amp.choose("auto", CPU, lambda: amp.ProbeResult(fp32_s=1.0, bf16_s=1.5, spread=1.1), "k", cache)
    assert not steady.enabled and "k" in json.loads(cache.read_text())


def test_cuda_auto_is_fp16_with_grad_scaler_and_explicit_settings_win(tmp_path: Path) -> None:
    cuda = amp.choose("auto", CUDA, no_probe, "k", tmp_path / "amp.json")
    assert cuda.enabled and cuda.dtype == "float16" and "GradScaler" in cuda.reason
    assert not (tmp_path / "amp.json").exists()
    assert amp.choose(True, CPU, no_probe).dtype == "bfloat16"
    assert amp.choose(True, CUDA, no_probe).dtype == "float16"
    assert not amp.choose(False, CUDA, no_probe).enabled
    assert amp.inference_amp("auto", CUDA) and not amp.inference_amp("auto", CPU) and amp.inference_amp(True, CPU)
    with pytest.raises(ValueError, match="true, false or auto"):
        amp.choose("fast", CPU)


def test_probe_leaves_no_trace_in_the_model() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(1))
    x = torch.randn(4, 3, 16, 16)
    model(x)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    result = amp.time_training_steps(model, lambda: model(x), rounds=1)
    assert result.fp32_s > 0 and result.bf16_s > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics restored
    assert all(p.grad is None for p in model.parameters()) and not model.training
    assert torch.equal(rng, torch.get_rng_state())


def test_train_logs_the_auto_choice_and_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DFSWEEP_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_config(overrides={
        "model.model_type": "test_efficientnet", "model.pretrained": False, "data.image_size": 32,
        "data.batch_size": 8, "data.num_workers": 0, "data.max_samples_per_split": 16, "train.num_epochs": 1,
        "train.use_amp": "auto", "train.device": "cpu", "train.output_dir": str(tmp_path / "out"),
        "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment_name": "amp",
        "tracking.log_model": False})
    monkeypatch.setattr(amp, "MAX_SPREAD", float("inf"))  # a loaded test machine must not stop the caching
    calls = []
    real = amp.time_training_steps
    monkeypatch.setattr(amp, "time_training_steps", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = train(cfg)
    second = train(cfg)
    assert len(calls) == 1  # probed once, then read from the cache
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for result, source in ((first, "auto: probe"), (second, "auto: cached probe")):
        run = mlflow.get_run(result.run_id)
        assert run.data.params["amp"] in {"bf16", "off"}
        assert run.data.tags["amp_reason"].startswith(source)
        assert run.data.tags["amp_reason"].endswith("bf16" if run.data.params["amp"] == "bf16" else "fp32")
        # a resumed run keeps this precision (Trainer.choose_amp reads it back from last.pt)
        assert load_checkpoint(result.output_dir / "last.pt")["amp"] == run.data.params["amp"]
    entries = json.loads((tmp_path / "cache" / "amp_probe.json").read_text())
    assert len(entries) == 1 and "32px|b8|" in next(iter(entries))


def test_convs_striding_past_their_input_are_found_and_the_model_mode_is_kept() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4, padding=1), torch.nn.Conv2d(8, 8, 3, stride=2, padding=1))
    model.train()
    # 8 px -> 2x2 after the first conv: the second (stride 2) sees a map as large as its stride, which is fine
    assert amp.convs_striding_past_their_input(model, lambda: model(torch.zeros(1, 3, 8, 8))) == []
    # 4 px -> 1x1: a stride-2 conv on a 1x1 map
    assert amp.convs_striding_past_their_input(model, lambda: model(torch.zeros(1, 3, 4, 4))) == ["1"]
    assert amp.convs_striding_past_their_input(model, lambda: model(torch.zeros(1, 3, 2, 2))) == ["0", "1"]
    assert model.training and not model[0]._forward_pre_hooks  # mode restored, hooks removed


def test_cpu_bf16_falls_back_to_fp32_where_a_strided_conv_sees_a_1x1_map() -> None:
    """torch's CPU bf16 conv backward leaves such a layer's weight gradient partly uninitialised (NaN at random:
    the dual_stream sweep on 32 px clips, whose 16 px LQ stream reaches the last stride-2 conv at 1x1)."""
    from models.video import create_dual_stream

    def tiny_model(image_size: int) -> torch.nn.Module:
        cfg = load_config(overrides={"model.pretrained": False})
        return create_dual_stream(cfg.model, 1, image_size=image_size, hq_backbone="test_efficientnet",
                                  lq_backbone="test_efficientnet", lstm_channels=(8,))

    bf16 = amp.choose(True, CPU)
    for size, safe in ((32, False), (64, True)):
        model = tiny_model(image_size=size)
        hq, lq = model.example_input(1, 2)
        choice = amp.cpu_bf16_safe(bf16, CPU, model, lambda: model((hq, lq)))
        assert choice.enabled is safe and choice.dtype == ("bfloat16" if safe else "float32")
        if not safe:
            assert "backbone.lq.blocks.4.0.conv_dw" in choice.reason and choice.reason.startswith(bf16.reason)
    model = tiny_model(image_size=32)
    off = amp.choose(False, CPU)
    assert amp.cpu_bf16_safe(off, CPU, model, no_probe) is off  # nothing to check: no forward at all
    fp16 = amp.choose(True, CUDA)
    assert amp.cpu_bf16_safe(fp16, CUDA, model, no_probe) is fp16  # CUDA fp16 is another kernel path


def test_the_probe_waits_for_mlflows_warm_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's warm-up (its import; on a new store, creating the schema) takes seconds of CPU beside the run's
    start: a probe timed meanwhile once measured fp32 at 893 ms/step instead of ~600 and cached bf16."""
    import threading
    import time

    from core import tracking
    from dataio.pipeline import scan_data
    from training.trainer import Trainer

    monkeypatch.setenv("DFSWEEP_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_config(overrides={
        "model.model_type": "test_efficientnet", "model.pretrained": False, "data.image_size": 32,
        "data.batch_size": 8, "data.num_workers": 0, "data.max_samples_per_split": 16, "train.use_amp": "auto",
        "train.device": "cpu", "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    warm = threading.Event()
    thread = threading.Thread(target=lambda: (time.sleep(4.0), warm.set()))  # longer than the build below
    thread.start()
    monkeypatch.setitem(tracking._WARMING, tracking.resolve_tracking_uri(cfg.tracking), thread)
    seen = []
    monkeypatch.setattr(amp, "time_training_steps", lambda *a, **k: seen.append(warm.is_set()) or amp.ProbeResult(1, 1))
    Trainer(cfg, scan_data(cfg), run_dir=None)
    assert seen == [True]
