"""What the delegates that start and supervise an OS process of their own share: the ``process`` delegate (the
workload itself) and the ``nspawn`` delegate (a ``systemd-nspawn`` per container).

Such a process leads a session of its own, so that it outlives the agent; its output is appended to
``<data_dir>/logs/<ns>/<svc>/<node>.<index>.log``; its environment carries the markers
``KHUTULUN_RESOURCE``, ``KHUTULUN_SPEC_HASH`` and ``KHUTULUN_HOST``. It is ours only when its pid, its start
time and its markers all agree, since pids are reused: the handle recorded in the state (pid and start time)
finds it after an agent restart, and a scan of ``/proc`` finds one that was never recorded (the agent died
between starting it and recording it). It is watched with a pidfd, whether it is a child or adopted.

A subclass says which processes are its own (:meth:`SupervisedDelegate._ours`, :meth:`_candidate`), how to
start one and how to stop one; this class finds, inspects, lists, watches and reaps them.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from abc import abstractmethod
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from khutulun.delegates import procfs
from khutulun.delegates._hostio import exit_status, follow_file, tail_offset
from khutulun.delegates.base import Delegate, DelegateContext
from khutulun.errors import DelegateError, InvalidInputError
from khutulun.resources import Live, LiveState, Resource, ResourceId

__all__ = ["HOST_MARKER", "MARKERS", "RESOURCE_MARKER", "SPEC_HASH_MARKER", "Found", "SupervisedDelegate",
           "base_environment", "early_exit_message"]

RESOURCE_MARKER = "KHUTULUN_RESOURCE"
SPEC_HASH_MARKER = "KHUTULUN_SPEC_HASH"
HOST_MARKER = "KHUTULUN_HOST"
MARKERS = (RESOURCE_MARKER, SPEC_HASH_MARKER, HOST_MARKER)

_BASE_ENVIRONMENT = frozenset({"PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR"})
"""What a supervised process inherits from the agent (plus ``LC_*``): enough for programs to find their tools
and speak the locale; never the agent's own ``KHUTULUN_*`` settings, which are not the workload's business."""

_LOG_TAIL_LINES = 5


def base_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k in _BASE_ENVIRONMENT or k.startswith("LC_")}


@dataclass(frozen=True)
class _Child:
    popen: subprocess.Popen[bytes]
    delegate: str
    rid: ResourceId
    host: str
    spec_hash: str


_CHILDREN: dict[int, _Child] = {}
"""The processes this OS process started, by pid, whichever delegate instance started them.

Being someone's child belongs to the OS process, not to a delegate instance. Keeping the Popen objects here
means a child is reaped by whichever instance of its delegate sees it end (a test that simulates an agent
restart has two instances in one process), and that no Popen is dropped while its process runs (a zombie
later, and a ResourceWarning now)."""


@dataclass(frozen=True)
class _Exit:
    """A child this delegate saw end, for ``inspect`` to report until the resource is applied or deleted."""

    pid: int
    spec_hash: str
    returncode: int


@dataclass(frozen=True)
class Found:
    """A process verified as one of ours: alive, a session leader, with this host's markers."""

    stat: procfs.ProcStat
    environment: Mapping[str, str]

    @property
    def handle(self) -> dict[str, Any]:
        return {"pid": self.stat.pid, "start_time": self.stat.start_time}

    def live(self) -> Live:
        return Live(LiveState.RUNNING, self.environment.get(SPEC_HASH_MARKER), handle=self.handle,
                    attributes={"pid": self.stat.pid}, started_at=procfs.start_time_to_epoch(self.stat.start_time))


@dataclass(frozen=True)
class _Watch:
    rid: ResourceId
    pidfd: int
    loop: asyncio.AbstractEventLoop


