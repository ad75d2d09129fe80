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
- for each directory it uses, ``KHUTULUN_<NAME>_PATH``, and ``KHUTULUN_<NAME>_DIGEST``, a digest of the
  directory's managed files: when they change, so does the workload's environment, and it is restarted.

The template's own ``environment`` comes last and wins. Values are text; expressions are wrapped in a
one-part ``concat`` to make them so.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from khutulun.errors import InvalidInputError
from khutulun.expressions import Unknown, references
from khutulun.model import AttributeRef, Concat, Join, Node, NodeKind, RequirementKind, Topology
from khutulun.resources import ResourceId
from khutulun.scheduler import InstancePlacement, Placement

__all__ = ["Attributes", "DesiredResource", "ExposedPort", "Site", "delegate_for", "desired_resources", "env_name"]


@dataclass(frozen=True)
class Site:
    """What desired resources need to know of where they run."""

    shared_root: str = ""
    """Where ``shared`` directories go: inside the cluster's shared directory, the same path on every host."""
    artifacts: Mapping[str, str] = field(default_factory=dict)
    """An artifact's file, as the template names it within its bundle → the absolute path of its copy in the
    shared state (every host can read it)."""


@dataclass(frozen=True)
class ExposedPort:
    capability: str
    port: int
    protocol: str

    def __str__(self) -> str:
        return f"{self.port}/{self.protocol}"


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
    gates: tuple[Mapping[str, Any], ...] = ()
    """Ready conditions (``khutulun.datatypes.ReadyCondition`` values, with ``what`` naming the gate and
    ``target`` what to reach: host:port, or a URL), resolved like the spec."""
    exposed: tuple[ExposedPort, ...] = ()
    """Ports to open in the host's firewall."""
    reads: tuple[ResourceId, ...] = ()
    """The resources whose applied attributes (a path, a digest: not an address or port) flow into the spec:
    when one of them changes, this one may have to change too."""


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
    bridged = node.kind is NodeKind.CONTAINER and node.properties.get("network", "bridge") == "bridge"
    for cap in node.endpoints():
        prefix = f"KHUTULUN_{env_name(cap.name)}"
        if bridged:  # inside its own network, a container binds every address, on the port published to
            env[f"{prefix}_ADDRESS"] = "0.0.0.0"
            env[f"{prefix}_PORT"] = Concat((_container_port(node, cap.name),))
            continue
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
            env[f"{prefix}_DIGEST"] = Concat((AttributeRef(req.target, "digest"),))
    given = node.properties.get("environment")
    if isinstance(given, dict):
        env.update(given)
    return env


def _artifact(node: Node, site: Site, type_name: str) -> str | None:
    """The stored copy of the node's first artifact of a type (an image archive, a root filesystem)."""
    for artifact in node.artifacts.values():
        if artifact.type == type_name or type_name in artifact.type:
            return site.artifacts.get(artifact.file)
    return None


def _mounts(topology: Topology, node: Node) -> list[dict[str, Any]]:
    mounts = []
    for req in node.requirements:
        if req.kind is RequirementKind.STORAGE or topology.nodes[req.target].kind is NodeKind.DIRECTORY:
            location = req.properties.get("location")
            mounts.append({"source": AttributeRef(req.target, "path"),
                           "target": location if isinstance(location, str) and location else f"/srv/{req.target}",
                           "read_only": bool(req.properties.get("read_only"))})
    return mounts


def _container_port(node: Node, capability: str) -> Any:
    """The port inside a container that an endpoint leads to: its target_port, else the port reserved."""
    target = next((c.properties.get("target_port") for c in node.endpoints() if c.name == capability), None)
    return target or AttributeRef(node.name, "port", capability)


def _ports(node: Node) -> list[dict[str, Any]]:
    return [{"name": cap.name, "host_address": Concat((AttributeRef(node.name, "address", cap.name),)),
             "host_port": AttributeRef(node.name, "port", cap.name),
             "container_port": _container_port(node, cap.name),
             "protocol": str(cap.properties.get("protocol") or "tcp")} for cap in node.endpoints()]


