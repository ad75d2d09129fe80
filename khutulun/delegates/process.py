"""The ``process`` delegate: bare processes that the agent starts and supervises.

Each process leads its own session and process group, so that it outlives the agent and is signalled as a
group; its stdout and stderr are appended to ``<data_dir>/logs/<ns>/<svc>/<node>.<index>.log``; and its
environment carries three markers: ``KHUTULUN_RESOURCE``, ``KHUTULUN_SPEC_HASH`` and ``KHUTULUN_HOST``.

A process is ours only when its pid, its start time and its markers all agree: pids are reused, so a pid
alone is never signalled. After an agent restart the handle recorded in the state (pid and start time) finds
the process again; when there is no handle (the agent died between starting it and recording it), a scan of
``/proc`` for session leaders with the markers does. Several agents may share one pid namespace (in tests),
so every scan keeps to this host's marker.

A spec, as the agent builds it::

    {"command": ["python3", "-m", "http.server", "8080"], "environment": {"DB": "10.0.0.5:5432"},
     "working_directory": null, "stop_timeout": 10.0}
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from khutulun.delegates import procfs
from khutulun.delegates._hostio import ended_within, exit_status, follow_file, start_exec, tail_offset
from khutulun.delegates.base import Capabilities, Delegate, DelegateContext, ExecSession
from khutulun.errors import DelegateError, InvalidInputError
from khutulun.resources import Live, LiveState, Resource, ResourceId

__all__ = ["HOST_MARKER", "RESOURCE_MARKER", "SPEC_HASH_MARKER", "ProcessDelegate", "ProcessSpec"]

RESOURCE_MARKER = "KHUTULUN_RESOURCE"
SPEC_HASH_MARKER = "KHUTULUN_SPEC_HASH"
HOST_MARKER = "KHUTULUN_HOST"
_MARKERS = (RESOURCE_MARKER, SPEC_HASH_MARKER, HOST_MARKER)

_BASE_ENVIRONMENT = frozenset({"PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR"})
"""What a process inherits from the agent (plus ``LC_*``): enough for programs to find their tools and
speak the locale; never the agent's own ``KHUTULUN_*`` settings, which are not the workload's business."""

_SPEC_KEYS = frozenset({"command", "environment", "working_directory", "stop_timeout"})
_KILL_WAIT = 5.0  # after SIGKILL, only a process stuck in the kernel takes longer than this to end
_LOG_TAIL_LINES = 5
_ENVIRONMENTS_KEPT = 4096


@dataclass(frozen=True)
class ProcessSpec:
    command: tuple[str, ...]
    environment: Mapping[str, str]
    working_directory: str | None
    """Absolute; None for the default, ``<data_dir>/work/<ns>/<svc>/<node>.<index>``, which the delegate
    creates and removes. A directory the user names is never created nor removed."""
    stop_timeout: float

    @classmethod
    def parse(cls, resource: Resource, default_stop_timeout: float) -> ProcessSpec:
        """Validate a spec; every problem is named in one DelegateError."""
        spec = resource.spec
        problems: list[str] = []
        unknown = sorted(set(spec) - _SPEC_KEYS)
        if unknown:
            problems.append(f"unknown keys {unknown!r} (known: {sorted(_SPEC_KEYS)!r})")

        command = spec.get("command")
        if not (isinstance(command, list | tuple) and command and all(_is_text(a) for a in command)
                and command[0]):
            problems.append(f"'command' must be a non-empty list of strings, not {command!r}")
            command = ()

        environment = spec.get("environment") or {}
        if not isinstance(environment, Mapping):
            problems.append(f"'environment' must map names to strings, not {environment!r}")
            environment = {}
        for key, value in environment.items():
            if not (_is_text(key) and key and "=" not in key and _is_text(value)):
                problems.append(f"'environment' entry {key!r}: {value!r} is not a name (without '=') and a string")

        working_directory = spec.get("working_directory")
        if working_directory is not None and not (_is_text(working_directory)
                                                  and Path(working_directory).is_absolute()):
            problems.append(f"'working_directory' must be an absolute path or null, not {working_directory!r}")

        stop_timeout = spec.get("stop_timeout", default_stop_timeout)
        if stop_timeout is None:
            stop_timeout = default_stop_timeout
        if isinstance(stop_timeout, bool) or not isinstance(stop_timeout, int | float) \
                or not math.isfinite(stop_timeout) or stop_timeout < 0:
            problems.append(f"'stop_timeout' must be a number of seconds (0 or more), not {stop_timeout!r}")
            stop_timeout = default_stop_timeout

        if problems:
            raise DelegateError(f"the process spec of {resource.id} is not valid: " + "; ".join(problems))
        return cls(tuple(command), dict(environment), working_directory, float(stop_timeout))


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and "\0" not in value


@dataclass(frozen=True)
class _Child:
    popen: subprocess.Popen[bytes]
    rid: ResourceId
    host: str
    spec_hash: str


_CHILDREN: dict[int, _Child] = {}
"""The processes this OS process started, by pid, whichever delegate instance started them.

