"""The ``docker`` delegate: containers run by the Docker Engine, through its API and the ``docker`` library.

It reaches dockerd on ``$KHUTULUN_DOCKER_SOCKET`` (a path, or ``unix://`` and a path), by default
``/var/run/docker.sock``, and never starts a daemon itself: a Docker that does not answer leaves the agent
without this delegate. Everything it does is in :mod:`khutulun.delegates._containers`; this module only speaks
the Docker dialect (its spec is in ``docs/delegate-specs.md``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.types
import docker.utils

from khutulun.delegates._containerdelegate import ContainerDelegate
from khutulun.delegates._containers import (
    ContainerSpec,
    Engine,
    EngineContainer,
    EngineError,
    check_socket,
    engine_errors,
)
from khutulun.errors import DelegateError

__all__ = ["DEFAULT_SOCKET", "SOCKET_VARIABLE", "DockerDelegate", "DockerEngine"]

DEFAULT_SOCKET = "/var/run/docker.sock"
SOCKET_VARIABLE = "KHUTULUN_DOCKER_SOCKET"
_TIMEOUT = 120  # seconds for one API call; stop() adds its own grace period to it
_EXITED = re.compile(r"^Exited \((-?\d+)\)")


def _errors() -> AbstractContextManager[None]:
    return engine_errors(docker.errors.APIError, docker.errors.DockerException)


def _listed(attrs: Mapping[str, Any]) -> EngineContainer:
    """A container from the list, which tells less: the exit code only in words, no start time."""
    status = str(attrs.get("State") or "unknown")
    exited = _EXITED.match(str(attrs.get("Status") or ""))
    names = attrs.get("Names") or ["/"]
    return EngineContainer(
        id=str(attrs["Id"]), name=str(names[0]).lstrip("/"), labels=dict(attrs.get("Labels") or {}), state=status,
        exit_code=int(exited.group(1)) if exited else None, started_at=None, finished_at=None, error="",
        oom_killed=False,
        image_id=str(attrs.get("ImageID") or ""))


class DockerEngine(Engine):
    runtime = "Docker"
    died_event = "die"
    log_stamp_resolution = 1e-9

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        check_socket(socket_path)
        with _errors():
            # "auto" asks the daemon for its API version: a first call that fails at once if nothing answers.
            self._client = docker.DockerClient(base_url=f"unix://{socket_path}", version="auto", timeout=_TIMEOUT)
        self._api = self._client.api
        self.api_prefix = f"/v{self._api.api_version}"

    def close(self) -> None:
        self._client.close()

    def containers(self, label: str | None) -> list[EngineContainer]:
        with _errors():
            listed = self._api.containers(all=True, filters={"label": [label]} if label else None)
        return [_listed(attrs) for attrs in listed]

    def container(self, container_id: str) -> EngineContainer | None:
        try:
            with _errors():
                return EngineContainer.inspected(self._api.inspect_container(container_id))
        except EngineError as e:
            if e.not_found:
                return None
            raise

    def create(self, name: str, labels: Mapping[str, str], spec: ContainerSpec) -> str:
        bindings: dict[int | str, list[Any]] = {}
        for port in spec.ports if spec.network == "bridge" else ():
            bindings.setdefault(f"{port.container_port}/{port.protocol}", []).append(
                (port.host_address, port.host_port) if port.host_address else port.host_port)
        mounts = [docker.types.Mount(target=m.target, source=m.source, type="bind", read_only=m.read_only)
                  for m in spec.mounts]
        with _errors():
            host_config = self._api.create_host_config(
                port_bindings=bindings, mounts=mounts, init=True,
                network_mode="host" if spec.network == "host" else None,
                nano_cpus=round(spec.cpus * 1e9) if spec.cpus is not None else None, mem_limit=spec.memory)
            created = self._api.create_container(
                image=spec.image, command=list(spec.command) if spec.command is not None else None, name=name,
                labels=dict(labels), environment=dict(spec.environment),
                ports=[(p.container_port, p.protocol) for p in spec.ports] if spec.network == "bridge" else None,
                host_config=host_config)
        return str(created["Id"])

    def start(self, container_id: str) -> None:
        with _errors():
            self._api.start(container_id)

    def stop(self, container_id: str, timeout: int) -> None:
        try:
            with _errors():
                self._api.stop(container_id, timeout=timeout)
        except EngineError as e:
            if not e.not_found:
                raise

    def remove(self, container_id: str) -> None:
        try:
            with _errors():
                # force: should it have been started again since it was stopped, it is killed, not left behind.
                self._api.remove_container(container_id, v=True, force=True)
        except EngineError as e:
            if not e.not_found:
                raise

    def image_id(self, reference: str) -> str | None:
        try:
            with _errors():
                return str(self._api.inspect_image(reference)["Id"])  # type: ignore[no-untyped-call]
        except EngineError as e:
            if e.not_found:
                return None
            raise

    def load_image(self, archive: Path) -> list[str]:
        names: list[str] = []
        with _errors(), archive.open("rb") as data:
            for message in self._api.load_image(data):  # type: ignore[no-untyped-call]
                if message.get("error"):
                    raise EngineError(str(message["error"]))
                text = str(message.get("stream") or "")
                if text.startswith("Loaded image: "):
                    names.append(text.removeprefix("Loaded image: ").strip())
        return names

    def import_image(self, archive: Path, reference: str) -> None:
        repository, tag = docker.utils.parse_repository_tag(reference)
        with _errors():
            answer = self._api.import_image_from_file(str(archive), repository=repository, tag=tag or "latest")
        for line in str(answer).splitlines():
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict) and message.get("error"):
                raise EngineError(str(message["error"]))

    def remove_image(self, reference: str) -> bool:
        try:
            with _errors():
                self._api.remove_image(reference)
        except EngineError as e:
            if e.status == 409:
                return False
            if not e.not_found:
                raise
        return True

    def exec_create(self, container_id: str, argv: Sequence[str], *, tty: bool) -> str:
        with _errors():
            return str(self._api.exec_create(container_id, list(argv), stdin=True, tty=tty)["Id"])

    def exec_state(self, exec_id: str) -> tuple[bool, int | None, int]:
        with _errors():
            info = self._api.exec_inspect(exec_id)
        running = bool(info.get("Running"))
        return running, None if running else info.get("ExitCode"), int(info.get("Pid") or 0)

    def exec_resize(self, exec_id: str, rows: int, columns: int) -> None:
        with _errors():
            self._api.exec_resize(exec_id, height=rows, width=columns)



class DockerDelegate(ContainerDelegate):
    name = "docker"

    async def _connect(self) -> Engine:
        socket = os.environ.get(SOCKET_VARIABLE) or DEFAULT_SOCKET
        socket = socket.removeprefix("unix://")
        try:
            return await asyncio.to_thread(DockerEngine, socket)
        except EngineError as e:
            raise DelegateError(f"Docker does not answer on {socket} ({e.message}); start dockerd, or set "
                                f"{SOCKET_VARIABLE} to the socket it listens on") from e