def _spec(topology: Topology, node: Node, rid: ResourceId, site: Site) -> dict[str, Any]:
    """The delegate's spec for one instance: the formats of docs/delegate-specs.md."""
    props = node.properties
    stop_timeout = float(props.get("stop_timeout") or 10.0)
    if node.kind is NodeKind.PROCESS:
        return {"command": props.get("command"), "environment": _environment(topology, node, rid),
                "working_directory": props.get("working_directory"), "stop_timeout": stop_timeout}
    if node.kind is NodeKind.DIRECTORY:
        path = props.get("path")
        if not path and props.get("shared") and site.shared_root:
            path = posixpath.join(site.shared_root, rid.namespace, rid.service, rid.filename)
        copies = {a.deploy_path or posixpath.basename(a.file): site.artifacts[a.file]
                  for a in node.artifacts.values() if "khutulun.artifacts.Template" not in a.type
                  and a.file in site.artifacts}
        return {"path": path, "temporary": bool(props.get("temporary")), "files": dict(props.get("files") or {}),
                "copies": copies}
    if node.kind is NodeKind.CONTAINER:
        return {"image": props.get("image"), "image_archive": _artifact(node, site, "khutulun.artifacts.ImageArchive"),
                "rootfs_archive": _artifact(node, site, "khutulun.artifacts.RootFilesystem"),
                "command": props.get("command"), "environment": _environment(topology, node, rid),
                "ports": _ports(node), "mounts": _mounts(topology, node), "cpus": props.get("cpus"),
                "memory": props.get("memory"), "stop_timeout": stop_timeout,
                "network": str(props.get("network") or "bridge")}
    if node.kind is NodeKind.SYSTEM_CONTAINER:
        return {"root": props.get("root"), "rootfs_archive": _artifact(node, site, "khutulun.artifacts.RootFilesystem"),
                "command": props.get("command"), "boot": bool(props.get("boot")),
                "environment": _environment(topology, node, rid), "mounts": _mounts(topology, node),
                "stop_timeout": stop_timeout}
    # Kinds realized by later delegates get their properties and the environment as they are.
    return {**props, "environment": _environment(topology, node, rid),
            "artifacts": {a.name: {"type": a.type, "file": site.artifacts.get(a.file, a.file)}
                          for a in node.artifacts.values()}}


def _gates(node: Node, instance: InstancePlacement) -> tuple[dict[str, Any], ...]:
    """The node's ready conditions, each with what it reaches: its endpoint's host:port, or a URL."""
    gates = []
    endpoints = node.endpoints()
    conditions = [(node.name, node.properties.get("ready"), endpoints[0] if endpoints else None)]
    conditions += [(f"{node.name}.{cap.name}", cap.properties.get("ready"), cap) for cap in endpoints]
    for what, condition, cap in conditions:
        if not isinstance(condition, dict):
            continue
        kind = next(k for k in ("tcp", "http", "command") if condition.get(k))
        target: Any = ""
        if cap is not None and kind != "command":
            host_port = Concat((instance.address, ":", AttributeRef(node.name, "port", cap.name)))
            http = str(condition.get("http") or "")
            target = http if http.startswith(("http:", "https:")) else (
                Concat(("http://", host_port, "/" + http.lstrip("/"))) if kind == "http" else host_port)
        elif kind == "http":
            target = str(condition["http"])
        gates.append({**condition, "kind": kind, "what": what, "target": target})
    return tuple(gates)


def desired_resources(namespace: str, service: str, topology: Topology, placement: Placement,
                      choose_delegate: Callable[[Node], str] = delegate_for, site: Site | None = None
                      ) -> list[DesiredResource]:
    site = site or Site()
    out: list[DesiredResource] = []
    for node in topology.nodes.values():
        spec_refs = references(_spec(topology, node, ResourceId(namespace, service, node.name, 0), site))
        # What must be applied first: what it requires, and what it refers to that only an apply reports (a
        # path, a pid); an endpoint's address and port are known from placement and order nothing.
        applied = {ref.node for ref in [*_refs(node), *spec_refs]
                   if ref.node != node.name and ref.node in topology.nodes and not topology.nodes[ref.node].placed(ref)}
        uses = {r.target for r in node.requirements} | applied
        for instance in placement.of_node(node.name):
            rid = ResourceId(namespace, service, node.name, instance.index)

            def instance_of(target: str, index: int = instance.index) -> ResourceId:
                return ResourceId(namespace, service, target, _target_index(topology, target, index))

            attributes: dict[str, Any] = {"address": instance.address, "host": instance.host}
            for cap in node.endpoints():
                attributes[cap.name] = {"address": instance.address, "protocol": cap.properties.get("protocol", "tcp")}
                if cap.name in instance.ports:  # unknown until reserved: a preview leaves it out
                    attributes[cap.name]["port"] = instance.ports[cap.name]
            exposed = tuple(ExposedPort(cap.name, instance.ports[cap.name], str(cap.properties.get("protocol", "tcp")))
                            for cap in node.endpoints() if cap.properties.get("expose") and cap.name in instance.ports)
            out.append(DesiredResource(
                rid, choose_delegate(node), instance.host, _spec(topology, node, rid, site),
                tuple(instance_of(t) for t in sorted(uses)), str(node.properties.get("restart") or "always"),
                attributes, _gates(node, instance), exposed, tuple(instance_of(t) for t in sorted(applied))))
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
