"""The ``nspawn`` delegate: system containers, each a ``systemd-nspawn`` that the agent starts and supervises.

``systemd-nspawn --register=no --keep-unit`` runs without machined and without systemd as PID 1
(RUNTIMES.md, section 3), as a process much like the process delegate's: in a session of its own, its output
appended to ``<data_dir>/logs/<ns>/<svc>/<node>.<index>.log``, supervised with a pidfd whether it is a child
or adopted, and ours only when its pid, start time and markers agree. The markers are in the nspawn process's
own environment (``KHUTULUN_RESOURCE``, ``KHUTULUN_SPEC_HASH``, ``KHUTULUN_HOST``, and ``KHUTULUN_DELEGATE=nspawn``
so that no other delegate takes it for one of its own), where scans of ``/proc`` find it, and inside the
container through ``--setenv``.

In command mode the command runs as PID 2 under nspawn's stub init (``--as-pid2``): as PID 1 it would ignore
SIGTERM, and the stub reaps what it orphans. A stop sends the command itself SIGTERM (the stub's own shutdown
signals add a SIGHUP right after it, which would cut a SIGTERM handler short); a booted container gets
SIGRTMIN+4 at its init, which powers systemd off (RUNTIMES.md, section 3). After the grace period, SIGKILL to
the container's leader ends every process in it, and nspawn with it. The container shares the host's network.

A ``rootfs_archive`` is unpacked once, into ``<data_dir>/rootfs/<sha256 of the archive>/``. nspawn locks the
directory it runs in, so two containers cannot share one: two instances on a host need two roots.

A spec, as the agent builds it::

    {"root": "/var/lib/machines/deb", "rootfs_archive": null, "command": ["/bin/sh", "-c", "exec httpd -f"],
     "boot": false, "environment": {"K": "v"}, "mounts": [{"source": "/srv/data", "target": "/data",
     "read_only": false}], "stop_timeout": 10.0}
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from khutulun.delegates import _specfields as fields
from khutulun.delegates import procfs
from khutulun.delegates._containers import Mount, parse_mounts
from khutulun.delegates._hostio import ended_within, start_exec
from khutulun.delegates._supervised import (
    HOST_MARKER,
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

__all__ = ["DELEGATE_MARKER", "NspawnDelegate", "NspawnSpec", "nspawn_command"]

DELEGATE_MARKER = "KHUTULUN_DELEGATE"
_NAME = "nspawn"
_SPEC_KEYS = frozenset({"root", "rootfs_archive", "command", "boot", "environment", "mounts", "stop_timeout"})
_COMM = "systemd-nspawn"  # the command name in /proc/<pid>/stat of an nspawn process (not of its forks inside)
_CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_COMMAND_SHUTDOWN = signal.SIGRTMIN + 3  # nspawn's --kill-signal in command mode: the stub init's "halt"
_BOOT_SHUTDOWN = signal.SIGRTMIN + 4  # to systemd: power off
_LEADER_WAIT = 5.0  # seconds nspawn has to set the container up before it counts as started anyway
_KILL_WAIT = 5.0


@dataclass(frozen=True)
class NspawnSpec:
    root: str | None
    rootfs_archive: str | None
    command: tuple[str, ...] | None
    boot: bool
    environment: Mapping[str, str]
    mounts: tuple[Mount, ...]
    stop_timeout: float

    @classmethod
    def parse(cls, resource: Resource, default_stop_timeout: float) -> NspawnSpec:
        """Validate a spec; every problem is named in one DelegateError."""
        spec = resource.spec
        problems: list[str] = []
        fields.unknown_keys(spec, _SPEC_KEYS, problems)
        root, archive = spec.get("root"), spec.get("rootfs_archive")
        for key, path in (("root", root), ("rootfs_archive", archive)):
            fields.absolute_path(key, path, problems)
        if (root is None) == (archive is None):
            problems.append("give exactly one of 'root' and 'rootfs_archive'")
        boot = spec.get("boot") or False
        if not isinstance(boot, bool):
            problems.append(f"'boot' must be true or false, not {boot!r}")
            boot = False
        command = spec.get("command")
        if boot and command is not None:
            problems.append("a container that boots runs its own init: 'command' must be null")
        elif not boot and not fields.is_command(command):
            problems.append(f"'command' must be a non-empty list of strings (or 'boot' true), not {command!r}")
        environment = fields.environment(spec.get("environment"), problems)
        mounts = parse_mounts(spec.get("mounts"), problems)
        stop_timeout = fields.stop_timeout(spec.get("stop_timeout"), default_stop_timeout, problems)
        if problems:
            raise DelegateError(f"the nspawn spec of {resource.id} is not valid: " + "; ".join(problems))
        return cls(root, archive, tuple(command) if command and not boot else None, boot, dict(environment), mounts,
                   float(stop_timeout))



def _escape(path: str) -> str:
    """A path in a ``--bind`` argument, where ``:`` separates source from target (``\\`` escapes)."""
    return path.replace("\\", "\\\\").replace(":", "\\:")


def nspawn_command(program: str, root: str, spec: NspawnSpec, markers: Mapping[str, str]) -> list[str]:
    """The ``systemd-nspawn`` command line for a spec (pure: tested on its own)."""
    argv = [program, "--register=no", "--keep-unit", "--quiet", f"--directory={root}"]
    if spec.boot:
        # The console's output goes to the log; nspawn passes a SIGTERM on as a power-off, as we would.
        argv += ["--boot", "--console=read-only", f"--kill-signal={_signal_name(_BOOT_SHUTDOWN)}"]
    else:
        argv += ["--as-pid2", "--console=pipe", f"--kill-signal={_signal_name(_COMMAND_SHUTDOWN)}"]
    argv += [f"--setenv={key}={value}" for key, value in {**spec.environment, **markers}.items()]
    argv += [f"--bind{'-ro' if m.read_only else ''}={_escape(m.source)}:{_escape(m.target)}" for m in spec.mounts]
    if spec.command is not None:
        argv += ["--", *spec.command]
    return argv


def _signal_name(number: int) -> str:
    return f"SIGRTMIN+{number - signal.SIGRTMIN}"


def _arguments(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _boots(pid: int) -> bool:
    """Whether the nspawn process ``pid`` booted its container (its command line says so)."""
    return b"--boot" in _arguments(pid)


def _leader(pid: int) -> procfs.ProcStat | None:
    """The container's PID 1 as the host sees it: the child of nspawn ``pid`` in a pid namespace of its own."""
    try:
        own = Path(f"/proc/{pid}/ns/pid").readlink()
    except OSError:
        return None
    for stat in procfs.iter_stats():
        if stat.ppid == pid and stat.alive:
            with suppress(OSError):
                if Path(f"/proc/{stat.pid}/ns/pid").readlink() != own:
                    return stat
    return None


