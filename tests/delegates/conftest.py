"""Fixtures for the delegate tests, and the sample specs that the conformance harness runs every delegate with.

Every delegate registered under the ``khutulun.delegates`` entry points needs an entry in
:data:`SAMPLE_SPECS`; ``test_conformance.py`` fails for one that has none.

The container delegates need real runtimes: ``scripts/setup-containers`` (as root) starts them and prints the
``KHUTULUN_*`` variables that say where they are. Their tests carry the ``containers`` marker and skip, saying
so, only when those variables are missing (a developer without root); CI always sets them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from khutulun.config import Timeouts
from khutulun.delegates import Delegate, DelegateContext, procfs
from khutulun.delegates.process import HOST_MARKER, ProcessDelegate
from khutulun.errors import KhutulunError
from khutulun.resources import Resource, ResourceId, spec_hash

Spec = dict[str, Any]
SampleFactory = Callable[[Path], tuple[Spec, Spec]]
"""``tmp_path`` → (a spec, a changed spec for the same resource)."""


def _process_sample(tmp_path: Path) -> tuple[Spec, Spec]:
    spec: Spec = {"command": ["sleep", "300"], "environment": {"GREETING": "hello"}, "working_directory": None,
                  "stop_timeout": 2.0}
    return spec, {**spec, "environment": {"GREETING": "bonjour"}}


def _directory_sample(tmp_path: Path) -> tuple[Spec, Spec]:
    spec: Spec = {"path": str(tmp_path / "data"), "temporary": True, "files": {"a.txt": "one\n"}}
    return spec, {**spec, "files": {"a.txt": "two\n", "sub/b.txt": "three\n"}}


def runtime_setting(name: str) -> str:
    """A variable that ``scripts/setup-containers`` prints; the test is skipped, saying why, without it."""
    value = os.environ.get(name)
    if not value:
        pytest.skip(f"{name} is not set: run scripts/setup-containers as root and eval what it prints "
                    "(scripts/test does)")
    return value


def container_spec(image: str, **changes: Any) -> Spec:
    """A podman or docker spec: ``sleep 300`` in ``image``, with ``changes``."""
    return {"image": image, "image_archive": None, "rootfs_archive": None, "command": ["sleep", "300"],
            "environment": {}, "ports": [], "mounts": [], "cpus": None, "memory": None, "stop_timeout": 2.0, **changes}


def _container_sample(socket_variable: str) -> SampleFactory:
    def sample(tmp_path: Path) -> tuple[Spec, Spec]:
        runtime_setting(socket_variable)
        spec = container_spec(runtime_setting("KHUTULUN_TEST_IMAGE"), environment={"GREETING": "hello"})
        return spec, {**spec, "environment": {"GREETING": "bonjour"}}

    return sample


def nspawn_spec(root: str, **changes: Any) -> Spec:
    """An nspawn spec: ``sleep 300`` in the directory ``root``, with ``changes``."""
    return {"root": root, "rootfs_archive": None, "command": ["sleep", "300"], "boot": False, "environment": {},
            "mounts": [], "stop_timeout": 2.0, **changes}


def _nspawn_sample(tmp_path: Path) -> tuple[Spec, Spec]:
    spec = nspawn_spec(runtime_setting("KHUTULUN_TEST_NSPAWN_ROOT"), environment={"GREETING": "hello"})
    return spec, {**spec, "environment": {"GREETING": "bonjour"}}


SAMPLE_SPECS: dict[str, SampleFactory] = {
    "process": _process_sample,
    "directory": _directory_sample,
    "podman": _container_sample("KHUTULUN_PODMAN_SOCKET"),
    "docker": _container_sample("KHUTULUN_DOCKER_SOCKET"),
    "nspawn": _nspawn_sample,
}
CONTAINER_DELEGATES = frozenset({"podman", "docker", "nspawn"})
"""The delegates whose tests need real runtimes: their cases carry the ``containers`` marker."""


@pytest.fixture
def sample_specs() -> dict[str, SampleFactory]:
    return SAMPLE_SPECS


@pytest.fixture
def host() -> str:
    """A host name of this test's own: processes carry it, so that no other test (or agent) sees them."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def context(tmp_path: Path, host: str) -> DelegateContext:
    return DelegateContext(host=host, data_dir=tmp_path / "delegate", timeouts=Timeouts(stop=2.0))


@pytest.fixture
def make_resource(host: str) -> Callable[..., Resource]:
    """``make_resource(spec, node="web", index=0, delegate="process", handle=None)``: a resource of this host."""

    def make(spec: Spec, *, node: str = "web", index: int = 0, delegate: str = "process",
             handle: dict[str, Any] | None = None) -> Resource:
        return Resource(id=ResourceId("test", "svc", node, index), delegate=delegate, host=host, spec=spec,
                        spec_hash=spec_hash(spec), handle=handle or {})

    return make


class Cleanup:
    """What a test made, deleted at its end whatever happened: resources through their delegates, then (as a
    last resort, by pid) any process still carrying the test's host marker."""

    def __init__(self, host: str) -> None:
        self.host = host
        self._resources: list[tuple[Delegate, Resource]] = []
        self._delegates: list[Delegate] = []

    def __call__(self, delegate: Delegate, resource: Resource | None) -> None:
        """Delete ``resource`` (if any) with ``delegate`` at the end of the test, and close ``delegate``."""
        if resource is not None:
            self._resources.append((delegate, resource))
        if delegate not in self._delegates:
            self._delegates.append(delegate)

    async def run(self) -> None:
        for delegate, resource in reversed(self._resources):
            with contextlib.suppress(KhutulunError):
                await delegate.delete(resource, None, purge=True)
        for delegate in self._delegates:
            # Whatever else carries the test's markers, found as the agent finds orphans (every host is the test's
            # own, so nothing of anyone else's).
            with contextlib.suppress(KhutulunError):
                if delegate.capabilities.list:
                    for rid, live in await delegate.list():
                        await delegate.delete(Resource(rid, delegate.name, self.host, {}, live.spec_hash or "",
                                                       live.handle), live, purge=True)
        for delegate in self._delegates:
            await delegate.close()
        leftovers = [s for s in procfs.iter_stats() if (procfs.read_environ(s.pid) or {}).get(HOST_MARKER) == self.host]
        for stat in leftovers:
            procfs.signal_exactly(stat, signal.SIGKILL)
        if leftovers:
            await asyncio.sleep(0.1)  # SIGKILL is delivered at once, but the processes take a moment to end
        # Reap whatever of ours that killed (or that a test killed by hand), so no zombie outlives the test.
        reaper = ProcessDelegate(DelegateContext(self.host, Path("/nonexistent"), Timeouts()))
        await reaper.list()
        await reaper.close()


@pytest.fixture
async def cleanup(host: str) -> AsyncIterator[Callable[[Delegate, Resource | None], None]]:
    """``cleanup(delegate, resource)``: delete ``resource`` and close ``delegate`` when the test ends."""
    done = Cleanup(host)
    try:
        yield done
    finally:
        await done.run()
