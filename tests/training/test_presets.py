"""Seed presets from the CLI: seed 003's defaults, seed 002's ArcFace parameter count, the video recipe, swin offline."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.config import load_config, parse_set, preset_path
from core.errors import UnknownNameError
from training.train_unified import build_parser, main, overrides_from_args


def _cfg(argv: list[str]):
    args = build_parser().parse_args(argv)
    return load_config(preset_path(args.preset), {**parse_set(args.set), **overrides_from_args(args)})


def test_seed003_preset_gives_the_card_defaults_and_flags_still_win() -> None:
    cfg = _cfg(["--preset", "seed003"])
    assert cfg.model.model_type == "efficientnet_b3" and cfg.data.batch_size == 16
    assert (cfg.optim.gradient_clip, cfg.optim.warmup_epochs) == (1.0, 3)
    assert cfg.optim.resolved_lrs() == (1e-5, 1e-4)
    assert cfg.train.early_stopping_patience == 10
    cfg = _cfg(["--preset", "seed003", "--batch_size", "8", "--set", "optim.gradient_clip=0.5"])
    assert cfg.data.batch_size == 8 and cfg.optim.gradient_clip == 0.5 and cfg.optim.warmup_epochs == 3


def test_video_preset_uses_amp_and_stops_on_val_loss() -> None:
    for cfg in (_cfg(["--preset", "seed001"]), load_config(overrides={"model.model_type": "dual_stream"})):
        assert cfg.train.use_amp is True
        assert (cfg.train.monitor, cfg.train.monitor_mode, cfg.train.early_stopping_patience) == ("val_loss", "min", 10)


def test_unknown_preset_and_preset_with_config_exit_2(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(UnknownNameError, match="seed003"):
        preset_path("seed03")
    assert main(["--preset", "seed03"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown preset 'seed03'") and "did you mean 'seed003'" in err and "\n" not in err
    with pytest.raises(SystemExit) as e:
        main(["--preset", "seed003", "--config", "experiments/configs/demo.yaml"])
    assert e.value.code == 2


def test_num_classes_needs_ce() -> None:
    with pytest.raises(ValueError, match="loss.num_classes=9 needs loss.loss_type=ce"):
        load_config(overrides={"loss.num_classes": 9})


def _tiny_run(tmp_path: Path, argv: list[str]) -> Path:
    out = tmp_path / "outputs"
    rc = main(argv + ["--no-pretrained", "--no_tracking", "--image_size", "32", "--batch_size", "4",
                      "--num_epochs", "1", "--num_workers", "0", "--output_dir", str(out),
                      "--set", "data.max_samples_per_split=8", "train.max_steps_per_epoch=1"])
    assert rc == 0
    (run_dir,) = out.iterdir()
    return run_dir


def test_seed002_arcface_parameter_count_from_the_cli(tmp_path: Path) -> None:
    """268,288 trainable of 11,444,800 (ResNet-18 frozen, 512-d ArcFace over 9 classes), as the card reports."""
    summary = json.loads((_tiny_run(tmp_path, ["--preset", "seed002"]) / "parameter_summary.json").read_text())
    assert summary["total"] == 11_444_800
    assert summary["per_epoch"][0]["trainable"] == 268_288
    # the same from flags alone
    summary = json.loads((_tiny_run(tmp_path / "flags", [
        "--model_type", "resnet18", "--head", "arcface", "--loss_type", "ce", "--num_classes", "9",
        "--embedding_dim", "512", "--freeze_strategy", "frozen"]) / "parameter_summary.json").read_text())
    assert (summary["total"], summary["per_epoch"][0]["trainable"]) == (11_444_800, 268_288)


def test_swin_card_command_offline_says_how_and_runs_without_weights(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    assert main(["--model_type", "swin", "--no_tracking", "--image_size", "32",
                 "--set", "data.max_samples_per_split=8"]) == 2
    err = capsys.readouterr().err
    assert "--no-pretrained" in err and "--pretrained_path" in err
    run_dir = _tiny_run(tmp_path, ["--model_type", "swin"])
    log = (run_dir / "training_log.csv").read_text()
    assert log.count("\n") == 2  # header + one epoch
