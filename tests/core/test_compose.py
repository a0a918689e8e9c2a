"""core.config.compose is the one way a Config is resolved: the training CLI and a sweep's `base:` agree."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from core.config import compose, load_config, parse_set
from experiments.search_space import SWEEP_DEFAULTS, load_sweep
from models.presets import PRESETS
from training.train_unified import build_parser, overrides_from_args

SWEEP_ONLY = {"train.monitor", "train.monitor_mode"}  # set by the study, not by a single run


def cli_config(argv: list[str]):
    """The Config the training CLI resolves for argv (training/train_unified.main up to train(cfg))."""
    args = build_parser().parse_args(argv)
    return compose(args.config, [(parse_set(args.set), "--set"), (overrides_from_args(args), "command line")])


def sweep_base(tmp_path: Path, base: dict, config: str | None = None):
    doc = {"study": {"n_trials": 1, "metric": "val_auc"}, "base": base,
           "space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-3, "log": True}}}
    if config:
        doc["config"] = config
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_sweep(path)


def sweep_defaults_as_set() -> list[str]:
    return ["--set", *(f"{k}={v}" for k, v in SWEEP_DEFAULTS.items())]


@pytest.mark.parametrize("preset", PRESETS.names())
def test_cli_and_sweep_base_resolve_the_same_config(tmp_path: Path, preset: str) -> None:
    cli = cli_config(["--model_type", preset, *sweep_defaults_as_set()])
    spec = sweep_base(tmp_path, {"model": {"model_type": preset}})
    cli_flat = {k: v for k, v in cli.flat().items() if k not in SWEEP_ONLY}
    sweep_flat = {k: v for k, v in spec.base.flat().items() if k not in SWEEP_ONLY}
    assert sweep_flat == cli_flat
    # a trial that keeps the base's params resolves to the base itself
    assert spec.trial_config({}).flat() == spec.base.flat()


def test_xception_sweep_gets_its_seed_recipe(tmp_path: Path) -> None:
    """The bug this fixes: a sweep base with xception gave 224 px, full training, lr 1e-4."""
    cfg = sweep_base(tmp_path, {"model": {"model_type": "xception"}}).base
    assert (cfg.data.image_size, cfg.train.freeze_strategy, cfg.optim.lr) == (299, "frozen", 1e-3)


def test_swept_model_type_brings_its_model_file(tmp_path: Path) -> None:
    doc = {"study": {"n_trials": 1}, "base": {"model.pretrained": False},
           "space": {"model.model_type": {"type": "categorical", "choices": ["efficientnet", "xception"]}}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(doc))
    spec = load_sweep(path)
    xcp = spec.trial_config({"model.model_type": "xception"})
    assert (xcp.data.image_size, xcp.train.freeze_strategy) == (299, "frozen")
    assert spec.trial_config({"model.model_type": "efficientnet"}).data.image_size == spec.base.data.image_size


def test_layers_apply_in_order_and_errors_name_their_layer(tmp_path: Path) -> None:
    preset = tmp_path / "p.yaml"
    preset.write_text("optim:\n  lr: 0.002\ndata:\n  image_size: 96\n")
    cfg = compose(preset, [({"optim.lr": 3e-4}, "--set"), ({"data.image_size": 64}, "command line")])
    assert (cfg.optim.lr, cfg.data.image_size) == (3e-4, 64)
    # the config file names xception: its model file applies under the file, so the file's 96 px wins
    preset.write_text("model:\n  model_type: xception\ndata:\n  image_size: 96\n")
    cfg = compose(preset)
    assert (cfg.data.image_size, cfg.train.freeze_strategy) == (96, "frozen")
    assert load_config(overrides={"model.model_type": "xception"}) == compose(layers=[({"model.model_type": "xception"}, "--set")])
    with pytest.raises(Exception, match=r"'model.dropout' from command line"):
        compose(layers=[({"optim.lr": 1e-3}, "--set"), ({"model.dropout": 2.0}, "command line")])


def test_every_model_file_names_a_preset() -> None:
    """configs/models/<type>.yaml applies by name: a file whose name is not a preset would never apply."""
    from core.config import MODEL_CONFIGS

    for f in MODEL_CONFIGS.glob("*.yaml"):
        assert f.stem in PRESETS, f"{f} names no model preset"


def test_a_misspelt_name_exits_2_before_any_mlflow_run(tmp_path: Path) -> None:
    """A typo is a one-line error naming the closest registered name, and no (FAILED) run is left behind."""
    import os
    import subprocess
    import sys

    from core.config import REPO_ROOT

    db = tmp_path / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    for flags, hint in ((["--loss_type", "focl"], "focal"), (["--model_type", "dual_steam"], "dual_stream"),
                        (["--scheduler", "cosin"], "cosine"), (["--freeze_strategy", "partial:0"], "partial:N")):
        proc = subprocess.run([sys.executable, str(REPO_ROOT / "training" / "train_unified.py"), *flags,
                               "--output_dir", str(tmp_path / "out")],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and hint in lines[0], proc.stderr
    assert not db.exists() and not (tmp_path / "out").exists() and not (tmp_path / "mlruns").exists()
