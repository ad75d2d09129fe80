"""The agent's HTTP API, under ``/v1``: JSON in and out, NDJSON for progress, a websocket for ``exec``.

Handlers parse the request, call :class:`~khutulun.agent.operations.Operations`, and serialize; every
:class:`~khutulun.errors.KhutulunError` becomes ``{"error": {...}}`` with its HTTP status in one middleware,
and the client raises the same error class again. On TCP every request needs ``Authorization: Bearer
<token>``; on the unix socket the socket's permissions decide.

Deploys and destroys run as tasks of the agent, not of the request: a client that goes away does not cut a
deploy short, it only stops watching it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from khutulun import __version__, codec
from khutulun.agent.failover import Mover
from khutulun.agent.hosts import HostView
from khutulun.agent.operations import DeployResult, Operations, plan_json
from khutulun.bundle import Bundle
from khutulun.client import Client
from khutulun.cluster import Cluster
from khutulun.errors import (
    AgentUnavailableError,
    InternalError,
    InvalidInputError,
    KhutulunError,
    NotFoundError,
)
from khutulun.resources import Resource, check_name
from khutulun.state import HostRecord, ResourceRecord

__all__ = ["HOOKS", "OPERATIONS", "AgentHooks", "make_app"]

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class AgentHooks:
    """What handlers may ask of the agent itself."""

    stop: Callable[[], None]
    spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]]
    mover: Mover
    cluster: Cluster | None


OPERATIONS = web.AppKey("operations", Operations)
HOOKS = web.AppKey("hooks", AgentHooks)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error_response(error: KhutulunError) -> web.Response:
    return web.json_response({"error": error.to_wire()}, status=error.http_status)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except KhutulunError as e:
        return _error_response(e)
    except web.HTTPException:
        raise
    except Exception:  # a bug: logged with its traceback here, reported to the client without one
        log.exception("internal error in %s %s", request.method, request.path)
        return _error_response(InternalError(f"internal error in the agent ({request.method} {request.path}); "
                                             "the agent's log has the details"))


def authenticate(token: str | None) -> Any:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token is not None and request.transport is not None and request.transport.get_extra_info("peername"):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return web.json_response({"error": {"code": "unauthorized", "message": "a valid bearer token is "
                                                    "needed"}}, status=401)
        return await handler(request)

    return check


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"the request body is not JSON: {e}") from e
    if not isinstance(data, dict):
        raise InvalidInputError("the request body must be a JSON object")
    return data


def _bundle(data: dict[str, Any]) -> Bundle | None:
    raw = data.get("bundle")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InvalidInputError("bundle must be an object with main, files and blobs")
    return Bundle.from_wire(raw)


def _names(request: web.Request) -> tuple[str, str]:
    namespace = check_name("namespace", request.match_info["namespace"])
    return namespace, check_name("service", request.match_info.get("service", "x"))


def _inputs(data: dict[str, Any]) -> dict[str, Any]:
    inputs = data.get("inputs") or {}
    if not isinstance(inputs, dict):
        raise InvalidInputError("inputs must be an object")
    return inputs


async def health(request: web.Request) -> web.Response:
    ops = request.app[OPERATIONS]
    return web.json_response({"status": "ok", "host": ops.ctx.host, "version": __version__,
                              "state_dir": str(ops.ctx.config.state_dir)})


async def stop(request: web.Request) -> web.Response:
    request.app[HOOKS].stop()
    return web.json_response({"status": "stopping"})


async def validate(request: web.Request) -> web.Response:
    namespace = check_name("namespace", request.match_info["namespace"])
    data = await _body(request)
    ops = request.app[OPERATIONS]
    bundle = await ops.bundle_for(namespace, _bundle(data), data.get("template"))
    topology = await ops.load(namespace, bundle, _inputs(data))
    return web.json_response({"nodes": [{"name": n.name, "type": n.type, "instances": topology.instance_count(n.name)}
                                        for n in topology.nodes.values()],
                              "inputs": codec.dump_value(dict(topology.inputs)),
                              "outputs": list(topology.outputs)})


async def preview(request: web.Request) -> web.Response:
    namespace, service = _names(request)
    data = await _body(request)
    ops = request.app[OPERATIONS]
    bundle = await ops.bundle_for(namespace, _bundle(data), data.get("template"))
    plan, placement = await ops.preview(namespace, service, bundle, _inputs(data))
    return web.json_response({"plan": plan_json(plan), "placement": codec.dump(placement)})


async def _stream(request: web.Request, run: Callable[[Callable[[dict[str, Any]], None]],
                                                      Awaitable[DeployResult]]) -> web.StreamResponse:
    """Run an operation as a task of the agent and stream its progress as NDJSON until it ends."""
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    async def operation() -> None:
        try:
            result = await run(queue.put_nowait)
            queue.put_nowait({"event": "done", **result.summary()})
        except KhutulunError as e:
            queue.put_nowait({"event": "error", "error": e.to_wire()})
        except Exception:  # a bug: the agent keeps running, the client hears of it
            log.exception("internal error in %s %s", request.method, request.path)
            queue.put_nowait({"event": "error", "error": InternalError("internal error in the agent; its log has "
                                                                       "the details").to_wire()})
        finally:
            queue.put_nowait(None)

    request.app[HOOKS].spawn(operation())
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    while (event := await queue.get()) is not None:
        await response.write(json.dumps(event).encode() + b"\n")
    await response.write_eof()
    return response


async def deploy(request: web.Request) -> web.StreamResponse:
    namespace, service = _names(request)
    data = await _body(request)
    ops = request.app[OPERATIONS]
    template = data.get("template")
    bundle = await ops.bundle_for(namespace, _bundle(data), template)
    check_index = data.get("check_index")
    if check_index is not None and not isinstance(check_index, int):
        raise InvalidInputError("check_index must be an integer")
    # Errors in the template come back as a plain error answer, before any progress is streamed.
    topology = await ops.load(namespace, bundle, _inputs(data))
    return await _stream(request, lambda listener: ops.deploy(
        namespace, service, topology, bundle, _inputs(data), check_index=check_index,
        template=template if isinstance(template, str) else None, listener=listener))


async def destroy(request: web.Request) -> web.StreamResponse:
    namespace, service = _names(request)
    ops = request.app[OPERATIONS]
    await ops.service(namespace, service)  # not found: a plain error answer
    purge = request.query.get("purge", "") in ("1", "true", "yes")
    return await _stream(request, lambda listener: ops.destroy(namespace, service, purge=purge, listener=listener))


async def services(request: web.Request) -> web.Response:
    namespace = check_name("namespace", request.match_info["namespace"])
    return web.json_response({"services": await request.app[OPERATIONS].list(namespace)})


async def status(request: web.Request) -> web.Response:
    namespace, service = _names(request)
    return web.json_response(await request.app[OPERATIONS].status(namespace, service))


async def outputs(request: web.Request) -> web.Response:
    namespace, service = _names(request)
    return web.json_response({"outputs": codec.dump_value(await request.app[OPERATIONS].outputs(namespace, service))})


async def events(request: web.Request) -> web.Response:
    namespace, service = _names(request)
    try:
        limit = int(request.query.get("limit", "50"))
    except ValueError as e:
        raise InvalidInputError(f"limit {request.query['limit']!r} is not a number") from e
    ops = request.app[OPERATIONS]
    await ops.service(namespace, service)  # a service that is not there says so, rather than having no events
    found = await ops.ctx.io(ops.ctx.store.events, namespace, service, limit)
    return web.json_response({"events": codec.dump(found)})


async def _instance(request: web.Request) -> tuple[Operations, ResourceRecord]:
    namespace, service = _names(request)
    node = request.match_info["node"]
    try:
        index = int(request.match_info["index"])
    except ValueError as e:
        raise InvalidInputError(f"{request.match_info['index']!r} is not an instance index") from e
    ops = request.app[OPERATIONS]
    return ops, await ops.resource(namespace, service, node, index)


def _resource(record: ResourceRecord) -> Resource:
    return Resource(record.id, record.delegate, record.host, record.spec, record.spec_hash, record.handle)


def _agent_of(ops: Operations, record: ResourceRecord) -> Client:
    """A client of the agent that runs ``record``'s instance, on another host: logs and exec are relayed there,
    so that any agent answers for every instance, as it does for deploys."""
    api = ops.hosts.api(record.host)
    if api is None:
        raise AgentUnavailableError(f"{record.id.instance} runs on host {record.host!r}, whose agent is not "
                                    "available in the cluster now ('khutulun host list' shows it)")
    return Client(api, token=ops.ctx.config.token(), connect_timeout=5.0)


async def _relay_logs(request: web.Request, client: Client) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    async with client:
        chunks = client.raw(request.path, **request.query)
        # The other agent's errors (no such instance, no logs) surface before the first chunk: answer them
        # as errors of our own, which the error middleware can do only while nothing was sent.
        first = await anext(aiter(chunks), None)
        await response.prepare(request)
        if first is not None:
            await response.write(first)
            async for chunk in chunks:
                await response.write(chunk)
    await response.write_eof()
    return response


async def _forward(source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                   sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse) -> None:
    """Text and binary messages from ``source`` to ``sink``, until ``source`` closes or says anything else."""
    async for message in source:
        if message.type is WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif message.type is WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        else:
            break


async def _relay_exec(request: web.Request, client: Client) -> web.WebSocketResponse:
    async with client:
        remote = await client.websocket(request.path)
        ws = web.WebSocketResponse()
        await ws.prepare(request)

        async def upstream() -> None:
            await _forward(ws, remote)  # stdin, resizes, EOF
            await remote.close()

        forwarder = asyncio.create_task(upstream(), name="exec relay")
        try:
            await _forward(remote, ws)  # the other agent's output, until it says the command ended
        finally:
            forwarder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await forwarder
            await remote.close()
            await ws.close()
    return ws


async def logs(request: web.Request) -> web.StreamResponse:
    ops, record = await _instance(request)
    if record.host != ops.ctx.host:
        return await _relay_logs(request, _agent_of(ops, record))
    resource = _resource(record)
    delegate = ops.ctx.delegate(resource.delegate)
    tail = request.query.get("tail")
    chunks = delegate.logs(resource, follow=request.query.get("follow", "") in ("1", "true"),
                           tail=int(tail) if tail else None)
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    await response.prepare(request)
    try:
        async for chunk in chunks:
            await response.write(chunk)
    except (ConnectionResetError, asyncio.CancelledError):
        with contextlib.suppress(Exception):
            await chunks.aclose()  # type: ignore[attr-defined]
        raise
    await response.write_eof()
    return response


async def exec_(request: web.Request) -> web.StreamResponse:
    """A command next to an instance. The client's first message is ``{"argv": [...], "tty": bool}``; then
    binary messages are its stdin, ``{"eof": true}`` closes stdin and ``{"resize": [rows, cols]}`` resizes.
    The agent sends output as text messages ``{"stream": "stdout", "data": base64}`` and ends with
    ``{"exit": code}``."""
    ops, record = await _instance(request)
    if record.host != ops.ctx.host:
        return await _relay_exec(request, _agent_of(ops, record))
    resource = _resource(record)
    delegate = ops.ctx.delegate(resource.delegate)
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    first = await ws.receive_json()
    argv = first.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        await ws.send_json({"error": InvalidInputError("exec needs a command").to_wire()})
        await ws.close()
        return ws
    try:
        session = await delegate.exec(resource, argv, tty=bool(first.get("tty")))
    except KhutulunError as e:
        await ws.send_json({"error": e.to_wire()})
        await ws.close()
        return ws

    async def forward_input() -> None:
        async for message in ws:
            if message.type is WSMsgType.BINARY:
                await session.write(message.data)
            elif message.type is WSMsgType.TEXT:
                control = json.loads(message.data)
                if control.get("eof"):
                    await session.close_stdin()
                if isinstance(control.get("resize"), list):
                    await session.resize(*control["resize"])
            else:
                break

    # Input is forwarded on the side; the command's output, until it ends, decides when the session is over.
    forwarder = asyncio.create_task(forward_input(), name="exec input")
    try:
        async for stream, data in session.output():
            await ws.send_json({"stream": stream, "data": base64.b64encode(data).decode()})
        code = await session.wait()
        await ws.send_json({"exit": code})
    except BaseException:
        await session.kill()
        raise
    finally:
        forwarder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await forwarder
        await ws.close()
    return ws


async def namespaces(request: web.Request) -> web.Response:
    ops = request.app[OPERATIONS]
    return web.json_response({"namespaces": await ops.ctx.io(ops.ctx.store.namespaces)})


async def templates(request: web.Request) -> web.Response:
    namespace = check_name("namespace", request.match_info["namespace"])
    ops = request.app[OPERATIONS]
    return web.json_response({"templates": codec.dump(await ops.ctx.io(ops.ctx.store.templates, namespace))})


async def register_template(request: web.Request) -> web.Response:
    namespace = check_name("namespace", request.match_info["namespace"])
    name = check_name("template", request.match_info["name"])
    data = await _body(request)
    bundle = _bundle(data)
    if bundle is None:
        raise InvalidInputError("registering a template needs its bundle")
    ops = request.app[OPERATIONS]
    if data.get("validate", True):
        await ops.load(namespace, bundle, _inputs(data))
    record = await ops.ctx.io(ops.ctx.store.register_template, namespace, name, bundle,
                              str(data.get("description", "")))
    return web.json_response({"template": codec.dump(record)})


async def fetch_template(request: web.Request) -> web.Response:
    namespace = check_name("namespace", request.match_info["namespace"])
    ops = request.app[OPERATIONS]
    record, bundle = await ops.ctx.io(ops.ctx.store.template, namespace, request.match_info["name"])
    return web.json_response({"template": codec.dump(record), "bundle": bundle.to_wire()})


async def delist_template(request: web.Request) -> web.Response:
    namespace = check_name("namespace", request.match_info["namespace"])
    ops = request.app[OPERATIONS]
    await ops.ctx.io(ops.ctx.store.delist_template, namespace, request.match_info["name"])
    return web.json_response({"delisted": request.match_info["name"]})


async def hosts(request: web.Request) -> web.Response:
    ops = request.app[OPERATIONS]

    def gather() -> list[HostView]:
        return ops.hosts.views(ops.ctx.store.read_all_services())

    return web.json_response({"hosts": codec.dump(await ops.ctx.io(gather))})


async def add_host(request: web.Request) -> web.Response:
    data = await _body(request)
    cluster = request.app[HOOKS].cluster
    if cluster is None:
        raise InvalidInputError("this agent is not in a cluster (set gossip, seeds and gossip_secret_file)")
    address = str(data.get("address", ""))
    await cluster.add_peer(address)
    return web.json_response({"added": address})


def _set_eligible(ops: Operations, name: str, eligible: bool) -> None:
    def change(record: HostRecord | None) -> HostRecord:
        if record is None:
            raise NotFoundError(f"there is no host {name!r} (khutulun host list shows them)")
        return replace(record, eligible=eligible)

    ops.ctx.store.update_host(name, change)


async def drain_host(request: web.Request) -> web.Response:
    ops, hooks, name = request.app[OPERATIONS], request.app[HOOKS], request.match_info["name"]
    await ops.ctx.io(_set_eligible, ops, name, False)
    if hooks.cluster is not None and name == ops.ctx.host:
        hooks.cluster.update_metadata(eligible=False)
    moved = await ops.ctx.io(hooks.mover.move_off, name, f"host {name} is drained")
    return web.json_response({"host": name, "eligible": False, "moved": [str(rid) for rid in moved]})


async def host_eligibility(request: web.Request) -> web.Response:
    ops, hooks, name = request.app[OPERATIONS], request.app[HOOKS], request.match_info["name"]
    eligible = bool((await _body(request)).get("eligible"))
    await ops.ctx.io(_set_eligible, ops, name, eligible)
    if hooks.cluster is not None and name == ops.ctx.host:
        hooks.cluster.update_metadata(eligible=eligible)
    return web.json_response({"host": name, "eligible": eligible})


async def converge(request: web.Request) -> web.StreamResponse:
    """Converge this host's part of a service now: what the agent that took a deploy asks the others."""
    namespace, service = _names(request)
    purge = bool((await _body(request)).get("purge"))
    ops = request.app[OPERATIONS]
    return await _stream(request, lambda listener: ops.converge_here(namespace, service, purge=purge,
                                                                     listener=listener))


