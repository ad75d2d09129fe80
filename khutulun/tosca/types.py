"""An index of every type a template can use: TOSCA's normative types and those of its files.

Built from raw definitions rather than tosca-parser's type objects, because the checks tosca-parser lacks
(requirement targets, capabilities, cycles; TOSCA-PARSER-NOTES P5) need derivation chains and merged
definitions, and because its relationship objects point at copies of nodes (P2-P4).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from khutulun.tosca.source import Document, FieldPath

__all__ = ["SECTIONS", "TypeDef", "TypeIndex"]

SECTIONS = ("node_types", "capability_types", "relationship_types", "data_types", "policy_types",
            "group_types", "interface_types", "artifact_types")

# Normative types are also known by short names ("Compute" for tosca.nodes.Compute).
_PREFIXES = {
    "node_types": "tosca.nodes.", "capability_types": "tosca.capabilities.",
    "relationship_types": "tosca.relationships.", "data_types": "tosca.datatypes.",
    "policy_types": "tosca.policies.", "group_types": "tosca.groups.", "interface_types": "tosca.interfaces.",
    "artifact_types": "tosca.artifacts.",
}
_PRIMITIVES = {"string", "integer", "float", "boolean", "timestamp", "version", "range", "list", "map",
               "scalar-unit.size", "scalar-unit.time", "scalar-unit.frequency", "scalar-unit.bitrate", "any"}


@dataclass(frozen=True)
class TypeDef:
    name: str
    section: str
    raw: Mapping[str, Any]
    doc: Document | None
    """The file that defines it; None for a normative type."""
    path: FieldPath

    @property
    def parent(self) -> str | None:
        parent = self.raw.get("derived_from")
        return parent if isinstance(parent, str) else None


class TypeIndex:
    def __init__(self) -> None:
        self.types: dict[str, TypeDef] = {}
        self._chains: dict[str, tuple[str, ...]] = {}
        self._merged: dict[tuple[str, str], dict[str, Any]] = {}
        self._requirements: dict[str, dict[str, dict[str, Any]]] = {}

    @classmethod
    def build(cls, normative: Mapping[str, Any], files: Iterable[tuple[Document, str | None]]) -> TypeIndex:
        """``files`` are (document, namespace prefix of the import that brought it in)."""
        index = cls()
        for name, raw in normative.items():
            if isinstance(raw, dict):
                section = next((s for s, p in _PREFIXES.items() if name.startswith(p)), "node_types")
                index.types[name] = TypeDef(name, section, raw, None, ())
        for doc, prefix in files:
            for section in SECTIONS:
                defs = doc.get((section,))
                if not isinstance(defs, dict):
                    continue
                for name, raw in defs.items():
                    if isinstance(name, str) and isinstance(raw, dict):
                        full = f"{prefix}.{name}" if prefix else name
                        index.types[full] = TypeDef(full, section, raw, doc, (section, name))
        return index

    def get(self, name: Any, section: str | None = None) -> TypeDef | None:
        if not isinstance(name, str):
            return None
        found = self.types.get(name)
        if found is None:
            short = name.split(":", 1)[1] if name.startswith("tosca:") else name
            for sec, prefix in _PREFIXES.items():
                if section in (None, sec) and (prefix + short) in self.types:
                    found = self.types[prefix + short]
                    break
        if found is not None and section is not None and found.section != section:
            return None
        return found

    def canonical(self, name: Any) -> str | None:
        found = self.get(name)
        return found.name if found else None

    def names(self, section: str) -> list[str]:
        return [t.name for t in self.types.values() if t.section == section]

    def chain(self, name: Any) -> tuple[str, ...]:
        """The type and its ancestors, most specific first; stops at an unknown parent or a loop."""
        start = self.canonical(name)
        if start is None:
            return ()
        if start in self._chains:
            return self._chains[start]
        out: list[str] = []
        current: str | None = start
        while current is not None and current not in out:
            out.append(current)
            found = self.get(self.types[current].parent) if self.types[current].parent else None
            current = found.name if found else None
        self._chains[start] = tuple(out)
        return self._chains[start]

    def is_a(self, name: Any, base: str) -> bool:
        base_name = self.canonical(base) or base
        return base_name in self.chain(name)

    def merged(self, name: Any, key: str) -> dict[str, Any]:
        """A map section (properties, attributes, capabilities, interfaces) merged down the chain. The
        answer is shared between callers: do not change it."""
        cache_key = (str(name), key)
        if cache_key not in self._merged:
            self._merged[cache_key] = self._merge(name, key)
        return self._merged[cache_key]

    def _merge(self, name: Any, key: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for type_name in reversed(self.chain(name)):
            section = self.types[type_name].raw.get(key)
            if isinstance(section, dict):
                for k, v in section.items():
                    if isinstance(v, dict) and isinstance(out.get(k), dict):
                        out[k] = {**out[k], **v}  # a refinement keeps what it does not restate
                    else:
                        out[k] = v
        return out

    def requirements(self, name: Any) -> dict[str, dict[str, Any]]:
        """Requirement definitions by name, merged down the chain (a list of one-key maps in TOSCA). Shared
        between callers, like :meth:`merged`."""
        if str(name) not in self._requirements:
            self._requirements[str(name)] = self._merge_requirements(name)
        return self._requirements[str(name)]

    def _merge_requirements(self, name: Any) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for type_name in reversed(self.chain(name)):
            reqs = self.types[type_name].raw.get("requirements")
            if not isinstance(reqs, list):
                continue
            for entry in reqs:
                if isinstance(entry, dict) and len(entry) == 1:
                    (req_name, definition), = entry.items()
                    if isinstance(definition, str):
                        definition = {"capability": definition}
                    if isinstance(definition, dict):
                        out[str(req_name)] = {**out.get(str(req_name), {}), **definition}
        return out

    def capability_type(self, definition: Any) -> str | None:
        """The type of a capability definition (its short form is just the type name)."""
        if isinstance(definition, str):
            return self.canonical(definition) or definition
        if isinstance(definition, dict) and isinstance(definition.get("type"), str):
            return self.canonical(definition["type"]) or definition["type"]
        return None

    def valid_target_types(self, relationship: Any) -> list[str]:
        for type_name in self.chain(relationship):
            targets = self.types[type_name].raw.get("valid_target_types")
            if isinstance(targets, list):
                return [self.canonical(t) or str(t) for t in targets]
        return []

    @staticmethod
    def is_primitive(name: Any) -> bool:
        return isinstance(name, str) and name in _PRIMITIVES
