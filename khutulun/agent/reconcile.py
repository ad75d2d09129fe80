"""The reconcile loop: what runs on this host is made to match the shared state, again and again.

Every ``reconcile_interval``, and at once when a delegate reports that something stopped, each service is
converged as a deploy would: dead workloads are restarted (first at once, then with a doubling delay up to
``restart_backoff_max``, forgotten once a workload stays up for ``restart_backoff_reset``), drift is
repaired, a deploy or destroy that an agent crash cut short is finished, and anything that carries our markers
but belongs to no service is removed. A service that a deploy is changing on this host is left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, replace

from khutulun.agent.context import AgentContext
from khutulun.agent.converge import Converger, Listing, Situation
from khutulun.agent.operations import Operations
from khutulun.delegates.base import Delegate
from khutulun.errors import BusyError, KhutulunError, NotSupportedError
from khutulun.plan import Action, Plan, Step
from khutulun.resources import Resource, ResourceId
from khutulun.state import ServiceRecord, ServiceStatus

__all__ = ["Reconciler"]

log = logging.getLogger(__name__)


@dataclass
class _Backoff:
    restarts: int = 0
    next_at: float = 0.0


class Reconciler:
    def __init__(self, ctx: AgentContext, converger: Converger, operations: Operations) -> None:
        self.ctx = ctx
        self.converger = converger
        self.operations = operations
        self.wake = asyncio.Event()
        self.backoff: dict[ResourceId, _Backoff] = {}
        self.passes = 0

    async def run(self) -> None:
        interval = self.ctx.config.reconcile_interval
        while True:
            with contextlib.suppress(TimeoutError):  # the interval passed with nothing reported: a regular pass
                await asyncio.wait_for(self.wake.wait(), timeout=interval)
            self.wake.clear()
            try:
                await self.reconcile_all()
            except KhutulunError as e:  # the shared state is unreachable for a while: try again next time
                log.warning("reconcile pass failed: %s", e.message)
            self.passes += 1

    async def watch(self, delegate: Delegate) -> None:
        """Wake the loop whenever ``delegate`` reports that something of ours stopped."""
        try:
            async for rid in delegate.watch():
                log.info("%s stopped", rid)
                self.wake.set()
        except NotSupportedError:
            return

    async def reconcile_all(self) -> None:
        # The names only: each service is read once, under its lease (a deploy may finish meanwhile).
        services = await self.ctx.io(self.ctx.store.service_ids)
        listing = await self.converger.listing()  # one scan of this host for every service
        existing: set[tuple[str, str]] = set()  # what the orphan sweep keeps: all but the services found gone
        for namespace, service in services:
            existing.add((namespace, service))
            if self.converger.busy(namespace, service):
                continue
            try:
                if not await self.reconcile(namespace, service, listing):
                    existing.discard((namespace, service))
            except BusyError:
                continue
            except KhutulunError as e:
                log.warning("reconciling %s/%s failed: %s", namespace, service, e.message)
        await self.sweep_orphans(existing, listing)

    async def reconcile(self, namespace: str, service: str, listing: Listing) -> bool:
        """Converge this host's part of a service; False when the service is not there (any more)."""
        async with self.converger.exclusive(namespace, service, wait=False):
            snapshot = await self.ctx.io(self.ctx.store.snapshot, namespace, service)
            if snapshot.service is None:
                return False
            record = snapshot.service
            situation = await self.converger.situation(namespace, service, record, snapshot.resources, listing)
            plan = self._with_backoff(situation, self.converger.plan(situation))
            self._forget_stable(situation)
            if plan.changes:
                convergence = await self.converger.run(situation, plan, gates=False)
                now = time.time()
                for result in convergence.results:
                    if self._is_restart(situation, result.step):
                        self._count_restart(result.step.id, now)
                for failed in convergence.failed:
                    log.warning("%s: %s", failed.step.key, failed.message)
                if convergence.failed:
                    return True
            elif any(s.reason.startswith("restart in") for s in plan.steps):
                return True
        await self._settle(record)
        return True

    async def _settle(self, record: ServiceRecord) -> None:
        """A deploy or destroy that nothing is running any more, now converged: say so in the service."""
        if record.status is ServiceStatus.DESTROYING:
            if await self.ctx.io(self.operations.remove_if_empty, record.namespace, record.name):
                log.info("service %s/%s destroyed", record.namespace, record.name)
        elif record.status is ServiceStatus.DEPLOYING:
            await self.ctx.io(self._mark_deployed, record)

    def _mark_deployed(self, record: ServiceRecord) -> None:
        store = self.ctx.store
        with store.service_lock(record.namespace, record.name):
            current = store.read_service(record.namespace, record.name)
            if current is not None and current.revision == record.revision and \
                    current.status is ServiceStatus.DEPLOYING:
                store.write_service(replace(current, status=ServiceStatus.DEPLOYED, message="",
                                            updated_at=time.time()))

    # -- restart backoff ------------------------------------------------------------------------------

    @staticmethod
    def _is_restart(situation: Situation, step: Step) -> bool:
        prior = situation.prior.get(step.id)
        return step.action is Action.CREATE and prior is not None and prior.host == step.host

    def _with_backoff(self, situation: Situation, plan: Plan) -> Plan:
        now = time.time()
        steps = []
        for step in plan.steps:
            backoff = self.backoff.get(step.id)
            if self._is_restart(situation, step) and backoff is not None and backoff.next_at > now:
                step = replace(step, action=Action.KEEP,
                               reason=f"restart in {backoff.next_at - now:.1f} s ({step.reason})")
            steps.append(step)
        return replace(plan, steps=tuple(steps))

    def _count_restart(self, rid: ResourceId, now: float) -> None:
        backoff = self.backoff.setdefault(rid, _Backoff())
        backoff.restarts += 1
        # The first restart is immediate, and is not delayed here; the next waits 1 s, then 2, 4, ...
        delay = min(self.ctx.config.restart_backoff_max, 2.0 ** (backoff.restarts - 1))
        backoff.next_at = now + delay

    def _forget_stable(self, situation: Situation) -> None:
        reset = self.ctx.config.restart_backoff_reset
        now = time.time()
        for rid, live in situation.live.items():
            if rid in self.backoff and live is not None and live.healthy and live.started_at is not None \
                    and now - live.started_at > reset:
                del self.backoff[rid]

    # -- orphans --------------------------------------------------------------------------------------

    async def sweep_orphans(self, services: set[tuple[str, str]], listing: Listing) -> None:
        """Remove what carries our markers on this host but belongs to no service at all."""
        for rid, (name, live) in listing.items():
            if (rid.namespace, rid.service) in services or self.converger.busy(rid.namespace, rid.service):
                continue
            log.info("removing %s (%s): it belongs to no service", rid, name)
            try:
                await self.ctx.delegate(name).delete(Resource(rid, name, self.ctx.host, {}, live.spec_hash or "",
                                                              live.handle), live)
            except KhutulunError as e:
                log.warning("cannot remove orphan %s: %s", rid, e.message)
