"""Config: every YAML loads, flags map onto keys, and bad input exits 2 with one line naming the key."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from core.config import REPO_ROOT, ConfigError, load_config, parse_set
from training.train_unified import FLAGS, SWITCHES, build_parser, overrides_from_args

CONFIGS = sorted((REPO_ROOT / "experiments" / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_config_file_loads(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.model.model_type


def test_model_file_layers_under_explicit_flags() -> None:
    assert load_config(overrides={"model.model_type": "xception"}).train.freeze_strategy == "frozen"
    cfg = load_config(overrides={"model.model_type": "xception", "train.freeze_strategy": "full"})
    assert cfg.train.freeze_strategy == "full" and cfg.data.image_size == 299


def test_every_flag_maps_to_a_config_key() -> None:
    argv = []
    for name, (key, kw) in FLAGS.items():
        value = kw["choices"][-1] if "choices" in kw else {int: "3", float: "0.5", str: "x"}[kw["type"]]
        if name in ("freeze_strategy",):
            value = "partial:2"
        argv += [f"--{name}", value]
    args = build_parser().parse_args(argv + [f"--{s}" for s in SWITCHES if s != "eval_only"])
    overrides = overrides_from_args(args)
    keys = {k for k, _ in FLAGS.values()} | {k for k, _ in SWITCHES.values() if k != "train.eval_only"}
    assert keys <= set(overrides)


def test_seed_flags_override_yaml_and_set() -> None:
    args = build_parser().parse_args(["--lr", "0.01", "--train_all_layers", "--use_advanced_aug", "--no-pretrained"])
    cfg = load_config(REPO_ROOT / "experiments/configs/xception_frozen.yaml",
                      {**parse_set(["optim.lr=0.5"]), **overrides_from_args(args)})
    assert cfg.optim.lr == 0.01 and cfg.train.freeze_strategy == "full"
    assert cfg.data.aug_policy == "advanced" and cfg.model.pretrained is False


def test_set_takes_several_pairs_per_flag_and_repeats() -> None:
    args = build_parser().parse_args(["--set", "optim.lr=3e-4", "data.image_size=96", "--set", "loss.loss_type=focal"])
    cfg = load_config(overrides=parse_set(args.set))
    assert (cfg.optim.lr, cfg.data.image_size, cfg.loss.loss_type) == (3e-4, 96, "focal")


@pytest.mark.parametrize("overrides, needle", [
    ({"optim.lrr": 1}, "optim.lrr"),
    ({"optim.lr": -1}, "optim.lr"),
    ({"train.freeze_strategy": "partial:0"}, "train.freeze_strategy"),
    ({"data.split": [0.5, 0.5, 0.5]}, "data.split"),
    ({"nosection.key": 1}, "nosection.key"),
    ({"model.head": "arcface"}, "arcface"),
])
def test_bad_values_name_the_key(overrides, needle) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_key_in_file_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim.learning_rate.*bad.yaml.*did you mean"):
        load_config(bad)


@pytest.mark.parametrize("argv, needle", [
    (["--set", "optim.lrr=3"], "optim.lrr"),
    (["--batch_size", "0"], "data.batch_size"),
    (["--config", "missing.yaml"], "missing.yaml"),
    (["--eval_only"], "checkpoint"),
])
def test_cli_exits_2_with_one_line(argv, needle) -> None:
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "training" / "train_unified.py"), *argv],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
