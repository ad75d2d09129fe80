"""Resolving the expressions the loader left in property values, once the nodes they name have run.

Pure: the caller supplies a lookup that answers an :class:`~khutulun.model.AttributeRef` or raises
:class:`Unknown` when the value does not exist yet (the node is not placed or not applied).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from khutulun.model import EXPR_TYPES, AttributeRef, Concat, Join, Token

__all__ = ["Unknown", "has_expressions", "references", "resolve", "text_of"]


class Unknown(Exception):
    """A value that will only be known after something is applied."""

    def __init__(self, ref: AttributeRef) -> None:
        super().__init__(str(ref))
        self.ref = ref


def text_of(value: Any) -> str:
    """A value as ``concat`` and ``join`` put it into a string (the loader does the same)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


def resolve(value: Any, lookup: Callable[[AttributeRef], Any]) -> Any:
    """``value`` with every expression replaced by what it evaluates to now."""
    if isinstance(value, AttributeRef):
        found = lookup(value)
        for key in value.path:
            if isinstance(found, dict) and key in found:
                found = found[key]
            elif isinstance(found, list) and isinstance(key, int) and 0 <= key < len(found):
                found = found[key]
            else:
                raise Unknown(value)
        return found
    if isinstance(value, Concat):
        return "".join(text_of(resolve(p, lookup)) for p in value.parts)
    if isinstance(value, Join):
        return value.delimiter.join(text_of(resolve(p, lookup)) for p in value.parts)
    if isinstance(value, Token):
        pieces = re.split("[" + re.escape(value.separators) + "]", text_of(resolve(value.value, lookup)))
        return pieces[value.index] if 0 <= value.index < len(pieces) else ""
    if isinstance(value, dict):
        return {k: resolve(v, lookup) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [resolve(v, lookup) for v in value]
    return value


def references(value: Any) -> list[AttributeRef]:
    """Every attribute reference inside ``value``."""
    if isinstance(value, AttributeRef):
        return [value]
    if isinstance(value, (Concat, Join)):
        return [r for p in value.parts for r in references(p)]
    if isinstance(value, Token):
        return references(value.value)
    if isinstance(value, dict):
        return [r for v in value.values() for r in references(v)]
    if isinstance(value, (list, tuple)):
        return [r for v in value for r in references(v)]
    return []


def has_expressions(value: Any) -> bool:
    if isinstance(value, EXPR_TYPES):
        return True
    if isinstance(value, dict):
        return any(has_expressions(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(has_expressions(v) for v in value)
    return False
