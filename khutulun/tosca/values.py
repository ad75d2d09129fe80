"""TOSCA values: checking them against primitive types, scalar units, and inputs given as text.

tosca-parser accepts anything for a ``string`` (it calls ``str()``, TOSCA-PARSER-NOTES P8) and crashes when
a value of the wrong type meets a constraint (P11), so values are checked here first. Numbers are accepted
for strings (``PORT: 8080`` in an environment is common and unambiguous); booleans, lists and maps are not,
since ``str(True)`` would hand a workload ``True`` where the user meant ``true``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml

__all__ = ["FUNCTION_NAMES", "check_value", "coerce", "contains_function", "convert_input", "is_function",
           "normalize_scalar", "parse_scalar"]

FUNCTION_NAMES = frozenset({"get_input", "get_property", "get_attribute", "get_operation_output", "concat", "join",
                            "token", "get_artifact", "get_nodes_of_type"})

_SCALAR = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([A-Za-z]+)\s*$")

_SIZE: dict[str, float] = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2, "gb": 1000**3,
                           "gib": 1024**3, "tb": 1000**4, "tib": 1024**4}
_TIME = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
_FREQUENCY = {"hz": 1.0, "khz": 1e3, "mhz": 1e6, "ghz": 1e9}
_BITRATE = {"bps": 1.0, "kbps": 1e3, "kibps": 1024.0, "mbps": 1e6, "mibps": 1024.0**2, "gbps": 1e9,
            "gibps": 1024.0**3, "tbps": 1e12, "tibps": 1024.0**4}
_UNITS: dict[str, dict[str, float]] = {"scalar-unit.size": _SIZE, "scalar-unit.time": _TIME,
                                       "scalar-unit.frequency": _FREQUENCY, "scalar-unit.bitrate": _BITRATE}
_VERSION = re.compile(r"^\d+(\.\d+){0,2}(\.[A-Za-z0-9_]+(-\d+)?)?$")


def is_function(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in FUNCTION_NAMES


def contains_function(value: Any) -> bool:
    if is_function(value):
        return True
    if isinstance(value, dict):
        return any(contains_function(v) for v in value.values())
    if isinstance(value, list):
        return any(contains_function(v) for v in value)
    return False


def coerce(value: Any, type_name: str, entry_schema: Any = None) -> Any:
    """A checked value in the form the model keeps: numbers where strings are declared become their text
    (``command: [serve, 8080]``), scalar units become numbers; lists and maps are coerced entry by entry."""
    if type_name == "string" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if type_name in _UNITS:
        return normalize_scalar(value, type_name)
    entry = _entry_type(entry_schema)
    if entry and type_name == "list" and isinstance(value, list):
        return [coerce(v, entry) for v in value]
    if entry and type_name == "map" and isinstance(value, dict):
        return {k: coerce(v, entry) for k, v in value.items()}
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a map"
    return type(value).__name__


def parse_scalar(value: Any, type_name: str) -> float | None:
    """The value of a scalar-unit in its base unit (bytes, seconds, hertz, bits per second), or None."""
    units = _UNITS[type_name]
    if not isinstance(value, str):
        return None
    match = _SCALAR.match(value)
    if not match:
        return None
    factor = units.get(match.group(2).lower())
    if factor is None:
        return None
    number = float(match.group(1)) * factor
    return number if math.isfinite(number) else None


def normalize_scalar(value: Any, type_name: str) -> Any:
    """Scalar units become numbers: sizes in bytes (int), the others as floats. Anything else is unchanged."""
    if type_name not in _UNITS or not isinstance(value, str):
        return value
    number = parse_scalar(value, type_name)
    if number is None:
        return value
    return round(number) if type_name == "scalar-unit.size" else number


def check_value(value: Any, type_name: str, entry_schema: Any = None) -> str | None:
    """Why ``value`` is not of the primitive type ``type_name``, or None when it is (or when the type is not
    primitive: data types are left to tosca-parser). Functions are not checked here; their results are."""
    if is_function(value):
        return None
    if type_name == "string":
        if isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            return None
        hint = " (quote it to pass it as text)" if isinstance(value, bool) or value is None else ""
        return f"expected a string, got {_kind(value)}{hint}"
    if type_name == "integer":
        return None if isinstance(value, int) and not isinstance(value, bool) else \
            f"expected an integer, got {_kind(value)}"
    if type_name == "float":
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else \
            f"expected a number, got {_kind(value)}"
    if type_name == "boolean":
        return None if isinstance(value, bool) else f"expected a boolean (true or false), got {_kind(value)}"
    if type_name == "version":
        return None if isinstance(value, (str, int, float)) and not isinstance(value, bool) and \
            _VERSION.match(str(value)) else f"expected a version such as 1.2.3, got {_kind(value)}"
    if type_name == "timestamp":
        return None if isinstance(value, str) else f"expected a timestamp, got {_kind(value)}"
    if type_name in _UNITS:
        if parse_scalar(value, type_name) is not None:
            return None
        units = ", ".join(sorted(_UNITS[type_name]))
        return f"expected a {type_name} such as {_EXAMPLES[type_name]!r} (units: {units}), got {_kind(value)}"
    if type_name == "list":
        if not isinstance(value, list):
            return f"expected a list, got {_kind(value)}"
        entry = _entry_type(entry_schema)
        if entry:
            for i, item in enumerate(value):
                why = check_value(item, entry)
                if why:
                    return f"entry {i}: {why}"
        return None
    if type_name == "map":
        if not isinstance(value, dict):
            return f"expected a map, got {_kind(value)}"
        entry = _entry_type(entry_schema)
        if entry:
            for key, item in value.items():
                why = check_value(item, entry)
                if why:
                    return f"entry {key!r}: {why}"
        return None
    if type_name == "range":
        ok = isinstance(value, list) and len(value) == 2 and all(
            (isinstance(v, int) and not isinstance(v, bool)) or v == "UNBOUNDED" for v in value)
        return None if ok else f"expected a range [low, high], got {_kind(value)}"
    return None


_EXAMPLES = {"scalar-unit.size": "512 MiB", "scalar-unit.time": "10 s", "scalar-unit.frequency": "2 GHz",
             "scalar-unit.bitrate": "100 Mbps"}


def _entry_type(entry_schema: Any) -> str | None:
    if isinstance(entry_schema, str):
        return entry_schema
    if isinstance(entry_schema, dict) and isinstance(entry_schema.get("type"), str):
        return str(entry_schema["type"])
    return None


def convert_input(value: Any, type_name: str) -> Any:
    """An input value as the template declares it: text from ``--input name=value`` is converted to the
    declared type when it reads as one; anything else is returned as given (and then checked)."""
    if not isinstance(value, str) or type_name in ("string", "timestamp", "version") or type_name in _UNITS:
        return value
    text = value.strip()
    if type_name == "integer" and re.fullmatch(r"[-+]?\d+", text):
        return int(text)
    if type_name == "float":
        try:
            return float(text)
        except ValueError:
            return value
    if type_name == "boolean":
        lowered = text.lower()
        if lowered in ("true", "yes", "on", "1"):
            return True
        if lowered in ("false", "no", "off", "0"):
            return False
        return value
    if type_name in ("list", "map", "range"):
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError:
            return value
        return parsed if isinstance(parsed, (list, dict)) else value
    return value
