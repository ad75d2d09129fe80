"""What an agent does for a request: load a template, place it, plan, deploy, destroy, and report.

A deploy writes the new desired state and its placement first (under the service's lock, with the
``--check-index`` test), then converges; so a deploy cut short by a crash is finished by the reconcile
loop, and a second deploy of the same template finds nothing left to do.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from khutulun import __version__, codec
from khutulun.agent.context import AgentContext
from khutulun.agent.converge import Convergence, Converger, Listener
from khutulun.agent.hosts import HostsView
from khutulun.agent.remote import converge_remote
from khutulun.bundle import Bundle
from khutulun.config import Config
from khutulun.errors import DelegateError, InvalidInputError, KhutulunError, NotFoundError, StaleIndexError
from khutulun.expressions import Unknown, resolve
from khutulun.instances import Attributes, delegate_for, desired_resources
from khutulun.model import Topology
from khutulun.plan import Action, Plan
from khutulun.resources import LiveState, ResourceId, check_name
from khutulun.scheduler import HostInfo, Placement, PortRequest, place
from khutulun.state import Event, HostRecord, ResourceRecord, ServiceRecord, ServiceStatus
from khutulun.tosca import load_bundle

__all__ = ["DeployResult", "Operations", "api_url", "host_record", "port_is_free"]


def port_is_free(port: int, protocol: str) -> bool:
    """Whether nothing on this host holds the port: a bind on every address succeeds."""
    kind = socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as probe:
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _memory() -> int:
    try:
        text = Path("/proc/meminfo").read_text(encoding="ascii")
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def api_url(config: Config) -> str:
    """How other agents reach this one: its TCP listener (at this host's address when it listens on every
    address), else its unix socket (reachable from this host only)."""
    if not config.listen:
        return config.agent_url
    host, _, port = config.listen.rpartition(":")
    return f"http://{config.host_address if host in ('', '0.0.0.0', '::', '[::]') else host}:{port}"


def host_record(ctx: AgentContext) -> HostRecord:
    config = ctx.config
    return HostRecord(name=ctx.host, address=config.host_address, api=api_url(config),
                      cpus=float(os.cpu_count() or 1), memory=_memory(), labels=dict(config.labels),
                      version=__version__, pid=os.getpid(), started_at=time.time(), port_range=config.port_range)


@dataclass(frozen=True)
class DeployResult:
    revision: int
    status: ServiceStatus
    convergence: Convergence
    """This host's part."""
    elsewhere: list[dict[str, Any]] = field(default_factory=list)
    """What failed on other hosts, as their agents reported it."""

    def summary(self) -> dict[str, Any]:
        return {"revision": self.revision, "status": self.status.value,
                "failed": [{"instance": r.step.id.instance, "host": r.step.host, "action": r.step.action.value,
                            "outcome": r.outcome.value, "message": r.message} for r in self.convergence.failed]
                + self.elsewhere}


