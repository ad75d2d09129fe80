"""Placement: which host runs each instance, and which ports its endpoints get.

Deterministic and explainable: the same topology, hosts and prior placement give the same answer, and every
instance carries the reason it went where it went. An instance keeps its prior host and ports as long as they
are still valid, so that a deploy moves nothing that need not move.

Ports are not chosen here: a :class:`PortAllocator` reserves them on the chosen host (in the shared state,
under its lock), since only the reservation book knows what other services hold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from khutulun.errors import PlacementError
from khutulun.model import Topology

__all__ = ["HostInfo", "InstancePlacement", "Placement", "PortAllocator", "PortRequest", "place"]


@dataclass(frozen=True)
class HostInfo:
    """A host as placement sees it."""

    name: str
    address: str
    cpus: float = 0.0
    memory: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    eligible: bool = True


@dataclass(frozen=True)
class InstancePlacement:
    node: str
    index: int
    host: str
    address: str
    ports: Mapping[str, int] = field(default_factory=dict)
    """Endpoint capability name → the port reserved for it."""
    reason: str = ""


@dataclass(frozen=True)
class Placement:
    instances: tuple[InstancePlacement, ...] = ()

    def get(self, node: str, index: int) -> InstancePlacement | None:
        for instance in self.instances:
            if instance.node == node and instance.index == index:
                return instance
        return None

    def of_node(self, node: str) -> list[InstancePlacement]:
        return sorted((i for i in self.instances if i.node == node), key=lambda i: i.index)

    @property
    def hosts(self) -> set[str]:
        return {i.host for i in self.instances}


@dataclass(frozen=True)
class PortRequest:
    owner: str
    """The resource id that will hold the port."""
    capability: str
    port: int
    """The port asked for; 0 for any free one."""
    protocol: str
    prior: int | None = None
    """The port this endpoint had before, kept when it is still free for this owner."""


class PortAllocator(Protocol):
    def __call__(self, host: HostInfo, requests: Sequence[PortRequest]) -> Mapping[str, int]:
        """Reserve the ports on ``host`` and answer capability name → port, or raise PlacementError."""
        ...


def _choose_host(node: str, index: int, hosts: Sequence[HostInfo], prior: InstancePlacement | None
                 ) -> tuple[HostInfo, str]:
    eligible = [h for h in hosts if h.eligible]
    if not eligible:
        names = ", ".join(h.name for h in hosts) or "none"
        raise PlacementError(f"no eligible host for {node}/{index} (hosts: {names})")
    if prior is not None:
        for host in eligible:
            if host.name == prior.host:
                return host, f"kept on {host.name}, where it was placed before"
    # Spread instances of a node over the eligible hosts in name order; a single host takes them all.
    ordered = sorted(eligible, key=lambda h: h.name)
    host = ordered[index % len(ordered)]
    if len(ordered) == 1:
        return host, f"{host.name} is the only eligible host"
    return host, f"instance {index} of {node} spread over {len(ordered)} eligible hosts"


def place(topology: Topology, hosts: Sequence[HostInfo], prior: Placement | None,
          allocate_ports: PortAllocator, resource_id: Mapping[tuple[str, int], str]) -> Placement:
    """Place every instance of every node of ``topology``.

    ``resource_id`` names the resource of each (node, index), the owner of its port reservations.
    """
    instances: list[InstancePlacement] = []
    for node in topology.nodes.values():
        for index in range(topology.instance_count(node.name)):
            before = prior.get(node.name, index) if prior else None
            host, reason = _choose_host(node.name, index, hosts, before)
            requests = [
                PortRequest(owner=resource_id[(node.name, index)], capability=cap.name,
                            port=int(cap.properties.get("port", 0) or 0),
                            protocol=str(cap.properties.get("protocol", "tcp")),
                            prior=before.ports.get(cap.name) if before and before.host == host.name else None)
                for cap in node.endpoints()
            ]
            ports = dict(allocate_ports(host, requests)) if requests else {}
            instances.append(InstancePlacement(node=node.name, index=index, host=host.name,
                                               address=host.address, ports=ports, reason=reason))
    return Placement(tuple(instances))
