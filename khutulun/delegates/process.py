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
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from khutulun.delegates import _specfields as fields
from khutulun.delegates import procfs
from khutulun.delegates._hostio import ended_within, start_exec
from khutulun.delegates._supervised import (
    HOST_MARKER,
    MARKERS,
    RESOURCE_MARKER,
    SPEC_HASH_MARKER,
    Found,
    SupervisedDelegate,
    base_environment,
    early_exit_message,
)
from khutulun.delegates.base import Capabilities, DelegateContext, ExecSession
from khutulun.errors import DelegateError
from khutulun.resources import Live, LiveState, Resource, ResourceId

__all__ = ["HOST_MARKER", "RESOURCE_MARKER", "SPEC_HASH_MARKER", "ProcessDelegate", "ProcessSpec"]

_SPEC_KEYS = frozenset({"command", "environment", "working_directory", "stop_timeout"})
_KILL_WAIT = 5.0  # after SIGKILL, only a process stuck in the kernel takes longer than this to end
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
        fields.unknown_keys(spec, _SPEC_KEYS, problems)

        command = spec.get("command")
        if not fields.is_command(command):
            problems.append(f"'command' must be a non-empty list of strings, not {command!r}")
            command = ()

        environment = fields.environment(spec.get("environment"), problems)

        working_directory = spec.get("working_directory")
        fields.absolute_path("working_directory", working_directory, problems)

        stop_timeout = fields.stop_timeout(spec.get("stop_timeout"), default_stop_timeout, problems)

        if problems:
            raise DelegateError(f"the process spec of {resource.id} is not valid: " + "; ".join(problems))
        return cls(tuple(command), dict(environment), working_directory, float(stop_timeout))



class ProcessDelegate(SupervisedDelegate):
    name = "process"
    capabilities = Capabilities(supervised=True, logs=True, exec=True, list=True, watch=True)

    def __init__(self, context: DelegateContext) -> None:
        super().__init__(context)
        self._environments: dict[tuple[int, int], dict[str, str]] = {}

    # --- paths ---

    def _default_working_directory(self, rid: ResourceId) -> Path:
        return self.context.data_dir / "work" / rid.namespace / rid.service / rid.filename

    def _spec(self, resource: Resource) -> ProcessSpec:
        return ProcessSpec.parse(resource, self.context.timeouts.stop)

    # --- finding our processes ---

    def _candidate(self, stat: procfs.ProcStat) -> bool:
        return stat.session_leader

    def _ours(self, stat: procfs.ProcStat | None, rid: ResourceId | None) -> Found | None:
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
        return Found(stat, environment)

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

    # --- the interface ---

    async def apply(self, resource: Resource, live: Live | None) -> Live:
        spec = self._spec(resource)
        if live is not None and live.state is LiveState.RUNNING and live.spec_hash == resource.spec_hash:
            return live
        await self._stop(resource, live, spec.stop_timeout)
        return await self._start(resource, spec)

    async def delete(self, resource: Resource, live: Live | None, *, purge: bool = False) -> None:
        # Deleting must work for a spec that never was valid (nothing started then), so it reads what it needs
        # without insisting: the stop timeout, and whether the working directory is the user's.
        spec = fields.valid_or_none(lambda: self._spec(resource))
        await self._stop(resource, live, spec.stop_timeout if spec else self.context.timeouts.stop)
        users_directory = (spec.working_directory if spec else resource.spec.get("working_directory")) is not None
        self._remove_files(resource.id, remove_working_directory=not users_directory)

    async def exec(self, resource: Resource, argv: Sequence[str], *, tty: bool = False) -> ExecSession:
        spec = self._spec(resource)
        cwd = Path(spec.working_directory) if spec.working_directory else self._default_working_directory(resource.id)
        if not cwd.is_dir():
            raise DelegateError(f"cannot run a command next to {resource.id}: its working directory {str(cwd)!r} "
                                "does not exist (is it applied?)")
        # Not the markers: the command leads a session of its own, and with them it would pass for the resource.
        environment = {**base_environment(), **spec.environment}
        for marker in MARKERS:
            environment.pop(marker, None)
        return await start_exec(argv, cwd=cwd, env=environment, tty=tty)

    # --- starting ---

    async def _start(self, resource: Resource, spec: ProcessSpec) -> Live:
        popen, log_path, log_start = self._spawn(resource, spec)
        stat = self._adopt_child(resource, popen)
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
            raise DelegateError(early_exit_message(spec.command[0], popen.wait(), log_path, log_start))
        return self._running(resource, stat)

    def _spawn(self, resource: Resource, spec: ProcessSpec) -> tuple[subprocess.Popen[bytes], Path, int]:
        rid = resource.id
        program = spec.command[0]
        cwd = Path(spec.working_directory) if spec.working_directory else self._default_working_directory(rid)
        if spec.working_directory is not None and not cwd.is_dir():
            raise DelegateError(f"cannot start {program!r}: the working directory {str(cwd)!r} does not exist")
        environment = {**base_environment(), **spec.environment, RESOURCE_MARKER: str(rid),
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

    async def _stopped(self, rid: ResourceId, handles: Sequence[Mapping[str, Any]], stopped: set[int]) -> None:
        # A leader that ended before may have left members of its session behind; they carry our markers.
        for handle in handles:
            pid, start_time = handle.get("pid"), handle.get("start_time")
            if type(pid) is int and type(start_time) is int and pid not in stopped and pid > 0:
                await asyncio.to_thread(self._kill_session, pid, start_time, rid=rid)

    async def _terminate(self, rid: ResourceId, stat: procfs.ProcStat, pidfd: int, stop_timeout: float) -> None:
        pid = stat.pid
        # The leader is alive, so its pid is its process group's id and no one else's.
        self._signal_group(pid, signal.SIGTERM)
        if not await ended_within(pidfd, stop_timeout):
            self._signal_group(pid, signal.SIGKILL)
            if not await ended_within(pidfd, _KILL_WAIT):
                raise DelegateError(f"the process {pid} of {rid} did not end {_KILL_WAIT:g} s after SIGKILL "
                                    "(is it stuck in the kernel?)")
        await asyncio.to_thread(self._kill_session, pid, stat.start_time, rid=None)

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
            procfs.signal_exactly(member, signal.SIGKILL, same_session=True)

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
