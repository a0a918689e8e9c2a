"""Name -> factory registries, one per pluggable family, and the families themselves.

A registry is the only list of valid names for its family: the Config validates against it, `--help` lists
it, sweeps and tests parametrize over it. Entries register themselves where they are implemented (a loss in
training/losses.py, a preset in models/presets.py, ...), i.e. in HIGHER layers than core. So that core
never imports those layers at module import, each family names its entry module as a string, and the first
lookup (`names()`, `get()`, `in`, `check()`) imports it with importlib. Adding an entry is one decorated
function or class in that module (plus its own config fields, if any).
"""
from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, Generic, TypeVar

from core.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """`register` a factory under a name (with metadata such as a loss's num_outputs), `create(name, **kw)`
    it, list `names()`. `entry_module`: where the entries register (imported on first lookup)."""

    def __init__(self, family: str, entry_module: str | None = None) -> None:
        self.family = family
        self.entry_module = entry_module
        self._loaded = entry_module is None
        self._factories: dict[str, Callable[..., T]] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        self._parser: Callable[[str], Any] | None = None

    def register(self, name: str, factory: Callable[..., T] | None = None, **meta: Any):
        """Register `factory` under `name`; usable as a decorator when `factory` is omitted."""

        def _add(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.family} {name!r} is already registered")
            self._factories[name] = fn
            self._meta[name] = dict(meta)
            return fn

        return _add(factory) if factory is not None else _add

    def set_parser(self, parser: Callable[[str], Any]) -> None:
        """For families whose values carry arguments ("partial:3", "randaugment:2:9"): `parser(value)` raises
        ValueError/UnknownNameError for a bad value; `check()` calls it."""
        self._parser = parser

    def load(self) -> "Registry[T]":
        """Import the entry module once, so every entry is registered."""
        if not self._loaded:
            self._loaded = True  # set first: the module's own lookups during its import must not recurse
            try:
                importlib.import_module(self.entry_module)  # type: ignore[arg-type]
            except BaseException:
                self._loaded = False
                raise
        return self

    def get(self, name: str) -> Callable[..., T]:
        """Return the factory for `name` or raise UnknownNameError naming the valid choices."""
        self.load()
        try:
            return self._factories[name]
        except (KeyError, TypeError):
            raise UnknownNameError(self.unknown_message(name)) from None

    def meta(self, name: str) -> dict[str, Any]:
        """What the entry declared when it registered (e.g. num_outputs, kind)."""
        self.get(name)
        return self._meta[name]

    def create(self, name: str, **kwargs: Any) -> T:
        return self.get(name)(**kwargs)

    def check(self, value: str) -> str:
        """`value` if it is a valid name (with arguments, through the family's parser), else UnknownNameError
        or ValueError with a one-line reason."""
        self.load()
        if self._parser is not None:
            self._parser(value)
        else:
            self.get(value)
        return value

    def names(self) -> list[str]:
        self.load()
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        self.load()
        return name in self._factories

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(str(name), self.names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown {self.family} {name!r}{hint}; valid: {', '.join(self.names())}"


# ---------------------------------------------------------------------------- the families the Config names
MODEL_PRESETS: Registry = Registry("model preset", "models.presets")  # meta: kind (image | video)
LOSSES: Registry = Registry("loss", "training.losses")  # meta: num_outputs
OPTIMIZERS: Registry = Registry("optimizer", "training.optim")
SCHEDULERS: Registry = Registry("scheduler", "training.optim")
FREEZE_STRATEGIES: Registry = Registry("freeze strategy", "training.freezing")
AUG_POLICIES: Registry = Registry("augmentation policy", "augmentation.policies")
HEADS: Registry = Registry("head", "models.heads")
FAMILIES: dict[str, Registry] = {  # config key -> the registry its value names
    "model.model_type": MODEL_PRESETS, "loss.loss_type": LOSSES, "optim.optimizer": OPTIMIZERS,
    "optim.scheduler": SCHEDULERS, "train.freeze_strategy": FREEZE_STRATEGIES, "data.aug_policy": AUG_POLICIES,
    "model.head": HEADS,
}
