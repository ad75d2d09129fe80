"""The tests every container delegate passes against its real runtime; ``test_podman.py`` and ``test_docker.py``
run them, each with its :class:`Runtime`.

Every test has a host name of its own (``conftest.host``), used as the service name too, so that no two tests,
and no leftover of an earlier run, share a container name. At its end the ``sweep`` fixture removes, by id,
every container labelled with that host and every image named after it: no container of a test outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import tarfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import docker.errors
import podman.errors
import pytest

from khutulun.delegates import Delegate, DelegateContext
from khutulun.delegates._containerdelegate import ContainerDelegate
from khutulun.delegates._containers import container_name
from khutulun.errors import DelegateError
from khutulun.resources import Live, LiveState, Resource, ResourceId, spec_hash
from tests.delegates.conftest import container_spec, runtime_setting

Cleanup = Callable[[Delegate, Resource | None], None]
MakeResource = Callable[..., Resource]

_NOT_FOUND = (docker.errors.NotFound, podman.errors.NotFound, podman.errors.ImageNotFound)
_HTTPD = ["httpd", "-f", "-p", "8080", "-h", "/www"]


@dataclass
class Runtime:
    """The runtime itself, through its library, for what a test does behind the delegate's back."""

    name: str
    delegate_class: type[ContainerDelegate]
    client: Any  # podman.PodmanClient or docker.DockerClient: their container and image APIs agree

    def attrs(self, container_id: str) -> dict[str, Any]:
        attrs: dict[str, Any] = self.client.containers.get(container_id).attrs
        return attrs

    def exists(self, container_id: str) -> bool:
        try:
            self.client.containers.get(container_id)
        except _NOT_FOUND:
            return False
        return True

    def kill(self, container_id: str) -> None:
        self.client.containers.get(container_id).kill()

    def create_foreign(self, name: str, labels: dict[str, str] | None = None) -> str:
        """A running container that Khutulun did not make (or, with ``labels``, another host's)."""
        container = self.client.containers.create(runtime_setting("KHUTULUN_TEST_IMAGE"), ["sleep", "300"], name=name,
                                                  labels=labels or {})
        container.start()
        return str(container.id)

    def remove(self, container_id: str) -> None:
        with contextlib.suppress(*_NOT_FOUND):
            container = self.client.containers.get(container_id)
            container.stop(timeout=0)  # podman-py's remove() waits for the default stop timeout otherwise
            container.remove(force=True)

    def labelled(self, host: str) -> list[str]:
        found = self.client.containers.list(all=True, filters={"label": f"khutulun.host={host}"})
        return [str(c.id) for c in found]

    def image_exists(self, reference: str) -> bool:
        try:
            self.client.images.get(reference)
        except _NOT_FOUND:
            return False
        return True

    def save_new_image(self, name: str, marker: str, archive: Path) -> str:
        """Write a ``save`` archive of a new image ``name``: the busybox tree with an ENV of its own (so that its
        id is its own, shared with no other test); the image itself is not left behind. Its id."""
        rootfs = runtime_setting("KHUTULUN_TEST_ROOTFS_ARCHIVE")
        changes = [f"ENV KHUTULUN_TEST_MARKER={marker}", 'CMD ["/bin/sh"]']
        repository, tag = name.rsplit(":", 1)
        if isinstance(self.client, docker.DockerClient):
            self.client.api.import_image_from_file(rootfs, repository=repository, tag=tag, changes=changes)
        else:
            with Path(rootfs).open("rb") as data:
                self.client.api.post("/images/import", params={"reference": name, "changes": changes}, data=data,
                                     headers={"Content-Type": "application/x-tar"}).raise_for_status()
        image = self.client.images.get(name)
        try:
            with archive.open("wb") as out:
                for chunk in image.save(named=name):
                    out.write(chunk)
        finally:
            self.client.images.remove(name)
        return str(image.id)

    def remove_image(self, reference: str) -> None:
        with contextlib.suppress(*_NOT_FOUND):
            self.client.images.remove(reference)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def endpoint(port: int, container_port: int = 8080) -> dict[str, Any]:
    return {"name": "endpoint", "host_address": "127.0.0.1", "host_port": port, "container_port": container_port,
            "protocol": "tcp"}


