"""Name -> factory registries, one per pluggable family, and the families themselves.

A registry is the only list of valid names for its family: the Config validates against it, `--help` lists
it, sweeps and tests parametrize over it. Entries register themselves where they are implemented (a loss in
training/losses.py, a preset in models/presets.py, ...), i.e. in HIGHER layers than core. So that core
never imports those layers at module import, each family names its entry module as a string.

Listing or checking names (`names()`, `in`, `check_name()`, `check()` in a family without arguments) does not
import the entry module when its source says them literally: they are read from it with `ast`
(`@LOSSES.register("focal", ...)`), so a misspelt name fails in milliseconds, before torch or albumentations are
imported. A module that registers computed names (models/presets.py) is imported instead. The factories (`get()`,
`create()`, `meta()`) and the parser of a family whose values take arguments ("partial:3", through `check()`)
import the entry module on first use. Adding an entry is one
decorated function or class in that module (plus its own config fields, if any).
"""
from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
from typing import Any, Callable, Generic, TypeVar

from core.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """`register` a factory under a name (with metadata such as a loss's num_outputs), `create(name, **kw)`
    it, list `names()`. `entry_module`: where the entries register (imported when a factory is needed).
    `takes_arguments`: values are "name" or "name:arg:...", checked by the parser the entry module sets."""

    def __init__(self, family: str, entry_module: str | None = None, takes_arguments: bool = False) -> None:
        self.family = family
        self.entry_module = entry_module
        self.takes_arguments = takes_arguments
        self._loaded = entry_module is None
        self._factories: dict[str, Callable[..., T]] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        self._parser: Callable[[str], Any] | None = None
        self._declared: frozenset[str] | None | bool = False  # False: not read yet; None: not readable

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
        if not self.takes_arguments:
            raise ValueError(f"{self.family} values take no arguments: declare its Registry with takes_arguments=True")
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

    def declared_names(self) -> frozenset[str] | None:
        """The names the entry module's source registers, read without importing it; None when it registers a
        computed name (or its source cannot be read): then only importing it tells."""
        if self._declared is False:
            self._declared = _names_in_source(self) if self.entry_module else None
        return self._declared  # type: ignore[return-value]

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

    def check_name(self, value: str) -> str:
        """`value` if its name (the part before ':' for a family with arguments) is registered, else
        UnknownNameError; never imports a module whose source lists its names."""
        name = value.split(":", 1)[0] if self.takes_arguments and isinstance(value, str) else value
        if name not in self:
            raise UnknownNameError(self.unknown_message(name))
        return value

    def check(self, value: str) -> str:
        """`value` if it is valid, else UnknownNameError or ValueError with a one-line reason: the name first
        (check_name), then, for a family with arguments, the family's parser (which imports the entry module)."""
        self.check_name(value)
        if self.takes_arguments:
            self.load()
            if self._parser is not None:
                self._parser(value)
            else:
                self.get(value)
        return value

    def names(self) -> list[str]:
        return sorted(self._known())

    def __contains__(self, name: object) -> bool:
        return name in self._known()

    def _known(self) -> set[str]:
        """Every registered name: read from the entry module's source until it is imported, then the registry's."""
        if not self._loaded:
            declared = self.declared_names()
            if declared is not None:
                return set(declared) | set(self._factories)
            self.load()
        return set(self._factories)

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(str(name), self.names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown {self.family} {name!r}{hint}; valid: {', '.join(self.names())}"


def _names_in_source(registry: Registry) -> frozenset[str] | None:
    """The literal names `registry.entry_module` registers: the first argument of each `<R>.register(...)` call
    whose receiver R is this registry, imported from core.registry (`from core.registry import LOSSES`) or an
    alias of it (`FREEZE = FREEZE_STRATEGIES`). None when a registration's name is not a string literal or the
    source is not found. Finding the module imports its parent packages only (whose __init__ imports nothing heavy)."""
    try:
        spec = importlib.util.find_spec(registry.entry_module)  # type: ignore[arg-type]
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read(), spec.origin)
    ours = {k for k, v in globals().items() if v is registry}  # its names in this module: LOSSES, ...
    receivers = {a.asname or a.name for node in tree.body if isinstance(node, ast.ImportFrom)
                 and node.module == "core.registry" for a in node.names if a.name in ours}
    for node in tree.body:  # module-level aliases, in order: FREEZE = FREEZE_STRATEGIES
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Name) and node.value.id in receivers:
            receivers.update(t.id for t in node.targets if isinstance(t, ast.Name))
    names: set[str] = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "register"
                and isinstance(node.func.value, ast.Name) and node.func.value.id in receivers):
            first = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "name"), None)
            if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                return None
            names.add(first.value)
    return frozenset(names)


# ---------------------------------------------------------------------------- the families the Config names
MODEL_PRESETS: Registry = Registry("model preset", "models.presets")  # meta: kind (image | video)
LOSSES: Registry = Registry("loss", "training.losses")  # meta: num_outputs
OPTIMIZERS: Registry = Registry("optimizer", "training.optim")
SCHEDULERS: Registry = Registry("scheduler", "training.optim")
FREEZE_STRATEGIES: Registry = Registry("freeze strategy", "training.freezing", takes_arguments=True)  # partial:N
AUG_POLICIES: Registry = Registry("augmentation policy", "augmentation.policies", takes_arguments=True)  # randaugment:N:M
HEADS: Registry = Registry("head", "models.heads")
FAMILIES: dict[str, Registry] = {  # config key -> the registry its value names
    "model.model_type": MODEL_PRESETS, "loss.loss_type": LOSSES, "optim.optimizer": OPTIMIZERS,
    "optim.scheduler": SCHEDULERS, "train.freeze_strategy": FREEZE_STRATEGIES, "data.aug_policy": AUG_POLICIES,
    "model.head": HEADS,
}
