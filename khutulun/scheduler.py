"""Placement: which host runs each instance, and which ports its endpoints get.

Deterministic and explainable: the same topology, hosts and prior placement give the same answer, every
instance carries the reason it went where it went, and an instance that cannot be placed fails the whole
placement before anything starts, saying what ruled each host out.

For each instance, in the template's order: the eligible hosts; those a ``khutulun.policies.Placement``
allows (host names, labels); the one its ``Colocation`` group already uses, if any; not those its
``Separation`` group already uses; those with the CPUs and memory it requests left. An instance keeps its prior
host while that host is still a candidate, so that a deploy moves nothing that need not move. Otherwise a few
candidates are sampled (from a start that depends on the instance, so that instances spread) and scored: the
most capacity left, the fewest instances of the same service. The cost per instance is the sample, not the
cluster.

Ports are not chosen here: a :class:`PortAllocator` reserves them on the chosen host (in the shared state,
under its lock), since only the reservation book knows what other services hold.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from khutulun.errors import PlacementError
from khutulun.model import Node, Topology

__all__ = ["SAMPLE", "HostInfo", "InstancePlacement", "Placement", "PortAllocator", "PortRequest", "demand", "place"]

SAMPLE = 5
"""How many candidate hosts are scored for an instance."""


@dataclass(frozen=True)
class HostInfo:
    """A host as placement sees it."""

    name: str
    address: str
    cpus: float = 0.0
    """Its CPUs; 0 when unknown (then CPU requests are not checked against it)."""
    memory: int = 0
    """Its memory in bytes; 0 when unknown."""
    labels: Mapping[str, str] = field(default_factory=dict)
    eligible: bool = True
    used_cpus: float = 0.0
    """What other services' instances placed here request."""
    used_memory: int = 0


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


def demand(node: Node) -> tuple[float, int]:
    """The CPUs and memory (bytes) one instance of ``node`` requests; 0 for what it does not say."""
    cpus, memory = node.properties.get("cpus"), node.properties.get("memory")
    return (float(cpus) if isinstance(cpus, int | float) and not isinstance(cpus, bool) else 0.0,
            int(memory) if isinstance(memory, int) and not isinstance(memory, bool) else 0)


@dataclass
class _Rules:
    """What the policies of a topology ask of each node."""

    allowed: dict[str, tuple[frozenset[str] | None, Mapping[str, str], str]] = field(default_factory=dict)
    """node → (host names or None, labels, policy name)"""
    together: dict[str, str] = field(default_factory=dict)
    """node → its Colocation policy's name"""
    apart: dict[str, str] = field(default_factory=dict)
    """node → its Separation policy's name"""

    @classmethod
    def of(cls, topology: Topology) -> _Rules:
        rules = cls()
        for policy in topology.policies:
            for target in policy.targets:
                if policy.is_a("khutulun.policies.Colocation"):
                    rules.together[target] = policy.name
                elif policy.is_a("khutulun.policies.Separation"):
                    rules.apart[target] = policy.name
                elif policy.is_a("khutulun.policies.Placement"):
                    hosts = policy.properties.get("hosts")
                    labels = policy.properties.get("labels")
                    rules.allowed[target] = (frozenset(map(str, hosts)) if isinstance(hosts, list) else None,
                                             {str(k): str(v) for k, v in labels.items()}
                                             if isinstance(labels, dict) else {}, policy.name)
        return rules


