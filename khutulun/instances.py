"""From the model and its placement to desired resources: what each delegate is asked to make.

This is the one place that knows both TOSCA node kinds and delegate spec formats. A spec may still hold
expressions (a connection's address, a directory's path) that :class:`Attributes` resolves once the
resources they name are placed or applied.

Environment variables every workload gets (``<NAME>`` is a node template's name, capitals, and any
character other than a letter or digit as ``_``):

- ``KHUTULUN_NAMESPACE``, ``KHUTULUN_SERVICE``, ``KHUTULUN_NODE``, ``KHUTULUN_INSTANCE`` (the index);
- for each endpoint it offers, ``KHUTULUN_<CAPABILITY>_ADDRESS`` and ``KHUTULUN_<CAPABILITY>_PORT`` (its own
  ``endpoint`` gives ``KHUTULUN_ENDPOINT_PORT``);
- for each connection to a node's endpoint, ``KHUTULUN_<NAME>_HOST``, ``KHUTULUN_<NAME>_PORT``,
  ``KHUTULUN_<NAME>_ADDRESS`` (``host:port``) of one instance of the target, and ``KHUTULUN_<NAME>_ADDRESSES``
  of all of them, comma-separated (a capability other than ``endpoint`` adds its name: ``<NAME>_<CAP>_PORT``);
- for each directory it uses, ``KHUTULUN_<NAME>_PATH``.

The template's own ``environment`` comes last and wins. Values are text; expressions are wrapped in a
one-part ``concat`` to make them so.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from khutulun.errors import InvalidInputError
from khutulun.expressions import Unknown, references
from khutulun.model import AttributeRef, Concat, Join, Node, NodeKind, RequirementKind, Topology
from khutulun.resources import ResourceId
from khutulun.scheduler import Placement

__all__ = ["Attributes", "DesiredResource", "delegate_for", "desired_resources", "env_name"]


@dataclass(frozen=True)
class DesiredResource:
    id: ResourceId
    delegate: str
    host: str
    spec: Mapping[str, Any]
    """The delegate's spec; may hold expressions until :class:`Attributes` can resolve them."""
    depends_on: tuple[ResourceId, ...] = ()
    restart: str = "always"
    """The node's restart policy (always, on-failure, never): the agent's to apply, not the delegate's."""
    attributes: Mapping[str, Any] = field(default_factory=dict)
    """Attributes known from placement alone (endpoint addresses and ports)."""


def env_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def delegate_for(node: Node) -> str:
    """The delegate that realizes a node, by its kind (and, for containers, its ``runtime`` property)."""
    if node.kind is NodeKind.PROCESS:
        return "process"
    if node.kind is NodeKind.DIRECTORY:
        return "directory"
    if node.kind is NodeKind.CONTAINER:
        return str(node.properties.get("runtime") or "podman")
    if node.kind is NodeKind.SYSTEM_CONTAINER:
        return "nspawn"
    if node.kind is NodeKind.VIRTUAL_MACHINE:
        return "libvirt"
    raise InvalidInputError(
        f"node template {node.name!r} ({node.source}) is a {node.type}, which no Khutulun delegate runs; "
        "use a type from the Khutulun profile (khutulun.nodes.Process, Container, SystemContainer, "
        "VirtualMachine, Directory) or one derived from it")


def _target_index(topology: Topology, target: str, index: int) -> int:
    count = topology.instance_count(target)
    return index % count if count else 0


def _environment(topology: Topology, node: Node, rid: ResourceId) -> dict[str, Any]:
    env: dict[str, Any] = {
        "KHUTULUN_NAMESPACE": rid.namespace, "KHUTULUN_SERVICE": rid.service, "KHUTULUN_NODE": node.name,
        "KHUTULUN_INSTANCE": str(rid.index),
    }
    for cap in node.endpoints():
        prefix = f"KHUTULUN_{env_name(cap.name)}"
        env[f"{prefix}_ADDRESS"] = Concat((AttributeRef(node.name, "address", cap.name),))
        env[f"{prefix}_PORT"] = Concat((AttributeRef(node.name, "port", cap.name),))
    for req in node.requirements:
        target = topology.nodes[req.target]
        prefix = f"KHUTULUN_{env_name(req.target)}"
        if req.kind is RequirementKind.CONNECTION and req.capability:
            if req.capability != "endpoint":
                prefix += f"_{env_name(req.capability)}"
            host = AttributeRef(req.target, "address", req.capability)
            port = AttributeRef(req.target, "port", req.capability)
            env[f"{prefix}_HOST"] = Concat((host,))
            env[f"{prefix}_PORT"] = Concat((port,))
            env[f"{prefix}_ADDRESS"] = Concat((host, ":", port))
            env[f"{prefix}_ADDRESSES"] = Join(tuple(
                Concat((AttributeRef(req.target, "address", req.capability, index=i), ":",
                        AttributeRef(req.target, "port", req.capability, index=i)))
                for i in range(topology.instance_count(req.target))), ",")
        elif req.kind is RequirementKind.STORAGE or target.kind is NodeKind.DIRECTORY:
            env[f"{prefix}_PATH"] = Concat((AttributeRef(req.target, "path"),))
    given = node.properties.get("environment")
    if isinstance(given, dict):
        env.update(given)
    return env


