"""Node templates read against their types: properties with defaults, capabilities, resolved requirements.

This is where the checks tosca-parser does not make are made (TOSCA-PARSER-NOTES P5): that a requirement
names an existing node template, that the node has the type the requirement definition asks for, that it has
a capability of the right type, and that the relationship may target that capability.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from khutulun.errors import Problem
from khutulun.model import ENDPOINT_CAPABILITY, STORAGE_CAPABILITY, RequirementKind
from khutulun.tosca.source import Document, FieldPath
from khutulun.tosca.types import TypeIndex
from khutulun.tosca.values import check_value

__all__ = ["CapabilityView", "NodeView", "RequirementView", "TopologyViews", "did_you_mean", "read_topology"]

NODE_TEMPLATES: FieldPath = ("topology_template", "node_templates")


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass
class CapabilityView:
    name: str
    type: str
    chain: tuple[str, ...]
    properties: dict[str, Any]
    """Assigned values over the defaults of the capability type; functions not yet evaluated."""
    property_defs: dict[str, Any]
    assigned: bool
    """The template assigns it (rather than just inheriting its definition)."""


@dataclass
class RequirementView:
    name: str
    index: int
    path: FieldPath
    target: str
    capability: str | None
    relationship: str
    kind: RequirementKind
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass
class NodeView:
    name: str
    type: str
    chain: tuple[str, ...]
    path: FieldPath
    raw: dict[str, Any]
    properties: dict[str, Any]
    """Assigned values over the type's defaults; functions not yet evaluated."""
    property_defs: dict[str, Any]
    capabilities: dict[str, CapabilityView]
    requirements: list[RequirementView] = field(default_factory=list)


@dataclass
class TopologyViews:
    nodes: dict[str, NodeView]
    broken: set[str]
    """Node templates too broken to check further (unknown type, not a map): problems under them that
    tosca-parser cascades from the first one are dropped."""
    problems: list[Problem]


def _defaults(defs: dict[str, Any]) -> dict[str, Any]:
    return {name: d["default"] for name, d in defs.items() if isinstance(d, dict) and "default" in d}


def _check_properties(doc: Document, path: FieldPath, values: dict[str, Any], defs: dict[str, Any],
                      problems: list[Problem], owner: str) -> None:
    for name, value in values.items():
        definition = defs.get(name)
        if name not in defs:
            known = ", ".join(sorted(map(str, defs))) or "none"
            problems.append(doc.problem((*path, name), f"{owner} has no property {name!r}"
                                        f"{did_you_mean(str(name), map(str, defs))} (it has: {known})", key=True))
            continue
        if isinstance(definition, dict) and isinstance(definition.get("type"), str):
            why = check_value(value, definition["type"], definition.get("entry_schema"))
            if why:
                problems.append(doc.problem((*path, name), f"property {name!r}: {why}"))


def _capabilities(doc: Document, index: TypeIndex, path: FieldPath, raw: dict[str, Any], type_name: str,
                  problems: list[Problem]) -> dict[str, CapabilityView]:
    defs = index.merged(type_name, "capabilities")
    found = raw.get("capabilities")
    assigned: dict[str, Any] = found if isinstance(found, dict) else {}
    out: dict[str, CapabilityView] = {}
    for cap_name, definition in defs.items():
        cap_type = index.capability_type(definition)
        if cap_type is None:
            continue
        property_defs = index.merged(cap_type, "properties")
        values = _defaults(property_defs)
        if isinstance(definition, dict) and isinstance(definition.get("properties"), dict):
            # In a node type, a capability's properties are refinements; their defaults are values.
            values.update(_defaults(definition["properties"]))
        assignment = assigned.get(cap_name)
        given = assignment.get("properties") if isinstance(assignment, dict) else None
        if isinstance(given, dict):
            _check_properties(doc, (*path, "capabilities", cap_name, "properties"), given, property_defs, problems,
                              f"capability {cap_name!r} ({cap_type})")
            values.update(given)
        out[cap_name] = CapabilityView(cap_name, cap_type, index.chain(cap_type), values, property_defs,
                                       assigned=cap_name in assigned)
    return out


def _relationship_type(value: Any, definition: dict[str, Any], relationship_templates: dict[str, Any],
                       index: TypeIndex) -> str | None:
    chosen = value.get("relationship") if isinstance(value, dict) else None
    if isinstance(chosen, dict):
        chosen = chosen.get("type")
    if isinstance(chosen, str) and chosen in relationship_templates:
        template = relationship_templates[chosen]
        chosen = template.get("type") if isinstance(template, dict) else None
    if chosen is None:
        chosen = definition.get("relationship")
        if isinstance(chosen, dict):
            chosen = chosen.get("type")
    if not isinstance(chosen, str):
        return "tosca.relationships.DependsOn"
    return index.canonical(chosen)


