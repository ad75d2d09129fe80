"""Frozen dataclasses to JSON and back, driven by their type hints.

The model, the placement, the plan and the state records all cross a boundary as JSON: the shared state
directory and the agent's API. One codec keeps them in step with their class definitions. Expressions in
property values are written as ``{"$expr": "<kind>", ...}`` so that they survive the round trip.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any, TypeVar, cast

from khutulun import model

__all__ = ["dump", "dump_value", "load", "load_value"]

T = TypeVar("T")

_EXPR_TAGS: dict[str, type[Any]] = {
    "get_attribute": model.AttributeRef,
    "concat": model.Concat,
    "join": model.Join,
    "token": model.Token,
}
_TAG_OF = {cls: tag for tag, cls in _EXPR_TAGS.items()}


def dump(obj: Any) -> Any:
    """Turn a dataclass (or a structure of them) into JSON-able data."""
    if isinstance(obj, model.EXPR_TYPES):
        return dump_value(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: dump(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Mapping):
        return {str(k): dump(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [dump(v) for v in obj]
    return obj


def dump_value(value: Any) -> Any:
    """A property value (JSON-like data with expressions inside) as JSON-able data."""
    if isinstance(value, model.EXPR_TYPES):
        out: dict[str, Any] = {"$expr": _TAG_OF[type(value)]}
        for f in dataclasses.fields(value):
            out[f.name] = dump_value(getattr(value, f.name))
        return out
    if isinstance(value, Mapping):
        return {str(k): dump_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [dump_value(v) for v in value]
    return value


def load_value(data: Any) -> Any:
    """The inverse of :func:`dump_value`."""
    if isinstance(data, dict):
        tag = data.get("$expr")
        if isinstance(tag, str) and tag in _EXPR_TAGS:
            cls = _EXPR_TAGS[tag]
            kwargs = {k: load_value(v) for k, v in data.items() if k != "$expr"}
            for name in ("parts", "path"):
                if name in kwargs:
                    kwargs[name] = tuple(kwargs[name])
            return cls(**kwargs)
        return {k: load_value(v) for k, v in data.items()}
    if isinstance(data, list):
        return [load_value(v) for v in data]
    return data


def load(cls: type[T], data: Any) -> T:
    """Build an instance of the dataclass ``cls`` from what :func:`dump` produced."""
    return cast(T, _load(cls, data))


@cache
def _hints(cls: type[Any]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _load(tp: Any, data: Any) -> Any:
    if tp is Any:
        return load_value(data)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if data is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        if len(candidates) == 1:
            return _load(candidates[0], data)
        for candidate in candidates:  # unions of primitives: take the first that fits
            if isinstance(candidate, type) and isinstance(data, candidate):
                return data
        return data
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_load(args[0], v) for v in data)
        return tuple(_load(a, v) for a, v in zip(args, data, strict=True))
    if origin in (list, Sequence):
        (arg,) = typing.get_args(tp)
        return [_load(arg, v) for v in data]
    if origin in (dict, Mapping):
        _, value_type = typing.get_args(tp)
        return {k: _load(value_type, v) for k, v in data.items()}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(data)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = _hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name in data:
                kwargs[f.name] = _load(hints[f.name], data[f.name])
        return tp(**kwargs)
    if tp is float and isinstance(data, int):
        return float(data)
    return data
