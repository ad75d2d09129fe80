"""The ``podman`` delegate: containers run by Podman, through its REST API and the ``podman`` library.

Which Podman: the socket ``$KHUTULUN_PODMAN_SOCKET`` names (and no other, when it is set); else the user's
(``$XDG_RUNTIME_DIR/podman/podman.sock``) or the system's (``/run/podman/podman.sock``), whichever answers;
else a ``podman system service`` that the delegate starts itself, on a socket in its data directory. That
service runs under ``tini -s`` when tini is installed, because a PID 1 that does not reap orphans leaves
Podman's helper processes as zombies (RUNTIMES.md, "Host facts"); its pid and start time are recorded beside
the socket, so that an agent started again uses it instead of starting a second one. It outlives the agent,
as workloads do; :func:`stop_own_service` ends it, and nothing else of the delegate ever signals a service it
did not start.

Everything else is in :mod:`khutulun.delegates._containers`; this module only speaks the libpod dialect. It
creates containers through the library's container manager (which turns create options into libpod's spec)
and does the rest through the library's API client, below its container objects and their quirks
(RUNTIMES.md): ``State`` is a word, not a mapping, in what ``containers.list()`` returns; a list of label
filters is mangled; ``remove()`` takes no stop timeout (a stop with timeout 0 goes first); ``nano_cpus`` never
reaches libpod (a CPU quota per period does). Exec output, with its 8-byte multiplexing header, is read by
``_enginehttp``, which takes the frames apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import podman
import podman.errors

from khutulun.delegates import procfs
from khutulun.delegates._containerdelegate import ContainerDelegate
from khutulun.delegates._containers import (
    ContainerSpec,
    Engine,
    EngineContainer,
    EngineError,
    check_socket,
    engine_errors,
    parse_engine_time,
)
from khutulun.delegates._hostio import tail_offset
from khutulun.errors import DelegateError

__all__ = ["SOCKET_VARIABLE", "SYSTEM_SOCKET", "PodmanDelegate", "PodmanEngine", "stop_own_service"]

SOCKET_VARIABLE = "KHUTULUN_PODMAN_SOCKET"
SYSTEM_SOCKET = "/run/podman/podman.sock"
_TIMEOUT = 120.0  # seconds for one API call; a stop adds its own grace period to it
_SERVICE_START = 20.0  # seconds a service we start has to answer
_SERVICE_STOP = 10.0
_SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes
_OK = frozenset({200, 201, 204, 304})


# --- the engine ----------------------------------------------------------------------------------------------

def _errors() -> AbstractContextManager[None]:
    return engine_errors(podman.errors.APIError, podman.errors.PodmanError)


def _listed(attrs: Mapping[str, Any]) -> EngineContainer:
    """A container from the list: ``State`` is a word here, not the mapping inspect gives."""
    status = str(attrs.get("State") or "unknown")
    names = attrs.get("Names") or [""]
    return EngineContainer(
        id=str(attrs["Id"]), name=str(names[0]), labels=dict(attrs.get("Labels") or {}), state=status,
        exit_code=None if status == "running" else attrs.get("ExitCode"),
        started_at=parse_engine_time(attrs.get("StartedAt")), finished_at=None, error="", oom_killed=False,
        image_id=str(attrs.get("ImageID") or ""))


def _quote(name: str) -> str:
    return urllib.parse.quote_plus(name)


class PodmanEngine(Engine):
    runtime = "Podman"
    died_event = "died"
    log_stamp_resolution = 1.0  # its API prints log stamps to the second

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        check_socket(socket_path)
        with _errors():
            self._client = podman.PodmanClient(base_url=f"unix://{socket_path}", timeout=_TIMEOUT)
        self._api = self._client.api
        try:
            self._call("GET", "/_ping")
        except EngineError:
            self._api.close()
            raise
        self.api_prefix = self._api.path_prefix.rstrip("/")

    def close(self) -> None:
        self._api.close()

    def _call(self, method: str, path: str, *, params: Mapping[str, Any] | None = None, body: Any = None,
              data: IO[bytes] | None = None, timeout: float | None = _TIMEOUT, missing: bool = False) -> Any:
        """One libpod call; its JSON answer (None for none). With ``missing``, a 404 is None too."""
        options: dict[str, Any] = {"params": params, "timeout": timeout}
        if body is not None:
            options["data"] = json.dumps(body)
        elif data is not None:
            options.update(data=data, headers={"Content-Type": "application/x-tar"})
        with _errors():
            response = getattr(self._api, method.lower())(path, **options)
        if response.status_code == 404 and missing:
            return None
        if response.status_code not in _OK:
            try:
                message = response.json().get("message") or response.text
            except ValueError:
                message = response.text
            raise EngineError(str(message).strip() or f"HTTP status {response.status_code}", response.status_code)
        if response.status_code in (204, 304) or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            return response.text

    def containers(self, label: str | None) -> list[EngineContainer]:
        filters = json.dumps({"label": [label]}) if label else None
        listed = self._call("GET", "/containers/json", params={"all": "true", "filters": filters})
        return [_listed(attrs) for attrs in listed or []]

    def container(self, container_id: str) -> EngineContainer | None:
        attrs = self._call("GET", f"/containers/{container_id}/json", missing=True)
        return EngineContainer.inspected(attrs) if attrs is not None else None

    def create(self, name: str, labels: Mapping[str, str], spec: ContainerSpec) -> str:
        ports: dict[str, list[Any]] = {}
        for port in spec.ports if spec.network == "bridge" else ():
            ports.setdefault(f"{port.container_port}/{port.protocol}", []).append(
                (port.host_address, port.host_port) if port.host_address else port.host_port)
        options: dict[str, Any] = {}
        if spec.network == "host":
            options["network_mode"] = "host"
        if spec.cpus is not None:  # the library's nano_cpus never reaches libpod: a quota per period does
            options.update(cpu_period=100_000, cpu_quota=round(spec.cpus * 100_000))
        if spec.memory is not None:
            options["mem_limit"] = spec.memory
        with _errors():
            container = self._client.containers.create(
                spec.image, command=list(spec.command) if spec.command is not None else None, name=name,
                labels=dict(labels), environment=dict(spec.environment), ports=ports, init=True,
                mounts=[{"type": "bind", "source": m.source, "target": m.target, "read_only": m.read_only}
                        for m in spec.mounts], **options)
        return str(container.id)

    def start(self, container_id: str) -> None:
        self._call("POST", f"/containers/{container_id}/start")

    def stop(self, container_id: str, timeout: int) -> None:
        self._call("POST", f"/containers/{container_id}/stop", params={"timeout": timeout},
                   timeout=_TIMEOUT + timeout, missing=True)

    def remove(self, container_id: str) -> None:
        # A forced removal of a running container waits for its default stop timeout (RUNTIMES.md: remove()
        # takes none): kill it first, should it have been started again since it was stopped.
        self._call("POST", f"/containers/{container_id}/stop", params={"timeout": 0}, missing=True)
        self._call("DELETE", f"/containers/{container_id}", params={"force": "true", "v": "true"}, missing=True)

    def image_id(self, reference: str) -> str | None:
        attrs = self._call("GET", f"/images/{_quote(reference)}/json", missing=True)
        return str(attrs["Id"]) if attrs is not None else None

    def load_image(self, archive: Path) -> list[str]:
        with _errors(), archive.open("rb") as data:
            answer = self._call("POST", "/images/load", data=data, timeout=None)
        return [str(name) for name in (answer or {}).get("Names") or []]

    def import_image(self, archive: Path, reference: str) -> None:
        with _errors(), archive.open("rb") as data:
            self._call("POST", "/images/import", params={"reference": reference}, data=data)

    def remove_image(self, reference: str) -> bool:
        try:
            self._call("DELETE", f"/images/{_quote(reference)}", missing=True)
        except EngineError as e:
            if e.status == 409:
                return False
            raise
        return True

    def exec_create(self, container_id: str, argv: Sequence[str], *, tty: bool) -> str:
        answer = self._call("POST", f"/containers/{container_id}/exec",
                            body={"AttachStdin": True, "AttachStdout": True, "AttachStderr": True, "Tty": tty,
                                  "Cmd": list(argv)})
        return str(answer["Id"])

    def exec_state(self, exec_id: str) -> tuple[bool, int | None, int]:
        info = self._call("GET", f"/exec/{exec_id}/json")
        running = bool(info.get("Running"))
        return running, None if running else info.get("ExitCode"), int(info.get("Pid") or 0)

    def exec_resize(self, exec_id: str, rows: int, columns: int) -> None:
        self._call("POST", f"/exec/{exec_id}/resize", params={"h": rows, "w": columns})



# --- finding Podman, or starting it ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _ServiceRecord:
    pid: int
    start_time: int
    socket: str


_SERVICES: dict[int, subprocess.Popen[bytes]] = {}
"""The services this OS process started, by pid: kept so that none is reaped late (a zombie meanwhile) and no
Popen is dropped while its process runs (a ResourceWarning)."""


def _own_socket(data_dir: Path) -> Path:
    """In the data directory; in the runtime directory (or the temporary one) when that path is too long for a
    unix socket."""
    name = f"khutulun-podman-{hashlib.sha256(os.fsencode(data_dir)).hexdigest()[:16]}.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    candidates = [data_dir / "podman.sock", *([Path(runtime) / name] if runtime else []),
                  Path(tempfile.gettempdir()) / name]
    for socket in candidates[:-1]:
        if len(os.fsencode(socket)) <= _SOCKET_PATH_MAX and (socket.parent == data_dir or socket.parent.is_dir()):
            return socket
    return candidates[-1]


def _record_path(data_dir: Path) -> Path:
    return data_dir / "podman-service.json"


def _read_record(data_dir: Path) -> _ServiceRecord | None:
    try:
        data = json.loads(_record_path(data_dir).read_text())
        return _ServiceRecord(int(data["pid"]), int(data["start_time"]), str(data["socket"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _running(record: _ServiceRecord) -> bool:
    """Whether the service the record names still runs (and its pid is not someone else's now)."""
    for pid, popen in list(_SERVICES.items()):
        if popen.poll() is not None:
            del _SERVICES[pid]  # reaped: a zombie's /proc entry would look alive to the check below
    stat = procfs.read_stat(record.pid)
    return stat is not None and stat.alive and stat.start_time == record.start_time


def stop_own_service(data_dir: Path) -> bool:
    """Stop the Podman service that a podman delegate with this data directory started, if it runs.

    SIGTERM, as tini passes it on to Podman, then SIGKILL after a while. The agent never calls this (a
    service outlives the agent, as workloads do); tests and uninstallers do. True if there was one to stop.
    """
    record = _read_record(data_dir)
    if record is None or not _running(record):
        return False
    try:
        pidfd = os.pidfd_open(record.pid)
    except ProcessLookupError:
        return False
    try:
        stat = procfs.read_stat(record.pid)  # the pidfd pins it: is it still the one we started?
        if stat is None or stat.start_time != record.start_time:
            return False
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        deadline = time.monotonic() + _SERVICE_STOP
        while (now := procfs.read_stat(record.pid)) is not None and now.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        if now is not None and now.alive:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        os.close(pidfd)
    popen = _SERVICES.pop(record.pid, None)
    if popen is not None:
        popen.wait()
    with contextlib.suppress(OSError):
        Path(record.socket).unlink(missing_ok=True)
    _record_path(data_dir).unlink(missing_ok=True)
    return True


class PodmanDelegate(ContainerDelegate):
    name = "podman"

    async def _connect(self) -> Engine:
        configured = os.environ.get(SOCKET_VARIABLE)
        if configured:
            socket = configured.removeprefix("unix://")
            try:
                return await asyncio.to_thread(PodmanEngine, socket)
            except EngineError as e:
                raise DelegateError(f"Podman does not answer on {socket}, which {SOCKET_VARIABLE} names: "
                                    f"{e.message}") from e
        candidates = [SYSTEM_SOCKET]
        if os.environ.get("XDG_RUNTIME_DIR"):
            candidates.insert(0, f"{os.environ['XDG_RUNTIME_DIR']}/podman/podman.sock")
        for socket in candidates:
            if await asyncio.to_thread(os.path.exists, socket):
                with contextlib.suppress(EngineError):
                    return await asyncio.to_thread(PodmanEngine, socket)
        return await self._own_service()

    async def _own_service(self) -> Engine:
        """Podman's service on a socket of our own: the one a previous agent started, or a new one."""
        data_dir = self.context.data_dir
        record = await asyncio.to_thread(_read_record, data_dir)
        if record is not None and await asyncio.to_thread(_running, record):
            return await self._await_service(record, None)
        program = shutil.which("podman")
        if program is None:
            raise DelegateError("Podman is not installed on this host (no `podman` in PATH) and no Podman service "
                                f"answers; install it, or set {SOCKET_VARIABLE} to the socket of one")
        socket = _own_socket(data_dir)
        tini = shutil.which("tini")
        argv = [*([tini, "-s", "--"] if tini else []), program, "system", "service", "--time=0", f"unix://{socket}"]
        log_path = data_dir / "podman-service.log"
        try:
            popen, log_start = _spawn_service(argv, data_dir, socket, log_path)
        except OSError as e:
            raise DelegateError(f"cannot start `podman system service` on {socket}: {e}") from e
        _SERVICES[popen.pid] = popen
        stat = procfs.read_stat(popen.pid)  # our unreaped child: it is there, even should it have ended
        record = _ServiceRecord(popen.pid, stat.start_time if stat else 0, str(socket))
        try:
            _record_path(data_dir).write_text(json.dumps({"pid": record.pid, "start_time": record.start_time,
                                                          "socket": record.socket}))
        except OSError as e:
            raise DelegateError(f"cannot record the Podman service it started: {e}") from e
        return await self._await_service(record, (popen, log_path, log_start))

    async def _await_service(self, record: _ServiceRecord,
                             started: tuple[subprocess.Popen[bytes], Path, int] | None) -> Engine:
        deadline = time.monotonic() + _SERVICE_START
        while True:
            if await asyncio.to_thread(os.path.exists, record.socket):
                with contextlib.suppress(EngineError):
                    return await asyncio.to_thread(PodmanEngine, record.socket)
            if started is not None and started[0].poll() is not None:
                _SERVICES.pop(started[0].pid, None)
                raise DelegateError(f"`podman system service` ended right after it started "
                                    f"({_log_tail(started[1], started[2])})")
            if time.monotonic() > deadline:
                raise DelegateError(f"the Podman service (pid {record.pid}) does not answer on {record.socket} "
                                    f"{_SERVICE_START:g} s after it started; see "
                                    f"{self.context.data_dir / 'podman-service.log'}")
            await asyncio.sleep(0.1)


def _spawn_service(argv: list[str], data_dir: Path, socket: Path,
                   log_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start the service in a session of its own (so that it outlives the agent); it and where its log starts.

    Fork and exec: quick enough to do on the event loop's thread, as asyncio's own subprocesses do.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    socket.unlink(missing_ok=True)  # left by a service that died: a new one cannot bind beside it
    with log_path.open("ab") as log:
        log_start = log.tell()
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True, close_fds=True)
    return popen, log_start


def _log_tail(path: Path, start: int) -> str:
    try:
        with path.open("rb") as log:
            log.seek(tail_offset(log, 5, start=start))
            text = log.read().decode(errors="replace").strip()
    except OSError:
        text = ""
    return f"its log, {path}, says:\n{text}" if text else f"its log, {path}, is empty"
