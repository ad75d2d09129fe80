"""What the ``podman`` and ``docker`` delegates share, as data: the spec, names and labels, and the engine contract.

- :class:`ContainerSpec` is the spec of ``docs/delegate-specs.md``, validated; every problem is named at once.
- A container is named ``khutulun-<ns>-<svc>-<node>-<index>`` (:func:`container_name`) and carries the labels
  of :func:`container_labels`. It is ours only when its ``khutulun.resource`` and ``khutulun.host`` labels say
  so.
- :class:`Engine` is what each runtime's module implements: a thin synchronous adapter over its Python library
  (the delegate calls it in worker threads), raising :class:`EngineError` only, and describing containers as
  :class:`EngineContainer`. The behaviour built on it is in ``_containerdelegate``.
"""

from __future__ import annotations

import abc
import datetime
import hashlib
import json
import math
import re
import signal
import socket
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeGuard

import requests

from khutulun.delegates import _specfields as specfields
from khutulun.delegates._specfields import is_text
from khutulun.errors import DelegateError
from khutulun.resources import Live, LiveState, Resource, ResourceId

__all__ = [
    "HOST_LABEL",
    "RESOURCE_LABEL",
    "SPEC_HASH_LABEL",
    "STARTABLE",
    "ContainerSpec",
    "Engine",
    "EngineContainer",
    "EngineError",
    "Mount",
    "Port",
    "check_socket",
    "container_labels",
    "container_name",
    "parse_engine_time",
    "parse_mounts",
]

RESOURCE_LABEL = "khutulun.resource"
SPEC_HASH_LABEL = "khutulun.spec-hash"
HOST_LABEL = "khutulun.host"
NAMESPACE_LABEL = "khutulun.namespace"
SERVICE_LABEL = "khutulun.service"
NODE_LABEL = "khutulun.node"
INSTANCE_LABEL = "khutulun.instance"
STARTABLE = frozenset({"created", "configured", "initialized", "exited", "stopped"})
"""Engine states of a container that is not running and can be started again."""

_SPEC_KEYS = frozenset({"image", "image_archive", "rootfs_archive", "command", "environment", "ports", "mounts",
                        "cpus", "memory", "stop_timeout", "network"})
NETWORKS = ("bridge", "host")
"""bridge: the runtime's own network, endpoints published on the host; host: the host's network, as a process."""
_PORT_KEYS = frozenset({"name", "host_address", "host_port", "container_port", "protocol"})
_MOUNT_KEYS = frozenset({"source", "target", "read_only"})
_NAME_MAX = 128
_NAME_REFUSED = re.compile(r"[^A-Za-z0-9_.-]")  # what both engines refuse in a container name
_CONNECT_TIMEOUT = 5.0


# --- the spec ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Port:
    name: str
    host_address: str | None
    """None publishes on every address of the host."""
    host_port: int
    container_port: int
    protocol: str


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool


@dataclass(frozen=True)
class ContainerSpec:
    """A ``podman`` or ``docker`` spec, as ``docs/delegate-specs.md`` describes it."""

    image: str
    image_archive: str | None
    rootfs_archive: str | None
    command: tuple[str, ...] | None
    """None keeps the image's own command."""
    environment: Mapping[str, str]
    ports: tuple[Port, ...]
    mounts: tuple[Mount, ...]
    cpus: float | None
    memory: int | None
    stop_timeout: float
    network: str = "bridge"

    @property
    def archive(self) -> str | None:
        return self.image_archive or self.rootfs_archive

    @classmethod
    def parse(cls, resource: Resource, default_stop_timeout: float) -> ContainerSpec:
        """Validate a spec; every problem is named in one DelegateError."""
        spec = resource.spec
        problems: list[str] = []
        specfields.unknown_keys(spec, _SPEC_KEYS, problems)

        image = spec.get("image")
        if not (is_text(image) and image and not image.isspace()):
            problems.append(f"'image' must be an image reference, not {image!r}")
            image = ""
        archives = {key: spec.get(key) for key in ("image_archive", "rootfs_archive")}
        for key, path in archives.items():
            specfields.absolute_path(key, path, problems)
        if all(archives.values()):
            problems.append("give 'image_archive' or 'rootfs_archive', not both")

        command = spec.get("command")
        if command is not None and not specfields.is_command(command):
            problems.append(f"'command' must be a non-empty list of strings or null, not {command!r}")
            command = None

        environment = specfields.environment(spec.get("environment"), problems)

        ports = _parse_ports(spec.get("ports"), problems)
        mounts = parse_mounts(spec.get("mounts"), problems)

        cpus = spec.get("cpus")
        if cpus is not None and (isinstance(cpus, bool) or not isinstance(cpus, int | float)
                                 or not math.isfinite(cpus) or cpus <= 0):
            problems.append(f"'cpus' must be a number of CPUs above 0, or null, not {cpus!r}")
            cpus = None
        memory = spec.get("memory")
        if memory is not None and (isinstance(memory, bool) or not isinstance(memory, int) or memory <= 0):
            problems.append(f"'memory' must be a number of bytes above 0, or null, not {memory!r}")
            memory = None

        stop_timeout = specfields.stop_timeout(spec.get("stop_timeout"), default_stop_timeout, problems)

        network = spec.get("network") or "bridge"
        if network not in NETWORKS:
            problems.append(f"'network' must be one of {', '.join(NETWORKS)}, not {network!r}")
        elif network == "host" and any(p.host_port != p.container_port for p in ports):
            problems.append("on the host's network a container binds its ports itself: 'container_port' must equal "
                            "'host_port'")

        if problems:
            raise DelegateError(f"the container spec of {resource.id} is not valid: " + "; ".join(problems))
        return cls(str(image), archives["image_archive"], archives["rootfs_archive"],
                   tuple(command) if command is not None else None, dict(environment), ports, mounts,
                   float(cpus) if cpus is not None else None, memory, float(stop_timeout), str(network))