class _Reader:
    def __init__(self, doc: Document, index: TypeIndex) -> None:
        self.doc = doc
        self.index = index
        self.problems: list[Problem] = []
        topology = doc.get(("topology_template",))
        self.topology = topology if isinstance(topology, dict) else {}
        templates = self.topology.get("node_templates")
        self.templates: dict[str, Any] = templates if isinstance(templates, dict) else {}
        relationships = self.topology.get("relationship_templates")
        self.relationship_templates = relationships if isinstance(relationships, dict) else {}

    def problem(self, path: FieldPath, message: str, *, key: bool = False) -> None:
        self.problems.append(self.doc.problem(path, message, key=key))

    def node(self, name: str, raw: Any) -> NodeView | None:
        path = (*NODE_TEMPLATES, name)
        if not isinstance(raw, dict):
            self.problem(path, f"node template {name!r} must be a map with a type")
            return None
        type_name = raw.get("type")
        if not isinstance(type_name, str):
            self.problem(path, f"node template {name!r} has no type", key=True)
            return None
        found = self.index.get(type_name, "node_types")
        if found is None:
            hint = did_you_mean(type_name, self.index.names("node_types"))
            self.problem((*path, "type"), f"unknown node type {type_name!r}{hint}")
            return None
        property_defs = self.index.merged(found.name, "properties")
        properties = _defaults(property_defs)
        assigned = raw.get("properties")
        if isinstance(assigned, dict):
            _check_properties(self.doc, (*path, "properties"), assigned, property_defs, self.problems,
                              f"type {found.name}")
            properties.update(assigned)
        capabilities = _capabilities(self.doc, self.index, path, raw, found.name, self.problems)
        self._check_interfaces(path, raw, found.name)
        return NodeView(name, found.name, self.index.chain(found.name), path, raw, properties, property_defs,
                        capabilities)

    def _check_interfaces(self, path: FieldPath, raw: dict[str, Any], type_name: str) -> None:
        """Interfaces a template assigns must be declared by its type (tosca-parser crashes on one that is
        not, TOSCA-PARSER-NOTES P11). Khutulun runs no operations; they are only checked."""
        assigned = raw.get("interfaces")
        if not isinstance(assigned, dict):
            return
        declared = self.index.merged(type_name, "interfaces")
        for name in assigned:
            if name not in declared:
                hint = did_you_mean(str(name), map(str, declared))
                self.problem((*path, "interfaces", name), f"type {type_name} declares no interface {name!r}{hint}",
                             key=True)

    def requirements(self, view: NodeView, nodes: dict[str, NodeView]) -> None:
        raw = view.raw.get("requirements")
        if raw is None:
            return
        if not isinstance(raw, list):
            self.problem((*view.path, "requirements"), "requirements must be a list of one-key maps")
            return
        definitions = self.index.requirements(view.type)
        for i, entry in enumerate(raw):
            path = (*view.path, "requirements", i)
            if not (isinstance(entry, dict) and len(entry) == 1):
                self.problem(path, "a requirement must be a map with one key: its name")
                continue
            (name, value), = entry.items()
            if name not in definitions:
                continue  # tosca-parser reports the unknown requirement name, with the ones that exist
            requirement = self.requirement(view, str(name), i, value, definitions[name], nodes, (*path, name))
            if requirement is not None:
                view.requirements.append(requirement)

    def requirement(self, view: NodeView, name: str, i: int, value: Any, definition: dict[str, Any],
                    nodes: dict[str, NodeView], path: FieldPath) -> RequirementView | None:
        target = value if isinstance(value, str) else value.get("node") if isinstance(value, dict) else None
        target_path = path if isinstance(value, str) else (*path, "node")
        if target is None:
            how = (" (Khutulun does not select nodes with node_filter: name the node template)"
                   if isinstance(value, dict) and "node_filter" in value else "")
            self.problem(path, f"requirement {name!r} of {view.name!r} names no node template{how}")
            return None
        if not isinstance(target, str):
            self.problem(target_path, f"requirement {name!r}: the node must be the name of a node template")
            return None
        if target not in self.templates:
            if self.index.get(target, "node_types") is not None:
                self.problem(target_path, f"requirement {name!r} names the node type {target!r}; name a node "
                             "template instead (Khutulun does not select nodes by type)")
            else:
                hint = did_you_mean(target, self.templates)
                self.problem(target_path, f"requirement {name!r} of {view.name!r}: there is no node template "
                             f"{target!r}{hint}")
            return None
        target_view = nodes.get(target)
        if target_view is None:
            return None  # the target is broken itself, and reported as such
        wanted_node = definition.get("node")
        if isinstance(wanted_node, str) and self.index.get(wanted_node, "node_types") is not None \
                and not self.index.is_a(target_view.type, wanted_node):
            self.problem(target_path, f"requirement {name!r} of {view.name!r} needs a node of type "
                         f"{self.index.canonical(wanted_node)}, but {target!r} is a {target_view.type}")
            return None
        fits, capability = self.capability(view, name, value, definition, target_view, path)
        if not fits:
            return None
        relationship = _relationship_type(value, definition, self.relationship_templates, self.index)
        if relationship is None:
            self.problem(path, f"requirement {name!r}: unknown relationship type")
            return None
        cap_view = target_view.capabilities.get(capability) if capability else None
        valid = self.index.valid_target_types(relationship)
        if cap_view is not None and valid and not any(v in cap_view.chain for v in valid):
            self.problem(path, f"requirement {name!r}: the relationship {relationship} cannot target the "
                         f"capability {capability!r} of {target!r} (a {cap_view.type}; it needs one of "
                         f"{', '.join(valid)})")
            return None
        properties = {}
        if isinstance(value, dict) and isinstance(value.get("relationship"), dict):
            props = value["relationship"].get("properties")
            properties = props if isinstance(props, dict) else {}
        if cap_view is not None and ENDPOINT_CAPABILITY in cap_view.chain:
            kind = RequirementKind.CONNECTION
        elif cap_view is not None and STORAGE_CAPABILITY in cap_view.chain:
            kind = RequirementKind.STORAGE
        else:
            kind = RequirementKind.DEPENDENCY
        return RequirementView(name, i, path, target, capability, relationship, kind, properties)

    def capability(self, view: NodeView, name: str, value: Any, definition: dict[str, Any],
                   target: NodeView, path: FieldPath) -> tuple[bool, str | None]:
        """(whether a capability of the target fits, reported when not; the name of the capability the
        requirement binds to, or None when it binds to the node as a whole)."""
        asked = value.get("capability") if isinstance(value, dict) else None
        wanted_type = self.index.canonical(definition.get("capability"))
        if isinstance(asked, str) and asked in target.capabilities:
            cap = target.capabilities[asked]
            if wanted_type and wanted_type not in cap.chain:
                self.problem((*path, "capability"), f"requirement {name!r} needs a capability of type "
                             f"{wanted_type}; {target.name}.{asked} is a {cap.type}")
                return False, None
            return True, asked
        if isinstance(asked, str):
            asked_type = self.index.canonical(asked)
            if asked_type is None:
                hint = did_you_mean(asked, target.capabilities)
                self.problem((*path, "capability"), f"requirement {name!r}: {target.name!r} has no capability "
                             f"{asked!r}{hint}")
                return False, None
            wanted_type = asked_type
        if wanted_type is None or wanted_type in ("tosca.capabilities.Node", "tosca.capabilities.Root"):
            # The generic "dependency": any node will do.
            return True, next((c for c, v in target.capabilities.items() if wanted_type in v.chain), None)
        for cap_name, cap in target.capabilities.items():
            if wanted_type in cap.chain:
                return True, cap_name
        have = ", ".join(f"{c} ({v.type})" for c, v in target.capabilities.items()) or "none"
        self.problem(path, f"requirement {name!r} of {view.name!r} needs a capability of type {wanted_type}, "
                     f"which {target.name!r} does not have (it has: {have})")
        return False, None