class SupervisedDelegate(Delegate):
    ended_as = "{how}"
    """How ``inspect`` words the end of a process (``{how}``: "exited with status 3", "was killed by SIGKILL")."""

    def __init__(self, context: DelegateContext) -> None:
        super().__init__(context)
        self._watched: dict[int, _Watch] = {}
        self._events: asyncio.Queue[ResourceId | None] = asyncio.Queue()
        self._exits: dict[ResourceId, _Exit] = {}
        self._closed = False

    def log_path(self, rid: ResourceId) -> Path:
        return self.context.data_dir / "logs" / rid.namespace / rid.service / f"{rid.filename}.log"

    # --- what a subclass says ---

    @abstractmethod
    def _ours(self, stat: procfs.ProcStat | None, rid: ResourceId | None) -> Found | None:
        """``stat``'s process if it is one of this delegate's, alive, with this host's markers (and ``rid``'s)."""

    @abstractmethod
    def _candidate(self, stat: procfs.ProcStat) -> bool:
        """A cheap first look at every process of a scan (before its environment is read)."""

    @abstractmethod
    async def _terminate(self, rid: ResourceId, stat: procfs.ProcStat, pidfd: int, stop_timeout: float) -> None:
        """End one process of ``rid``, checked to be ours and pinned by ``pidfd``: a stop, a grace of
        ``stop_timeout``, then a kill."""

    async def _stopped(self, rid: ResourceId, handles: Sequence[Mapping[str, Any]], stopped: set[int]) -> None:
        """After a stop: what else the subclass cleans up (``stopped``: the pids it stopped)."""

    # --- finding ours ---

    def _from_handle(self, rid: ResourceId, handle: Mapping[str, Any] | None) -> Found | None:
        pid, start_time = (handle or {}).get("pid"), (handle or {}).get("start_time")
        if type(pid) is not int or type(start_time) is not int or pid <= 0:
            return None
        stat = procfs.read_stat(pid)
        if stat is None or stat.start_time != start_time:
            return None
        return self._ours(stat, rid)

    def _scan(self, rid: ResourceId | None) -> list[Found]:
        """Every process of this host carrying ``rid``'s markers (any resource's, for None), oldest first.

        Runs in a worker thread: it reads a file or two for every process there is.
        """
        found = [f for stat in procfs.iter_stats() if self._candidate(stat) and (f := self._ours(stat, rid))]
        return sorted(found, key=lambda f: f.stat.start_time)

    async def _find(self, resource: Resource) -> Found | None:
        """The process of ``resource``: by its handle, else by a scan. Should a process have made a second
        session carrying the markers, the oldest is the one we started."""
        found = self._from_handle(resource.id, resource.handle)
        if found is None:
            candidates = await asyncio.to_thread(self._scan, resource.id)
            found = candidates[0] if candidates else None
        return found

    # --- the interface ---

    async def inspect(self, resource: Resource) -> Live | None:
        self._reap_children(resource.id)
        found = await self._find(resource)
        if found is not None:
            self._watch(resource.id, found.stat)
            return found.live()
        ended = self._exits.get(resource.id)
        if ended is None:
            return None
        exit_code, how = exit_status(ended.returncode)
        return Live(LiveState.STOPPED if ended.returncode == 0 else LiveState.FAILED, ended.spec_hash,
                    handle={"pid": ended.pid}, exit_code=exit_code, message=self.ended_as.format(how=how))

    async def list(self) -> Sequence[tuple[ResourceId, Live]]:
        self._reap_children()
        by_id: dict[ResourceId, Found] = {}
        for found in await asyncio.to_thread(self._scan, None):
            rid = parse_marker(found.environment[RESOURCE_MARKER])
            if rid is not None:  # else a marker we did not write; nothing of ours
                by_id.setdefault(rid, found)  # oldest first: the one we started, as inspect picks it
        for rid, found in by_id.items():
            self._watch(rid, found.stat)
        return [(rid, found.live()) for rid, found in sorted(by_id.items())]

    def logs(self, resource: Resource, *, follow: bool = False, tail: int | None = None) -> AsyncGenerator[bytes, None]:
        return follow_file(self.log_path(resource.id), follow=follow, tail=tail)

    async def watch(self) -> AsyncGenerator[ResourceId, None]:
        """Ids of processes that ended by themselves (not those this delegate stopped), as they end.

        Covers every process this instance started or found (by apply, inspect or list); it ends on close().
        """
        while not self._closed and (rid := await self._events.get()) is not None:
            yield rid

    async def close(self) -> None:
        for pid in list(self._watched):
            self._unwatch(pid)
        if not self._closed:
            self._closed = True
            self._events.put_nowait(None)  # ends watch()

    # --- starting and stopping ---

    def _adopt_child(self, resource: Resource, popen: subprocess.Popen[bytes]) -> procfs.ProcStat:
        """Keep a child just started for ``resource``; its stat, to watch it by."""
        self._exits.pop(resource.id, None)
        # Our unreaped child: its /proc entry stays until we reap it, even if it has already exited.
        stat = procfs.read_stat(popen.pid)
        if stat is None:  # pragma: no cover - see above
            raise DelegateError(f"{resource.id}: the process {popen.pid} started but cannot be found in /proc")
        _CHILDREN[popen.pid] = _Child(popen, self.name, resource.id, self.context.host, resource.spec_hash)
        return stat

    def _running(self, resource: Resource, stat: procfs.ProcStat) -> Live:
        """A child that has started: watched from now on, and reported running."""
        self._watch(resource.id, stat)
        return Live(LiveState.RUNNING, resource.spec_hash, handle={"pid": stat.pid, "start_time": stat.start_time},
                    attributes={"pid": stat.pid}, started_at=time.time())

    async def _stop(self, resource: Resource, live: Live | None, stop_timeout: float) -> None:
        """Stop every process of ``resource`` on this host: the recorded ones and any a scan finds."""
        rid = resource.id
        self._reap_children(rid)
        handles = [h for h in (live.handle if live else None, resource.handle) if h]
        targets = {found.stat.pid: found.stat for handle in handles if (found := self._from_handle(rid, handle))}
        if not targets:
            # Nothing recorded finds it: it may run unrecorded (an agent died right after starting it). A second
            # one with the same markers (a workload that made a session of its own) is left to the reconcile
            # loop, which removes what carries the markers of no service.
            targets = {f.stat.pid: f.stat for f in await asyncio.to_thread(self._scan, rid)}
        await asyncio.gather(*(self._stop_one(rid, stat, stop_timeout) for stat in targets.values()))
        await self._stopped(rid, handles, set(targets))
        self._exits.pop(rid, None)

    async def _stop_one(self, rid: ResourceId, stat: procfs.ProcStat, stop_timeout: float) -> None:
        pid = stat.pid
        self._unwatch(pid)  # a stop we make is not news for watch()
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        try:
            # Check again now that the pidfd pins it: it may have ended (and its pid been reused) since it was found.
            if (now := self._ours(procfs.read_stat(pid), rid)) is None or now.stat.start_time != stat.start_time:
                return
            await self._terminate(rid, stat, pidfd, stop_timeout)
        finally:
            os.close(pidfd)
        self._reap(pid)

    # --- children and watches ---

    def _reap(self, pid: int) -> None:
        child = _CHILDREN.get(pid)
        if child is None or child.delegate != self.name or (returncode := child.popen.poll()) is None:
            return
        del _CHILDREN[pid]
        if child.host == self.context.host:
            self._exits[child.rid] = _Exit(pid, child.spec_hash, returncode)

    def _reap_children(self, rid: ResourceId | None = None) -> None:
        """Reap every child that has ended (of one resource, with ``rid``), so that none stays a zombie while no
        watch covers it. An inspect reaps only its own: a pass inspects every resource, and polling every child
        for each would cost the square of the number of children every pass."""
        for pid, child in list(_CHILDREN.items()):
            if rid is None or child.rid == rid:
                self._reap(pid)

    def _watch(self, rid: ResourceId, stat: procfs.ProcStat) -> None:
        if self._closed or stat.pid in self._watched:
            return
        try:
            pidfd = os.pidfd_open(stat.pid)
        except ProcessLookupError:
            self._events.put_nowait(rid)
            return
        now = procfs.read_stat(stat.pid)
        if now is None or now.start_time != stat.start_time:  # gone, and its pid reused, since it was found
            os.close(pidfd)
            self._events.put_nowait(rid)
            return
        loop = asyncio.get_running_loop()
        loop.add_reader(pidfd, self._on_exit, stat.pid)
        self._watched[stat.pid] = _Watch(rid, pidfd, loop)

    def _unwatch(self, pid: int) -> _Watch | None:
        watch = self._watched.pop(pid, None)
        if watch is not None:
            watch.loop.remove_reader(watch.pidfd)
            os.close(watch.pidfd)
        return watch

    def _on_exit(self, pid: int) -> None:
        watch = self._unwatch(pid)
        if watch is not None:
            self._reap(pid)
            self._events.put_nowait(watch.rid)


def parse_marker(text: str) -> ResourceId | None:
    """The id a ``KHUTULUN_RESOURCE`` marker holds, or None for one that is not an id."""
    try:
        return ResourceId.parse(text)
    except InvalidInputError:
        return None


def early_exit_message(program: str, returncode: int, log_path: Path, log_start: int) -> str:
    _, how = exit_status(returncode)
    message = f"{program!r} {how} right after it started"
    try:
        with log_path.open("rb") as log:
            log.seek(tail_offset(log, _LOG_TAIL_LINES, start=log_start))
            lines = log.read().decode(errors="replace").splitlines()
    except OSError:
        lines = []
    if not lines:
        return f"{message} (its log, {log_path}, is empty)"
    return f"{message}; the last lines of its log ({log_path}):\n" + "\n".join(f"  {line}" for line in lines)