def _is_port(value: Any) -> TypeGuard[int]:
    return type(value) is int and 0 < value < 65536


def _parse_ports(value: Any, problems: list[str]) -> tuple[Port, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        problems.append(f"'ports' must be a list, not {value!r}")
        return ()
    ports: list[Port] = []
    published: set[tuple[str | None, int, str]] = set()
    for entry in value:
        if not isinstance(entry, Mapping):
            problems.append(f"a port must be a mapping, not {entry!r}")
            continue
        unknown = sorted(set(entry) - _PORT_KEYS)
        name, address = entry.get("name") or "", entry.get("host_address")
        host_port, container_port = entry.get("host_port"), entry.get("container_port")
        protocol = entry.get("protocol") or "tcp"
        where = f"port {name or entry!r}"
        if unknown:
            problems.append(f"{where} has unknown keys {unknown!r} (known: {sorted(_PORT_KEYS)!r})")
        if not is_text(name) or (address is not None and not (is_text(address) and address)):
            problems.append(f"{where}: 'name' and 'host_address' must be strings (host_address may be null)")
            continue
        if not (_is_port(host_port) and _is_port(container_port)):
            problems.append(f"{where}: 'host_port' and 'container_port' must be ports (1 to 65535), "
                            f"not {host_port!r} and {container_port!r}")
            continue
        if protocol not in ("tcp", "udp"):
            problems.append(f"{where}: 'protocol' must be tcp or udp, not {protocol!r}")
            continue
        if (address, host_port, protocol) in published:
            problems.append(f"{where}: {address or '*'}:{host_port}/{protocol} is published twice")
            continue
        published.add((address, host_port, protocol))
        ports.append(Port(name, address, host_port, container_port, protocol))
    return tuple(ports)


def parse_mounts(value: Any, problems: list[str]) -> tuple[Mount, ...]:
    """Bind mounts, as the container and nspawn specs give them; what is wrong is added to ``problems``."""
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        problems.append(f"'mounts' must be a list, not {value!r}")
        return ()
    mounts: list[Mount] = []
    for entry in value:
        if not isinstance(entry, Mapping):
            problems.append(f"a mount must be a mapping, not {entry!r}")
            continue
        unknown = sorted(set(entry) - _MOUNT_KEYS)
        source, target, read_only = entry.get("source"), entry.get("target"), entry.get("read_only", False)
        if unknown:
            problems.append(f"mount {target!r} has unknown keys {unknown!r} (known: {sorted(_MOUNT_KEYS)!r})")
        if not (is_text(source) and Path(source).is_absolute() and is_text(target) and Path(target).is_absolute()):
            problems.append(f"a mount's 'source' and 'target' must be absolute paths, not {source!r} and {target!r}")
            continue
        if read_only is None:
            read_only = False
        if not isinstance(read_only, bool):
            problems.append(f"mount {target!r}: 'read_only' must be true or false, not {read_only!r}")
            continue
        mounts.append(Mount(source, target, read_only))
    return tuple(mounts)


# --- names and labels ----------------------------------------------------------------------------------------

def container_name(rid: ResourceId) -> str:
    """``khutulun-<ns>-<svc>-<node>-<index>``, as readable as it can be and never the same for two resources.

    Characters the engines refuse become ``_``. The name gets a short digest of the resource id whenever it
    could be another resource's: when a character was replaced, when it is too long, and when the namespace
    or the service holds a ``-`` (``a-b``/``c`` and ``a``/``b-c`` would read alike). Without those, the parts
    are where the dashes say: the namespace and service have none, and the index is the last part.
    """
    parts = [rid.namespace, rid.service, rid.node, str(rid.index)]
    cleaned = [_NAME_REFUSED.sub("_", part) for part in parts]
    name = "khutulun-" + "-".join(cleaned)
    if cleaned != parts or "-" in rid.namespace or "-" in rid.service or len(name) > _NAME_MAX:
        digest = hashlib.sha256(str(rid).encode()).hexdigest()[:8]
        name = f"{name[:_NAME_MAX - len(digest) - 1]}-{digest}"
    return name


def container_labels(rid: ResourceId, host: str, spec_hash: str) -> dict[str, str]:
    return {RESOURCE_LABEL: str(rid), SPEC_HASH_LABEL: spec_hash, HOST_LABEL: host, NAMESPACE_LABEL: rid.namespace,
            SERVICE_LABEL: rid.service, NODE_LABEL: rid.node, INSTANCE_LABEL: str(rid.index)}


def parse_engine_time(value: Any) -> float | None:
    """An engine's time (RFC 3339 with nanoseconds, or seconds since the epoch) as seconds; None for "never"."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value) if value > 0 else None
    if not isinstance(value, str) or not value or value.startswith("0001-"):
        return None
    match = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", value)
    if match is None:
        return None
    whole, fraction, zone = match.groups()
    try:
        moment = datetime.datetime.fromisoformat(whole + ("+00:00" if zone == "Z" else zone))
    except ValueError:
        return None
    return moment.timestamp() + (float(f"0.{fraction}") if fraction else 0.0)


# --- the engine contract -------------------------------------------------------------------------------------

class EngineError(Exception):
    """What an engine's library raised, in words; ``status`` is the HTTP status when there was an answer."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    @property
    def not_found(self) -> bool:
        return self.status == 404


@contextmanager
def engine_errors(api_error: type[Exception], library_error: type[Exception]) -> Iterator[None]:
    """Turn what an engine's library raises into EngineError: its API's errors (the ``docker`` and ``podman``
    libraries give both an explanation and the HTTP status) and its own, and the failures of a connection."""
    try:
        yield
    except api_error as e:
        raise EngineError(str(getattr(e, "explanation", None) or e), getattr(e, "status_code", None)) from e
    except (library_error, requests.RequestException, OSError) as e:
        raise EngineError(str(e)) from e


@dataclass(frozen=True)
class EngineContainer:
    """A container as either engine describes it, reduced to what the delegate needs."""

    id: str
    name: str
    labels: Mapping[str, str]
    state: str  # the engine's word: running, exited, created, paused, ...
    exit_code: int | None
    started_at: float | None
    finished_at: float | None
    """When its last run ended (for a running container, the run before this one); None when unknown."""
    error: str
    oom_killed: bool
    image_id: str

    @classmethod
    def inspected(cls, attrs: Mapping[str, Any]) -> EngineContainer:
        """A container from ``inspect``, whose answer both engines shape alike (Docker's names lead with "/")."""
        state = attrs.get("State") or {}
        status = str(state.get("Status") or "unknown")
        return cls(
            id=str(attrs["Id"]), name=str(attrs.get("Name") or "").lstrip("/"),
            labels=dict((attrs.get("Config") or {}).get("Labels") or {}), state=status,
            exit_code=None if status == "running" else state.get("ExitCode"),
            started_at=parse_engine_time(state.get("StartedAt")),
            finished_at=parse_engine_time(state.get("FinishedAt")), error=str(state.get("Error") or ""),
            oom_killed=bool(state.get("OOMKilled")), image_id=str(attrs.get("Image") or ""))

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def spec_hash(self) -> str | None:
        return self.labels.get(SPEC_HASH_LABEL)

    @property
    def handle(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name}

    def live(self) -> Live:
        if self.running:
            return Live(LiveState.RUNNING, self.spec_hash, handle=self.handle, attributes=self._attributes(),
                        started_at=self.started_at)
        how = self.how_it_ended()
        failed = bool(self.error) or self.oom_killed or self.state not in STARTABLE \
            or (self.exit_code is not None and self.exit_code != 0)
        return Live(LiveState.FAILED if failed else LiveState.STOPPED, self.spec_hash, handle=self.handle,
                    attributes=self._attributes(), message=how, exit_code=self.exit_code)

    def how_it_ended(self) -> str:
        if self.state in ("created", "configured", "initialized"):
            how = "was created and never started"
        elif self.state in ("exited", "stopped"):
            how = _exit_words(self.exit_code)
        else:
            how = f"is {self.state}"
        if self.oom_killed:
            how += " (it used more memory than its limit)"
        if self.error:
            how += f": {self.error}"
        return how

    def _attributes(self) -> dict[str, Any]:
        return {"container_id": self.id, "container_name": self.name}


def _exit_words(exit_code: int | None) -> str:
    if exit_code is None:
        return "has stopped"
    if exit_code > 128:
        with suppress(ValueError):
            return f"was killed by {signal.Signals(exit_code - 128).name} (exit code {exit_code})"
    return f"exited with code {exit_code}"


class Engine(abc.ABC):
    """One runtime's API, synchronously (the delegate calls it in worker threads). Every method raises
    EngineError, never its library's exceptions; a container or image that is not there is None or False."""

    runtime: ClassVar[str]
    """The runtime's name, for messages: Podman, Docker."""
    socket_path: str
    """The unix socket of its API, for the streams ``_enginehttp`` reads."""
    died_event: ClassVar[str]
    """The action of the event an engine sends when a container's main process ends."""
    log_stamp_resolution: ClassVar[float]
    """How finely the stamps of its log lines tell time, in seconds (Podman 4.3 gives whole seconds)."""

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def containers(self, label: str | None) -> list[EngineContainer]:
        """Every container (also stopped ones) with the label ``key=value``; with None, every container."""

    @abc.abstractmethod
    def container(self, container_id: str) -> EngineContainer | None: ...

    @abc.abstractmethod
    def create(self, name: str, labels: Mapping[str, str], spec: ContainerSpec) -> str:
        """Create (not start) a container with ``--init`` and no restart policy; its id."""

    @abc.abstractmethod
    def start(self, container_id: str) -> None: ...

    @abc.abstractmethod
    def stop(self, container_id: str, timeout: int) -> None:
        """Its stop signal, then SIGKILL after ``timeout`` seconds; nothing for a container that has stopped."""

    @abc.abstractmethod
    def remove(self, container_id: str) -> None:
        """Remove a stopped container and the anonymous volumes it made; nothing if it is gone."""

    @abc.abstractmethod
    def image_id(self, reference: str) -> str | None: ...

    @abc.abstractmethod
    def load_image(self, archive: Path) -> list[str]:
        """Load a ``save`` archive; the names it holds."""

    @abc.abstractmethod
    def import_image(self, archive: Path, reference: str) -> None:
        """Import a root filesystem tarball as the image ``reference``."""

    @abc.abstractmethod
    def remove_image(self, reference: str) -> bool:
        """Untag ``reference`` (the image goes with its last name); False when a container still uses it."""

    @abc.abstractmethod
    def exec_create(self, container_id: str, argv: Sequence[str], *, tty: bool) -> str: ...

    @abc.abstractmethod
    def exec_state(self, exec_id: str) -> tuple[bool, int | None, int]:
        """Whether the exec runs, its exit code once it has ended, and the host pid of its process (0 if none)."""

    @abc.abstractmethod
    def exec_resize(self, exec_id: str, rows: int, columns: int) -> None: ...

    # The streamed endpoints, which ``_enginehttp`` speaks: the same paths and parameters on both engines (Docker
    # reads any of true/1 as yes and -1 as every line; Podman's libpod API takes what its compat API takes).
    api_prefix: str
    """What the paths of the API's version start with (``/v1.41``, ``/v4.0.0/libpod``)."""

    def logs_path(self, container_id: str, *, follow: bool, tail: int | None, since: float | None,
                  until: float | None = None) -> str:
        """The logs of both streams, each line stamped (``timestamps``), between ``since`` and ``until``."""
        return (f"{self.api_prefix}/containers/{container_id}/logs?stdout=true&stderr=true&timestamps=true"
                f"&follow={str(follow).lower()}&tail={tail if tail is not None else -1}{_window(since, until)}")

    def exec_start_path(self, exec_id: str) -> str:
        return f"{self.api_prefix}/exec/{exec_id}/start"

    def events_path(self, label: str, since: float | None) -> str:
        """The event stream of containers with the label ``key=value`` that die, from ``since`` on."""
        filters = _filters({"type": ["container"], "event": [self.died_event], "label": [label]})
        return f"{self.api_prefix}/events?stream=true&filters={filters}{_window(since, None)}"


def check_socket(path: str) -> None:
    """Connect to a unix socket and let go: EngineError when nothing listens there.

    Before a library client connects: the ``docker`` and ``podman`` libraries leave the socket of a failed
    connection for the garbage collector (a ResourceWarning).
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(_CONNECT_TIMEOUT)
            probe.connect(path)
    except OSError as e:
        raise EngineError(e.strerror or str(e)) from e


def _filters(mapping: Mapping[str, list[str]]) -> str:
    return urllib.parse.quote(json.dumps(mapping, separators=(",", ":")))


def _window(since: float | None, until: float | None) -> str:
    """The ``since`` and ``until`` query parameters both engines take, to the microsecond (both filter at least
    that finely, whatever the resolution of the stamps they print)."""
    return "".join(f"&{name}={moment:.6f}" for name, moment in (("since", since), ("until", until))
                   if moment is not None)