def read_topology(doc: Document, index: TypeIndex) -> TopologyViews:
    reader = _Reader(doc, index)
    nodes: dict[str, NodeView] = {}
    broken: set[str] = set()
    for name, raw in reader.templates.items():
        view = reader.node(str(name), raw)
        if view is None:
            broken.add(str(name))
        else:
            nodes[str(name)] = view
    for view in nodes.values():
        reader.requirements(view, nodes)
    return TopologyViews(nodes, broken, reader.problems)


def check_types_used(doc: Document, index: TypeIndex) -> list[Problem]:
    """Types named by policies, groups and type definitions' ``derived_from``: all must exist."""
    problems: list[Problem] = []
    topology = doc.get(("topology_template",))
    policies = topology.get("policies") if isinstance(topology, dict) else None
    if isinstance(policies, list):
        for i, entry in enumerate(policies):
            if isinstance(entry, dict) and len(entry) == 1:
                (name, policy), = entry.items()
                policy_type = policy.get("type") if isinstance(policy, dict) else None
                if isinstance(policy_type, str) and index.get(policy_type, "policy_types") is None:
                    hint = did_you_mean(policy_type, index.names("policy_types"))
                    problems.append(doc.problem(("topology_template", "policies", i, name, "type"),
                                                f"unknown policy type {policy_type!r}{hint}"))
    return problems