def make_app(operations: Operations, *, stop_agent: Callable[[], None],
             spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]], token: str | None, mover: Mover,
             cluster: Cluster | None) -> web.Application:
    app = web.Application(middlewares=[authenticate(token), errors], client_max_size=256 * 1024 * 1024)
    app[OPERATIONS] = operations
    app[HOOKS] = AgentHooks(stop_agent, spawn, mover, cluster)
    service = "/v1/namespaces/{namespace}/services/{service}"
    instance = service + "/instances/{node}/{index}"
    app.add_routes([
        web.get("/v1/health", health),
        web.post("/v1/agent/stop", stop),
        web.get("/v1/hosts", hosts),
        web.post("/v1/hosts", add_host),
        web.post("/v1/hosts/{name}/drain", drain_host),
        web.post("/v1/hosts/{name}/eligibility", host_eligibility),
        web.post(service + "/converge", converge),
        web.get("/v1/namespaces", namespaces),
        web.post("/v1/namespaces/{namespace}/validate", validate),
        web.get("/v1/namespaces/{namespace}/services", services),
        web.get(service, status),
        web.delete(service, destroy),
        web.post(service + "/preview", preview),
        web.post(service + "/deploy", deploy),
        web.get(service + "/outputs", outputs),
        web.get(service + "/events", events),
        web.get(instance + "/logs", logs),
        web.get(instance + "/exec", exec_),
        web.get("/v1/namespaces/{namespace}/templates", templates),
        web.put("/v1/namespaces/{namespace}/templates/{name}", register_template),
        web.get("/v1/namespaces/{namespace}/templates/{name}", fetch_template),
        web.delete("/v1/namespaces/{namespace}/templates/{name}", delist_template),
    ])
    return app