def http_get(port: int, within: float = 5.0) -> bytes:
    deadline = time.monotonic() + within
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as answer:
                body: bytes = answer.read()
                return body
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


async def read_until(chunks: AsyncIterator[bytes], wanted: bytes, within: float = 5.0) -> bytes:
    seen = b""
    async with asyncio.timeout(within):
        async for chunk in chunks:
            seen += chunk
            if wanted in seen:
                return seen
    raise AssertionError(f"{wanted!r} never came; what came: {seen!r}")


async def run(delegate: Delegate, resource: Resource, argv: list[str], stdin: bytes | None = None,
              *, tty: bool = False) -> tuple[int, bytes, bytes]:
    session = await delegate.exec(resource, argv, tty=tty)
    if stdin is not None:
        await session.write(stdin)
        await session.close_stdin()
    out, err = b"", b""
    async for stream, data in session.output():
        if stream == "stdout":
            out += data
        else:
            err += data
    return await session.wait(), out, err


class ContainerCases:
    """The cases; a subclass provides the ``runtime`` fixture."""

    @pytest.fixture
    def runtime(self) -> Runtime:
        raise NotImplementedError("a subclass gives its runtime")

    @pytest.fixture
    def image(self) -> str:
        return runtime_setting("KHUTULUN_TEST_IMAGE")

    @pytest.fixture
    async def sweep(self, runtime: Runtime, host: str) -> AsyncIterator[None]:
        """Last of all: remove what still carries the test's host label, and the images named after the host."""
        yield
        for container_id in await asyncio.to_thread(runtime.labelled, host):
            await asyncio.to_thread(runtime.remove, container_id)
        for reference in (f"localhost/khutulun-test-{host}:latest", f"localhost/khutulun-test-{host}:1"):
            await asyncio.to_thread(runtime.remove_image, reference)

    @pytest.fixture
    async def delegate(self, runtime: Runtime, sweep: None, cleanup: Cleanup,
                       context: DelegateContext) -> ContainerDelegate:
        delegate = runtime.delegate_class(context)
        cleanup(delegate, None)
        await delegate.start()
        return delegate

    @pytest.fixture
    def make(self, host: str, runtime: Runtime) -> MakeResource:
        def make(spec: dict[str, Any], *, node: str = "web", index: int = 0) -> Resource:
            return Resource(ResourceId("test", host, node, index), runtime.name, host, spec, spec_hash(spec))

        return make

    # --- running ---

    async def test_it_runs_named_and_labelled_and_serves_through_a_published_port(
            self, delegate: ContainerDelegate, runtime: Runtime, make: MakeResource, image: str, host: str) -> None:
        port = free_port()
        resource = make(container_spec(image, command=_HTTPD, ports=[endpoint(port)]))
        started = time.monotonic()
        live = await delegate.apply(resource, None)
        took = time.monotonic() - started
        assert live.state is LiveState.RUNNING and live.spec_hash == resource.spec_hash, live
        assert await asyncio.to_thread(http_get, port) == b"hello from khutulun\n"
        assert took < 3.0

        attrs = await asyncio.to_thread(runtime.attrs, live.handle["id"])
        assert attrs["Name"].lstrip("/") == container_name(resource.id) == live.handle["name"]
        assert attrs["Config"]["Labels"] == {
            "khutulun.resource": f"test/{host}/web/0", "khutulun.spec-hash": resource.spec_hash,
            "khutulun.host": host, "khutulun.namespace": "test", "khutulun.service": host, "khutulun.node": "web",
            "khutulun.instance": "0"}
        # The agent restarts, not the runtime; the workload runs under an init, so that SIGTERM reaches it.
        assert attrs["HostConfig"]["RestartPolicy"]["Name"] in ("", "no")
        assert attrs["HostConfig"]["Init"] is True

        started = time.monotonic()
        await delegate.delete(replace(resource, handle=live.handle), live)
        assert time.monotonic() - started < 1.5, "httpd ignores SIGTERM as PID 1; under the init it must not wait"
        assert not await asyncio.to_thread(runtime.exists, live.handle["id"])

    async def test_a_fresh_delegate_adopts_it_and_apply_keeps_it_running(
            self, delegate: ContainerDelegate, runtime: Runtime, make: MakeResource, image: str,
            context: DelegateContext, cleanup: Cleanup) -> None:
        resource = make(container_spec(image))
        live = await delegate.apply(resource, None)
        fresh = runtime.delegate_class(context)  # the agent, started again
        cleanup(fresh, None)
        await fresh.start()

        by_handle = await fresh.inspect(replace(resource, handle=live.handle))
        by_labels = await fresh.inspect(resource)  # nothing recorded: the agent died before it could
        assert by_handle is not None and by_labels is not None
        assert by_handle.handle == by_labels.handle == live.handle
        assert by_handle.state is LiveState.RUNNING and by_handle.spec_hash == resource.spec_hash
        assert dict(await fresh.list())[resource.id].handle == live.handle

        before = (await asyncio.to_thread(runtime.attrs, live.handle["id"]))["State"]["StartedAt"]
        again = await fresh.apply(resource, None)  # unrecorded, but running with this spec: kept as it is
        assert again.handle == live.handle
        assert (await asyncio.to_thread(runtime.attrs, live.handle["id"]))["State"]["StartedAt"] == before

        await fresh.delete(resource, None, purge=True)  # found by its labels; purge keeps images it did not load
        assert not await asyncio.to_thread(runtime.exists, live.handle["id"])
        assert await asyncio.to_thread(runtime.image_exists, image)
        assert await fresh.inspect(resource) is None
        await fresh.delete(resource, None)  # again: nothing left, no error

    async def test_watch_reports_a_kill_and_apply_has_it_running_again_within_3_seconds(
            self, delegate: ContainerDelegate, runtime: Runtime, make: MakeResource, image: str) -> None:
        resource = make(container_spec(image))
        live = await delegate.apply(resource, None)
        recorded = replace(resource, handle=live.handle)
        events = delegate.watch()
        first = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.5)  # the event stream is open by now
        killed = time.monotonic()
        await asyncio.to_thread(runtime.kill, live.handle["id"])
        assert await asyncio.wait_for(first, 3.0) == resource.id
        stopped = await delegate.inspect(recorded)
        assert stopped is not None and stopped.state is LiveState.FAILED, stopped
        assert stopped.exit_code == 137 and "SIGKILL" in stopped.message
        back = await delegate.apply(recorded, stopped)  # what the agent does on the watch's word
        assert back.state is LiveState.RUNNING
        assert back.handle == live.handle, "the same container again, with its logs"
        assert time.monotonic() - killed < 3.0

        # A stop of the delegate's own is not news.
        second = asyncio.ensure_future(anext(events))
        await delegate.delete(recorded, back)
        done, _ = await asyncio.wait({second}, timeout=1.0)
        assert not done, second.result()
        second.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
            await second
        await events.aclose()

    async def test_logs_tail_and_follow_across_a_restart(
            self, delegate: ContainerDelegate, runtime: Runtime, make: MakeResource, image: str) -> None:
        script = "echo one; sleep 0.1; echo two >&2; sleep 0.4; echo three; exec sleep 300"  # stderr too
        resource = make(container_spec(image, command=["sh", "-c", script]))
        live = await delegate.apply(resource, None)
        recorded = replace(resource, handle=live.handle)

        followed = delegate.logs(recorded, follow=True)
        assert (await read_until(followed, b"three")).startswith(b"one\ntwo\n")
        assert b"".join([c async for c in delegate.logs(recorded)]) == b"one\ntwo\nthree\n"
        assert b"".join([c async for c in delegate.logs(recorded, tail=1)]) == b"three\n"

        await asyncio.to_thread(runtime.kill, live.handle["id"])  # the agent starts it again: the log goes on
        stopped = await delegate.inspect(recorded)
        await delegate.apply(recorded, stopped)
        again = await read_until(followed, b"one\ntwo\n")
        assert again == b"one\ntwo\n", again
        await followed.aclose()

    async def test_exec_gives_output_exit_code_input_terminal_and_kill(
            self, delegate: ContainerDelegate, make: MakeResource, image: str) -> None:
        resource = make(container_spec(image, environment={"GREETING": "hello"}))
        live = await delegate.apply(resource, None)
        recorded = replace(resource, handle=live.handle)

        code, out, err = await run(delegate, recorded, ["sh", "-c", "read x; echo $GREETING $x; echo oops >&2; exit 3"],
                                   b"world\n")
        assert (code, out, err) == (3, b"hello world\n", b"oops\n")
        code, out, _ = await run(delegate, recorded, ["sh", "-c", "tty; exit 4"], tty=True)
        assert code == 4 and out.startswith(b"/dev/pts/")

        session = await delegate.exec(recorded, ["sh", "-c", "sleep 0.3; stty size"], tty=True)
        await session.resize(33, 101)
        output = b"".join([data async for _, data in session.output()])
        assert await session.wait() == 0 and b"33 101" in output

        session = await delegate.exec(recorded, ["sleep", "300"])
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await session.kill()
        assert await asyncio.wait_for(session.wait(), 5.0) == 137
        assert time.monotonic() - started < 3.0

        code, _, err = await run(delegate, recorded, ["no-such-program"])
        assert code in (126, 127), err

        await delegate.delete(recorded, live)
        with pytest.raises(DelegateError, match="its container is not running"):
            await delegate.exec(recorded, ["true"])

    async def test_mounts_and_limits_are_applied(self, delegate: ContainerDelegate, runtime: Runtime,
                                                 make: MakeResource, image: str, tmp_path: Path) -> None:
        shared, writable = tmp_path / "shared", tmp_path / "writable"
        shared.mkdir()
        writable.mkdir()
        (shared / "greeting").write_text("from the host\n")
        resource = make(container_spec(image, cpus=0.5, memory=64 * 1024 * 1024, mounts=[
            {"source": str(shared), "target": "/shared", "read_only": True},
            {"source": str(writable), "target": "/writable", "read_only": False}]))
        live = await delegate.apply(resource, None)
        recorded = replace(resource, handle=live.handle)

        assert await run(delegate, recorded, ["cat", "/shared/greeting"]) == (0, b"from the host\n", b"")
        code, _, _ = await run(delegate, recorded, ["touch", "/shared/nope"])
        assert code != 0
        assert (await run(delegate, recorded, ["sh", "-c", "echo out > /writable/file"]))[0] == 0
        assert (writable / "file").read_text() == "out\n"

        attrs = await asyncio.to_thread(runtime.attrs, live.handle["id"])
        host_config = attrs["HostConfig"]
        assert host_config["Memory"] == 64 * 1024 * 1024
        assert host_config["NanoCpus"] == 500_000_000 or host_config["CpuQuota"] / host_config["CpuPeriod"] == 0.5
        mounts = {m["Destination"]: (m["Source"], m["RW"]) for m in attrs["Mounts"]}
        assert mounts == {"/shared": (str(shared), False), "/writable": (str(writable), True)}

        missing = make(container_spec(image, mounts=[{"source": str(tmp_path / "gone"), "target": "/x",
                                                      "read_only": False}]), node="other")
        with pytest.raises(DelegateError, match=r"the source of the mount on '/x', .*gone', does not exist"):
            await delegate.apply(missing, None)

    # --- images ---

    async def test_an_image_from_a_save_archive_is_loaded_and_purged_once_unused(
            self, delegate: ContainerDelegate, runtime: Runtime, make: MakeResource, context: DelegateContext) -> None:
        archive = runtime_setting("KHUTULUN_TEST_IMAGE_ARCHIVE")
        image = runtime_setting("KHUTULUN_TEST_ARCHIVED_IMAGE")
        await asyncio.to_thread(runtime.remove_image, image)  # the tests' own: left by a run that stopped midway
        first = make(container_spec(image, image_archive=archive))
        second = make(container_spec(image, image_archive=archive), index=1)
        try:
            lives = await asyncio.gather(delegate.apply(first, None), delegate.apply(second, None))
            assert all(live.state is LiveState.RUNNING for live in lives)
            assert await asyncio.to_thread(runtime.image_exists, image)
            assert [entry["names"] for entry in json.loads((context.data_dir / "images.json").read_text()).values()] \
                == [[image]]

            await delegate.delete(first, lives[0], purge=True)
            assert await asyncio.to_thread(runtime.image_exists, image), "the other instance still uses it"
            await delegate.delete(second, lives[1], purge=True)
            assert not await asyncio.to_thread(runtime.image_exists, image)
            assert json.loads((context.data_dir / "images.json").read_text()) == {}
        finally:
            await asyncio.to_thread(runtime.remove_image, image)

    async def test_an_image_a_changed_archive_replaced_is_purged_too(
            self, delegate: ContainerDelegate, runtime: Runtime, make: MakeResource, host: str,
            tmp_path: Path) -> None:
        name = f"localhost/khutulun-test-{host}:latest"
        first = await asyncio.to_thread(runtime.save_new_image, name, "first", tmp_path / "first.tar")
        second = await asyncio.to_thread(runtime.save_new_image, name, "second", tmp_path / "second.tar")
        assert first != second
        resource = make(container_spec(name, image_archive=str(tmp_path / "first.tar")))
        live = await delegate.apply(resource, None)
        assert (await asyncio.to_thread(runtime.attrs, live.handle["id"]))["Image"].endswith(first.split(":")[-1])
        changed = make(container_spec(name, image_archive=str(tmp_path / "second.tar")))  # the same name, anew
        live = await delegate.apply(replace(changed, handle=live.handle), live)
        assert (await asyncio.to_thread(runtime.attrs, live.handle["id"]))["Image"].endswith(second.split(":")[-1])

        await delegate.delete(replace(changed, handle=live.handle), live, purge=True)
        for image_id in (first, second):
            assert not await asyncio.to_thread(runtime.image_exists, image_id), "both images it loaded are gone"
        assert not await asyncio.to_thread(runtime.image_exists, name)

    async def test_an_image_from_a_root_filesystem_archive(self, delegate: ContainerDelegate, runtime: Runtime,
                                                          make: MakeResource, host: str) -> None:
        image = f"localhost/khutulun-test-{host}:latest"
        resource = make(container_spec(image, rootfs_archive=runtime_setting("KHUTULUN_TEST_ROOTFS_ARCHIVE"),
                                       command=["sh", "-c", "echo imported; exec sleep 300"]))
        live = await delegate.apply(resource, None)
        assert live.state is LiveState.RUNNING
        assert await read_until(delegate.logs(replace(resource, handle=live.handle), follow=True), b"imported")
        await delegate.delete(resource, live, purge=True)
        assert not await asyncio.to_thread(runtime.image_exists, image)

    async def test_a_missing_image_fails_that_resource_clearly(self, delegate: ContainerDelegate,
                                                              make: MakeResource, host: str) -> None:
        resource = make(container_spec(f"localhost/khutulun-test-{host}:1"))
        with pytest.raises(DelegateError) as failed:
            await delegate.apply(resource, None)
        assert failed.value.message == (f"{resource.id}: image 'localhost/khutulun-test-{host}:1' is not on this host "
                                        "and no archive was given; Khutulun never pulls from a registry")
        assert await delegate.list() == []

    async def test_an_archive_that_is_not_an_image_fails_clearly(self, delegate: ContainerDelegate, make: MakeResource,
                                                                host: str, tmp_path: Path) -> None:
        junk = tmp_path / "junk.tar"
        junk.write_bytes(b"this is not a tarball\n" * 100)
        text = tmp_path / "text.txt"
        text.write_text("a file in a tarball\n")
        tarball = tmp_path / "files.tar"
        with tarfile.open(tarball, "w") as tar:
            tar.add(text, arcname="text.txt")
        image = f"localhost/khutulun-test-{host}:1"
        cases = [({"image_archive": str(junk)}, r"is not an image archive: it is not a tar file"),
                 ({"rootfs_archive": str(junk)}, r"is not a root filesystem archive: it is not a tar file"),
                 ({"image_archive": str(tarball)}, r"is not an image archive \(as `podman save` or `docker save` "
                                                   r"write them\): \w+ said: .+"),
                 ({"image_archive": str(tmp_path / "gone.tar")}, r"cannot read the archive .*gone.tar")]
        for changes, message in cases:
            with pytest.raises(DelegateError, match=message):
                await delegate.apply(make(container_spec(image, **changes)), None)
        assert await delegate.list() == []

    # --- ports and names ---

    async def test_a_port_that_is_taken_fails_that_resource_clearly(self, delegate: ContainerDelegate,
                                                                   make: MakeResource, image: str) -> None:
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            port = holder.getsockname()[1]
            resource = make(container_spec(image, command=_HTTPD, ports=[endpoint(port)]))
            with pytest.raises(DelegateError, match=rf"cannot publish port 'endpoint' on 127\.0\.0\.1:{port}/tcp: "
                                                    r"another program on this host holds it"):
                await delegate.apply(resource, None)
        assert await delegate.list() == [], "nothing half-made stays behind"

    async def test_containers_without_our_labels_are_never_touched(
            self, delegate: ContainerDelegate, runtime: Runtime, make: MakeResource, image: str, host: str) -> None:
        resource = make(container_spec(image))
        squatted = make(container_spec(image), node="other")
        foreign = await asyncio.to_thread(runtime.create_foreign, f"not-khutulun-{host}")
        elsewhere = await asyncio.to_thread(runtime.create_foreign, f"not-khutulun-{host}-b", {
            "khutulun.resource": str(resource.id), "khutulun.host": f"{host}-elsewhere"})
        squatter = await asyncio.to_thread(runtime.create_foreign, container_name(squatted.id))
        try:
            live = await delegate.apply(resource, None)
            assert [rid for rid, _ in await delegate.list()] == [resource.id]
            await delegate.delete(resource, None, purge=True)
            assert not await asyncio.to_thread(runtime.exists, live.handle["id"])

            with pytest.raises(DelegateError, match="is taken by a container that is not this resource's"):
                await delegate.apply(squatted, None)
            await delegate.delete(squatted, None)
            for container_id in (foreign, elsewhere, squatter):
                assert (await asyncio.to_thread(runtime.attrs, container_id))["State"]["Status"] == "running"
        finally:
            for container_id in (foreign, elsewhere, squatter):
                await asyncio.to_thread(runtime.remove, container_id)

    async def test_a_changed_spec_replaces_it_and_an_exited_one_starts_again(
            self, delegate: ContainerDelegate, make: MakeResource, image: str) -> None:
        resource = make(container_spec(image, command=["sh", "-c", "echo ran; exec sleep 300"]))
        live = await delegate.apply(resource, None)
        changed = make(container_spec(image, command=["sh", "-c", "echo changed; exec sleep 300"]))
        replaced = await delegate.apply(replace(changed, handle=live.handle), live)
        assert replaced.handle["id"] != live.handle["id"] and replaced.handle["name"] == live.handle["name"]
        assert await delegate.inspect(replace(resource, handle=live.handle)) == replaced  # the old one is gone

        quits = make(container_spec(image, command=["sh", "-c", "echo bye; exit 5"]), node="quits")
        with pytest.raises(DelegateError, match=r"exited with code 5 right after it started; the last lines of its "
                                                r"log:\n  bye"):
            await delegate.apply(quits, None)
        ended = await delegate.inspect(quits)
        assert ended is not None and ended.state is LiveState.FAILED and ended.exit_code == 5, ended
        assert dict(await delegate.list())[quits.id].state is LiveState.FAILED


def assert_running(live: Live | None) -> None:
    assert live is not None and live.state is LiveState.RUNNING, live
