"""YAML documents that remember where each value was written.

tosca-parser reports no source locations (TOSCA-PARSER-NOTES P12) and PyYAML silently keeps the last of two
equal keys. So every file is composed once here, with libyaml when it is there, and built into plain data
while the line and column of every key and value are recorded by field path. The same plain data is what
tosca-parser is given later, so nothing is parsed twice.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor

from khutulun.errors import Problem

__all__ = ["Document", "FieldPath", "Positions", "child", "format_path", "parse_yaml"]

FieldPath = tuple[str | int, ...]

_Loader: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# A document whose aliases expand past this many values is refused: a "billion laughs" file would otherwise
# take the loader's memory and time before any TOSCA is looked at.
MAX_VALUES = 2_000_000


_MISSING: Any = object()


def child(value: Any, key: Any, default: Any = None) -> Any:
    """``value[key]`` for a map's key or a list's index, else ``default``."""
    if isinstance(value, dict):
        return value.get(key, default)
    if isinstance(value, list) and isinstance(key, int) and not isinstance(key, bool) and 0 <= key < len(value):
        return value[key]
    return default


def format_path(path: FieldPath) -> str:
    """``topology_template.node_templates.web.properties.command[2]``; odd keys are quoted."""
    out = ""
    for part in path:
        if isinstance(part, str) and part and all(c.isalnum() or c in "_-" for c in part):
            out += ("." if out else "") + part
        elif isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f"[{part!r}]"
    return out


@dataclass
class Positions:
    """1-based (line, column) of values, and of the keys that hold them, by field path."""

    values: dict[FieldPath, tuple[int, int]] = field(default_factory=dict)
    keys: dict[FieldPath, tuple[int, int]] = field(default_factory=dict)

    def of(self, path: FieldPath, *, key: bool = False) -> tuple[int, int]:
        """The closest known position: the path itself, else the nearest enclosing field."""
        table = self.keys if key else self.values
        for length in range(len(path), -1, -1):
            prefix = path[:length]
            if prefix in table:
                return table[prefix]
            if key and prefix in self.values:
                return self.values[prefix]
            if not key and prefix in self.keys:
                return self.keys[prefix]
        return (1, 1)


@dataclass
class Document:
    """One YAML file of a template: its data and where everything in it was written."""

    display: str
    """The file as messages name it."""
    data: Any
    positions: Positions

    def problem(self, path: FieldPath, message: str, *, key: bool = False) -> Problem:
        line, column = self.positions.of(path, key=key)
        return Problem(message=message, file=self.display, line=line, column=column, path=format_path(path))

    def walk(self, path: FieldPath = ()) -> Iterator[tuple[FieldPath, Any]]:
        """Every (path, value) in the document, depth first, containers before their contents."""
        stack: list[tuple[FieldPath, Any]] = [(path, self.get(path))]
        while stack:
            here, value = stack.pop()
            yield here, value
            if isinstance(value, dict):
                stack.extend(((*here, k), v) for k, v in reversed(list(value.items())))
            elif isinstance(value, list):
                stack.extend(((*here, i), v) for i, v in reversed(list(enumerate(value))))

    def get(self, path: FieldPath, default: Any = None) -> Any:
        value = self.data
        for part in path:
            value = child(value, part, _MISSING)
            if value is _MISSING:
                return default
        return value


class _Builder:
    def __init__(self, display: str) -> None:
        self.display = display
        self.positions = Positions()
        self.problems: list[Problem] = []
        self.constructor = SafeConstructor()
        self.count = 0
        self.active: set[int] = set()

    def _pos(self, node: yaml.Node) -> tuple[int, int]:
        return node.start_mark.line + 1, node.start_mark.column + 1

    def _problem(self, node: yaml.Node, path: FieldPath, message: str) -> None:
        line, column = self._pos(node)
        self.problems.append(Problem(message, self.display, line, column, format_path(path)))

    def build(self, node: yaml.Node, path: FieldPath) -> Any:
        self.count += 1
        if self.count > MAX_VALUES:
            raise _TooLarge
        self.positions.values[path] = self._pos(node)
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, path)
        if id(node) in self.active:  # an alias to an enclosing node: the data would be infinite
            self._problem(node, path, "this alias refers to a node that contains it")
            return None
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
        finally:
            self.active.discard(id(node))
        self._problem(node, path, f"unexpected YAML node {node.tag!r}")
        return None

    def _scalar(self, node: yaml.ScalarNode, path: FieldPath) -> Any:
        # Plain strings are most of a template: taken as they are, without the constructor's dispatch.
        if node.tag == "tag:yaml.org,2002:str":
            return node.value
        try:
            value = self.constructor.construct_object(node, deep=True)
        except ConstructorError as e:
            self._problem(node, path, f"cannot read this value: {e.problem}")
            return None
        # The model is JSON: dates stay as the text the user wrote, bytes as base64 text.
        if isinstance(value, (datetime.date, datetime.datetime, bytes)):
            return node.value
        return value

    def _mapping(self, node: yaml.MappingNode, path: FieldPath) -> dict[Any, Any]:
        # "<<" merge keys (YAML 1.1): built first, so that the mapping's own keys, built after, win and keep
        # their own positions; earlier merge sources win over later ones.
        merged: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag != "tag:yaml.org,2002:merge":
                continue
            for source in value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]:
                if isinstance(source, yaml.MappingNode):
                    for key, value in self._mapping(source, path).items():
                        merged.setdefault(key, value)
                else:
                    self._problem(source, path, "a merge key ('<<') needs a map or a list of maps")
        out: dict[Any, Any] = {}
        first_seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self._problem(key_node, path, "a key must be a plain value, not a list or a map")
                continue
            key = self._scalar(key_node, path)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                key = str(key)
            if key in first_seen:
                self._problem(key_node, (*path, key),
                              f"duplicate key {key!r} (first at line {first_seen[key]}); YAML keeps only one")
                continue
            first_seen[key] = key_node.start_mark.line + 1
            self.positions.keys[(*path, key)] = self._pos(key_node)
            out[key] = self.build(value_node, (*path, key))
        for key, value in merged.items():
            out.setdefault(key, value)
        return out


class _TooLarge(Exception):
    pass


def parse_yaml(display: str, text: str, *, positions: bool = True) -> tuple[Document | None, list[Problem]]:
    """Parse one file. A syntax error gives no document; other problems come with the document.

    Without ``positions`` (for a caller that only follows imports), libyaml builds the data on its own, several
    times faster, and nothing is located: problems are left for the load that follows.
    """
    if not positions:
        try:
            return Document(display, yaml.load(text, Loader=_Loader), Positions()), []
        except yaml.YAMLError:
            return None, []
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        what = e.problem or "invalid YAML"
        context = f" ({e.context})" if e.context else ""
        return None, [Problem(f"YAML syntax error: {what}{context}", display, line, column)]
    except yaml.YAMLError as e:
        return None, [Problem(f"YAML error: {e}", display, 1, 1)]
    finally:
        loader.dispose()
    if node is None:
        return None, [Problem("the file is empty", display, 1, 1)]
    builder = _Builder(display)
    try:
        data = builder.build(node, ())
    except _TooLarge:
        return None, [Problem(f"the document expands to more than {MAX_VALUES} values (through aliases)",
                              display, 1, 1)]
    except RecursionError:
        return None, [Problem("the document is nested too deeply", display, 1, 1)]
    return Document(display, data, builder.positions), builder.problems
