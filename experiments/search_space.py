"""Sweep files: parse and validate `study:`, `config:`, `base:` and `space:`, and sample a trial's params.

A sweep file (experiments/sweeps/*.yaml)::

    study:  {name, direction, metric, sampler, seed, pruner, n_trials, timeout, full_reports}
    config: experiments/configs/some_preset.yaml      # optional preset, merged over default.yaml
    base:   {data: {image_size: 64}, ...}              # fixed for every trial (sections or dotted keys)
    space:
      loss.loss_type: {type: categorical, choices: [bce, focal]}
      loss.focal_gamma: {type: float, low: 0.5, high: 4.0, when: {loss.loss_type: focal}}

Every error is a `ConfigError` naming the file and the key. Sampling calls `trial.suggest_*`
(duck-typed), so this module does not need Optuna.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from core.config import REPO_ROOT, Config, ConfigError, compose, known_keys, read_yaml, set_dotted

log = logging.getLogger(__name__)

SAMPLER_OPTIONS = {
    "tpe": {"n_startup_trials", "multivariate", "group", "constant_liar", "n_ei_candidates"},
    "random": set(),
    "grid": set(),
}
PRUNER_OPTIONS = {
    "median": {"n_startup_trials", "n_warmup_steps", "interval_steps", "n_min_trials"},
    "percentile": {"percentile", "n_startup_trials", "n_warmup_steps", "interval_steps", "n_min_trials"},
    "hyperband": {"min_resource", "max_resource", "reduction_factor", "bootstrap_count"},
    "none": set(),
}
# Where a trial differs from one run (the file, a preset or --set still win): no last.pt, since a killed
# trial is retried by Optuna rather than resumed (so best.pt is written once, at the trial's end), and the
# metrics files without the dashboard and error gallery, which the sweep builds at its end for its best
# trials (study.full_reports). AMP is train.use_amp=auto as for any run (fp16 on CUDA, bf16 on CPU only where
# the probe finds it faster); a space may sweep it like any other key.
SWEEP_DEFAULTS: dict[str, Any] = {"train.save_last": False, "train.report": "metrics"}
STUDY_KEYS = {"name", "direction", "metric", "sampler", "seed", "pruner", "n_trials", "timeout", "full_reports"}
PARAM_KEYS = {"categorical": {"choices"}, "int": {"low", "high", "step", "log"}, "float": {"low", "high", "step", "log"}}
# Keys that change what dataio.data.scan returns: a space over them disables the per-worker scan reuse.
SCAN_KEYS = {"data.data_dir", "data.split", "data.group_by", "data.max_samples_per_split"}


class Suggester(Protocol):
    """The part of optuna.trial.Trial used here."""

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...
    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...
    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False) -> float: ...


@dataclass(frozen=True)
class StudySettings:
    name: str
    direction: str = "maximize"
    metric: str = "val_auc"
    sampler: str = "tpe"
    sampler_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 42
    pruner: str = "median"
    pruner_options: dict[str, Any] = field(default_factory=dict)
    n_trials: int = 10
    timeout: float | None = None
    full_reports: int = 1  # the best N completed trials get the full evaluation report when the sweep ends


@dataclass(frozen=True)
class Param:
    """One swept Config key; `when` = ((key, allowed values), ...), all of which must hold."""

    key: str
    kind: str
    choices: tuple[Any, ...] = ()
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def active(self, sampled: dict[str, Any]) -> bool:
        """True when every condition holds on the params sampled so far."""
        return all(k in sampled and sampled[k] in values for k, values in self.when)

    def suggest(self, trial: Suggester) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)

    def probe_values(self) -> list[Any]:
        """Values checked against the Config at load time: every choice, or low and high."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def grid_values(self, path: Path | str = "") -> list[Any]:
        if self.kind == "categorical":
            return list(self.choices)
        if self.step is None and self.kind == "float":
            raise ConfigError(f"{path}: space.{self.key}: the grid sampler needs a step for float params")
        step = self.step or 1
        n = int(round((self.high - self.low) / step)) + 1
        vals = [self.low + i * step for i in range(n) if self.low + i * step <= self.high + 1e-12]
        return [int(v) for v in vals] if self.kind == "int" else [round(float(v), 12) for v in vals]


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep file: study settings, the base Config and the ordered search space."""

    path: Path
    study: StudySettings
    base: Config
    params: tuple[Param, ...]
    recipe: "Recipe | None" = None  # how base was composed; a trial's params are composed on top of it

    def sample(self, trial: Suggester) -> dict[str, Any]:
        """Suggest every active param in file order (conditions see earlier params only)."""
        sampled: dict[str, Any] = {}
        for p in self.params:
            if p.active(sampled):
                sampled[p.key] = p.suggest(trial)
        return sampled

    def trial_config(self, params: dict[str, Any], extra: dict[str, Any] | None = None) -> Config:
        """Base Config + a trial's params (+ extra overrides such as the output folder), composed as the CLI
        would: a swept model_type brings its own configs/models/<type>.yaml like --model_type does."""
        trial = {**params, **(extra or {})}
        if self.recipe is None:
            return self.base.with_overrides(trial, f"trial params of {self.path}")
        return self.recipe.compose((trial, f"trial params of {self.path}"))

    def grid_space(self) -> dict[str, list[Any]]:
        return {p.key: p.grid_values(self.path) for p in self.params}

    @property
    def touches_scan(self) -> bool:
        """True when trials may scan different data: a swept data key, or presets of different kinds (photos
        vs clips)."""
        if any(p.key in SCAN_KEYS for p in self.params):
            return True
        from core.registry import MODEL_PRESETS

        kinds = {MODEL_PRESETS.meta(v)["kind"] for p in self.params if p.key == "model.model_type" for v in p.choices}
        return len(kinds | {self.base.model.kind}) > 1

    @property
    def fingerprint(self) -> str:
        """Hash of what makes trial values comparable: base Config (less where outputs go), space, metric."""
        base = self.base.model_dump(mode="json", exclude={"tracking": True, "train": {"output_dir", "device"},
                                                          "data": {"num_workers"}})
        doc = {"base": base, "space": [asdict(p) for p in self.params], "metric": self.study.metric}
        return hashlib.sha1(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------- loading
def load_sweep(
    path: str | Path,
    overrides: dict[str, Any] | None = None,
    study_overrides: dict[str, Any] | None = None,
) -> SweepSpec:
    """Read and validate a sweep file. `overrides`: `--set` dotted keys; `study_overrides`: CLI study flags."""
    path = Path(path)
    raw = read_yaml(path)
    unknown = set(raw) - {"study", "config", "base", "space"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key '{sorted(unknown)[0]}' (expected study, config, base, space)")
    study = _parse_study(raw.get("study") or {}, path, study_overrides or {})
    params = _parse_space(raw.get("space"), path)
    recipe = _recipe(raw, path, study, overrides or {}, {p.key for p in params})
    spec = SweepSpec(path=path, study=study, base=recipe.compose(), params=params, recipe=recipe)
    _probe(spec)
    if study.sampler == "grid":
        spec.grid_space()  # fails early on a float without step
    return spec


def _parse_study(raw: Any, path: Path, cli: dict[str, Any]) -> StudySettings:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: 'study' must be a mapping")
    bad = set(raw) - STUDY_KEYS
    if bad:
        raise ConfigError(f"{path}: unknown key 'study.{sorted(bad)[0]}' (valid: {', '.join(sorted(STUDY_KEYS))})")
    sampler, sampler_opts = _named(raw.get("sampler", "tpe"), "study.sampler", SAMPLER_OPTIONS, path)
    pruner, pruner_opts = _named(raw.get("pruner", "median"), "study.pruner", PRUNER_OPTIONS, path)
    if cli.get("sampler") and cli["sampler"] != sampler:
        sampler, sampler_opts = _named(cli["sampler"], "--sampler", SAMPLER_OPTIONS, path)
    if cli.get("pruner") and cli["pruner"] != pruner:
        pruner, pruner_opts = _named(cli["pruner"], "--pruner", PRUNER_OPTIONS, path)
    values = {k: v for k, v in raw.items() if k not in ("sampler", "pruner")}
    values.update({k: v for k, v in cli.items() if v is not None and k not in ("sampler", "pruner")})
    values.setdefault("name", path.stem)
    settings = StudySettings(sampler=sampler, sampler_options=sampler_opts, pruner=pruner,
                             pruner_options=pruner_opts, **values)
    if settings.direction not in ("maximize", "minimize"):
        raise ConfigError(f"{path}: study.direction must be maximize or minimize (got {settings.direction!r})")
    if not isinstance(settings.n_trials, int) or isinstance(settings.n_trials, bool) or settings.n_trials < 1:
        raise ConfigError(f"{path}: study.n_trials must be an integer >= 1 (got {settings.n_trials!r})")
    if settings.timeout is not None and not (_is_number(settings.timeout) and settings.timeout > 0):
        raise ConfigError(f"{path}: study.timeout must be a positive number of seconds (got {settings.timeout!r})")
    if not isinstance(settings.full_reports, int) or isinstance(settings.full_reports, bool) or settings.full_reports < 0:
        raise ConfigError(f"{path}: study.full_reports must be an integer >= 0 (got {settings.full_reports!r})")
    if not isinstance(settings.seed, int) or isinstance(settings.seed, bool):
        raise ConfigError(f"{path}: study.seed must be an integer (got {settings.seed!r})")
    if not isinstance(settings.name, str) or not settings.name:
        raise ConfigError(f"{path}: study.name must be a non-empty string")
    if "loss" in settings.metric and settings.direction == "maximize":
        log.warning("event=sweep_direction_check metric=%s direction=maximize (minimize is usual for losses)", settings.metric)
    return settings


def _named(value: Any, where: str, options: dict[str, set[str]], path: Path) -> tuple[str, dict[str, Any]]:
    """`tpe` or `{type: tpe, n_startup_trials: 5}` -> ("tpe", {...}), options checked."""
    opts = dict(value) if isinstance(value, dict) else {"type": value}
    kind = opts.pop("type", None)
    if kind not in options:
        raise ConfigError(f"{path}: {where} must be one of {', '.join(options)} (got {kind!r})")
    bad = set(opts) - options[kind]
    if bad:
        valid = ", ".join(sorted(options[kind])) or "none"
        raise ConfigError(f"{path}: unknown option '{sorted(bad)[0]}' for {where} {kind} (valid: {valid})")
    return kind, opts


def _parse_space(raw: Any, path: Path) -> tuple[Param, ...]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: 'space' must be a non-empty mapping of dotted Config keys to param specs")
    keys = set(known_keys())
    params: list[Param] = []
    for key, spec in raw.items():
        where = f"{path}: space.{key}"
        if key not in keys:
            set_dotted({}, str(key), None, f"{path} space")  # raises with a did-you-mean hint
            raise ConfigError(f"{where}: not a Config key")
        if not isinstance(spec, dict):
            raise ConfigError(f"{where} must be a mapping like {{type: float, low: 0.1, high: 1.0}}")
        params.append(_parse_param(str(key), spec, where))
    _check_conditions(params, path)
    return tuple(params)


def _parse_param(key: str, spec: dict[str, Any], where: str) -> Param:
    spec = dict(spec)
    kind = spec.pop("type", None)
    when = spec.pop("when", None)
    if kind not in PARAM_KEYS:
        raise ConfigError(f"{where}: type must be categorical, int or float (got {kind!r})")
    bad = set(spec) - PARAM_KEYS[kind]
    if bad:
        raise ConfigError(f"{where}: unknown option '{sorted(bad)[0]}' for a {kind} param")
    cond = _parse_when(when, where)
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: choices must be a non-empty list")
        if any(c is not None and not isinstance(c, (bool, int, float, str)) for c in choices):
            raise ConfigError(f"{where}: choices must be scalars (str, int, float, bool or null)")
        if len({repr(c) for c in choices}) != len(choices):
            raise ConfigError(f"{where}: choices contain duplicates")
        return Param(key, kind, choices=tuple(choices), when=cond)
    for name in ("low", "high"):
        if name not in spec:
            raise ConfigError(f"{where}: {kind} param needs '{name}'")
    low, high = _number(spec["low"], kind, f"{where}.low"), _number(spec["high"], kind, f"{where}.high")
    step = _number(spec["step"], kind, f"{where}.step") if spec.get("step") is not None else None
    use_log = spec.get("log", False)
    if not isinstance(use_log, bool):
        raise ConfigError(f"{where}: log must be true or false")
    if low >= high:
        raise ConfigError(f"{where}: low ({low}) must be < high ({high})")
    if use_log and low <= 0:
        raise ConfigError(f"{where}: log scale needs low > 0 (got {low})")
    if step is not None and step <= 0:
        raise ConfigError(f"{where}: step must be > 0 (got {step})")
    if step is not None and use_log and not (kind == "int" and step == 1):
        raise ConfigError(f"{where}: step and log cannot be combined")
    return Param(key, kind, low=low, high=high, step=step, log=use_log, when=cond)


def _number(value: Any, kind: str, where: str) -> int | float:
    if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where}: not a number ({value!r})") from None
    if not _is_number(value):
        raise ConfigError(f"{where}: not a number ({value!r})")
    if kind == "int":
        if float(value) != int(value):
            raise ConfigError(f"{where}: an int param needs integer bounds (got {value!r})")
        return int(value)
    return float(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_when(when: Any, where: str) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    if when is None:
        return ()
    if not isinstance(when, dict) or not when:
        raise ConfigError(f"{where}: when must be a mapping like {{loss.loss_type: focal}}")
    return tuple((str(k), tuple(v) if isinstance(v, list) else (v,)) for k, v in when.items())


def _check_conditions(params: list[Param], path: Path) -> None:
    """Condition keys must be categorical params defined earlier; values must be among their choices."""
    seen: dict[str, Param] = {}
    for p in params:
        for key, values in p.when:
            where = f"{path}: space.{p.key}.when.{key}"
            if key not in seen:
                later = any(q.key == key for q in params)
                why = "must be defined above it in space" if later else "is not a param in space"
                raise ConfigError(f"{where}: condition key {key} {why}")
            parent = seen[key]
            if parent.kind != "categorical":
                raise ConfigError(f"{where}: conditions need a categorical param ({key} is {parent.kind})")
            for v in values:
                if not any(v == c and type(v) is type(c) for c in parent.choices):
                    raise ConfigError(f"{where}: {v!r} is not among the choices of {key} {list(parent.choices)}")
        seen[p.key] = p


def _find_preset(name: str, path: Path) -> Path:
    for cand in (path.parent / name, REPO_ROOT / name, REPO_ROOT / "experiments" / "configs" / name, Path(name)):
        if cand.is_file():
            return cand
    raise ConfigError(f"{path}: config preset '{name}' not found (looked beside the sweep file and in experiments/configs)")


def _flat_base(raw: Any, path: Path) -> dict[str, Any]:
    """`base:` as sections ({data: {image_size: 64}}) or dotted keys ({data.image_size: 64})."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: 'base' must be a mapping")
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if "." in str(k):
            out[str(k)] = v
        elif isinstance(v, dict) and k != "tags":
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            raise ConfigError(f"{path}: base.{k} must be a section mapping (e.g. base: {{data: {{image_size: 64}}}})")
    return out