Being someone's child belongs to the OS process, not to a delegate instance. Keeping the Popen objects here
means a child is reaped by whichever instance sees it end (a test that simulates an agent restart has two
instances in one process), and that no Popen is dropped while its process runs (a zombie later, and a
ResourceWarning now)."""


@dataclass(frozen=True)
class _Exit:
    """A child this delegate saw end, for ``inspect`` to report until the resource is applied or deleted."""

    pid: int
    spec_hash: str
    returncode: int


@dataclass(frozen=True)
class _Found:
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


def _base_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k in _BASE_ENVIRONMENT or k.startswith("LC_")}


class ProcessDelegate(Delegate):
    name = "process"
    capabilities = Capabilities(supervised=True, logs=True, exec=True, list=True, watch=True)

    def __init__(self, context: DelegateContext) -> None:
        super().__init__(context)
        self._watched: dict[int, _Watch] = {}
        self._events: asyncio.Queue[ResourceId | None] = asyncio.Queue()
        self._exits: dict[ResourceId, _Exit] = {}
        self._environments: dict[tuple[int, int], dict[str, str]] = {}
        self._closed = False

    # --- paths ---

    def _default_working_directory(self, rid: ResourceId) -> Path:
        return self.context.data_dir / "work" / rid.namespace / rid.service / rid.filename

    def log_path(self, rid: ResourceId) -> Path:
        return self.context.data_dir / "logs" / rid.namespace / rid.service / f"{rid.filename}.log"

    def _spec(self, resource: Resource) -> ProcessSpec:
        return ProcessSpec.parse(resource, self.context.timeouts.stop)

    # --- finding our processes ---

    def _ours(self, stat: procfs.ProcStat | None, rid: ResourceId | None) -> _Found | None:
        """``stat``'s process if it is a live session leader with this host's markers (and ``rid``'s, if given)."""
        if stat is None or not stat.alive or not stat.session_leader:
            return None
        environment = self._environment(stat)
        if environment is None or environment.get(HOST_MARKER) != self.context.host:
            return None
        if environment.get("KHUTULUN_DELEGATE", self.name) != self.name:
            return None  # another delegate's session leader (an nspawn container): never ours to adopt or sweep
        marker = environment.get(RESOURCE_MARKER)
        if marker is None or (rid is not None and marker != str(rid)):
            return None
        return _Found(stat, environment)

    def _environment(self, stat: procfs.ProcStat) -> dict[str, str] | None:
        """A process's environment, read once for each workload rather than on every inspect of every pass.

        Only an environment with our resource marker is kept: that is a workload after its exec, and it never
        changes (a pid and a start time name one process for good). Anything else is read again next time,
        because a child between fork and exec (already its own session leader, as the spawn calls setsid
        first) shows the agent's environment under the very pid and start time the workload will have.
        """
        key = (stat.pid, stat.start_time)
        found = self._environments.get(key)
        if found is not None:
            return found
        environment = procfs.read_environ(stat.pid)
        if environment is not None and RESOURCE_MARKER in environment:
            if len(self._environments) >= _ENVIRONMENTS_KEPT:
                self._environments.clear()  # the simplest bound: start over; the next pass refills what runs
            self._environments[key] = environment
        return environment

    def _from_handle(self, rid: ResourceId, handle: Mapping[str, Any] | None) -> _Found | None:
        pid, start_time = (handle or {}).get("pid"), (handle or {}).get("start_time")
        if type(pid) is not int or type(start_time) is not int or pid <= 0:
            return None
        stat = procfs.read_stat(pid)
        if stat is None or stat.start_time != start_time:
            return None
        return self._ours(stat, rid)

    def _scan(self, rid: ResourceId | None) -> list[_Found]:
        """Every session leader of this host carrying ``rid``'s markers (any resource's, for None), oldest first.

        Runs in a worker thread: it reads a file or two for every process there is.
        """
        found = [f for stat in procfs.iter_stats() if stat.session_leader and (f := self._ours(stat, rid))]
        return sorted(found, key=lambda f: f.stat.start_time)

    # --- the interface ---

    async def inspect(self, resource: Resource) -> Live | None:
        self._reap_children(resource.id)
        found = self._from_handle(resource.id, resource.handle)
        if found is None:
            # No usable handle: the agent may have died between starting the process and recording it.
            # Should a process have made a second session carrying the markers, the oldest is the one we started.
            candidates = await asyncio.to_thread(self._scan, resource.id)
            found = candidates[0] if candidates else None
        if found is not None:
            self._watch(resource.id, found.stat)
            return found.live()
        ended = self._exits.get(resource.id)
        if ended is None:
            return None
        exit_code, how = exit_status(ended.returncode)
        return Live(LiveState.STOPPED if ended.returncode == 0 else LiveState.FAILED, ended.spec_hash,
                    handle={"pid": ended.pid}, exit_code=exit_code, message=how)

    async def apply(self, resource: Resource, live: Live | None) -> Live:
        spec = self._spec(resource)
        if live is not None and live.state is LiveState.RUNNING and live.spec_hash == resource.spec_hash:
            return live
        await self._stop(resource, live, spec.stop_timeout)
        return await self._start(resource, spec)

    async def delete(self, resource: Resource, live: Live | None, *, purge: bool = False) -> None:
        # Deleting must work for a spec that never was valid (nothing started then), so it reads what it needs
        # without insisting: the stop timeout, and whether the working directory is the user's.
        try:
            spec: ProcessSpec | None = self._spec(resource)
        except DelegateError:
            spec = None
        await self._stop(resource, live, spec.stop_timeout if spec else self.context.timeouts.stop)
        users_directory = (spec.working_directory if spec else resource.spec.get("working_directory")) is not None
        self._remove_files(resource.id, remove_working_directory=not users_directory)

    async def list(self) -> Sequence[tuple[ResourceId, Live]]:
        self._reap_children()
        by_id: dict[ResourceId, _Found] = {}
        for found in await asyncio.to_thread(self._scan, None):
            rid = _parse_marker(found.environment[RESOURCE_MARKER])
            if rid is not None:  # else a marker we did not write; nothing of ours
                by_id.setdefault(rid, found)  # oldest first: the one we started, as inspect picks it
        for rid, found in by_id.items():
            self._watch(rid, found.stat)
        return [(rid, found.live()) for rid, found in sorted(by_id.items())]

    def logs(self, resource: Resource, *, follow: bool = False, tail: int | None = None) -> AsyncGenerator[bytes, None]:
        return follow_file(self.log_path(resource.id), follow=follow, tail=tail)

    async def exec(self, resource: Resource, argv: Sequence[str], *, tty: bool = False) -> ExecSession:
        spec = self._spec(resource)
        cwd = Path(spec.working_directory) if spec.working_directory else self._default_working_directory(resource.id)
        if not cwd.is_dir():
            raise DelegateError(f"cannot run a command next to {resource.id}: its working directory {str(cwd)!r} "
                                "does not exist (is it applied?)")
        # Not the markers: the command leads a session of its own, and with them it would pass for the resource.
        environment = {**_base_environment(), **spec.environment}
        for marker in _MARKERS:
            environment.pop(marker, None)
        return await start_exec(argv, cwd=cwd, env=environment, tty=tty)

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

    # --- starting ---

    async def _start(self, resource: Resource, spec: ProcessSpec) -> Live:
        rid = resource.id
        self._exits.pop(rid, None)
        popen, log_path, log_start = self._spawn(resource, spec)
        # Our unreaped child: its /proc entry stays until we reap it, even if it has already exited.
        stat = procfs.read_stat(popen.pid)
        if stat is None:  # pragma: no cover - see above
            raise DelegateError(f"{rid}: the process {popen.pid} started but cannot be found in /proc")
        _CHILDREN[popen.pid] = _Child(popen, rid, self.context.host, resource.spec_hash)

        pidfd = os.pidfd_open(popen.pid)
        try:
            ended = await ended_within(pidfd, self.context.timeouts.startup_grace)
        finally:
            os.close(pidfd)
        if ended:
            # What it started in its session must not outlive it; then reap it (not before: while it is an
            # unreaped zombie, its session id cannot be anyone else's).
            await asyncio.to_thread(self._kill_session, stat.pid, stat.start_time, rid=None)
            self._reap(popen.pid)
            raise DelegateError(_early_exit_message(spec.command[0], popen.wait(), log_path, log_start))

        self._watch(rid, stat)
        return Live(LiveState.RUNNING, resource.spec_hash, handle={"pid": stat.pid, "start_time": stat.start_time},
                    attributes={"pid": stat.pid}, started_at=time.time())

    def _spawn(self, resource: Resource, spec: ProcessSpec) -> tuple[subprocess.Popen[bytes], Path, int]:
        rid = resource.id
        program = spec.command[0]
        cwd = Path(spec.working_directory) if spec.working_directory else self._default_working_directory(rid)
        if spec.working_directory is not None and not cwd.is_dir():
            raise DelegateError(f"cannot start {program!r}: the working directory {str(cwd)!r} does not exist")
        environment = {**_base_environment(), **spec.environment, RESOURCE_MARKER: str(rid),
                       SPEC_HASH_MARKER: resource.spec_hash, HOST_MARKER: self.context.host}
        log_path = self.log_path(rid)
        try:
            if spec.working_directory is None:
                cwd.mkdir(parents=True, exist_ok=True)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log = log_path.open("ab")  # appended to, as `cmd >>log 2>&1`: a restart keeps what came before
        except OSError as e:
            raise DelegateError(f"cannot start {program!r}: cannot make its working directory or log: {e}") from e
        with log:
            log_start = log.tell()
            try:
                popen = subprocess.Popen(spec.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=cwd, env=environment, start_new_session=True, close_fds=True)
            except OSError as e:
                where = f" in {str(cwd)!r}" if e.filename == str(cwd) else ""
                raise DelegateError(f"cannot start {program!r}{where}: {e.strerror}") from e
        return popen, log_path, log_start

    # --- stopping ---

    async def _stop(self, resource: Resource, live: Live | None, stop_timeout: float) -> None:
        """Stop every process of ``resource`` on this host: the recorded ones and any a scan finds."""
        rid = resource.id
        self._reap_children(rid)
        handles = [h for h in (live.handle if live else None, resource.handle) if h]
        targets = {found.stat.pid: found.stat for handle in handles if (found := self._from_handle(rid, handle))}
        if not targets:
            # Nothing recorded finds it: it may run unrecorded (an agent died right after starting it). A second
            # leader with the same markers (a workload that made a session of its own) is left to the reconcile
            # loop, which removes what carries the markers of no service.
            targets = {f.stat.pid: f.stat for f in await asyncio.to_thread(self._scan, rid)}
        await asyncio.gather(*(self._stop_one(rid, stat, stop_timeout) for stat in targets.values()))
        # A leader that ended before may have left members of its session behind; they carry our markers.
        for handle in handles:
            pid, start_time = handle.get("pid"), handle.get("start_time")
            if type(pid) is int and type(start_time) is int and pid not in targets and pid > 0:
                await asyncio.to_thread(self._kill_session, pid, start_time, rid=rid)
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
            # The leader is alive, so its pid is its process group's id and no one else's.
            self._signal_group(pid, signal.SIGTERM)
            if not await ended_within(pidfd, stop_timeout):
                self._signal_group(pid, signal.SIGKILL)
                if not await ended_within(pidfd, _KILL_WAIT):
                    raise DelegateError(f"the process {pid} of {rid} did not end {_KILL_WAIT:g} s after SIGKILL "
                                        "(is it stuck in the kernel?)")
            await asyncio.to_thread(self._kill_session, pid, stat.start_time, rid=None)
        finally:
            os.close(pidfd)
        self._reap(pid)

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        except OSError as e:
            raise DelegateError(f"cannot send {sig.name} to the process group {pgid}: {e.strerror}") from e

    def _kill_session(self, leader: int, start_time: int, *, rid: ResourceId | None) -> None:
        """SIGKILL what is left of the session that ``leader`` (started at ``start_time``) led, once it has ended.

        A session id stays reserved while any member of the session lives, so if no other process has taken
        the leader's pid, every process in that session was started by our process. With ``rid``, the
        leader was not seen alive in this call, and a member must also carry ``rid``'s markers.
        Runs in a worker thread.
        """
        stats = list(procfs.iter_stats())
        if any(s.pid == leader and s.start_time != start_time for s in stats):
            return  # the pid belongs to another process now, so our session has no members left
        for member in stats:
            if member.session != leader or member.pid == leader or not member.alive:
                continue
            if rid is not None:
                environment = procfs.read_environ(member.pid) or {}
                if environment.get(RESOURCE_MARKER) != str(rid) or environment.get(HOST_MARKER) != self.context.host:
                    continue
            _kill_exactly(member)

    def _remove_files(self, rid: ResourceId, *, remove_working_directory: bool) -> None:
        try:
            if remove_working_directory:
                shutil.rmtree(self._default_working_directory(rid))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise DelegateError(f"cannot remove the working directory of {rid}: {e}") from e
        try:
            self.log_path(rid).unlink(missing_ok=True)
        except OSError as e:
            raise DelegateError(f"cannot remove the log of {rid}: {e}") from e

    # --- children and watches ---

    def _reap(self, pid: int) -> None:
        child = _CHILDREN.get(pid)
        if child is None or (returncode := child.popen.poll()) is None:
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


def _parse_marker(text: str) -> ResourceId | None:
    """The id a ``KHUTULUN_RESOURCE`` marker holds, or None for one that is not an id."""
    try:
        return ResourceId.parse(text)
    except InvalidInputError:
        return None


def _kill_exactly(stat: procfs.ProcStat) -> None:
    """SIGKILL the process ``stat`` describes, and no other that has taken its pid since."""
    try:
        pidfd = os.pidfd_open(stat.pid)
    except ProcessLookupError:
        return
    try:
        now = procfs.read_stat(stat.pid)
        if now is not None and now.start_time == stat.start_time and now.session == stat.session:
            with suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        os.close(pidfd)


def _early_exit_message(program: str, returncode: int, log_path: Path, log_start: int) -> str:
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
