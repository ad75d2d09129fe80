"""The IR: what a service template means to Khutulun, in frozen dataclasses.

``khutulun.tosca`` builds a :class:`Topology` from TOSCA; nothing of the parser leaks past it. Property values
are JSON-like data (None, bool, int, float, str, lists, string-keyed dicts) in which an :data:`Expr` may stand
for what is only known at run time, such as the port an endpoint was given. Inputs, ``get_property`` and
everything else that can be computed from the template alone are already evaluated.

Scalar units are normalized while loading: sizes to bytes (int), times to seconds (float), frequencies to
hertz and bit rates to bits per second (float), so that no delegate parses TOSCA units.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

__all__ = [
    "PROFILE_TYPES",
    "Artifact",
    "AttributeRef",
    "Capability",
    "Concat",
    "Expr",
    "Join",
    "Node",
    "NodeKind",
    "Output",
    "Policy",
    "Requirement",
    "RequirementKind",
    "SourceRef",
    "Token",
    "Topology",
    "Value",
]

Value: TypeAlias = Any
"""JSON-like data that may hold :data:`Expr` anywhere inside it."""


@dataclass(frozen=True)
class SourceRef:
    """Where something was written, for messages at run time (1-based line and column)."""

    file: str
    line: int = 0
    column: int = 0

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}" if self.line else self.file


@dataclass(frozen=True)
class AttributeRef:
    """``get_attribute``: an attribute of a node, or of one of its capabilities, known once it runs."""

    node: str
    attribute: str
    capability: str | None = None
    path: tuple[str | int, ...] = ()
    index: int | None = None
    """Which instance of the node; None for the one matching the referring instance (see instances.py)."""

    def __str__(self) -> str:
        parts = [self.node, *([self.capability] if self.capability else []), self.attribute, *map(str, self.path)]
        return "get_attribute(" + ", ".join(parts) + ")"


@dataclass(frozen=True)
class Concat:
    """``concat`` of parts of which at least one is not known before run time."""

    parts: tuple[Value, ...]


@dataclass(frozen=True)
class Join:
    """``join`` of parts of which at least one is not known before run time."""

    parts: tuple[Value, ...]
    delimiter: str = ""


@dataclass(frozen=True)
class Token:
    """``token``: the part ``index`` of ``value`` split at any of ``separators``."""

    value: Value
    separators: str
    index: int


Expr: TypeAlias = AttributeRef | Concat | Join | Token
EXPR_TYPES = (AttributeRef, Concat, Join, Token)


class NodeKind(enum.StrEnum):
    """What a node template is, as far as choosing a delegate goes."""

    PROCESS = "process"
    CONTAINER = "container"
    SYSTEM_CONTAINER = "system-container"
    VIRTUAL_MACHINE = "virtual-machine"
    DIRECTORY = "directory"
    OTHER = "other"


PROFILE_TYPES: Mapping[str, NodeKind] = {
    "khutulun.nodes.Process": NodeKind.PROCESS,
    "khutulun.nodes.Container": NodeKind.CONTAINER,
    "khutulun.nodes.SystemContainer": NodeKind.SYSTEM_CONTAINER,
    "khutulun.nodes.VirtualMachine": NodeKind.VIRTUAL_MACHINE,
    "khutulun.nodes.Directory": NodeKind.DIRECTORY,
}
"""The profile's node types, and the kind of every type derived from them."""

ENDPOINT_CAPABILITY = "khutulun.capabilities.Endpoint"
PLACED_ATTRIBUTES = ("address", "port")
"""An endpoint's attributes that placement decides."""
STORAGE_CAPABILITY = "khutulun.capabilities.Storage"


class RequirementKind(enum.StrEnum):
    CONNECTION = "connection"  # to an endpoint: the source learns the address and port
    STORAGE = "storage"  # to a directory: the source gets its path
    DEPENDENCY = "dependency"  # ordering only


@dataclass(frozen=True)
class Capability:
    name: str
    type: str
    types: tuple[str, ...]
    properties: Mapping[str, Value] = field(default_factory=dict)

    @property
    def is_endpoint(self) -> bool:
        return ENDPOINT_CAPABILITY in self.types


@dataclass(frozen=True)
class Requirement:
    """One requirement assignment, resolved to the node template and capability it points at."""

    name: str
    target: str
    capability: str | None
    relationship: str
    kind: RequirementKind
    properties: Mapping[str, Value] = field(default_factory=dict)


@dataclass(frozen=True)
class Artifact:
    name: str
    type: str
    file: str
    deploy_path: str | None = None
    properties: Mapping[str, Value] = field(default_factory=dict)


@dataclass(frozen=True)
class Node:
    name: str
    type: str
    types: tuple[str, ...]
    """The type and every type it derives from, most specific first."""
    kind: NodeKind
    properties: Mapping[str, Value]
    capabilities: Mapping[str, Capability]
    requirements: tuple[Requirement, ...]
    artifacts: Mapping[str, Artifact] = field(default_factory=dict)
    source: SourceRef = SourceRef("")

    def is_a(self, type_name: str) -> bool:
        return type_name in self.types

    def endpoints(self) -> list[Capability]:
        return [c for c in self.capabilities.values() if c.is_endpoint]

    def placed(self, ref: AttributeRef) -> bool:
        """Whether placement alone answers ``ref`` (an endpoint's address or port), so that nothing needs to be
        applied before it is known, and referring to it orders nothing."""
        capability = self.capabilities.get(ref.capability) if ref.capability else None
        return capability is not None and capability.is_endpoint and ref.attribute in PLACED_ATTRIBUTES


@dataclass(frozen=True)
class Policy:
    name: str
    type: str
    types: tuple[str, ...]
    targets: tuple[str, ...]
    properties: Mapping[str, Value] = field(default_factory=dict)

    def is_a(self, type_name: str) -> bool:
        return type_name in self.types


@dataclass(frozen=True)
class Output:
    name: str
    value: Value
    description: str = ""


@dataclass(frozen=True)
class Topology:
    source: str
    """The main template file, as the loader was given it."""
    nodes: Mapping[str, Node]
    """Node templates by name, in the order the template lists them."""
    inputs: Mapping[str, Value] = field(default_factory=dict)
    outputs: Mapping[str, Output] = field(default_factory=dict)
    policies: tuple[Policy, ...] = ()
    description: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)

    def instance_count(self, node: str) -> int:
        """How many instances of ``node`` to run: the last Redundancy policy that names it, else one."""
        count = 1
        for policy in self.policies:
            if policy.is_a("khutulun.policies.Redundancy") and node in policy.targets:
                count = int(policy.properties.get("count", 1))
        return count
