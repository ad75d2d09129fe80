"""Converging one service on this host: desired, prior and live state into a plan, and the plan into steps.

Both a deploy and the reconcile loop come here, so a deploy interrupted by a crash is finished by the same
code that repairs drift. One convergence of a service runs at a time per host: an asyncio lock inside the
agent, and a lease in the shared state against a second agent claiming the same host name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp

from khutulun.agent.context import AgentContext
from khutulun.agent.firewall import Firewall
from khutulun.agent.ready import Gate, GateError, RunCommand, check_once, wait_ready
from khutulun.agent.runner import Outcome, StepResult, run_steps
from khutulun.errors import BusyError, DelegateError, KhutulunError
from khutulun.expressions import Unknown, resolve
from khutulun.instances import Attributes, DesiredResource, Site, desired_resources
from khutulun.plan import Action, Plan, Step, make_plan
from khutulun.resources import Live, LiveState, Resource, ResourceId, spec_hash
from khutulun.state import Event, ResourceRecord, ServiceRecord, ServiceStatus

__all__ = ["Convergence", "Converger", "Listener", "Listing", "Situation"]

log = logging.getLogger(__name__)

Listing = dict[ResourceId, tuple[str, Live]]
"""What carries delegates' markers on this host: resource id → (delegate, live)."""

Listener = Callable[[dict[str, Any]], None]
"""Receives progress events (plan, step started, step result) as JSON-able dicts."""


@dataclass
class Situation:
    """Everything a plan for one service on this host is made from."""

    namespace: str
    service: str
    record: ServiceRecord | None
    desired: dict[ResourceId, DesiredResource]
    prior: dict[ResourceId, ResourceRecord]
    live: dict[ResourceId, Live | None]
    orphans: list[tuple[ResourceId, str, Live]]
    """(id, delegate, live) of what runs here with this service's markers and no record."""
    known: dict[ResourceId, dict[str, Any]] = field(default_factory=dict)
    """Attributes by resource: placement's, then what delegates reported. Change it with :meth:`learn`."""
    ready: set[ResourceId] = field(default_factory=set)
    """Resources whose ready conditions passed during this convergence."""
    artifacts: dict[str, str] = field(default_factory=dict)
    """Stored artifact path → the file the template named, so that messages speak of the user's file."""
    _resolved: dict[ResourceId, tuple[dict[str, Any] | None, str | None]] = field(default_factory=dict)

    def in_user_terms(self, message: str) -> str:
        """``message`` with each stored artifact's path replaced by the file the template gave."""
        for stored, name in self.artifacts.items():
            message = message.replace(f"'{stored}'", f"artifact file {name!r}").replace(stored, name)
        return message

    def learn(self, rid: ResourceId, attributes: dict[str, Any] | None) -> None:
        """What a step found out (or, with None, that the resource is gone): specs resolve anew after it."""
        if attributes is None:
            self.known.pop(rid, None)
        else:
            self.known[rid] = attributes
        self._resolved.clear()

    @property
    def revision(self) -> int:
        return self.record.revision if self.record else 0

    def attributes(self) -> Attributes | None:
        if self.record is None:
            return None
        return Attributes(self.namespace, self.service, self.record.topology, self.known)

    def resolve(self, desired: DesiredResource) -> tuple[dict[str, Any] | None, str | None]:
        """The resource's spec and hash as far as the known attributes go (memoized until one changes)."""
        if desired.id not in self._resolved:
            self._resolved[desired.id] = self._resolve(desired)
        return self._resolved[desired.id]

    def _resolve(self, desired: DesiredResource) -> tuple[dict[str, Any] | None, str | None]:
        attributes = self.attributes()
        if attributes is None:
            return None, None
        try:
            spec = resolve(dict(desired.spec), attributes.lookup_for(desired.id.index))
        except Unknown:
            return None, None
        return spec, spec_hash(spec)


@dataclass
class Convergence:
    plan: Plan
    results: list[StepResult]

    @property
    def failed(self) -> list[StepResult]:
        return [r for r in self.results if r.outcome is not Outcome.DONE]


def step_event(kind: str, step: Step, **extra: Any) -> dict[str, Any]:
    return {"event": kind, "key": step.key, "resource": str(step.id), "instance": step.id.instance,
            "host": step.host, "delegate": step.delegate, "action": step.action.value, "reason": step.reason,
            **extra}