def _command(leader: procfs.ProcStat) -> procfs.ProcStat | None:
    """The command of a command-mode container: the stub init's first child (later ones are orphans it took in)."""
    children = [s for s in procfs.iter_stats() if s.ppid == leader.pid and s.alive]
    return min(children, key=lambda s: s.start_time, default=None)


def _sha256(path: str) -> str:
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class NspawnDelegate(SupervisedDelegate):
    name = _NAME
    capabilities = Capabilities(supervised=True, logs=True, exec=True, list=True, watch=True)
    ended_as = "the container {how}"

    def __init__(self, context: DelegateContext) -> None:
        super().__init__(context)
        self._digests: dict[tuple[str, int, int], str] = {}
        self._unpacking: dict[str, asyncio.Lock] = {}

    def _spec(self, resource: Resource) -> NspawnSpec:
        return NspawnSpec.parse(resource, self.context.timeouts.stop)

    # --- finding our containers ---

    def _candidate(self, stat: procfs.ProcStat) -> bool:
        return stat.comm == _COMM

    def _ours(self, stat: procfs.ProcStat | None, rid: ResourceId | None) -> Found | None:
        """``stat``'s process if it is a live nspawn leading its session, with this host's markers (and ``rid``'s)."""
        if stat is None or not stat.alive or not stat.session_leader or stat.comm != _COMM:
            return None
        environment = procfs.read_environ(stat.pid)
        if environment is None or environment.get(HOST_MARKER) != self.context.host \
                or environment.get(DELEGATE_MARKER) != _NAME:
            return None
        marker = environment.get(RESOURCE_MARKER)
        if marker is None or (rid is not None and marker != str(rid)):
            return None
        return Found(stat, environment)

    # --- the interface ---

    async def apply(self, resource: Resource, live: Live | None) -> Live:
        spec = self._spec(resource)
        if live is not None and live.state is LiveState.RUNNING and live.spec_hash == resource.spec_hash:
            return live
        await self._stop(resource, live, spec.stop_timeout)
        root = await self._root(resource.id, spec)
        return await self._start(resource, spec, root)

    async def delete(self, resource: Resource, live: Live | None, *, purge: bool = False) -> None:
        spec = fields.valid_or_none(lambda: self._spec(resource))
        await self._stop(resource, live, spec.stop_timeout if spec else self.context.timeouts.stop)
        try:
            self.log_path(resource.id).unlink(missing_ok=True)
        except OSError as e:
            raise DelegateError(f"cannot remove the log of {resource.id}: {e}") from e
        if purge and spec is not None and spec.rootfs_archive is not None:
            await self._purge_root(spec.rootfs_archive)

    async def exec(self, resource: Resource, argv: Sequence[str], *, tty: bool = False) -> ExecSession:
        spec = self._spec(resource)
        found = await self._find(resource)
        leader = await asyncio.to_thread(_leader, found.stat.pid) if found is not None else None
        if leader is None:
            raise DelegateError(f"cannot run a command in {resource.id}: its container is not running")
        program = shutil.which("nsenter")
        if program is None:
            raise DelegateError("cannot run a command in a system container: nsenter is not installed")
        # Every namespace of the container's leader, its root included: what `machinectl shell` would give,
        # without machined. The command gets the container's environment, without the markers. A terminal is the
        # host's: the command has one, but the container's /dev/pts does not name it (`tty` says "not a tty").
        environment = {**{k: v for k, v in base_environment().items() if k in ("LANG", "LANGUAGE", "TZ")
                          or k.startswith("LC_")}, "PATH": _CONTAINER_PATH, "container": "systemd-nspawn",
                       **spec.environment}
        return await start_exec([program, f"--target={leader.pid}", "--all", "--", *argv], cwd=Path("/"),
                                env=environment, tty=tty)

    # --- roots ---

    async def _root(self, rid: ResourceId, spec: NspawnSpec) -> Path:
        if spec.root is not None:
            root = Path(spec.root)
            if not await asyncio.to_thread(root.is_dir):
                raise DelegateError(f"{rid}: the root directory {spec.root!r} does not exist on this host")
            return root
        assert spec.rootfs_archive is not None
        return await self._unpacked(rid, spec.rootfs_archive)

    async def _digest(self, archive: str) -> str:
        try:
            st = await asyncio.to_thread(os.stat, archive)
            key = (archive, st.st_size, st.st_mtime_ns)
            if key not in self._digests:
                self._digests[key] = await asyncio.to_thread(_sha256, archive)
        except OSError as e:
            raise DelegateError(f"cannot read the root filesystem archive {archive!r}: {e.strerror}") from e
        return self._digests[key]

    async def _unpacked(self, rid: ResourceId, archive: str) -> Path:
        """The archive unpacked, once, into ``<data_dir>/rootfs/<sha256>``: in a directory of its own first, then
        renamed into place, so that a root that is there is whole."""
        digest = await self._digest(archive)
        target = self.context.data_dir / "rootfs" / digest
        async with self._unpacking.setdefault(digest, asyncio.Lock()):
            if await asyncio.to_thread(target.is_dir):
                return target
            partial = target.with_name(f".{digest}.{uuid.uuid4().hex[:8]}")
            try:
                await asyncio.to_thread(partial.mkdir, parents=True)
                process = await asyncio.create_subprocess_exec(
                    "tar", "--extract", "--preserve-permissions", "--numeric-owner", f"--file={archive}",
                    f"--directory={partial}", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE)
                _, errors = await process.communicate()
                if process.returncode != 0:
                    raise DelegateError(f"{rid}: cannot unpack the root filesystem archive {archive!r}: "
                                        f"{errors.decode(errors='replace').strip()}")
                await asyncio.to_thread(partial.rename, target)
            except OSError as e:
                raise DelegateError(f"{rid}: cannot unpack the root filesystem archive {archive!r}: {e}") from e
            finally:
                await asyncio.to_thread(shutil.rmtree, partial, True)
        return target

    async def _purge_root(self, archive: str) -> None:
        """Remove the unpacked root of ``archive``, unless a container of ours still runs in it."""
        try:
            digest = await self._digest(archive)
        except DelegateError:
            return  # the archive is gone: which root was its cannot be told, and none is removed
        target = self.context.data_dir / "rootfs" / digest
        for found in await asyncio.to_thread(self._scan, None):
            if os.fsencode(f"--directory={target}") in await asyncio.to_thread(_arguments, found.stat.pid):
                return
        await asyncio.to_thread(shutil.rmtree, target, True)
        with suppress(OSError):  # nspawn's lock file beside the directory it ran in
            await asyncio.to_thread(target.with_name(f".#{target.name}.lck").unlink, True)

    # --- starting ---

    async def _start(self, resource: Resource, spec: NspawnSpec, root: Path) -> Live:
        popen, log_path, log_start = self._spawn(resource, spec, root)
        stat = self._adopt_child(resource, popen)
        pidfd = os.pidfd_open(popen.pid)
        try:
            # Started once the container's leader runs (nspawn has set everything up), and still runs a moment
            # later; an nspawn that refuses (a root that is busy, a bind source that is missing) ends first.
            deadline = time.monotonic() + _LEADER_WAIT
            ended = False
            while not (ended := await ended_within(pidfd, 0.02)) and time.monotonic() < deadline:
                if await asyncio.to_thread(_leader, popen.pid) is not None:
                    ended = await ended_within(pidfd, self.context.timeouts.startup_grace)
                    break
        finally:
            os.close(pidfd)
        if ended:
            self._reap(popen.pid)
            raise DelegateError(early_exit_message("systemd-nspawn", popen.wait(), log_path, log_start))
        return self._running(resource, stat)

    def _spawn(self, resource: Resource, spec: NspawnSpec, root: Path) -> tuple[subprocess.Popen[bytes], Path, int]:
        rid = resource.id
        program = shutil.which("systemd-nspawn")
        if program is None:
            raise DelegateError(f"{rid}: systemd-nspawn is not installed on this host (Debian: systemd-container)")
        for mount in spec.mounts:
            if not Path(mount.source).exists():
                raise DelegateError(f"{rid}: the source of the mount on {mount.target!r}, {mount.source!r}, does "
                                    "not exist on this host")
        markers = {RESOURCE_MARKER: str(rid), SPEC_HASH_MARKER: resource.spec_hash, HOST_MARKER: self.context.host,
                   DELEGATE_MARKER: _NAME}
        argv = nspawn_command(program, str(root), spec, markers)
        log_path = self.log_path(rid)
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log = log_path.open("ab")  # appended to: a restart keeps what came before
        except OSError as e:
            raise DelegateError(f"{rid}: cannot make its log {str(log_path)!r}: {e}") from e
        with log:
            log_start = log.tell()
            try:
                popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         cwd="/", env={**base_environment(), **markers}, start_new_session=True,
                                         close_fds=True)
            except OSError as e:
                raise DelegateError(f"{rid}: cannot start systemd-nspawn: {e.strerror}") from e
        return popen, log_path, log_start

    # --- stopping ---

    async def _terminate(self, rid: ResourceId, stat: procfs.ProcStat, pidfd: int, stop_timeout: float) -> None:
        pid = stat.pid
        leader = await asyncio.to_thread(_leader, pid)
        command = None if leader is None or _boots(pid) else await asyncio.to_thread(_command, leader)
        if command is not None:
            procfs.signal_exactly(command, signal.SIGTERM)
        elif leader is not None:  # booted; or the command has ended, and nothing is left to wait for
            procfs.signal_exactly(leader, _BOOT_SHUTDOWN if _boots(pid) else signal.SIGKILL)
        else:  # still setting the container up: nspawn passes its --kill-signal on once there is a leader
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        if not await ended_within(pidfd, stop_timeout):
            # SIGKILL to the leader ends every process in its pid namespace; nspawn then ends by itself.
            leader = await asyncio.to_thread(_leader, pid)
            if leader is not None:
                procfs.signal_exactly(leader, signal.SIGKILL)
            if not await ended_within(pidfd, _KILL_WAIT):
                with suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                if not await ended_within(pidfd, _KILL_WAIT):
                    raise DelegateError(f"systemd-nspawn {pid} of {rid} did not end {_KILL_WAIT:g} s after "
                                        "SIGKILL (is it stuck in the kernel?)")
