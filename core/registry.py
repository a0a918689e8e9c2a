"""A tiny name -> factory registry shared by every pluggable family (models, losses, schedulers, ...)."""
from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, TypeVar

from core.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """`register` a factory under a name, `create(name, **kw)` it, list `names()`."""

    def __init__(self, family: str) -> None:
        self.family = family
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str, factory: Callable[..., T] | None = None):
        """Register `factory` under `name`; usable as a decorator when `factory` is omitted."""

        def _add(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.family} {name!r} is already registered")
            self._factories[name] = fn
            return fn

        return _add(factory) if factory is not None else _add

    def get(self, name: str) -> Callable[..., T]:
        """Return the factory for `name` or raise UnknownNameError naming the valid choices."""
        try:
            return self._factories[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def create(self, name: str, **kwargs: Any) -> T:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(str(name), self.names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown {self.family} {name!r}{hint}; valid: {', '.join(self.names())}"
