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
from collections.abc import Callable, Mapping, Sequence
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
    decode: Decoder = _decoder(cast(Any, cls))
    return cast(T, decode(data))


Decoder = Callable[[Any], Any]


def _identity(data: Any) -> Any:
    return data


@cache
def _decoder(tp: Any) -> Decoder:
    """A function that decodes data of type ``tp``, made once per type: the records of a large service are
    decoded on every reconcile pass, and reading the type hints again for every value cost most of it."""
    if tp is Any:
        return load_value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _union_decoder(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            item = _decoder(args[0])
            return lambda data: tuple(item(v) for v in data)
        items = [_decoder(a) for a in args]
        return lambda data: tuple(d(v) for d, v in zip(items, data, strict=True))
    if origin in (list, Sequence):
        (arg,) = typing.get_args(tp)
        item = _decoder(arg)
        return lambda data: [item(v) for v in data]
    if origin in (dict, Mapping):
        value = _decoder(typing.get_args(tp)[1])
        return lambda data: {k: value(v) for k, v in data.items()}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass_decoder(tp)
    if tp is float:
        return lambda data: float(data) if isinstance(data, int) and not isinstance(data, bool) else data
    return _identity


def _union_decoder(tp: Any) -> Decoder:
    args = typing.get_args(tp)
    candidates = [a for a in args if a is not type(None)]
    if len(candidates) == 1:
        inner = _decoder(candidates[0])
        return lambda data: None if data is None else inner(data)
    # Unions of primitives (str | int in a field path) are taken as they come.
    return _identity


def _dataclass_decoder(cls: type[Any]) -> Decoder:
    hints = typing.get_type_hints(cls)
    fields = [(f.name, _decoder(hints[f.name])) for f in dataclasses.fields(cls)]

    def decode(data: Any) -> Any:
        return cls(**{name: decode_field(data[name]) for name, decode_field in fields if name in data})

    return decode