class _Placer:
    def __init__(self, topology: Topology, hosts: Sequence[HostInfo], service: str, sample: int) -> None:
        self.topology = topology
        self.hosts = sorted(hosts, key=lambda h: h.name)
        self.service = service
        self.sample = max(1, sample)
        self.rules = _Rules.of(topology)
        self.used = {h.name: (h.used_cpus, h.used_memory) for h in self.hosts}
        self.group_hosts: dict[str, set[str]] = {}
        """A Colocation or Separation policy → the hosts its instances use so far."""
        self.service_count: Counter[str] = Counter()

    def candidates(self, node: Node, placed_on: str | None = None) -> tuple[list[HostInfo], list[str]]:
        """The hosts that may take an instance of ``node`` now, and why the others may not. An ineligible host
        keeps what is placed on it (``placed_on``): eligibility keeps new instances away; a drain moves them."""
        out: list[str] = []
        found = [h for h in self.hosts if h.eligible or h.name == placed_on]
        if len(found) < len(self.hosts):
            out.append(f"{len(self.hosts) - len(found)} not eligible")
        rule = self.rules.allowed.get(node.name)
        if rule is not None:
            names, labels, policy = rule
            kept = [h for h in found if (names is None or h.name in names)
                    and all(h.labels.get(k) == v for k, v in labels.items())]
            if len(kept) < len(found):
                out.append(f"{len(found) - len(kept)} outside Placement policy {policy!r}")
            found = kept
        group = self.rules.together.get(node.name)
        if group is not None and self.group_hosts.get(group):
            kept = [h for h in found if h.name in self.group_hosts[group]]
            if len(kept) < len(found):
                out.append(f"{len(found) - len(kept)} away from the Colocation policy {group!r}'s host")
            found = kept
        group = self.rules.apart.get(node.name)
        if group is not None:
            kept = [h for h in found if h.name not in self.group_hosts.get(group, set())]
            if len(kept) < len(found):
                out.append(f"{len(found) - len(kept)} already run an instance of Separation policy {group!r}")
            found = kept
        cpus, memory = demand(node)
        kept = [h for h in found if self.fits(h, cpus, memory)]
        if len(kept) < len(found):
            out.append(f"{len(found) - len(kept)} without {cpus:g} CPUs and {memory // 2**20} MiB left")
        return kept, out

    def fits(self, host: HostInfo, cpus: float, memory: int) -> bool:
        used_cpus, used_memory = self.used[host.name]
        return (not host.cpus or not cpus or used_cpus + cpus <= host.cpus + 1e-9) and \
            (not host.memory or not memory or used_memory + memory <= host.memory)

    def score(self, host: HostInfo) -> float:
        used_cpus, used_memory = self.used[host.name]
        free = [1.0 - used_cpus / host.cpus if host.cpus else 1.0,
                1.0 - used_memory / host.memory if host.memory else 1.0]
        return sum(free) / len(free) - 0.25 * self.service_count[host.name]

    def choose(self, node: Node, index: int, prior: InstancePlacement | None) -> tuple[HostInfo, str]:
        found, ruled_out = self.candidates(node, prior.host if prior else None)
        if not found:
            why = "; ".join(ruled_out) or "there are no hosts"
            raise PlacementError(f"cannot place {node.name}/{index}: of {len(self.hosts)} hosts, {why}")
        if prior is not None:
            kept = next((h for h in found if h.name == prior.host), None)
            if kept is not None:
                return kept, f"kept on {kept.name}, where it was placed before"
        if len(found) == 1:
            return found[0], f"{found[0].name} is the only host that may take it" + (
                f" ({'; '.join(ruled_out)})" if ruled_out else "")
        # A start that depends on the instance: different instances sample (and so spread over) different hosts.
        start = int.from_bytes(hashlib.sha256(f"{self.service}/{node.name}/{index}".encode()).digest()[:4], "big")
        sampled = [found[(start + i) % len(found)] for i in range(min(self.sample, len(found)))]
        best = min(sampled, key=lambda h: (-self.score(h), h.name))
        used_cpus, used_memory = self.used[best.name]
        left = (f"{best.cpus - used_cpus:g} CPUs" if best.cpus else "CPUs unknown") + ", " + (
            f"{(best.memory - used_memory) // 2**20} MiB left" if best.memory else "memory unknown")
        return best, (f"best of {len(sampled)} sampled from {len(found)} candidates: "
                      f"{self.service_count[best.name]} instances of the service there, {left}")

    def took(self, host: HostInfo, node: Node) -> None:
        cpus, memory = demand(node)
        used_cpus, used_memory = self.used[host.name]
        self.used[host.name] = (used_cpus + cpus, used_memory + memory)
        self.service_count[host.name] += 1
        for rules in (self.rules.together, self.rules.apart):
            if node.name in rules:
                self.group_hosts.setdefault(rules[node.name], set()).add(host.name)


def place(topology: Topology, hosts: Sequence[HostInfo], prior: Placement | None, allocate_ports: PortAllocator,
          resource_id: Mapping[tuple[str, int], str], *, service: str = "", sample: int = SAMPLE) -> Placement:
    """Place every instance of every node of ``topology``; ``resource_id`` names the resource of each
    (node, index), the owner of its port reservations."""
    placer = _Placer(topology, hosts, service, sample)
    chosen: list[tuple[Node, int, HostInfo, str, InstancePlacement | None]] = []
    for node in topology.nodes.values():
        for index in range(topology.instance_count(node.name)):
            before = prior.get(node.name, index) if prior else None
            host, reason = placer.choose(node, index, before)
            placer.took(host, node)
            chosen.append((node, index, host, reason, before))
    # Ports last: nothing is reserved for a placement that fails.
    instances = []
    for node, index, host, reason, before in chosen:
        requests = [PortRequest(owner=resource_id[(node.name, index)], capability=cap.name,
                                port=int(cap.properties.get("port", 0) or 0),
                                protocol=str(cap.properties.get("protocol", "tcp")),
                                prior=before.ports.get(cap.name) if before and before.host == host.name else None)
                    for cap in node.endpoints()]
        ports = dict(allocate_ports(host, requests)) if requests else {}
        instances.append(InstancePlacement(node.name, index, host.name, host.address, ports, reason))
    return Placement(tuple(instances))

