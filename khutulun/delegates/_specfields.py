"""Checks of the fields that several delegates' specs share. Each adds what is wrong to ``problems`` (so that a
spec names all of its problems in one error) and returns a value the parse can go on with."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, TypeGuard, TypeVar

from khutulun.errors import DelegateError

__all__ = [
    "absolute_path", "environment", "is_command", "is_text", "stop_timeout", "unknown_keys", "valid_or_none",
]

Spec = TypeVar("Spec")


def valid_or_none(parse: Callable[[], Spec]) -> Spec | None:
    """The parsed spec, or None when it is not valid: deleting must work for a spec that never was valid (and
    for an orphan's, which is empty), reading what it can do without."""
    try:
        return parse()
    except DelegateError:
        return None


def is_text(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and "\0" not in value


def is_command(value: Any) -> TypeGuard[list[str] | tuple[str, ...]]:
    """A non-empty list of strings whose first, the program, is not empty."""
    return isinstance(value, list | tuple) and bool(value) and all(is_text(a) for a in value) and bool(value[0])


def unknown_keys(spec: Mapping[str, Any], known: Collection[str], problems: list[str]) -> None:
    unknown = sorted(set(spec) - set(known))
    if unknown:
        problems.append(f"unknown keys {unknown!r} (known: {sorted(known)!r})")


def environment(value: Any, problems: list[str]) -> dict[str, str]:
    """Names (without '=') mapped to strings."""
    found = value or {}
    if not isinstance(found, Mapping):
        problems.append(f"'environment' must map names to strings, not {found!r}")
        return {}
    for key, item in found.items():
        if not (is_text(key) and key and "=" not in key and is_text(item)):
            problems.append(f"'environment' entry {key!r}: {item!r} is not a name (without '=') and a string")
    return dict(found)


def absolute_path(key: str, value: Any, problems: list[str]) -> None:
    """``value`` is an absolute path, or None."""
    if value is not None and not (is_text(value) and Path(value).is_absolute()):
        problems.append(f"{key!r} must be an absolute path or null, not {value!r}")


def stop_timeout(value: Any, default: float, problems: list[str]) -> float:
    """Seconds (0 or more); None for ``default``."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        problems.append(f"'stop_timeout' must be a number of seconds (0 or more), not {value!r}")
        return default
    return float(value)
