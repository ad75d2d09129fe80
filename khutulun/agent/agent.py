"""The agent: one asyncio process per host, the same on every host.

:meth:`Agent.run` owns one task group holding the reconcile loop, one watcher per delegate that reports
stops, and the operations that requests start; the API is served beside it by aiohttp. SIGTERM stops it
cleanly: requests end, running operations get a grace period, and every workload keeps running, to be
adopted by the next agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
from collections.abc import Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web

from khutulun import __version__
from khutulun.agent.api import make_app
from khutulun.agent.context import AgentContext
from khutulun.agent.converge import Converger
from khutulun.agent.failover import Mover
from khutulun.agent.hosts import HostsView
from khutulun.agent.operations import Operations, host_record
from khutulun.agent.reconcile import Reconciler
from khutulun.cluster import DEFAULT_GROUP, Cluster, ClusterSettings, HostMetadata
from khutulun.config import Config
from khutulun.delegates import DelegateContext, delegate_classes
from khutulun.errors import InvalidInputError, KhutulunError, StateError
from khutulun.state import HostRecord, StateStore

__all__ = ["Agent"]

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 10.0  # seconds running operations get to finish when the agent stops


def _socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


class Agent:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._stop = asyncio.Event()
        self._group: asyncio.TaskGroup | None = None
        self._operations: set[asyncio.Task[Any]] = set()
        self._lock_fd: int | None = None
        self.reconciler: Reconciler | None = None

    def request_stop(self) -> None:
        self._stop.set()

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Start an operation as a task of the agent, not of the request that asked for it."""
        if self._group is None:
            coroutine.close()
            raise StateError("the agent is not running")
        task = self._group.create_task(coroutine)
        self._operations.add(task)
        task.add_done_callback(self._operations.discard)
        return task

    def _claim_data_dir(self) -> None:
        """One agent per data directory: a second one stops here with a clear message."""
        data_dir = self.config.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(data_dir / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = self.config.pid_file.read_text().strip() if self.config.pid_file.exists() else "?"
            raise StateError(f"an agent is already running for {data_dir} (pid {pid})") from None
        self._lock_fd = fd

    async def _load_delegates(self, ctx: AgentContext) -> None:
        for name, cls in sorted(delegate_classes().items()):
            delegate = cls(DelegateContext(ctx.host, self.config.data_dir / name, self.config.timeouts))
            try:
                await delegate.start()
            except KhutulunError as e:  # a runtime that is not installed: its kind of resource is unavailable
                log.warning("the %s delegate is not available: %s", name, e.message)
                continue
            ctx.delegates[name] = delegate

    async def _serve(self, app: web.Application) -> web.AppRunner:
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        path = self.config.socket
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.exists():
            if _socket_answers(path):
                await runner.cleanup()
                raise StateError(f"another agent already answers on {path}")
            path.unlink()
        await web.UnixSite(runner, str(path)).start()
        path.chmod(0o600)
        if self.config.listen:
            host, _, port = self.config.listen.rpartition(":")
            await web.TCPSite(runner, host or "0.0.0.0", int(port)).start()
        return runner

    def _cluster(self, ctx: AgentContext, record: HostRecord) -> Cluster | None:
        """The cluster this agent gossips in, when it is configured to (``gossip``); None: a cluster of one."""
        config = self.config
        if not config.gossip:
            return None
        if not config.listen or config.gossip_secret_file is None:
            raise InvalidInputError("joining a cluster (gossip) needs listen and token_file (other agents call "
                                    "this one's API) and gossip_secret_file")
        settings = ClusterSettings(secret_file=config.gossip_secret_file, bind=config.gossip,
                                   advertise=config.gossip_advertise, seeds=config.seeds,
                                   discovery=DEFAULT_GROUP if config.discovery == "default" else config.discovery)
        return Cluster(settings, HostMetadata(name=ctx.host, api=record.api, address=record.address, cpus=record.cpus,
                                              memory=record.memory, labels=dict(record.labels),
                                              eligible=record.eligible, version=__version__))

    async def run(self) -> None:
        config = self.config
        if config.listen and config.token_file is None:
            raise InvalidInputError("serving the API on TCP (listen) needs a token_file")
        token = config.token() if config.listen else None
        self._claim_data_dir()
        store = StateStore(config.state_dir, lock_timeout=config.timeouts.lock)
        await asyncio.to_thread(store.initialize)
        ctx = AgentContext(config, store, config.host_name)
        await self._load_delegates(ctx)
        # A drained host stays drained across restarts of its agent: eligibility is the shared state's.
        fresh = host_record(ctx)
        record = await asyncio.to_thread(store.update_host, ctx.host, lambda previous: replace(
            fresh, eligible=previous.eligible if previous else True))
        async with contextlib.AsyncExitStack() as stack:
            cluster = self._cluster(ctx, record)
            if cluster is not None:
                await stack.enter_async_context(cluster)
            await self._run(ctx, cluster, token)

    async def _run(self, ctx: AgentContext, cluster: Cluster | None, token: str | None) -> None:
        config = self.config
        hosts = HostsView(ctx, cluster)
        converger = Converger(ctx)
        operations = Operations(ctx, converger, hosts)
        self.reconciler = Reconciler(ctx, converger, operations)
        mover = Mover(ctx, hosts)
        app = make_app(operations, stop_agent=self.request_stop, spawn=self.spawn, token=token, mover=mover,
                       cluster=cluster)
        runner = await self._serve(app)
        config.pid_file.write_text(f"{os.getpid()}\n")
        log.info("agent for host %s ready on %s (state in %s)", ctx.host, config.socket, config.state_dir)
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                loops = [group.create_task(self.reconciler.run(), name="reconcile")]
                if cluster is not None:
                    loops.append(group.create_task(mover.watch(), name="failover"))
                    loops.append(group.create_task(mover.beat(), name="heartbeat"))
                for delegate in ctx.delegates.values():
                    if delegate.capabilities.watch:
                        loops.append(group.create_task(self.reconciler.watch(delegate), name=f"watch {delegate.name}"))
                await self._stop.wait()
                log.info("stopping: workloads keep running")
                if cluster is not None:
                    await cluster.leave()  # the others see this host left, not dead: nothing moves
                await runner.cleanup()
                for task in loops:
                    task.cancel()
                if self._operations:
                    _, pending = await asyncio.wait(set(self._operations), timeout=SHUTDOWN_GRACE)
                    for task in pending:
                        task.cancel()
        finally:
            self._group = None
            await runner.cleanup()
            for delegate in ctx.delegates.values():
                with contextlib.suppress(Exception):
                    await delegate.close()
            with contextlib.suppress(OSError):
                config.socket.unlink()
            with contextlib.suppress(OSError):
                config.pid_file.unlink()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