def _spec(topology: Topology, node: Node, rid: ResourceId) -> dict[str, Any]:
    props = node.properties
    if node.kind is NodeKind.PROCESS:
        return {"command": props.get("command"), "environment": _environment(topology, node, rid),
                "working_directory": props.get("working_directory"),
                "stop_timeout": float(props.get("stop_timeout") or 10.0)}
    if node.kind is NodeKind.DIRECTORY:
        return {"path": props.get("path"), "temporary": bool(props.get("temporary")),
                "files": dict(props.get("files") or {})}
    # Kinds realized by later delegates get their properties and the environment as they are.
    return {**props, "environment": _environment(topology, node, rid),
            "artifacts": {a.name: {"type": a.type, "file": a.file} for a in node.artifacts.values()}}


def desired_resources(namespace: str, service: str, topology: Topology, placement: Placement,
                      choose_delegate: Callable[[Node], str] = delegate_for) -> list[DesiredResource]:
    out: list[DesiredResource] = []
    for node in topology.nodes.values():
        uses = {r.target for r in node.requirements} | {ref.node for ref in _refs(node) if ref.node != node.name}
        for instance in placement.of_node(node.name):
            rid = ResourceId(namespace, service, node.name, instance.index)
            depends_on = tuple(ResourceId(namespace, service, target, _target_index(topology, target, instance.index))
                               for target in sorted(uses))
            attributes: dict[str, Any] = {"address": instance.address, "host": instance.host}
            for cap in node.endpoints():
                attributes[cap.name] = {"address": instance.address, "port": instance.ports.get(cap.name, 0),
                                        "protocol": cap.properties.get("protocol", "tcp")}
            out.append(DesiredResource(rid, choose_delegate(node), instance.host, _spec(topology, node, rid),
                                       depends_on, str(node.properties.get("restart") or "always"), attributes))
    return out


def _refs(node: Node) -> list[AttributeRef]:
    found = references(dict(node.properties))
    for cap in node.capabilities.values():
        found += references(dict(cap.properties))
    return found


class Attributes:
    """Answers attribute references for one instance, from what placement and earlier applies recorded.

    ``known`` maps a resource id to its attributes: those known from placement (``address``; per endpoint
    capability ``address``, ``port``, ``protocol``) merged with those its delegate reported (``pid``, ``path``).
    Properties stand in for attributes no delegate reports, as TOSCA says every property is an attribute.
    """

    def __init__(self, namespace: str, service: str, topology: Topology, known: Mapping[ResourceId, Mapping[str, Any]]
                 ) -> None:
        self.namespace = namespace
        self.service = service
        self.topology = topology
        self.known = known

    def lookup_for(self, index: int) -> Callable[[AttributeRef], Any]:
        """The lookup for instance ``index`` of a node: a reference to a node with several instances
        resolves to the instance with the same index, modulo their count, unless it names one."""

        def lookup(ref: AttributeRef) -> Any:
            target = ref.index if ref.index is not None else _target_index(self.topology, ref.node, index)
            return self._value(ref, target)

        return lookup

    def _value(self, ref: AttributeRef, index: int) -> Any:
        rid = ResourceId(self.namespace, self.service, ref.node, index)
        attributes = self.known.get(rid)
        node = self.topology.nodes.get(ref.node)
        if attributes is not None:
            scope = attributes.get(ref.capability) if ref.capability else attributes
            if isinstance(scope, Mapping) and ref.attribute in scope:
                return scope[ref.attribute]
        if ref.attribute == "tosca_name":
            return ref.node
        if ref.attribute == "tosca_id":
            return str(rid)
        if node is not None:
            if ref.capability is None:
                props: Mapping[str, Any] = node.properties
            else:
                cap = node.capabilities.get(ref.capability)
                props = cap.properties if cap is not None else {}
            # An endpoint's port and address come from placement only: its "port" property may be 0.
            if ref.attribute in props and ref.attribute not in ("port", "address"):
                return props[ref.attribute]
        raise Unknown(ref)
