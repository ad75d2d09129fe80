"""The hosts an agent knows: itself alone, or the members of its cluster, with what the shared state says of them.

Membership (alive, suspect, left, dead; name, API address, capacity) comes from gossip; eligibility and labels
are the host records' in the shared state, where ``khutulun host drain`` and ``eligibility`` write them, so that
they hold whichever agent is asked and survive restarts. Placement chooses among available, eligible hosts.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from khutulun.agent.context import AgentContext
from khutulun.cluster import Cluster, Member, MemberStatus
from khutulun.resources import ResourceId
from khutulun.scheduler import HostInfo, demand
from khutulun.state import HostRecord, ServiceRecord

__all__ = ["HEARTBEAT_INTERVAL", "HostView", "HostsView"]

HEARTBEAT_INTERVAL = 1.0
"""Seconds between an agent's heartbeats in the shared state."""


@dataclass(frozen=True)
class HostView:
    """A host as ``khutulun host list`` shows it."""

    name: str
    address: str
    api: str
    status: str
    """alive, suspect, left or dead (from gossip); "standalone" for an agent without a cluster."""
    eligible: bool
    cpus: float
    memory: int
    labels: dict[str, str]
    instances: int
    since: float
    heartbeat: float | None = None
    """When its agent last wrote its heartbeat into the shared state (its clock); None: never."""
    cut_off: bool = False
    """Dead to gossip, while its agent still writes the shared state: its instances stay where they are."""


class HostsView:
    def __init__(self, ctx: AgentContext, cluster: Cluster | None) -> None:
        self.ctx = ctx
        self.cluster = cluster

    def members(self) -> list[Member]:
        return self.cluster.members() if self.cluster is not None else []

    def _records(self) -> dict[str, HostRecord]:
        return {r.name: r for r in self.ctx.store.hosts()}

    def status(self) -> dict[str, tuple[str, str, float]]:
        """Host name → (status, API address, since), for every host gossip knows (or this one alone)."""
        if self.cluster is None:
            return {self.ctx.host: ("alive", self.ctx.config.agent_url, time.time())}
        return {m.name: (m.status.value, m.metadata.api if m.metadata else "", m.since) for m in self.members()}

    def api(self, host: str) -> str | None:
        """Where the agent of ``host`` answers, while it is a member (or this agent, for its own host)."""
        if host == self.ctx.host:
            return self.ctx.config.agent_url
        for member in self.members():
            if member.name == host and member.available and member.metadata is not None and member.metadata.api:
                return member.metadata.api
        return None

    def placeable(self, services: Iterable[ServiceRecord], exclude: str | None = None) -> list[HostInfo]:
        """Available hosts for placement (blocking: reads the shared state), with what other services already
        ask of each. Without a cluster: this host alone."""
        records = self._records()
        used: dict[str, tuple[float, int]] = {}
        for service in services:
            for placed in service.placement.instances:
                cpus, memory = demand(service.topology.nodes[placed.node])
                old = used.get(placed.host, (0.0, 0))
                used[placed.host] = (old[0] + cpus, old[1] + memory)
        if self.cluster is None:
            candidates = [(self.ctx.host, self.ctx.config.host_address, 0.0, 0, dict(self.ctx.config.labels))]
        else:
            candidates = [(m.name, m.metadata.address, m.metadata.cpus, m.metadata.memory, dict(m.metadata.labels))
                          for m in self.members() if m.available and m.metadata is not None and m.name != exclude]
        out = []
        for name, address, cpus, memory, labels in candidates:
            record = records.get(name)
            used_cpus, used_memory = used.get(name, (0.0, 0))
            out.append(HostInfo(name, address, cpus or (record.cpus if record else 0.0),
                                memory or (record.memory if record else 0), labels or dict(record.labels if record
                                                                                            else {}),
                                eligible=record.eligible if record else True, used_cpus=used_cpus,
                                used_memory=used_memory))
        return out

    def views(self, services: Iterable[ServiceRecord]) -> list[HostView]:
        """Every host gossip or the shared state knows, for ``host list`` (blocking)."""
        records = self._records()
        placed: dict[str, int] = {}
        for service in services:
            for instance in service.placement.instances:
                placed[instance.host] = placed.get(instance.host, 0) + 1
        status = self.status()
        names = sorted(set(records) | set(status))
        out = []
        for name in names:
            record = records.get(name)
            state, api, since = status.get(name, ("unknown", record.api if record else "", 0.0))
            out.append(HostView(name=name, address=record.address if record else "", api=api or
                                (record.api if record else ""), status=state,
                                eligible=record.eligible if record else True, cpus=record.cpus if record else 0.0,
                                memory=record.memory if record else 0,
                                labels=dict(record.labels) if record else {}, instances=placed.get(name, 0),
                                since=since, heartbeat=(beat := self.ctx.store.heartbeat(name)),
                                cut_off=state == "dead" and self._fresh(beat, time.time())))
        return out

    def still_writes(self, host: str, now: float) -> bool:
        """Whether ``host``'s agent wrote its heartbeat within the failover grace (blocking: reads the shared
        state). Gossip alone cannot tell a dead host from one cut off from this one's network; the shared
        directory is the witness."""
        return self._fresh(self.ctx.store.heartbeat(host), now)

    def _fresh(self, beat: float | None, now: float) -> bool:
        return beat is not None and now - beat < self.ctx.config.failover_grace + HEARTBEAT_INTERVAL

    def dead_since(self) -> dict[str, float]:
        """Hosts gossip says are dead, and since when."""
        return {m.name: m.since for m in self.members() if m.status is MemberStatus.DEAD}

    def decides(self) -> bool:
        """Whether this agent takes the cluster-wide decisions (failover): the available member with the
        smallest name. Two agents that briefly disagree are kept from acting twice by the service lock and
        the placement they re-read under it."""
        available = sorted(m.name for m in self.members() if m.available)
        return not available or available[0] == self.ctx.host


def instances_on(service: ServiceRecord, host: str) -> list[ResourceId]:
    return [ResourceId(service.namespace, service.name, i.node, i.index)
            for i in service.placement.instances if i.host == host]
