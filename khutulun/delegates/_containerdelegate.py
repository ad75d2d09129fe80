"""What the ``podman`` and ``docker`` delegates share, as behaviour: :class:`ContainerDelegate`.

Both delegates are a ContainerDelegate; each differs only in its :class:`~khutulun.delegates._containers.Engine`
(a thin synchronous adapter over its runtime's Python library, called in worker threads) and in how it
reaches its runtime; the few endpoints that stream are spoken by ``_enginehttp``. Everything else is decided
here, once:

- A container is named ``khutulun-<ns>-<svc>-<node>-<index>`` (:func:`container_name`) and carries the labels
  of :func:`container_labels`. It is ours only when its ``khutulun.resource`` and ``khutulun.host`` labels say
  so: ``inspect`` and ``list`` find containers by these labels alone, and nothing without them is touched.
- ``apply`` returns a running container with the spec's hash as it is; starts a stopped one with that hash
  again (a restart keeps its logs, as a process's log is appended to); replaces anything else: stop (grace,
  then kill) and remove, then create and start. No restart policy is given to the runtime: restarting is the
  agent's, the same on every delegate.
- Containers run with ``--init`` (catatonit for Podman, docker-init for Docker): the workload is not PID 1, so
  a SIGTERM ends it at once instead of being ignored until the grace period runs out (RUNTIMES.md: busybox
  httpd as PID 1 ignores SIGTERM, and a stop of 30 containers took 52 s), and zombies are reaped.
- Images come from the host or from an archive in the shared state, never from a registry. What the delegate
  loaded is recorded in its data directory (``images.json``), so that ``delete(purge=True)`` removes those
  images (and no other) once no container uses them.
- ``watch`` follows the engine's event stream for containers of this host that die, skipping those this
  delegate stops itself.
"""

from __future__ import annotations

import abc
import asyncio
import functools
import json
import math
import os
import re
import signal
import tarfile
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from khutulun.delegates import procfs
from khutulun.delegates._containers import (
    HOST_LABEL,
    RESOURCE_LABEL,
    STARTABLE,
    ContainerSpec,
    Engine,
    EngineContainer,
    EngineError,
    container_labels,
    container_name,
    parse_engine_time,
)
from khutulun.delegates._enginehttp import EngineExecSession, EngineResponse, frames, open_request
from khutulun.delegates._specfields import valid_or_none
from khutulun.delegates.base import Capabilities, Delegate, DelegateContext, ExecSession
from khutulun.errors import DelegateError, InvalidInputError
from khutulun.resources import Live, LiveState, Resource, ResourceId

__all__ = ["ContainerDelegate"]

_LOG_TAIL_LINES = 5
_FOLLOW_POLL = 0.5
_LOG_LINES_KEPT = 1000  # the last lines a followed stream gave, to tell which the next stream repeats
_EVENTS_RETRY = 1.0
_STOPPING_KEPT = 300.0  # seconds a container we stopped stays in the list of stops that are not news
_PORT_IN_USE = re.compile(r"(?:listen|bind)\s+(?:tcp|udp)[46]?\s+(\S+):(\d+)")

T = TypeVar("T")


@dataclass(frozen=True)
class _LogLine:
    """A line of a container's log (or a part of a long one), with the time the engine stamped on it."""

    stream: str
    stamp: float | None
    payload: bytes

    @classmethod
    def parse(cls, stream: str, framed: bytes) -> _LogLine:
        """Take the stamp that ``timestamps`` puts before each line off (a line without one keeps all it has)."""
        stamp, _, payload = framed.partition(b" ")
        when = parse_engine_time(stamp.decode("ascii", "replace")) if payload or framed.endswith(b" ") else None
        return cls(stream, when, payload) if when is not None else cls(stream, None, framed)


