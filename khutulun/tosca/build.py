"""From checked views and evaluated functions to the model: the last step of loading, and its own checks
(inputs, dependency cycles, values that functions produced)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import yaml

from khutulun import model
from khutulun.errors import Problem
from khutulun.expressions import text_of
from khutulun.model import EXPR_TYPES, PROFILE_TYPES, AttributeRef, Concat, NodeKind, Token
from khutulun.tosca.functions import INVALID, Evaluator
from khutulun.tosca.source import Document, FieldPath
from khutulun.tosca.types import TypeIndex
from khutulun.tosca.values import check_value, coerce, contains_function, convert_input, is_function
from khutulun.tosca.views import NodeView, TopologyViews, did_you_mean

__all__ = ["ArtifactFinder", "build_topology", "find_cycles", "resolve_inputs"]

INPUTS: FieldPath = ("topology_template", "inputs")

ArtifactFinder = Callable[[str], tuple[str, bytes | None]]
"""An artifact's file name as written → (its path in the template's source, its content or None)."""


def resolve_inputs(doc: Document, given: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any],
                                                                        list[Problem]]:
    """(the value of every declared input, the given values as their types, problems). A required input
    that was not given is :data:`INVALID`, so that what uses it is not reported twice."""
    problems: list[Problem] = []
    declared = doc.get(INPUTS)
    declared = declared if isinstance(declared, dict) else {}
    for name in given:
        if name not in declared:
            names = ", ".join(sorted(map(str, declared))) or "none"
            problems.append(doc.problem(INPUTS if declared else (), f"unknown input {name!r}"
                                        f"{did_you_mean(name, map(str, declared))} (the template declares: {names})",
                                        key=True))
    values: dict[str, Any] = {}
    typed: dict[str, Any] = {}
    for name, definition in declared.items():
        definition = definition if isinstance(definition, dict) else {}
        type_name = definition.get("type", "string")
        schema = definition.get("entry_schema")
        if name in given:
            value = convert_input(given[name], type_name) if isinstance(type_name, str) else given[name]
            why = check_value(value, type_name, schema) if isinstance(type_name, str) else None
            if why:
                problems.append(doc.problem((*INPUTS, name), f"input {name!r} = {given[name]!r}: {why}"))
                values[name] = INVALID
            else:
                values[name] = typed[name] = value
        elif "default" in definition:
            value = definition["default"]
            why = check_value(value, type_name, schema) if isinstance(type_name, str) else None
            if why:  # tosca-parser skips checking falsy defaults (P10)
                problems.append(doc.problem((*INPUTS, name, "default"), f"default of input {name!r}: {why}"))
            values[name] = value
        elif definition.get("required", True) is False:
            values[name] = None
        else:
            problems.append(doc.problem((*INPUTS, name), f"input {name!r} is required and has no default: "
                                        f"give it with --input {name}=VALUE", key=True))
            values[name] = INVALID
    return values, typed, problems


def find_cycles(doc: Document, views: TopologyViews, attribute_refs: Mapping[str, set[str]]) -> list[Problem]:
    """Dependency cycles through requirements and ``get_attribute`` references: no order could start them."""
    edges: dict[str, list[tuple[str, FieldPath]]] = {name: [] for name in views.nodes}
    for view in views.nodes.values():
        for req in view.requirements:
            edges[view.name].append((req.target, req.path))
        for other in sorted(attribute_refs.get(view.name, ())):
            edges[view.name].append((other, (*view.path, "properties")))
    problems: list[Problem] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    reported: set[frozenset[str]] = set()
    for start in views.nodes:
        if state.get(start):
            continue
        stack: list[tuple[str, int]] = [(start, 0)]
        trail: list[tuple[str, FieldPath | None]] = [(start, None)]
        state[start] = 1
        while stack:
            node, i = stack[-1]
            if i < len(edges[node]):
                stack[-1] = (node, i + 1)
                target, path = edges[node][i]
                if target not in edges:
                    continue
                if state.get(target) == 1:
                    names = [n for n, _ in trail][[n for n, _ in trail].index(target):]
                    key = frozenset(names)
                    if key not in reported:
                        reported.add(key)
                        loop = " → ".join([*names, target])
                        problems.append(doc.problem(path, f"dependency cycle: {loop}; no order could start these"))
                elif not state.get(target):
                    state[target] = 1
                    stack.append((target, 0))
                    trail.append((target, path))
            else:
                state[node] = 2
                stack.pop()
                trail.pop()
    return problems


def _contains(value: Any, test: Callable[[Any], bool]) -> bool:
    if test(value):
        return True
    if isinstance(value, dict):
        return any(_contains(v, test) for v in value.values())
    if isinstance(value, list):
        return any(_contains(v, test) for v in value)
    return False


def _text_where_declared(value: Any, type_name: str, entry_schema: Any) -> Any:
    """An attribute (a port, a pid) where a string is declared becomes a one-part concat, so that it
    resolves to text at run time, as a literal number there would have been turned into text now."""
    entry = entry_schema.get("type") if isinstance(entry_schema, dict) else entry_schema
    if type_name == "string" and isinstance(value, (AttributeRef, Token)):
        return Concat((value,))
    if type_name == "list" and entry == "string" and isinstance(value, list):
        return [_text_where_declared(v, "string", None) for v in value]
    if type_name == "map" and entry == "string" and isinstance(value, dict):
        return {k: _text_where_declared(v, "string", None) for k, v in value.items()}
    return value


def _kind(chain: tuple[str, ...]) -> NodeKind:
    for type_name in chain:
        if type_name in PROFILE_TYPES:
            return PROFILE_TYPES[type_name]
    return NodeKind.OTHER


def _lower_occurrence(definition: Any) -> int:
    occurrences = definition.get("occurrences") if isinstance(definition, dict) else None
    if isinstance(occurrences, list) and occurrences and isinstance(occurrences[0], int):
        return occurrences[0]
    return 1


class _Builder:
    def __init__(self, doc: Document, views: TopologyViews, evaluator: Evaluator, index: TypeIndex,
                 find_artifact: ArtifactFinder) -> None:
        self.doc = doc
        self.views = views
        self.evaluator = evaluator
        self.index = index
        self.find_artifact = find_artifact
        self.problems: list[Problem] = []
        self.rendered: dict[str, dict[str, Any]] = {}

    def value(self, raw: Any, evaluated: Any, definition: Any, path: FieldPath, what: str) -> Any:
        """A property's evaluated value, checked when a function produced it, scalars as numbers; a value of a
        data type gets the defaults of its fields, each field made the same way."""
        type_name = definition.get("type") if isinstance(definition, dict) else None
        if not isinstance(type_name, str) or evaluated is INVALID or isinstance(evaluated, EXPR_TYPES):
            return evaluated
        if isinstance(evaluated, dict) and not self.index.is_primitive(type_name) \
                and self.index.get(type_name, "data_types") is not None:
            fields = self.index.merged(type_name, "properties")
            given = {k: d["default"] for k, d in fields.items() if isinstance(d, dict) and "default" in d}
            given.update(evaluated)
            return {key: self.value(raw.get(key) if isinstance(raw, dict) else None, field_value, fields.get(key),
                                    (*path, key), f"{what}.{key}")
                    for key, field_value in given.items()}
        schema = definition.get("entry_schema")
        if contains_function(raw):  # literal values were checked when the template was read
            if _contains(evaluated, lambda v: v is INVALID):
                return INVALID  # the function's own problem is reported
            if _contains(evaluated, lambda v: isinstance(v, EXPR_TYPES)):
                return _text_where_declared(evaluated, type_name, schema)
            why = check_value(evaluated, type_name, schema)
            if why:
                self.problems.append(self.doc.problem(path, f"{what}: {why}"))
                return INVALID
        return coerce(evaluated, type_name, schema)

    def node(self, view: NodeView, targeted: set[tuple[str, str]]) -> model.Node:
        properties = {}
        for name, raw in view.properties.items():
            path = (*view.path, "properties", name)
            evaluated = self.evaluator.node_property(view.name, name)
            properties[name] = self.value(raw, evaluated, view.property_defs.get(name), path, f"property {name!r}")
        capability_defs = self.index.merged(view.type, "capabilities")
        capabilities = {}
        for cap_name, cap in view.capabilities.items():
            present = (cap.assigned or (view.name, cap_name) in targeted
                       or (view.name, cap_name) in self.evaluator.referenced_capabilities
                       or _lower_occurrence(capability_defs.get(cap_name)) > 0)
            if not present:
                continue
            cap_props = {}
            for name, raw in cap.properties.items():
                path = (*view.path, "capabilities", cap_name, "properties", name)
                evaluated = self.evaluator.capability_property(view.name, cap_name, name)
                cap_props[name] = self.value(raw, evaluated, cap.property_defs.get(name), path,
                                             f"property {name!r} of capability {cap_name!r}")
            capability = model.Capability(cap_name, cap.type, cap.chain, cap_props)
            if capability.is_endpoint:
                port = cap_props.get("port", 0)
                if isinstance(port, EXPR_TYPES):
                    self.problems.append(self.doc.problem((*view.path, "capabilities", cap_name, "properties",
                                                           "port"),
                                                          "an endpoint's port must be known before deploy (a "
                                                          "number, or 0 for any free port), not an attribute"))
            capabilities[cap_name] = capability
        requirements = tuple(
            model.Requirement(r.name, r.target, r.capability, r.relationship, r.kind,
                              self.evaluator.evaluate(r.properties, (*r.path, "relationship", "properties"),
                                                      view.name, source=view.name, target=r.target))
            for r in view.requirements)
        artifacts = self.artifacts(view)
        if view.name in self.rendered:
            properties["files"] = {**(properties.get("files") or {}), **self.rendered[view.name]}
        self.check_ready(view, properties, capabilities)
        line, column = self.doc.positions.of(view.path, key=True)
        return model.Node(name=view.name, type=view.type, types=view.chain, kind=_kind(view.chain),
                          properties=properties, capabilities=capabilities, requirements=requirements,
                          artifacts=artifacts, source=model.SourceRef(self.doc.display, line, column))

    def check_ready(self, view: NodeView, properties: dict[str, Any],
                    capabilities: dict[str, model.Capability]) -> None:
        """A ready condition checks one thing, and a TCP or HTTP check on the node needs an endpoint."""
        conditions = [((*view.path, "properties", "ready"), properties.get("ready"), True)]
        conditions += [((*view.path, "capabilities", c.name, "properties", "ready"), c.properties.get("ready"), False)
                       for c in capabilities.values()]
        for path, condition, on_node in conditions:
            if not isinstance(condition, dict):
                continue
            kinds = [k for k in ("tcp", "http", "command") if condition.get(k)]
            if len(kinds) != 1:
                self.problems.append(self.doc.problem(path, "a ready condition needs exactly one of tcp, http and "
                                                      f"command (it has {', '.join(kinds) or 'none'})"))
                continue
            whole_url = str(condition.get("http", "")).startswith(("http:", "https:"))
            if on_node and kinds[0] != "command" and not whole_url \
                    and not any(c.is_endpoint for c in capabilities.values()):
                self.problems.append(self.doc.problem(path, f"the ready condition checks {kinds[0]} on an endpoint, "
                                                      f"but {view.name!r} has none"))

    def artifacts(self, view: NodeView) -> dict[str, model.Artifact]:
        """The node's artifacts, their files found next to the template; a template artifact of a directory
        is rendered into its files (see :meth:`render`)."""
        raw = view.raw.get("artifacts")
        out: dict[str, model.Artifact] = {}
        if not isinstance(raw, dict):
            return out
        for name, definition in raw.items():
            path = (*view.path, "artifacts", name)
            if isinstance(definition, str):
                definition = {"file": definition}
            if not isinstance(definition, dict) or not isinstance(definition.get("file"), str):
                self.problems.append(self.doc.problem(path, f"artifact {name!r} needs a file"))
                continue
            file_path = path if isinstance(raw[name], str) else (*path, "file")
            if "://" in definition["file"]:
                self.problems.append(self.doc.problem(file_path, f"artifact {name!r} names a URL; Khutulun never "
                                                      "fetches from the network: put the file next to the template"))
                continue
            rel, data = self.find_artifact(definition["file"])
            if data is None:
                self.problems.append(self.doc.problem(file_path, f"artifact {name!r}: there is no file "
                                                      f"{definition['file']!r} next to the template"))
                continue
            type_name = self.index.canonical(definition.get("type")) or "tosca.artifacts.File"
            deploy_path = definition.get("deploy_path")
            deploy_path = deploy_path if isinstance(deploy_path, str) else None
            if self.index.is_a(type_name, "khutulun.artifacts.Template"):
                if _kind(view.chain) is not NodeKind.DIRECTORY:
                    self.problems.append(self.doc.problem(path, f"artifact {name!r}: a template artifact "
                                                          "belongs on a khutulun.nodes.Directory"))
                    continue
                self.rendered.setdefault(view.name, {})[deploy_path or str(name)] = self.render(
                    view, str(name), data, path)
            props = self.evaluator.evaluate(definition.get("properties") or {}, (*path, "properties"), view.name)
            out[str(name)] = model.Artifact(str(name), type_name, rel, deploy_path,
                                            props if isinstance(props, dict) else {})
        return out

    def render(self, view: NodeView, name: str, data: bytes, path: FieldPath) -> Any:
        """A template's text with each ``{{ function }}`` replaced by its value (a concat when one is only
        known at run time)."""
        try:
            text = data.decode()
        except UnicodeDecodeError:
            self.problems.append(self.doc.problem(path, f"artifact {name!r}: a template must be UTF-8 text"))
            return INVALID
        parts: list[Any] = []
        last = 0
        for match in re.finditer(r"\{\{(.*?)\}\}", text, re.S):
            parts.append(text[last:match.start()])
            last = match.end()
            inner = match.group(1).strip()
            where = f"artifact {name!r}, line {text.count(chr(10), 0, match.start()) + 1}"
            try:
                call = yaml.safe_load("{" + inner + "}")
            except yaml.YAMLError:
                call = None
            if not is_function(call):
                self.problems.append(self.doc.problem(path, f"{where}: {{{{ {inner} }}}} is not a TOSCA function "
                                                      "(such as {{ get_attribute: [api, endpoint, port] }})"))
                return INVALID
            parts.append(self.evaluator.evaluate(call, (*path, "file"), view.name))
        parts.append(text[last:])
        if any(p is INVALID for p in parts):
            return INVALID
        if any(isinstance(p, EXPR_TYPES) for p in parts):
            return Concat(tuple(p for p in parts if p != ""))
        return "".join(text_of(p) for p in parts)

    def policies(self) -> tuple[model.Policy, ...]:
        raw = self.doc.get(("topology_template", "policies"))
        groups = self.doc.get(("topology_template", "groups"))
        groups = groups if isinstance(groups, dict) else {}
        out = []
        for i, entry in enumerate(raw if isinstance(raw, list) else []):
            if not (isinstance(entry, dict) and len(entry) == 1):
                continue
            (name, policy), = entry.items()
            if not isinstance(policy, dict) or self.index.get(policy.get("type"), "policy_types") is None:
                continue
            type_name = self.index.canonical(policy["type"]) or str(policy["type"])
            targets: list[str] = []
            for target in policy.get("targets") or []:
                group = groups.get(target)
                members = group.get("members") if isinstance(group, dict) else None
                if isinstance(members, list):
                    targets.extend(str(m) for m in members)
                else:
                    targets.append(str(target))
            defs = self.index.merged(type_name, "properties")
            props = {k: d["default"] for k, d in defs.items() if isinstance(d, dict) and "default" in d}
            given = policy.get("properties")
            if isinstance(given, dict):
                props.update(given)
            path = ("topology_template", "policies", i, name, "properties")
            evaluated = self.evaluator.evaluate(props, path)
            out.append(model.Policy(str(name), type_name, self.index.chain(type_name), tuple(targets),
                                    {k: self.value(props[k], v, defs.get(k), (*path, k), f"property {k!r}")
                                     for k, v in evaluated.items()}))
        return tuple(out)

    def outputs(self) -> dict[str, model.Output]:
        raw = self.doc.get(("topology_template", "outputs"))
        out: dict[str, model.Output] = {}
        if raw is None:
            return out
        if not isinstance(raw, dict):
            self.problems.append(self.doc.problem(("topology_template", "outputs"), "outputs must be a map"))
            return out
        for name, definition in raw.items():
            path = ("topology_template", "outputs", name)
            if not isinstance(definition, dict) or "value" not in definition:
                self.problems.append(self.doc.problem(path, f"output {name!r} needs a value", key=True))
                continue
            unknown = set(definition) - {"value", "description", "type"}
            if unknown:
                self.problems.append(self.doc.problem((*path, sorted(unknown)[0]),
                                                      f"output {name!r} has an unknown field "
                                                      f"{sorted(unknown)[0]!r}", key=True))
            value = self.evaluator.evaluate(definition["value"], (*path, "value"))
            description = definition.get("description")
            out[str(name)] = model.Output(str(name), value, description if isinstance(description, str) else "")
        return out


def build_topology(doc: Document, views: TopologyViews, evaluator: Evaluator, index: TypeIndex,
                   inputs: dict[str, Any], find_artifact: ArtifactFinder) -> tuple[model.Topology | None,
                                                                                    list[Problem]]:
    builder = _Builder(doc, views, evaluator, index, find_artifact)
    targeted = {(r.target, r.capability) for v in views.nodes.values() for r in v.requirements if r.capability}
    policies = builder.policies()
    outputs = builder.outputs()
    nodes = {name: builder.node(view, targeted) for name, view in views.nodes.items()}
    problems = builder.problems + evaluator.problems
    if problems:
        return None, problems
    description = doc.get(("description",))
    metadata = doc.get(("metadata",))
    topology = model.Topology(
        source=doc.display, nodes=nodes,
        inputs={k: v for k, v in inputs.items() if v is not INVALID}, outputs=outputs, policies=policies,
        description=description.strip() if isinstance(description, str) else "",
        metadata={str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {})
    return topology, []