@dataclass(frozen=True)
class Recipe:
    """The layers a sweep's Config is composed from (core.config.compose): sweep defaults, the `config:` preset,
    `base:`, `--set`, then the study's metric as train.monitor. A trial adds its params before the metric."""

    config_file: Path | None
    layers: tuple[tuple[dict[str, Any], str], ...]
    monitor: tuple[dict[str, Any], str]

    def compose(self, *extra: tuple[dict[str, Any], str]) -> Config:
        return compose(self.config_file, [*self.layers, *extra, self.monitor],
                       defaults=[(SWEEP_DEFAULTS, "sweep defaults")])


def _recipe(raw: dict[str, Any], path: Path, study: StudySettings, cli: dict[str, Any], swept: set[str]) -> Recipe:
    """default.yaml <- SWEEP_DEFAULTS <- models/<model_type>.yaml <- config preset <- base <- --set; train.monitor
    and monitor_mode from the study (the training CLI's order, core.config.compose)."""
    preset = _find_preset(str(raw["config"]), path) if raw.get("config") else None
    base = _flat_base(raw.get("base"), path)
    layers = []
    for values, source in ((base, f"{path} base"), (cli, "--set")):
        for key in values:
            if key in swept:
                raise ConfigError(f"'{key}' from {source} is also swept in {path} space; fix it in one place only")
        layers.append((values, source))
    monitor = base.get("train.monitor", cli.get("train.monitor"))
    if monitor and monitor != study.metric:
        log.warning("event=sweep_monitor_override train.monitor=%s study.metric=%s", monitor, study.metric)
    last = ({"train.monitor": study.metric, "train.monitor_mode": "max" if study.direction == "maximize" else "min"},
            f"{path} study.metric/direction")
    return Recipe(preset, tuple(layers), last)


def _probe(spec: SweepSpec) -> None:
    """Compose every choice (or low/high) of every param on top of the base, so a bad value (a bad key, an
    unregistered name: the Config checks names against the registries) fails now, before any trial runs."""
    for p in spec.params:
        for value in p.probe_values():
            spec.recipe.compose(({p.key: value}, f"{spec.path} space.{p.key}"))
