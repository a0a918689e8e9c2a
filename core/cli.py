"""The argument parser every CLI uses: one flag style, no abbreviations, did-you-mean for unknown flags.

Flags are spelled with underscores (`--batch_size`, the seed scripts' style); the hyphenated spelling
(`--batch-size`, `--test-pairs`) is accepted as an alias, and `--help` shows the underscore form only.
Prefixes are not expanded (`--lr` never silently means `--lr_scheduler`); an unknown flag names the closest one.
"""
from __future__ import annotations

import argparse
import atexit
import difflib
import os
import sys
import threading
from typing import Any, NoReturn, Sequence


def _spellings(option: str) -> list[str]:
    """'--batch-size' -> ['--batch_size', '--batch-size']: the canonical underscore form first, then the alias."""
    if not option.startswith("--") or len(option) < 4:
        return [option]
    name = option[2:]
    canonical = "--" + name.replace("-", "_")
    alias = "--" + name.replace("_", "-")
    return [canonical] + ([alias] if alias != canonical else [])


def _is_alias(option: str) -> bool:
    return option.startswith("--") and not option.startswith("--no-") and _spellings(option)[0] != option


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Lists each flag once, in its underscore spelling."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        every = action.option_strings
        action.option_strings = [s for s in every if not _is_alias(s)] or every
        try:
            return super()._format_action_invocation(action)
        finally:
            action.option_strings = every


class ArgumentParser(argparse.ArgumentParser):
    """argparse with allow_abbrev=False, underscore flags with hyphen aliases, and did-you-mean on unknown flags."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument_group(self, *args: Any, **kwargs: Any):  # groups share the aliasing
        group = super().add_argument_group(*args, **kwargs)
        group.add_argument = _aliasing(group.add_argument)  # type: ignore[method-assign]
        return group

    def add_mutually_exclusive_group(self, **kwargs: Any):
        group = super().add_mutually_exclusive_group(**kwargs)
        group.add_argument = _aliasing(group.add_argument)  # type: ignore[method-assign]
        return group

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        return _aliasing(super().add_argument)(*args, **kwargs)

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None):  # type: ignore[override]
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(self.unknown_message(extras))
        return ns

    def unknown_message(self, extras: Sequence[str]) -> str:
        """'unknown flag --batchsize (did you mean --batch_size?)', or argparse's wording for stray values."""
        flags = [e.split("=", 1)[0] for e in extras if e.startswith("-")]
        if not flags:
            return f"unrecognized arguments: {' '.join(extras)}"
        known = sorted(s for s in self._option_string_actions if s.startswith("--") and "-" not in s[2:])
        parts = []
        for flag in flags:
            close = difflib.get_close_matches(flag.replace("-", "_").replace("__", "--", 1), known, n=1, cutoff=0.6)
            parts.append(f"{flag}" + (f" (did you mean {close[0]}?)" if close else ""))
        return f"unknown flag{'s' if len(parts) > 1 else ''} {', '.join(parts)}; --help lists them"


def _aliasing(add):
    """Wrap an add_argument so each long flag is registered in both spellings, underscore first."""

    def _add(*args: Any, **kwargs: Any) -> argparse.Action:
        names: list[str] = []
        for a in args:
            names += _spellings(a) if isinstance(a, str) and a.startswith("--") else [a]
        if "dest" not in kwargs and args and all(isinstance(a, str) and a.startswith("-") for a in args):
            longs = [n for n in names if n.startswith("--")]
            if longs:
                kwargs["dest"] = longs[0][2:]
        return add(*dict.fromkeys(names), **kwargs)

    return _add


def exit_now(code: int | None) -> NoReturn:
    """End a CLI like sys.exit(code), minus the interpreter's teardown of its ~5,000 modules (torch, timm,
    MLflow, sklearn: 1.7-2.7 s a process here, after the last file is written). Everything a normal exit does
    for the outside world still happens, in the same order: non-daemon threads are joined, atexit handlers run
    (logging flushed and closed, multiprocessing's children such as DataLoader workers ended, MLflow's own),
    and stdout/stderr are flushed. Only `if __name__ == "__main__"` calls it: code that imports a CLI's main()
    (tests, sweeps) exits the usual way."""
    main = threading.main_thread()
    for t in threading.enumerate():
        if t is not main and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # closed or replaced streams: nothing left to flush
            pass
    os._exit(code or 0)