# --- images this delegate loaded -----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Loaded:
    """An image this delegate loaded from an archive (recorded by its id): the names it gave it, and the archive
    as it was then. An image that a changed archive replaced under the same name stays recorded, so that a
    purge still removes it."""

    names: tuple[str, ...]
    archive: str
    size: int
    mtime_ns: int

    def came_from(self, archive: str, size: int, mtime_ns: int) -> bool:
        return (self.archive, self.size, self.mtime_ns) == (archive, size, mtime_ns)


def _archive_identity(path: str) -> tuple[int, int]:
    try:
        st = Path(path).stat()
    except OSError as e:
        raise DelegateError(f"cannot read the archive {path!r}: {e.strerror}") from e
    return st.st_size, st.st_mtime_ns


def _is_tar(path: str) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


# --- the delegate --------------------------------------------------------------------------------------------

class ContainerDelegate(Delegate):
    """A delegate for one container engine; subclasses only connect to it (:meth:`_connect`)."""

    capabilities = Capabilities(supervised=True, logs=True, exec=True, list=True, watch=True)

    def __init__(self, context: DelegateContext) -> None:
        super().__init__(context)
        self._engine: Engine | None = None
        self._images: dict[str, _Loaded] = {}  # by image id
        self._images_lock = asyncio.Lock()
        self._stopping: dict[str, float] = {}
        self._streams: set[EngineResponse] = set()
        self._closed = False

    @abc.abstractmethod
    async def _connect(self) -> Engine:
        """Reach the engine, or raise DelegateError saying why it cannot be reached."""

    async def start(self) -> None:
        self._engine = await self._connect()
        try:
            self._images = await asyncio.to_thread(self._read_images)
        except BaseException:
            await self.close()  # the agent never closes a delegate that did not start
            raise

    async def close(self) -> None:
        self._closed = True
        for response in list(self._streams):
            await response.close()  # ends watch() and followed logs
        if self._engine is not None:
            await asyncio.to_thread(self._engine.close)
            self._engine = None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise DelegateError(f"the {self.name} delegate is not started (or is closed)")
        return self._engine

    @staticmethod
    async def _run(fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, an engine's method, in a worker thread; whatever goes wrong is an EngineError."""
        try:
            return await asyncio.to_thread(fn, *args)
        except EngineError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:  # an answer of another shape
            raise EngineError(f"an answer Khutulun does not understand ({type(e).__name__}: {e})") from e

    async def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread; an EngineError becomes a DelegateError saying ``what`` failed."""
        try:
            return await self._run(fn, *args)
        except EngineError as e:
            raise DelegateError(f"{what}: {self.engine.runtime} said: {e.message}") from e

    def _spec(self, resource: Resource) -> ContainerSpec:
        return ContainerSpec.parse(resource, self.context.timeouts.stop)

    @property
    def _host_label(self) -> str:
        return f"{HOST_LABEL}={self.context.host}"

    # --- finding our containers ---

    def _ours(self, container: EngineContainer, rid: ResourceId | None = None) -> bool:
        labels = container.labels
        return labels.get(HOST_LABEL) == self.context.host and RESOURCE_LABEL in labels \
            and (rid is None or labels[RESOURCE_LABEL] == str(rid))

    async def _containers_of(self, rid: ResourceId, handles: Iterable[Mapping[str, Any] | None], *,
                             search: bool) -> list[EngineContainer]:
        """The containers of ``rid`` on this host, the preferred first (running, then the latest started).

        Those the handles name, when they are still ``rid``'s; with ``search`` (or when no handle finds one),
        also those that carry ``rid``'s labels: after a crash between create and record there may be two.
        """
        found: dict[str, EngineContainer] = {}
        for handle in handles:
            container_id = (handle or {}).get("id")
            if isinstance(container_id, str) and container_id and container_id not in found:
                container = await self._call(f"cannot inspect the container of {rid}", self.engine.container,
                                             container_id)
                if container is not None and self._ours(container, rid):
                    found[container.id] = container
        if search or not found:
            for container in await self._call(f"cannot list the containers of {rid}", self.engine.containers,
                                              self._host_label):
                if self._ours(container, rid):
                    found.setdefault(container.id, container)
        return sorted(found.values(), key=_preference)

    # --- the interface ---

    async def _preferred(self, rid: ResourceId, handle: Mapping[str, Any] | None, *,
                         running: bool = False) -> EngineContainer | None:
        """The container of ``rid`` that counts (running, then the latest started), as ``inspect`` tells it.

        With ``running``, only a running one. A container found by a listing is inspected: a list tells less.
        """
        found = await self._containers_of(rid, [handle], search=running)
        best = next((c for c in found if c.running or not running), None)
        if best is None or best.id == (handle or {}).get("id"):
            return best
        return await self._call(f"cannot inspect the container of {rid}", self.engine.container, best.id) or best

    async def inspect(self, resource: Resource) -> Live | None:
        found = await self._preferred(resource.id, resource.handle)
        return found.live() if found is not None else None

    async def apply(self, resource: Resource, live: Live | None) -> Live:
        spec = self._spec(resource)
        if live is not None and live.state is LiveState.RUNNING and live.spec_hash == resource.spec_hash:
            return live
        rid = resource.id
        existing = await self._containers_of(rid, [live.handle if live else None, resource.handle], search=True)
        if len(existing) == 1 and existing[0].spec_hash == resource.spec_hash:
            container = existing[0]
            if container.running:  # running all along: the agent had not recorded it
                inspected = await self._call(f"cannot inspect the container of {rid}", self.engine.container,
                                             container.id)
                return (inspected or container).live()
            if container.state in STARTABLE:  # a restart: the same container again, with its logs
                return await self._start(rid, container.id, spec)
        for container in existing:
            await self._remove(rid, container, spec.stop_timeout)
        await self._ensure_image(rid, spec)
        for mount in spec.mounts:
            if not await asyncio.to_thread(os.path.exists, mount.source):
                raise DelegateError(f"{rid}: the source of the mount on {mount.target!r}, {mount.source!r}, "
                                    "does not exist on this host")
        name = container_name(rid)
        labels = container_labels(rid, self.context.host, resource.spec_hash)
        try:
            container_id = await self._run(self.engine.create, name, labels, spec)
        except EngineError as e:
            if "already in use" in e.message or e.status == 409:
                raise DelegateError(f"{rid}: the container name {name!r} is taken by a container that is not this "
                                    f"resource's on this host (Khutulun leaves it alone): {e.message}") from e
            raise DelegateError(f"{rid}: {self.engine.runtime} cannot create the container: {e.message}") from e
        return await self._start(rid, container_id, spec)

    async def delete(self, resource: Resource, live: Live | None, *, purge: bool = False) -> None:
        spec = valid_or_none(lambda: self._spec(resource))
        rid = resource.id
        existing = await self._containers_of(rid, [live.handle if live else None, resource.handle], search=True)
        for container in existing:
            await self._remove(rid, container, spec.stop_timeout if spec else self.context.timeouts.stop)
        if purge:
            await self._purge_images({c.image_id for c in existing}, {spec.image} if spec else set())

    async def list(self) -> Sequence[tuple[ResourceId, Live]]:
        by_id: dict[ResourceId, EngineContainer] = {}
        containers = await self._call("cannot list containers", self.engine.containers, self._host_label)
        for container in sorted(containers, key=_preference):
            if self._ours(container) and (rid := _parse_rid(container.labels[RESOURCE_LABEL])) is not None:
                by_id.setdefault(rid, container)
        return [(rid, container.live()) for rid, container in sorted(by_id.items())]

    async def logs(self, resource: Resource, *, follow: bool = False,
                   tail: int | None = None) -> AsyncGenerator[bytes, None]:
        """What the container wrote; following goes on across restarts and replacements, as ``tail -F`` does."""
        current = await self._preferred(resource.id, resource.handle)
        since: float | None = None
        given: deque[_LogLine] = deque(maxlen=_LOG_LINES_KEPT)  # by the stream now read, for the next one
        repeated: Counter[_LogLine] = Counter()  # what the next stream would give twice
        while True:
            if current is not None:
                async for line in self._log_lines(current.id, follow=follow, tail=tail, since=since):
                    if repeated[line]:
                        repeated[line] -= 1
                        continue
                    if follow:
                        given.append(line)
                    yield line.payload
            if not follow or self._closed:
                return
            # The stream ended: the container stopped (or never was, or the engine went away). Once one runs
            # again, read on: a new container from its start, the same one from the start of its new run.
            ended, previous, opened, current, tail = time.time(), current, since, None, None
            while current is None:
                await asyncio.sleep(_FOLLOW_POLL)
                if self.closed:
                    return
                current = await self._preferred(resource.id, resource.handle, running=True)
            repeated = Counter()
            if previous is None or current.id != previous.id:
                since = None
            elif current.started_at is not None and current.started_at != previous.started_at:
                # Nothing is written between two runs: read from halfway between the end of the last and the start
                # of this one (an engine may stamp a first line a moment before it records the start).
                finished = current.finished_at if current.finished_at is not None else current.started_at - 0.1
                since = (min(finished, current.started_at) + current.started_at) / 2
                repeated = await self._given_of_new_run(current.id, given, opened, since)
            else:
                since = ended  # the same run, its stream broken: what came while we were away may be lost
            given.clear()

    async def _given_of_new_run(self, container_id: str, given: Iterable[_LogLine], opened: float | None,
                                boundary: float) -> Counter[_LogLine]:
        """The lines of a container's new run (from ``boundary`` on) that the stream of its last run gave too.

        An engine ends a followed stream a moment after the run ends, and reads the log to its end then: when the
        agent was quick to start the container again, the old stream carries the first lines of the new run too
        (Podman, one time in six in the conformance test; not always in order). A line is told by its stamp:
        those stamped before the boundary's stamp are the old run's; of those stamped with it (Podman stamps to
        the second), the old run's are what the engine reads before the boundary, the rest are the new run's.
        """
        resolution = self.engine.log_stamp_resolution
        first = math.floor(boundary / resolution) * resolution
        late = Counter(line for line in given if line.stamp is not None and line.stamp >= first)
        if not late:
            return Counter()
        before = [line async for line in self._log_lines(
            container_id, follow=False, tail=None, since=max(first, opened or first), until=boundary)]
        return late - Counter(before)

    async def _log_lines(self, container_id: str, *, follow: bool, tail: int | None, since: float | None,
                         until: float | None = None) -> AsyncGenerator[_LogLine, None]:
        path = self.engine.logs_path(container_id, follow=follow, tail=tail, since=since, until=until)
        response = await self._open(path, what="cannot read the logs")
        try:
            if response.status == 404:
                return  # removed meanwhile: nothing (more) to read
            if response.status >= 300:
                raise DelegateError(f"cannot read the logs of the container {container_id[:12]}: "
                                    f"{self.engine.runtime} said: {await response.error_message()}")
            try:
                async for stream, payload in frames(response.chunks()):
                    yield _LogLine.parse(stream, payload)
            except (OSError, ValueError):
                return  # the stream broke: what came is what there is (a followed log is opened again)
        finally:
            await self._let_go(response)

    async def exec(self, resource: Resource, argv: Sequence[str], *, tty: bool = False) -> ExecSession:
        if not argv or not all(isinstance(a, str) and "\0" not in a for a in argv) or not argv[0]:
            raise DelegateError(f"exec needs a command: a non-empty list of strings, not {list(argv)!r}")
        rid = resource.id
        container = await self._preferred(rid, resource.handle, running=True)
        if container is None:
            raise DelegateError(f"cannot run a command in {rid}: its container is not running")
        engine = self.engine
        exec_id = await self._call(f"cannot run a command in {rid}", functools.partial(engine.exec_create, tty=tty),
                                   container.id, list(argv))
        response = await self._open(engine.exec_start_path(exec_id), what=f"cannot run a command in {rid}",
                                    body={"Detach": False, "Tty": tty}, upgrade=True)
        if response.status >= 300:
            message = await response.error_message()
            await response.close()
            raise DelegateError(f"cannot run a command in {rid}: {engine.runtime} said: {message}")

        async def state() -> tuple[bool, int | None]:
            running, exit_code, _ = await self._call("cannot ask how the command is", engine.exec_state, exec_id)
            return running, exit_code

        async def resize(rows: int, columns: int) -> None:
            await self._call("cannot resize the command's terminal", engine.exec_resize, exec_id, rows, columns)

        async def kill() -> None:
            await self._kill_exec(exec_id)

        return EngineExecSession(response, tty=tty, state=state, resize=resize, kill=kill)

    async def watch(self) -> AsyncGenerator[ResourceId, None]:
        """Ids of this host's containers that stopped by themselves (not those this delegate stopped).

        Follows the engine's event stream, opened again (from where it broke off) if the engine restarts or the
        stream breaks; it never raises (the agent watches for as long as it runs), and it ends on close().
        """
        since: float | None = None
        while not self._closed:
            opened = time.time()
            response = None
            try:
                response = await self._open(self.engine.events_path(self._host_label, since), what="cannot watch")
                if response.status < 300:
                    async for rid in self._died(response):
                        yield rid
            except (DelegateError, OSError, ValueError):
                pass  # the engine went away, or said something else than events: open the stream again
            finally:
                if response is not None:
                    await self._let_go(response)
            if not self.closed:
                since = opened - 1  # what happened while no stream was open is replayed (twice at worst: harmless)
                await asyncio.sleep(_EVENTS_RETRY)

    async def _died(self, response: EngineResponse) -> AsyncGenerator[ResourceId, None]:
        pending = b""
        async for chunk in response.chunks():
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                rid = self._died_rid(line)
                if rid is not None:
                    yield rid

    def _died_rid(self, line: bytes) -> ResourceId | None:
        try:
            event = json.loads(line)
        except ValueError:
            return None
        if not isinstance(event, dict) or event.get("Action") != self.engine.died_event:
            return None
        actor = event.get("Actor") or {}
        attributes = actor.get("Attributes") or {}
        if attributes.get(HOST_LABEL) != self.context.host:
            return None
        container_id = str(actor.get("ID") or event.get("id") or "")
        now = time.monotonic()
        for stopped, when in list(self._stopping.items()):
            if now - when > _STOPPING_KEPT:
                del self._stopping[stopped]
        if self._stopping.pop(container_id, None) is not None:
            return None  # we stopped it: not news
        return _parse_rid(str(attributes.get(RESOURCE_LABEL) or ""))

    # --- streams ---

    async def _open(self, path: str, *, what: str, body: Mapping[str, Any] | None = None,
                    upgrade: bool = False) -> EngineResponse:
        engine = self.engine
        try:
            response = await open_request(engine.socket_path, "POST" if body is not None else "GET", path, body=body,
                                          upgrade=upgrade)
        except (OSError, TimeoutError) as e:
            raise DelegateError(f"{what}: {engine.runtime} does not answer on {engine.socket_path}: {e}") from e
        if self._closed:  # closed while it connected: close() has let go of every stream it knew
            await response.close()
            raise DelegateError(f"{what}: the {self.name} delegate is closed")
        if not upgrade:
            self._streams.add(response)
        return response

    async def _let_go(self, response: EngineResponse) -> None:
        self._streams.discard(response)
        await response.close()

    # --- starting and stopping ---

    async def _start(self, rid: ResourceId, container_id: str, spec: ContainerSpec) -> Live:
        self._stopping.pop(container_id, None)
        try:
            await self._run(self.engine.start, container_id)
        except EngineError as e:
            # The engine refused to start it (a port taken, a mount refused): nothing half-made stays behind.
            with suppress(EngineError):
                await self._run(self.engine.remove, container_id)
            raise DelegateError(self._start_error(rid, spec, e)) from e
        await asyncio.sleep(self.context.timeouts.startup_grace)
        container = await self._call(f"cannot inspect the container of {rid}", self.engine.container, container_id)
        if container is None:
            raise DelegateError(f"{rid}: the container {container_id[:12]} was removed right after it started")
        if not container.running:
            raise DelegateError(await self._early_exit_message(rid, container))
        return container.live()

    def _start_error(self, rid: ResourceId, spec: ContainerSpec, error: EngineError) -> str:
        runtime = self.engine.runtime
        if "address already in use" in error.message:
            match = _PORT_IN_USE.search(error.message)
            port = next((p for p in spec.ports if match and p.host_port == int(match.group(2))), None)
            if port is not None:
                where = f"{port.host_address or '*'}:{port.host_port}/{port.protocol}"
                return (f"{rid}: cannot publish port {port.name or port.container_port!r} on {where}: another "
                        f"program on this host holds it ({runtime} said: {error.message})")
            return f"{rid}: a port it publishes is taken on this host ({runtime} said: {error.message})"
        return f"{rid}: {runtime} cannot start the container: {error.message}"

    async def _early_exit_message(self, rid: ResourceId, container: EngineContainer) -> str:
        message = f"{rid}: the container {container.name} {container.how_it_ended()} right after it started"
        lines: list[str] = []
        with suppress(DelegateError):
            async for line in self._log_lines(container.id, follow=False, tail=_LOG_TAIL_LINES, since=None):
                lines += line.payload.decode(errors="replace").splitlines()
        if not lines:
            return f"{message} (its log is empty)"
        return f"{message}; the last lines of its log:\n" + "\n".join(f"  {line}" for line in lines[-_LOG_TAIL_LINES:])

    async def _remove(self, rid: ResourceId, container: EngineContainer, stop_timeout: float) -> None:
        self._stopping[container.id] = time.monotonic()  # its end is not news for watch()
        if container.running or container.state in ("paused", "restarting"):
            await self._call(f"cannot stop the container of {rid}", self.engine.stop, container.id,
                             math.ceil(stop_timeout))
        await self._call(f"cannot remove the container of {rid}", self.engine.remove, container.id)

    async def _kill_exec(self, exec_id: str) -> None:
        """SIGKILL an exec's process (and its process group, when it leads one): the engines cannot."""
        running, _, pid = await self._call("cannot stop the command", self.engine.exec_state, exec_id)
        if not running or pid <= 0:
            return
        try:
            pidfd = os.pidfd_open(pid)
        except (ProcessLookupError, PermissionError):
            return
        try:
            # With the pidfd pinning the process, ask again: the exec may have ended and its pid been reused.
            running, _, now = await self._call("cannot stop the command", self.engine.exec_state, exec_id)
            stat = procfs.read_stat(pid)
            if running and now == pid and stat is not None:
                with suppress(ProcessLookupError, PermissionError):
                    if stat.pgrp == pid:
                        os.killpg(pid, signal.SIGKILL)
                    else:
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        finally:
            os.close(pidfd)

    # --- images ---

    async def _ensure_image(self, rid: ResourceId, spec: ContainerSpec) -> None:
        """Have ``spec.image`` on this host: loaded from the spec's archive if need be, never pulled."""
        engine = self.engine
        async with self._images_lock:  # the instances of a node share an image: one load, not one each
            present = await self._call(f"cannot look for the image of {rid}", engine.image_id, spec.image)
            archive = spec.archive
            if archive is None:
                if present is None:
                    raise DelegateError(f"{rid}: image {spec.image!r} is not on this host and no archive was given; "
                                        "Khutulun never pulls from a registry")
                return
            size, mtime_ns = await asyncio.to_thread(_archive_identity, archive)
            if present is not None:
                loaded = self._images.get(present)
                if loaded is None or loaded.came_from(archive, size, mtime_ns):
                    return  # there already: someone else's (left as it is), or the one we loaded from this archive
            if not await asyncio.to_thread(_is_tar, archive):
                kind = "an image archive" if spec.image_archive else "a root filesystem archive"
                raise DelegateError(f"{rid}: {archive!r} is not {kind}: it is not a tar file")
            if spec.image_archive:
                try:
                    names = await self._run(engine.load_image, Path(archive))
                except EngineError as e:
                    raise DelegateError(f"{rid}: {archive!r} is not an image archive (as `podman save` or "
                                        f"`docker save` write them): {engine.runtime} said: {e.message}") from e
            else:
                try:
                    await self._run(engine.import_image, Path(archive), spec.image)
                except EngineError as e:
                    raise DelegateError(f"{rid}: {engine.runtime} cannot import {archive!r} as the image "
                                        f"{spec.image!r}: {e.message}") from e
                names = [spec.image]
            by_id: dict[str, list[str]] = {}
            for name in sorted({spec.image, *names}):
                if (name_id := await self._call("cannot look for an image", engine.image_id, name)) is not None:
                    by_id.setdefault(name_id, []).append(name)
            if not any(spec.image in held for held in by_id.values()):
                held = ", ".join(repr(n) for n in names) or "no named image"
                raise DelegateError(f"{rid}: the image archive {archive!r} does not hold {spec.image!r} "
                                    f"(it holds {held})")
            for image_id, image_names in by_id.items():
                self._images[image_id] = _Loaded(tuple(image_names), archive, size, mtime_ns)
            await self._write_images()

    async def _purge_images(self, image_ids: set[str], references: set[str]) -> None:
        """Remove the images this delegate loaded that ``delete`` was about, once no container uses them: its
        names are taken off (the engine removes an image with its last name), and an image left without any
        name is removed by its id."""
        engine = self.engine
        async with self._images_lock:  # not while an apply loads one
            candidates = {image_id: loaded for image_id, loaded in self._images.items()
                          if image_id in image_ids or references & set(loaded.names)}
            if not candidates:
                return
            in_use = {c.image_id for c in await self._call("cannot list containers", engine.containers, None)}
            for image_id, loaded in candidates.items():
                if image_id in in_use:
                    continue
                removed = True
                named = [n for n in loaded.names
                         if await self._call("cannot look for an image", engine.image_id, n) == image_id]
                for name in named:
                    untagged: bool = await self._call(f"cannot remove the image {name!r}", engine.remove_image, name)
                    removed = removed and untagged
                if not named and await self._call("cannot look for an image", engine.image_id, image_id) is not None:
                    removed = await self._call(f"cannot remove the image {image_id[:19]}", engine.remove_image,
                                               image_id)
                if removed:  # else a container made meanwhile uses it: it stays, and so does our record of it
                    del self._images[image_id]
            await self._write_images()

    @property
    def _images_file(self) -> Path:
        return self.context.data_dir / "images.json"

    def _read_images(self) -> dict[str, _Loaded]:
        try:
            data = json.loads(self._images_file.read_text())
            return {str(image_id): _Loaded(**{**entry, "names": tuple(entry["names"])})
                    for image_id, entry in data.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, AttributeError, KeyError) as e:
            raise DelegateError(f"cannot read {str(self._images_file)!r}, the record of the images the {self.name} "
                                f"delegate loaded: {e}") from e

    async def _write_images(self) -> None:
        # Serialized here, on the event loop, where the record changes; written in a thread, atomically.
        text = json.dumps({image_id: asdict(loaded) for image_id, loaded in sorted(self._images.items())}, indent=1)
        await asyncio.to_thread(self._write_images_file, text)

    def _write_images_file(self, text: str) -> None:
        path = self._images_file
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
            temporary.write_text(text)
            temporary.replace(path)
        except OSError as e:
            raise DelegateError(f"cannot record the images the {self.name} delegate loaded in {str(path)!r}: "
                                f"{e.strerror}") from e


def _preference(container: EngineContainer) -> tuple[bool, float]:
    return not container.running, -(container.started_at or 0.0)


def _parse_rid(text: str) -> ResourceId | None:
    try:
        return ResourceId.parse(text)
    except InvalidInputError:
        return None
