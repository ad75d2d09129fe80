"""TOSCA functions, evaluated here wherever they are nested.

tosca-parser leaves functions inside maps, lists and ``concat`` arguments as raw dicts, has no ``join``, and
evaluates only ``get_input`` and ``get_property`` (TOSCA-PARSER-NOTES P9). So every function is evaluated by
this module: what can be known from the template alone becomes a value; ``get_attribute`` becomes an
:class:`~khutulun.model.AttributeRef` (and ``concat``/``join``/``token`` over one stay expressions) for the
agent to resolve once the nodes run.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from khutulun.errors import Problem
from khutulun.expressions import text_of
from khutulun.model import ENDPOINT_CAPABILITY, EXPR_TYPES, PLACED_ATTRIBUTES, AttributeRef, Concat, Join, Token
from khutulun.tosca.source import Document, FieldPath, child
from khutulun.tosca.types import TypeIndex
from khutulun.tosca.values import is_function
from khutulun.tosca.views import NodeView, TopologyViews, did_you_mean

__all__ = ["INVALID", "Evaluator", "text_of"]

STANDARD_ATTRIBUTES = ("tosca_id", "tosca_name", "state")


class _Invalid:
    def __repr__(self) -> str:
        return "INVALID"


INVALID: Any = _Invalid()
"""The value of a function that could not be evaluated (its problem is reported)."""


class _Context:
    def __init__(self, node: str | None, source: str | None = None, target: str | None = None) -> None:
        self.node = node
        self.source = source
        self.target = target


class Evaluator:
    def __init__(self, doc: Document, views: TopologyViews, index: TypeIndex, inputs: dict[str, Any]) -> None:
        self.doc = doc
        self.views = views
        self.index = index
        self.inputs = inputs
        self.problems: list[Problem] = []
        self.attribute_refs: dict[str, set[str]] = defaultdict(set)
        """Node → the other nodes whose attributes it uses: ordering edges the agent must respect."""
        self.referenced_capabilities: set[tuple[str, str]] = set()
        self._memo: dict[tuple[str, ...], Any] = {}
        self._active: list[tuple[str, ...]] = []

    def _problem(self, path: FieldPath, message: str) -> Any:
        self.problems.append(self.doc.problem(path, message))
        return INVALID

    # -- entry points -------------------------------------------------------------------------------------

    def evaluate(self, value: Any, path: FieldPath, node: str | None = None, *, source: str | None = None,
                 target: str | None = None) -> Any:
        return self._eval(value, path, _Context(node, source, target))

    def node_property(self, node: str, name: str) -> Any:
        view = self.views.nodes[node]
        return self._memoized(("property", node, name), (*view.path, "properties", name),
                              lambda p: self._eval(view.properties[name], p, _Context(node)))

    def capability_property(self, node: str, capability: str, name: str) -> Any:
        view = self.views.nodes[node]
        cap = view.capabilities[capability]
        return self._memoized(("capability", node, capability, name),
                              (*view.path, "capabilities", capability, "properties", name),
                              lambda p: self._eval(cap.properties[name], p, _Context(node)))

    def _memoized(self, key: tuple[str, ...], path: FieldPath, compute: Any) -> Any:
        if key in self._memo:
            return self._memo[key]
        if key in self._active:
            loop = " → ".join(".".join(k[1:]) for k in self._active[self._active.index(key):])
            return self._problem(path, f"circular reference: {loop} → {'.'.join(key[1:])}")
        self._active.append(key)
        try:
            value = compute(path)
        finally:
            self._active.pop()
        self._memo[key] = value
        return value

    # -- evaluation ---------------------------------------------------------------------------------------

    def _eval(self, value: Any, path: FieldPath, ctx: _Context) -> Any:
        if is_function(value):
            (name, args), = value.items()
            return self._call(name, args, (*path, name), ctx)
        if isinstance(value, dict):
            return {k: self._eval(v, (*path, k), ctx) for k, v in value.items()}
        if isinstance(value, list):
            return [self._eval(v, (*path, i), ctx) for i, v in enumerate(value)]
        return value

    def _call(self, name: str, args: Any, path: FieldPath, ctx: _Context) -> Any:
        if name == "get_input":
            return self._get_input(args, path)
        if name in ("get_property", "get_attribute"):
            if not isinstance(args, list) or len(args) < 2:
                return self._problem(path, f"{name} needs a list of at least two arguments: "
                                     "[node or SELF, (capability or requirement,) name, ...]")
            result = self._get(name == "get_attribute", args, path, ctx)
            if isinstance(result, AttributeRef) and ctx.node is not None and result.node != ctx.node \
                    and not self._placed(result):
                self.attribute_refs[ctx.node].add(result.node)
            return result
        if name == "concat":
            return self._concat(args, path, ctx)
        if name == "join":
            return self._join(args, path, ctx)
        if name == "token":
            return self._token(args, path, ctx)
        return self._problem(path, f"the function {name} is not supported by Khutulun")

    def _get_input(self, args: Any, path: FieldPath) -> Any:
        parts = args if isinstance(args, list) else [args]
        if not parts or not isinstance(parts[0], str):
            return self._problem(path, "get_input needs the name of an input")
        name = parts[0]
        if name not in self.inputs:
            declared = ", ".join(sorted(self.inputs)) or "none"
            return self._problem(path, f"unknown input {name!r}{did_you_mean(name, self.inputs)} "
                                 f"(the template declares: {declared})")
        return self._descend(self.inputs[name], parts[1:], path, f"input {name!r}")

    def _descend(self, value: Any, keys: list[Any], path: FieldPath, what: str) -> Any:
        for key in keys:
            if value is INVALID or isinstance(value, EXPR_TYPES):
                return value
            found = child(value, key, INVALID)
            if found is INVALID:
                return self._problem(path, f"{what} has no entry {key!r}")
            value = found
        return value

    def _entity(self, word: Any, path: FieldPath, ctx: _Context) -> str | None:
        if word == "SELF":
            if ctx.node is None:
                self._problem(path, "SELF can only be used inside a node template")
            return ctx.node
        if word in ("SOURCE", "TARGET"):
            found = ctx.source if word == "SOURCE" else ctx.target
            if found is None:
                self._problem(path, f"{word} can only be used inside a relationship")
            return found
        if not isinstance(word, str) or word not in self.views.nodes:
            if isinstance(word, str) and word in self.views.broken:
                return None  # reported where that node is defined
            hint = did_you_mean(str(word), self.views.nodes)
            self._problem(path, f"there is no node template {word!r}{hint}")
            return None
        return word

    def _placed(self, ref: AttributeRef) -> bool:
        """An endpoint's address or port: placement decides it, so referring to it orders nothing."""
        view = self.views.nodes.get(ref.node)
        capability = view.capabilities.get(ref.capability) if view is not None and ref.capability else None
        return capability is not None and ENDPOINT_CAPABILITY in capability.chain and ref.attribute in PLACED_ATTRIBUTES

    def _hosts(self, node: str) -> list[str]:
        """The nodes ``node`` is hosted on, nearest first, through HostedOn requirements."""
        out: list[str] = []
        current = node
        while True:
            view = self.views.nodes.get(current)
            hosted = next((r for r in view.requirements
                           if self.index.is_a(r.relationship, "tosca.relationships.HostedOn")), None) if view else None
            if hosted is None or hosted.target in out or hosted.target == node:
                return out
            current = hosted.target
            out.append(current)

    def _get(self, attribute: bool, args: list[Any], path: FieldPath, ctx: _Context) -> Any:
        function = "get_attribute" if attribute else "get_property"
        if args[0] == "HOST":
            # TOSCA: the nearest node up the HostedOn chain that has the property or attribute.
            if ctx.node is None:
                return self._problem(path, "HOST can only be used inside a node template")
            hosts = self._hosts(ctx.node)
            for host in hosts:
                view = self.views.nodes[host]
                names = set(view.property_defs) | (set(self.index.merged(view.type, "attributes")) if attribute
                                                   else set())
                if args[1] in names or (len(args) >= 3 and args[1] in view.capabilities):
                    return self._get(attribute, [host, *args[1:]], path, ctx)
            if not hosts:
                return self._problem(path, f"HOST: {ctx.node!r} is not hosted on any node (no HostedOn "
                                     "requirement)")
            return self._problem(path, f"HOST: no host of {ctx.node!r} ({', '.join(hosts)}) has "
                                 f"{'an attribute' if attribute else 'a property'} {args[1]!r}")
        node = self._entity(args[0], path, ctx)
        if node is None:
            return INVALID
        view = self.views.nodes[node]
        # [node, capability-or-requirement, name, ...] when the second argument names one, else [node, name, ...]
        if len(args) >= 3 and isinstance(args[1], str) and args[1] in view.capabilities:
            return self._from_capability(attribute, view, args[1], args[2], args[3:], path)
        requirement = next((r for r in view.requirements if r.name == args[1]), None) if len(args) >= 3 else None
        if requirement is not None:
            target = self.views.nodes.get(requirement.target)
            if target is None:
                return INVALID
            if requirement.capability is None:
                return self._from_node(attribute, target, args[2], args[3:], path)
            return self._from_capability(attribute, target, requirement.capability, args[2], args[3:], path)
        if not isinstance(args[1], str):
            return self._problem(path, f"{function}: {args[1]!r} is not a name")
        return self._from_node(attribute, view, args[1], args[2:], path)

    def _from_node(self, attribute: bool, view: NodeView, name: Any, rest: list[Any], path: FieldPath) -> Any:
        if attribute:
            declared = set(self.index.merged(view.type, "attributes")) | set(view.property_defs)
            if name not in declared and name not in STANDARD_ATTRIBUTES:
                hint = did_you_mean(str(name), declared)
                return self._problem(path, f"node {view.name!r} ({view.type}) has no attribute {name!r}{hint}")
            return AttributeRef(view.name, str(name), None, tuple(rest))
        if name not in view.properties:
            hint = did_you_mean(str(name), view.property_defs)
            if name in view.property_defs:
                return self._problem(path, f"property {name!r} of {view.name!r} has no value")
            return self._problem(path, f"node {view.name!r} ({view.type}) has no property {name!r}{hint}")
        value = self.node_property(view.name, str(name))
        return self._descend(value, rest, path, f"property {name!r} of {view.name!r}")

    def _from_capability(self, attribute: bool, view: NodeView, capability: str, name: Any, rest: list[Any],
                         path: FieldPath) -> Any:
        cap = view.capabilities[capability]
        self.referenced_capabilities.add((view.name, capability))
        if attribute:
            declared = set(self.index.merged(cap.type, "attributes")) | set(cap.property_defs)
            if name not in declared:
                hint = did_you_mean(str(name), declared)
                return self._problem(path, f"capability {view.name}.{capability} ({cap.type}) has no attribute "
                                     f"{name!r}{hint}")
            return AttributeRef(view.name, str(name), capability, tuple(rest))
        if name not in cap.properties:
            hint = did_you_mean(str(name), cap.property_defs)
            return self._problem(path, f"capability {view.name}.{capability} has no property {name!r}{hint}")
        value = self.capability_property(view.name, capability, str(name))
        return self._descend(value, rest, path, f"property {name!r} of {view.name}.{capability}")

    def _parts(self, args: Any, path: FieldPath, ctx: _Context) -> list[Any] | None:
        if not isinstance(args, list):
            self._problem(path, "expected a list of arguments")
            return None
        parts = [self._eval(a, (*path, i), ctx) for i, a in enumerate(args)]
        return None if any(p is INVALID for p in parts) else parts

    def _concat(self, args: Any, path: FieldPath, ctx: _Context) -> Any:
        parts = self._parts(args, path, ctx)
        if parts is None:
            return INVALID
        if any(isinstance(p, EXPR_TYPES) for p in parts):
            return Concat(tuple(parts))
        return "".join(text_of(p) for p in parts)

    def _join(self, args: Any, path: FieldPath, ctx: _Context) -> Any:
        if not isinstance(args, list) or not 1 <= len(args) <= 2:
            return self._problem(path, "join needs [list of values] or [list of values, delimiter]")
        items = self._eval(args[0], (*path, 0), ctx)
        delimiter = self._eval(args[1], (*path, 1), ctx) if len(args) == 2 else ""
        if items is INVALID or delimiter is INVALID:
            return INVALID
        if not isinstance(items, list):
            return self._problem((*path, 0), "join needs a list of values to join")
        if not isinstance(delimiter, str):
            return self._problem((*path, 1), "the delimiter of join must be a string")
        if any(isinstance(p, EXPR_TYPES) for p in items):
            return Join(tuple(items), delimiter)
        return delimiter.join(text_of(p) for p in items)

    def _token(self, args: Any, path: FieldPath, ctx: _Context) -> Any:
        parts = self._parts(args, path, ctx)
        if parts is None:
            return INVALID
        if len(parts) != 3 or not isinstance(parts[1], str) or not isinstance(parts[2], int) or not parts[1]:
            return self._problem(path, "token needs [string, separator characters, index]")
        if isinstance(parts[0], EXPR_TYPES):
            return Token(parts[0], parts[1], parts[2])
        pieces = re.split("[" + re.escape(parts[1]) + "]", text_of(parts[0]))
        if not 0 <= parts[2] < len(pieces):
            return self._problem(path, f"token: index {parts[2]} is out of range ({len(pieces)} parts)")
        return pieces[parts[2]]