class Converger:
    def __init__(self, ctx: AgentContext) -> None:
        self.ctx = ctx
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._writes: dict[tuple[str, str], asyncio.Lock] = {}
        self.firewall = Firewall(ctx.config.firewall_zone)

    def lock(self, namespace: str, service: str) -> asyncio.Lock:
        return self._locks.setdefault((namespace, service), asyncio.Lock())

    def busy(self, namespace: str, service: str) -> bool:
        return self.lock(namespace, service).locked()

    @contextlib.asynccontextmanager
    async def exclusive(self, namespace: str, service: str, *, wait: bool = True) -> AsyncIterator[None]:
        """Hold this host's right to change the service: the in-process lock, then the shared lease."""
        lock = self.lock(namespace, service)
        if not wait and lock.locked():
            raise BusyError(f"service {namespace}/{service} is being changed on this host")
        async with lock:
            lease = self.ctx.store.converge_lease(namespace, service, self.ctx.host)
            deadline = time.monotonic() + (self.ctx.config.timeouts.lock if wait else 0)
            while True:
                held = await self.ctx.io(lease.__enter__)
                if held:
                    break
                await self.ctx.io(lease.__exit__, None, None, None)
                if time.monotonic() >= deadline:
                    raise BusyError(f"another agent for host {self.ctx.host!r} is changing service "
                                    f"{namespace}/{service}")
                lease = self.ctx.store.converge_lease(namespace, service, self.ctx.host)
                await asyncio.sleep(0.2)
            try:
                yield
            finally:
                await self.ctx.io(lease.__exit__, None, None, None)

    # -- seeing the situation -------------------------------------------------------------------------

    async def listing(self) -> Listing:
        """Everything on this host that carries a delegate's markers: one scan, for many services."""
        found: Listing = {}
        for delegate in self.ctx.delegates.values():
            if delegate.capabilities.list:
                for rid, live in await delegate.list():
                    found[rid] = (delegate.name, live)
        return found

    def _wanted(self, namespace: str, service: str, record: ServiceRecord | None,
                prior: Mapping[ResourceId, ResourceRecord]
                ) -> tuple[list[DesiredResource], dict[str, str], dict[ResourceId, dict[str, Any]]]:
        """What ``record`` wants on every host, the stored artifacts by path, and the attributes known so far."""
        wanted: list[DesiredResource] = []
        stored: dict[str, str] = {}
        if record is not None and record.status is not ServiceStatus.DESTROYING:
            stored = {name: str(self.ctx.store.artifact_path(namespace, service, digest))
                      for name, digest in record.artifacts.items()}
            wanted = desired_resources(namespace, service, record.topology, record.placement,
                                       site=Site(self.ctx.shared_root, stored))
        known: dict[ResourceId, dict[str, Any]] = {}
        for d in wanted:
            known[d.id] = dict(d.attributes)
        for rid, r in prior.items():
            # What a delegate reported (a path, a pid) comes from the record; where the instance is (host,
            # address, ports) from the placement wanted now, which a record of an earlier revision may predate.
            known[rid] = {**r.attributes, **known.get(rid, {})}
        return wanted, {path: name for name, path in stored.items()}, known

    @staticmethod
    def _at(host: str, namespace: str, service: str, record: ServiceRecord | None,
            prior: Mapping[ResourceId, ResourceRecord], wanted: list[DesiredResource], artifacts: dict[str, str],
            known: dict[ResourceId, dict[str, Any]]) -> Situation:
        """``host``'s part, before anything is found out about what runs. Situations made from one ``known``
        share it: only one of them may run steps (the others are a preview's)."""
        return Situation(namespace, service, record, {d.id: d for d in wanted if d.host == host},
                         {rid: r for rid, r in prior.items() if r.host == host}, {}, [],
                         known, artifacts=artifacts)

    async def situation(self, namespace: str, service: str, record: ServiceRecord | None,
                        prior: Mapping[ResourceId, ResourceRecord], listing: Listing | None = None) -> Situation:
        """What is desired (by ``record``), applied and running for the service on this host."""
        if listing is None:
            listing = await self.listing()
        situation = self._at(self.ctx.host, namespace, service, record, prior,
                             *self._wanted(namespace, service, record, prior))
        accounted = set(situation.desired) | set(situation.prior)
        for rid in accounted:
            situation.live[rid] = await self._inspect(situation, rid, listing)
        # Resources of this service found running here with no record: started just before a crash.
        situation.orphans = [(rid, name, live) for rid, (name, live) in listing.items()
                             if rid.namespace == namespace and rid.service == service and rid not in accounted]
        return situation

    def recorded_situations(self, namespace: str, service: str, record: ServiceRecord | None,
                            prior: Mapping[ResourceId, ResourceRecord], hosts: Iterable[str]) -> list[Situation]:
        """Other hosts' parts as far as the shared state tells, for a preview: only a host's own agent can see
        what runs there, so what its records say stands in for what runs."""
        wanted = self._wanted(namespace, service, record, prior)
        out = []
        for host in hosts:
            situation = self._at(host, namespace, service, record, prior, *wanted)
            situation.live = {rid: Live(r.state, r.spec_hash, r.handle, r.attributes, r.message)
                              for rid, r in situation.prior.items()}
            out.append(situation)
        return out

    def _resource(self, situation: Situation, rid: ResourceId) -> Resource:
        """The resource as its delegate knows it: the desired spec when it resolves, else the one applied."""
        prior = situation.prior.get(rid)
        handle = prior.handle if prior else {}
        wanted = situation.desired.get(rid)
        if wanted is not None:
            spec, digest = situation.resolve(wanted)
            if spec is not None and digest is not None:
                return Resource(rid, wanted.delegate, self.ctx.host, spec, digest, handle)
        if prior is not None:
            return Resource(rid, prior.delegate, self.ctx.host, prior.spec, prior.spec_hash, handle)
        assert wanted is not None
        return Resource(rid, wanted.delegate, self.ctx.host, dict(wanted.spec), "", handle)

    async def _inspect(self, situation: Situation, rid: ResourceId, listing: Listing) -> Live | None:
        resource = self._resource(situation, rid)
        try:
            delegate = self.ctx.delegate(resource.delegate)
            if delegate.capabilities.list and not resource.handle:
                # Nothing recorded to find it by: the listing, made once for all resources, has it if anything
                # does, where an inspect would scan the host again for each one.
                found = listing.get(rid)
                return found[1] if found is not None and found[0] == delegate.name else None
            return await delegate.inspect(resource)
        except DelegateError as e:
            return Live(LiveState.FAILED, None, message=e.message)

    def plan(self, situation: Situation) -> Plan:
        orphans = [(rid, self.ctx.host, name) for rid, name, _ in situation.orphans]
        return make_plan(situation.namespace, situation.service, situation.revision,
                         list(situation.desired.values()), situation.prior, situation.live, situation.resolve,
                         also_delete=orphans, destroying=situation.record is not None
                         and situation.record.status is ServiceStatus.DESTROYING)

    # -- changing things ------------------------------------------------------------------------------

    async def _write(self, situation: Situation, *calls: tuple[Callable[..., Any], tuple[Any, ...]]) -> None:
        """Writes to the service's records, together under its exclusive lock, off the event loop. Steps of
        one agent queue here first, so they do not poll the lock file against each other."""
        key = (situation.namespace, situation.service)
        async with self._writes.setdefault(key, asyncio.Lock()):
            def call() -> None:
                with self.ctx.store.service_lock(situation.namespace, situation.service):
                    for fn, args in calls:
                        fn(*args)

            await self.ctx.io(call)

    # Take-overs: when a host is declared dead its instances are placed elsewhere, and the host, if it was only
    # cut off, may still be converging its copies. Each record names the host that owns the instance; a write
    # or removal happens under the service lock only when this host still owns it, so that two hosts never
    # claim one instance. The copy a host no longer owns is an orphan on its next pass, and is removed.

    def _keep_record(self, record: ResourceRecord) -> None:
        current = self.ctx.store.read_resource(record.id)
        if current is not None and current.host != record.host:
            # Another host recorded it: a take-over, when the placement now gives the instance to this host (the
            # service record, with the whole topology, is read only in this rare case, not on every step).
            service = self.ctx.store.read_service(record.id.namespace, record.id.service)
            placed = service.placement.get(record.id.node, record.id.index) if service is not None else None
            if placed is None or placed.host != record.host:
                log.info("%s belongs to host %s: this host's copy is not recorded", record.id, current.host)
                return
        self.ctx.store.write_resource(record)

    def _drop_record(self, rid: ResourceId) -> None:
        current = self.ctx.store.read_resource(rid)
        if current is not None and current.host != self.ctx.host:
            return  # the record is another host's, which took the instance over: this host removed its copy
        self.ctx.store.remove_resource(rid)

    def _event(self, situation: Situation, kind: str, message: str, rid: ResourceId) -> tuple[Callable[..., Any],
                                                                                              tuple[Any, ...]]:
        event = Event(time=time.time(), kind=kind, message=message, resource=str(rid), host=self.ctx.host,
                      revision=situation.revision)
        return self._append_event, (situation.namespace, situation.service, event)

    def _append_event(self, namespace: str, service: str, event: Event) -> None:
        try:
            self.ctx.store.append_event(namespace, service, event)
        except KhutulunError:  # the history is for people; a full disk must not fail the step that happened
            log.exception("cannot record an event for %s/%s", namespace, service)

    async def run(self, situation: Situation, plan: Plan, *, purge: bool = False,
                  listener: Listener | None = None, gates: bool = True) -> Convergence:
        """Run the plan's steps. A step's ready conditions are waited for when ``gates`` (a deploy), and
        otherwise only when another step of the plan waits on it (the reconcile loop restarting one workload
        does not wait on it; creating what requires it does)."""
        waited_on = {key for step in plan.steps for key in step.after}

        def started(step: Step) -> None:
            if listener:
                listener(step_event("step-started", step))

        def finished(result: StepResult) -> None:
            if listener:
                listener(step_event("step-" + result.outcome.value, result.step, message=result.message))

        async def execute(step: Step) -> str:
            if step.action is Action.DELETE:
                return await self._delete(situation, step, purge=purge)
            return await self._apply(situation, step, gates=gates or step.key in waited_on)

        results = await run_steps(plan.steps, execute, concurrency=self.ctx.config.step_concurrency,
                                  on_start=started, on_result=finished)
        return Convergence(plan, results)

    async def _apply(self, situation: Situation, step: Step, *, gates: bool) -> str:
        wanted = situation.desired[step.id]
        prior = situation.prior.get(step.id)
        spec, digest = situation.resolve(wanted)
        if spec is None or digest is None:
            raise DelegateError(f"{step.id.instance}: a value it needs is not known; the resources it "
                                "depends on did not report it")
        delegate = self.ctx.delegate(wanted.delegate)
        resource = Resource(step.id, wanted.delegate, self.ctx.host, spec, digest, prior.handle if prior else {})
        before = situation.live.get(step.id)  # what the situation saw moments ago: this converge is ours alone
        if step.action is Action.UPDATE and before is not None and before.healthy and before.spec_hash == digest:
            return "unchanged: what it uses came out the same"  # an update that waited to see (plan._spread)
        await self._dependencies_ready(situation, wanted, wait=gates)
        restart = prior is not None and prior.spec_hash == digest
        try:
            live = await delegate.apply(resource, before)
        except DelegateError as e:
            message = situation.in_user_terms(e.message)
            failed = self._record(situation, wanted, spec, digest, Live(LiveState.FAILED, None, message=message),
                                  prior)
            await self._write(situation, (self._keep_record, (failed,)),
                              self._event(situation, "fail", f"{step.action.value} failed: {message}", step.id))
            situation.prior[wanted.id] = failed
            raise DelegateError(message) from e
        exposed = [str(p) for p in wanted.exposed]
        said = [await self.firewall.open(exposed)] if exposed else []
        record = replace(self._record(situation, wanted, spec, digest, live, prior, restarted=restart),
                         exposed=tuple(exposed) if said and said[0].startswith("exposed") else ())
        kind = "restart" if restart else step.action.value
        await self._write(situation, (self._keep_record, (record,)),
                          self._event(situation, kind, "; ".join([f"{kind}: {step.reason}", *said]), step.id))
        situation.prior[wanted.id] = record
        situation.live[wanted.id] = live
        situation.learn(step.id, dict(record.attributes))
        if gates:
            said += await self._wait_ready(situation, wanted, resource, record)
        return "; ".join(["restarted" if restart else f"{step.action.value}d", *said])

    async def _wait_ready(self, situation: Situation, wanted: DesiredResource, resource: Resource,
                          record: ResourceRecord) -> list[str]:
        """Wait for the resource's ready conditions; a gate that does not open fails the step (and so skips
        what requires it), and is noted on the resource's record."""
        attributes = situation.attributes()
        lookup = attributes.lookup_for(wanted.id.index) if attributes else None
        run_command = self._command_runner(wanted, resource)
        said = []
        for condition in wanted.gates:
            gate = Gate.from_condition(resolve(dict(condition), lookup) if lookup else condition)
            try:
                said.append(await wait_ready(gate, run_command))
            except GateError as e:
                await self._write(situation, (self._keep_record, (replace(record, message=e.message),)),
                                  self._event(situation, "fail", e.message, wanted.id))
                raise
        situation.ready.add(wanted.id)
        return said

    def _command_runner(self, wanted: DesiredResource, resource: Resource) -> RunCommand:
        """Runs a ready condition's command next to the resource, as ``exec`` does."""
        delegate = self.ctx.delegate(wanted.delegate)

        async def run_command(argv: Sequence[str]) -> tuple[int, str]:
            session = await delegate.exec(resource, argv)
            chunks = [data async for _, data in session.output()]
            return await session.wait(), b"".join(chunks).decode(errors="replace")

        return run_command

    async def _dependencies_ready(self, situation: Situation, wanted: DesiredResource, *, wait: bool) -> None:
        """What ``wanted`` requires must be ready before it starts, also when it runs already and changes
        nothing in this convergence: a deploy waits for its gates, the reconcile loop checks them once (and
        tries again on its next pass)."""
        for dep_id in wanted.depends_on:
            dep = situation.desired.get(dep_id)
            record = situation.prior.get(dep_id)
            if dep is None or not dep.gates or dep_id in situation.ready or record is None:
                continue
            resource = Resource(dep_id, dep.delegate, self.ctx.host, record.spec, record.spec_hash, record.handle)
            if wait:
                await self._wait_ready(situation, dep, resource, record)
                continue
            attributes = situation.attributes()
            lookup = attributes.lookup_for(dep_id.index) if attributes else None
            async with aiohttp.ClientSession() as session:
                for condition in dep.gates:
                    gate = Gate.from_condition(resolve(dict(condition), lookup) if lookup else condition)
                    passed, said = await check_once(gate, self._command_runner(dep, resource), session)
                    if not passed:
                        raise GateError(f"waits for {gate.what} to be ready ({gate.describe()}; the last answer: "
                                        f"{said})")
            situation.ready.add(dep_id)

    def _record(self, situation: Situation, wanted: DesiredResource, spec: dict[str, Any], digest: str, live: Live,
                prior: ResourceRecord | None, *, restarted: bool = False) -> ResourceRecord:
        restarts = (prior.restarts if prior else 0) + (1 if restarted else 0)
        return ResourceRecord(
            id=wanted.id, delegate=wanted.delegate, host=self.ctx.host, revision=situation.revision, spec=spec,
            spec_hash=digest if live.healthy else (prior.spec_hash if prior else ""), state=live.state,
            depends_on=wanted.depends_on, handle=dict(live.handle) or (dict(prior.handle) if prior else {}),
            attributes={**wanted.attributes, **live.attributes}, message=live.message, restarts=restarts,
            started_at=live.started_at if live.healthy else (prior.started_at if prior else None),
            updated_at=time.time())

    async def _delete(self, situation: Situation, step: Step, *, purge: bool) -> str:
        prior = situation.prior.get(step.id)
        orphan = next((live for rid, _, live in situation.orphans if rid == step.id), None)
        if prior is not None:
            resource = Resource(step.id, prior.delegate, self.ctx.host, prior.spec, prior.spec_hash, prior.handle)
            live = situation.live.get(step.id)
        elif orphan is not None:
            resource = Resource(step.id, step.delegate, self.ctx.host, {}, orphan.spec_hash or "", orphan.handle)
            live = orphan
        else:
            return "already gone"
        try:
            await self.ctx.delegate(resource.delegate).delete(resource, live, purge=purge)
            closed = await self.firewall.close(prior.exposed) if prior is not None and prior.exposed else ""
        except DelegateError as e:
            writes = [self._event(situation, "fail", f"delete failed: {e.message}", step.id)]
            if prior is not None:
                kept = replace(prior, message=f"delete failed: {e.message}", updated_at=time.time())
                writes.insert(0, (self._keep_record, (kept,)))
            await self._write(situation, *writes)
            raise
        said = "; ".join(filter(None, [f"deleted: {step.reason}", closed]))
        await self._write(situation, (self._drop_record, (step.id,)),
                          self._event(situation, "delete", said, step.id))
        await self.ctx.io(self.ctx.store.release_ports, self.ctx.host, [str(step.id)])
        situation.prior.pop(step.id, None)
        situation.live.pop(step.id, None)
        situation.learn(step.id, None)
        return "deleted"
