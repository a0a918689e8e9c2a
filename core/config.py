"""Resolving the run configuration: YAML files and overrides -> one validated `Config` (core.schema).

experiments/configs/default.yaml <- configs/models/<model_type>.yaml <- an optional --config file <- `--set
key=value` overrides <- CLI flags, through `compose()`, the one path every caller takes. Every error names the
key and where it came from (`ConfigError`); the CLI turns it into exit status 2. The schema's names (Config,
its sections, validate, ...) are re-exported here, so `from core.config import Config` is the one import.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml

from core.errors import ConfigError
from core.schema import (  # noqa: F401  (re-exported: the names other modules import from core.config)
    EXTRA_VAL_METRICS, VAL_METRICS, AugConfig, Config, DataConfig, LossConfig, ModelConfig, OptimConfig,
    TrackingConfig, TrainConfig, extra_val_name, extra_val_sets, flatten, known_keys, monitor_names, registered,
    set_dotted, validate,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "experiments" / "configs" / "default.yaml"
CONFIG_DIR = REPO_ROOT / "experiments" / "configs"
MODEL_CONFIGS = CONFIG_DIR / "models"


def parse_set(items: list[str]) -> dict[str, Any]:
    """`key=value` strings -> {key: YAML-parsed value}."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} must look like key=value, e.g. optim.lr=3e-4")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections (data:, model:, optim:, ...)")
    return data


def merge_file(data: dict[str, Any], path: str | Path) -> None:
    """Merge a YAML file (sections of keys) into `data`, checking every key against the schema."""
    for section, values in read_yaml(path).items():
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section '{section}' must be a mapping")
        for k, v in values.items():
            set_dotted(data, f"{section}.{k}", v, str(path))


Layer = tuple[dict[str, Any], str]  # (dotted key -> value, where it came from: "--set", "sweep.yaml base", ...)


def compose(config_file: str | Path | None = None, layers: Sequence[Layer] = (),
            defaults: Sequence[Layer] = ()) -> Config:
    """The one way a Config is resolved (training CLI, sweeps, evaluation, tests):

        default.yaml <- defaults <- configs/models/<model_type>.yaml <- config_file <- layers, in order

    `layers` are the overrides (the CLI: `--set` then its flags; a sweep: `base:`, `--set`, a trial's params).
    `defaults` are where a caller's defaults differ from default.yaml (a sweep: AMP on); everything after wins.
    model_type is the one the finished stack names, so its own file (what its seed recipe implies, e.g.
    xception: frozen backbone, 299 px) applies however it was chosen. Errors name the key and its source.
    """
    file_data: dict[str, Any] = {}
    if config_file:
        merge_file(file_data, config_file)
    data: dict[str, Any] = {}
    merge_file(data, DEFAULT_CONFIG)
    sources = [str(DEFAULT_CONFIG.relative_to(REPO_ROOT))]
    origins: dict[str, str] = {}  # key -> the override layer that set it last (for error messages)
    for values, source in defaults:
        for key, value in values.items():
            set_dotted(data, key, value, source)
        if values:
            sources.append(source)
    model_type = data.get("model", {}).get("model_type", "")
    model_type = file_data.get("model", {}).get("model_type", model_type)
    for values, _ in layers:
        model_type = values.get("model.model_type", model_type)
    model_file = MODEL_CONFIGS / f"{model_type}.yaml"
    if model_type and model_file.is_file():
        merge_file(data, model_file)
        sources.append(str(model_file.relative_to(REPO_ROOT)))
    if config_file:
        merge_file(data, config_file)
        sources.append(str(config_file))
    for values, source in layers:
        for key, value in values.items():
            set_dotted(data, key, value, source)
            origins[key] = source
        if values:
            sources.append(source)
    return validate(data, " + ".join(sources), origins)


def load_config(
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    override_source: str = "--set",
) -> Config:
    """compose() with one layer of overrides: default.yaml <- models/<model_type>.yaml <- config_file <- overrides."""
    return compose(config_file, [(overrides or {}, override_source)])


def preset_path(name: str) -> Path:
    """`--preset NAME` -> experiments/configs/NAME.yaml (any file there but default.yaml); unknown -> UnknownNameError."""
    from core.registry import Registry

    presets: Registry[Path] = Registry("preset")
    for f in sorted(CONFIG_DIR.glob("*.yaml")):
        if f != DEFAULT_CONFIG:
            presets.register(f.stem, lambda f=f: f)
    return presets.create(name)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
