"""Moving instances off a host: when the cluster has declared it dead (after a grace), or when it is drained.

A host is moved off only when gossip has called it dead for the grace *and* its agent's heartbeat in the shared
state is as old: the shared directory is the witness that tells a dead host from one cut off from the others'
network (which keeps its instances, so that none runs twice, and which moves none of theirs).

One agent decides (the available member with the smallest name); under each service's lock it re-reads the
placement, places again the instances still on the host (every other instance keeps its host), and writes the
new desired state with a new revision. The owning agents' reconcile loops then start the moved instances; the
host's own agent, if it comes back, finds its copies wanted nowhere and removes them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import replace

from khutulun.agent.context import AgentContext
from khutulun.agent.hosts import HEARTBEAT_INTERVAL, HostsView, instances_on
from khutulun.errors import KhutulunError
from khutulun.resources import ResourceId
from khutulun.scheduler import HostInfo, PortRequest, place
from khutulun.state import Event, ServiceRecord, ServiceStatus

__all__ = ["Mover"]

log = logging.getLogger(__name__)


class Mover:
    def __init__(self, ctx: AgentContext, hosts: HostsView) -> None:
        self.ctx = ctx
        self.hosts = hosts
        self.moved: dict[str, float] = {}
        """Host → when its instances were last moved off (for ``host list``, and to say it once)."""

    def move_off(self, host: str, why: str) -> list[ResourceId]:
        """Place again every instance placed on ``host`` (blocking: shared state and locks)."""
        store = self.ctx.store
        moved: list[ResourceId] = []
        # Read once; each service moved replaces its entry, so that the next is placed knowing where it went.
        services = {(s.namespace, s.name): s for s in store.all_services()}
        for key, service in list(services.items()):
            if not instances_on(service, host) or service.status is ServiceStatus.DESTROYING:
                continue
            candidates = self.hosts.placeable([s for k, s in services.items() if k != key], exclude=host)
            with store.service_lock(service.namespace, service.name):
                current = store.read_service(service.namespace, service.name)
                if current is None or not instances_on(current, host):
                    continue  # another agent moved them meanwhile, or the service went
                services[key], leaving = self._replace(current, host, candidates, why)
                moved += leaving
        if moved:
            self.moved[host] = time.time()
        return moved

    def _replace(self, service: ServiceRecord, gone: str, candidates: list[HostInfo], why: str
                 ) -> tuple[ServiceRecord, list[ResourceId]]:
        """Place ``service``'s instances on ``gone`` again; the service as written, and the instances moved."""
        store = self.ctx.store
        ids = {(i.node, i.index): str(ResourceId(service.namespace, service.name, i.node, i.index))
               for i in service.placement.instances}

        def allocate(host: HostInfo, requests: Sequence[PortRequest]) -> dict[str, int]:
            # The ports are checked for bindability by the agent of the host that runs them, not from here.
            return store.reserve_ports(host.name, self.ctx.config.port_range, requests, None)

        placement = place(service.topology, candidates, service.placement, allocate, ids,
                          service=f"{service.namespace}/{service.name}")
        leaving = instances_on(service, gone)
        store.release_ports(gone, [str(rid) for rid in leaving])
        now = time.time()
        moves = ", ".join(f"{rid.instance} to {i.host}" for rid in leaving
                          if (i := placement.get(rid.node, rid.index)) is not None)
        record = replace(service, revision=service.revision + 1, status=ServiceStatus.DEPLOYING, placement=placement,
                         message=f"{why}: moved {moves}", updated_at=now)
        store.write_service(record)
        store.append_event(service.namespace, service.name, Event(now, "move", f"{why}: moved {moves}",
                                                                  host=self.ctx.host, revision=record.revision))
        log.info("%s/%s: %s: moved %s", service.namespace, service.name, why, moves)
        return record, leaving

    async def beat(self) -> None:
        """Write this agent's heartbeat into the shared state, every second, for as long as it runs."""
        while True:
            try:
                await self.ctx.io(self.ctx.store.beat, self.ctx.host, time.time())
            except KhutulunError as e:
                log.warning("cannot write this host's heartbeat: %s", e.message)
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    async def watch(self) -> None:
        """Move the instances of hosts that stay dead past the grace (the deciding agent only)."""
        grace = self.ctx.config.failover_grace
        partitioned: set[str] = set()
        while True:
            await asyncio.sleep(min(1.0, max(0.1, grace / 4)))
            if not self.hosts.decides():
                continue
            now = time.time()
            for host, since in self.hosts.dead_since().items():
                if now - since < grace or self.moved.get(host, 0.0) > since:
                    continue
                # A host cut off from this one's network, not dead: moving its instances would run each twice
                # (and a host on the far side of a partition would move ours).
                if await self.ctx.io(self.hosts.still_writes, host, now):
                    if host not in partitioned:
                        partitioned.add(host)
                        log.warning("host %s is dead to gossip but its agent still writes the shared state: its "
                                    "instances stay where they are", host)
                    continue
                partitioned.discard(host)
                try:
                    await asyncio.to_thread(self.move_off, host, f"host {host} is dead")
                except KhutulunError as e:  # no host can take them (yet): try again on the next turn
                    log.warning("cannot move the instances of dead host %s: %s", host, e.message)