class Operations:
    def __init__(self, ctx: AgentContext, converger: Converger, hosts: HostsView) -> None:
        self.ctx = ctx
        self.converger = converger
        self.hosts = hosts

    # -- templates and placement ----------------------------------------------------------------------

    async def load(self, namespace: str, bundle: Bundle, inputs: Mapping[str, Any]) -> Topology:
        check_name("namespace", namespace)
        store = self.ctx.store
        registered = {t.name: str(store.template_files_dir(namespace, t.name))
                      for t in await self.ctx.io(store.templates, namespace)}
        topology = await self.ctx.io(load_bundle, bundle, inputs, registered=registered,
                                     timeout=self.ctx.config.timeouts.parse)
        for node in topology.nodes.values():
            name = delegate_for(node)
            try:
                self.ctx.delegate(name)
            except DelegateError as e:
                raise InvalidInputError(f"node template {node.name!r} ({node.source}) needs the {name!r} delegate: "
                                        f"{e.message}") from e
        return topology

    async def bundle_for(self, namespace: str, bundle: Bundle | None, template: str | None) -> Bundle:
        if bundle is not None:
            return bundle
        if template is None:
            raise InvalidInputError("give a template: its files, or the name of a registered one")
        _, registered = await self.ctx.io(self.ctx.store.template, namespace, template)
        return registered

    def _place(self, namespace: str, service: str, topology: Topology, prior: Placement | None, *,
               reserve: bool) -> Placement:
        ids = {(node, i): str(ResourceId(namespace, service, node, i))
               for node in topology.nodes for i in range(topology.instance_count(node))}

        def allocate(host: HostInfo, requests: Sequence[PortRequest]) -> Mapping[str, int]:
            if not reserve:  # a preview: ports held before stay; new ones are known only after the deploy
                return {r.capability: r.prior or r.port for r in requests if r.prior or r.port}
            is_free = port_is_free if host.name == self.ctx.host else None
            return self.ctx.store.reserve_ports(host.name, self.ctx.config.port_range, requests, is_free)

        others = [s for s in self.ctx.store.read_all_services() if (s.namespace, s.name) != (namespace, service)]
        return place(topology, self.hosts.placeable(others), prior, allocate, ids, service=f"{namespace}/{service}")

    # -- preview, deploy, destroy ---------------------------------------------------------------------

    async def preview(self, namespace: str, service: str, bundle: Bundle, inputs: Mapping[str, Any]
                      ) -> tuple[Plan, Placement]:
        check_name("service", service)
        topology = await self.load(namespace, bundle, inputs)
        store = self.ctx.store
        snapshot = await self.ctx.io(store.snapshot, namespace, service)
        current = snapshot.service
        placement = await self.ctx.io(self._place, namespace, service, topology,
                                      current.placement if current else None, reserve=False)
        hypothetical = ServiceRecord(namespace=namespace, name=service, revision=current.revision if current else 0,
                                     status=ServiceStatus.DEPLOYING, topology=topology, placement=placement,
                                     artifacts=store.artifact_digests(bundle.blobs))
        situation = await self.converger.situation(namespace, service, hypothetical, snapshot.resources)
        plan = self.converger.plan(situation)
        # The other hosts' parts, from the shared state: what each is to run, against what its records say.
        others = ({i.host for i in placement.instances} | {r.host for r in snapshot.resources.values()}) \
            - {self.ctx.host}
        for theirs in self.converger.recorded_situations(namespace, service, hypothetical, snapshot.resources,
                                                         sorted(others)):
            plan = replace(plan, steps=plan.steps + self.converger.plan(theirs).steps)
        return plan, placement

    async def deploy(self, namespace: str, service: str, topology: Topology, bundle: Bundle,
                     inputs: Mapping[str, Any], *, check_index: int | None = None, template: str | None = None,
                     listener: Listener | None = None) -> DeployResult:
        """Deploy ``topology``, which :meth:`load` made from ``bundle`` and ``inputs``."""
        check_name("service", service)
        async with self.converger.exclusive(namespace, service):
            record = await self.ctx.io(self._write_desired, namespace, service, topology, bundle, inputs,
                                       check_index, template)
            if listener:
                listener({"event": "revision", "revision": record.revision})
            convergence, elsewhere = await self._converge_everywhere(record, listener)
            failed = bool(convergence.failed or elsewhere)
            status = ServiceStatus.FAILED if failed else ServiceStatus.DEPLOYED
            await self.ctx.io(self._finish, namespace, service, record.revision, status, convergence, elsewhere)
        return DeployResult(record.revision, status, convergence, elsewhere)

    async def converge_here(self, namespace: str, service: str, *, purge: bool = False,
                            listener: Listener | None = None) -> DeployResult:
        """Converge this host's part of a service now (what another agent asks during a deploy or destroy)."""
        async with self.converger.exclusive(namespace, service):
            snapshot = await self.ctx.io(self.ctx.store.snapshot, namespace, service)
            record = snapshot.service
            situation = await self.converger.situation(namespace, service, record, snapshot.resources)
            plan = self.converger.plan(situation)
            if listener:
                listener({"event": "plan", "host": self.ctx.host, "plan": plan_json(plan)})
            convergence = await self.converger.run(situation, plan, purge=purge, listener=listener)
        return DeployResult(record.revision if record else 0, record.status if record else ServiceStatus.DESTROYING,
                            convergence)

    async def _converge_everywhere(self, record: ServiceRecord, listener: Listener | None, *, purge: bool = False
                                   ) -> tuple[Convergence, list[dict[str, Any]]]:
        """Converge this host's part, and ask the agent of every other host with a part to converge its own, at
        the same time; their progress comes through ``listener`` as ours does. A host whose agent cannot be
        reached is a failure of this deploy (its reconcile loop converges it once it is back)."""
        namespace, service = record.namespace, record.name
        resources = await self.ctx.io(self.ctx.store.resources, namespace, service)
        hosts = ({i.host for i in record.placement.instances} | {r.host for r in resources.values()}) - {self.ctx.host}

        async def here() -> Convergence:
            situation = await self.converger.situation(namespace, service, record, resources)
            plan = self.converger.plan(situation)
            if listener:
                listener({"event": "plan", "host": self.ctx.host, "plan": plan_json(plan)})
            return await self.converger.run(situation, plan, purge=purge, listener=listener)

        async def there(host: str) -> list[dict[str, Any]]:
            api = self.hosts.api(host)
            if api is None:
                return [{"instance": "*", "host": host, "action": "converge", "outcome": "failed",
                         "message": f"host {host} is not available; it converges when it is back"}]
            try:
                return await converge_remote(api, self.ctx.config.token(), namespace, service, purge, listener)
            except KhutulunError as e:
                return [{"instance": "*", "host": host, "action": "converge", "outcome": "failed",
                         "message": f"host {host}: {e.message}"}]

        local, *remote = await asyncio.gather(here(), *(there(h) for h in sorted(hosts)))
        return local, [failure for failures in remote for failure in failures]

    def _write_desired(self, namespace: str, service: str, topology: Topology, bundle: Bundle,
                       inputs: Mapping[str, Any], check_index: int | None, template: str | None) -> ServiceRecord:
        store = self.ctx.store
        with store.service_lock(namespace, service):
            current = store.read_service(namespace, service)
            revision = current.revision if current else 0
            if check_index is not None and check_index != revision:
                raise StaleIndexError(f"service {namespace}/{service} is at revision {revision}, not {check_index}: "
                                      "the plan is stale; preview again")
            placement = self._place(namespace, service, topology, current.placement if current else None,
                                    reserve=True)
            artifacts = store.put_artifacts(namespace, service, bundle.blobs)
            now = time.time()
            record = ServiceRecord(
                namespace=namespace, name=service, revision=revision + 1, status=ServiceStatus.DEPLOYING,
                topology=topology, placement=placement, inputs=dict(inputs), template_main=bundle.main,
                template_digest=bundle.digest, template_name=template, artifacts=artifacts,
                created_at=current.created_at if current else now, updated_at=now)
            store.write_service(record)
            store.append_event(namespace, service, Event(now, "deploy", f"revision {record.revision}: "
                                                         f"{len(topology.nodes)} node templates", host=self.ctx.host,
                                                         revision=record.revision))
            return record

    def _finish(self, namespace: str, service: str, revision: int, status: ServiceStatus,
                convergence: Convergence, elsewhere: list[dict[str, Any]]) -> None:
        """Record how a deploy ended, unless a newer one took over meanwhile."""
        store = self.ctx.store
        message = "; ".join([*(f"{r.step.id.instance}: {r.message}" for r in convergence.failed),
                             *(f"{f['instance']}: {f['message']}" for f in elsewhere)])
        with store.service_lock(namespace, service):
            current = store.read_service(namespace, service)
            if current is None or current.revision != revision:
                return
            store.write_service(replace(current, status=status, message=message, updated_at=time.time()))
            store.append_event(namespace, service, Event(time.time(), status.value, message or "every step done",
                                                         host=self.ctx.host, revision=revision))

    async def destroy(self, namespace: str, service: str, *, purge: bool = False,
                      listener: Listener | None = None) -> DeployResult:
        async with self.converger.exclusive(namespace, service):
            record = await self.ctx.io(self._mark_destroying, namespace, service)
            convergence, elsewhere = await self._converge_everywhere(record, listener, purge=purge)
            if not convergence.failed and not elsewhere:
                await self.ctx.io(self.remove_if_empty, namespace, service)
        return DeployResult(record.revision, ServiceStatus.DESTROYING, convergence, elsewhere)

    def _mark_destroying(self, namespace: str, service: str) -> ServiceRecord:
        store = self.ctx.store
        with store.service_lock(namespace, service):
            current = store.read_service(namespace, service)
            if current is None:
                raise NotFoundError(f"there is no service {service!r} in namespace {namespace!r}")
            record = replace(current, revision=current.revision + 1, status=ServiceStatus.DESTROYING,
                             updated_at=time.time())
            store.write_service(record)
            store.append_event(namespace, service, Event(time.time(), "destroy", f"revision {record.revision}",
                                                         host=self.ctx.host, revision=record.revision))
            return record

    def remove_if_empty(self, namespace: str, service: str) -> bool:
        """Forget a destroyed service once nothing of it is left on any host."""
        store = self.ctx.store
        with store.service_lock(namespace, service):
            current = store.read_service(namespace, service)
            if current is None or current.status is not ServiceStatus.DESTROYING:
                return False
            if store.read_resources(namespace, service):
                return False
            owners = [str(ResourceId(namespace, service, i.node, i.index)) for i in current.placement.instances]
            for host in current.placement.hosts:
                store.release_ports(host, owners)
            store.remove_service(namespace, service)
            return True

    # -- looking inside -------------------------------------------------------------------------------

    async def service(self, namespace: str, service: str) -> ServiceRecord:
        record = await self.ctx.io(self.ctx.store.service, namespace, service)
        if record is None:
            raise NotFoundError(f"there is no service {service!r} in namespace {namespace!r}")
        return record

    async def status(self, namespace: str, service: str) -> dict[str, Any]:
        snapshot = await self.ctx.io(self.ctx.store.snapshot, namespace, service)
        if snapshot.service is None:
            raise NotFoundError(f"there is no service {service!r} in namespace {namespace!r}")
        record = snapshot.service
        situation = await self.converger.situation(namespace, service, record, snapshot.resources)
        instances = []
        for placed in sorted(record.placement.instances, key=lambda i: (i.node, i.index)):
            rid = ResourceId(namespace, service, placed.node, placed.index)
            applied = snapshot.resources.get(rid)
            live = situation.live.get(rid) if placed.host == self.ctx.host else None
            if applied is not None and applied.state is LiveState.FAILED and (live is None or not live.healthy):
                state = applied.state.value  # what failed says so (with its message), not "missing" or "stopped"
            elif live is not None:
                state = live.state.value
            elif applied is not None and placed.host != self.ctx.host:
                state = applied.state.value
            else:
                state = "missing" if placed.host == self.ctx.host else "pending"
            delegate = delegate_for(record.topology.nodes[placed.node])
            found = self.ctx.delegates.get(delegate)
            instances.append({
                "instance": rid.instance, "node": placed.node, "index": placed.index, "host": placed.host,
                "delegate": delegate, "state": state,
                "logs": bool(found and found.capabilities.logs), "exec": bool(found and found.capabilities.exec),
                "pid": (live.attributes.get("pid") if live else None) or (applied.attributes.get("pid")
                                                                           if applied else None),
                "ports": dict(placed.ports), "restarts": applied.restarts if applied else 0,
                "message": (live.message if live and live.message else applied.message if applied else ""),
                "since": (live.started_at if live and live.started_at else applied.started_at if applied else None),
                "revision": applied.revision if applied else 0,
            })
        return {"namespace": namespace, "service": service, "revision": record.revision,
                "status": record.status.value, "message": record.message, "updated_at": record.updated_at,
                "instances": instances}

    async def list(self, namespace: str) -> list[dict[str, Any]]:
        out = []
        for record in await self.ctx.io(self.ctx.store.services, namespace):
            resources = await self.ctx.io(self.ctx.store.resources, namespace, record.name)
            healthy = sum(1 for r in resources.values() if r.state.value in ("running", "ready"))
            out.append({"service": record.name, "revision": record.revision, "status": record.status.value,
                        "instances": len(record.placement.instances), "healthy": healthy,
                        "template": record.template_name or record.template_main, "updated_at": record.updated_at})
        return out

    async def outputs(self, namespace: str, service: str) -> dict[str, Any]:
        snapshot = await self.ctx.io(self.ctx.store.snapshot, namespace, service)
        record = snapshot.service
        if record is None:
            raise NotFoundError(f"there is no service {service!r} in namespace {namespace!r}")
        return evaluate_outputs(namespace, service, record, snapshot.resources)

    async def resource(self, namespace: str, service: str, node: str, index: int) -> ResourceRecord:
        resources = await self.ctx.io(self.ctx.store.resources, namespace, service)
        found = resources.get(ResourceId(namespace, service, node, index))
        if found is None:
            raise NotFoundError(f"service {namespace}/{service} has no instance {node}/{index}")
        return found


def evaluate_outputs(namespace: str, service: str, record: ServiceRecord,
                     resources: Mapping[ResourceId, ResourceRecord]) -> dict[str, Any]:
    known = {d.id: {**(resources[d.id].attributes if d.id in resources else {}), **d.attributes}
             for d in desired_resources(namespace, service, record.topology, record.placement)}  # attributes only
    lookup = Attributes(namespace, service, record.topology, known).lookup_for(0)
    out: dict[str, Any] = {}
    for name, output in record.topology.outputs.items():
        try:
            out[name] = resolve(output.value, lookup)
        except Unknown:
            out[name] = None
    return out


def plan_json(plan: Plan) -> dict[str, Any]:
    return {"namespace": plan.namespace, "service": plan.service, "revision": plan.revision,
            "steps": [{**codec.dump(s), "id": str(s.id), "instance": s.id.instance, "key": s.key} for s in plan.steps],
            "counts": {a.value: plan.count(a) for a in Action}}
