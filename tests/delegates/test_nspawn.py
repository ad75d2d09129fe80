"""The nspawn delegate against real systemd-nspawn containers: command mode in a busybox root, mounts, stops
(graceful, and forced), adoption, watch, a root filesystem archive, and booting a Debian root.

Every test has a host name of its own (``conftest.host``); the ``cleanup`` fixture deletes what it started and
then kills, by pid, any process still carrying that host's marker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from khutulun.delegates import Delegate, DelegateContext, procfs
from khutulun.delegates.nspawn import NspawnDelegate, NspawnSpec, nspawn_command
from khutulun.delegates.process import HOST_MARKER, ProcessDelegate
from khutulun.errors import DelegateError
from khutulun.resources import Live, LiveState, Resource, ResourceId, spec_hash
from tests.delegates.conftest import nspawn_spec, runtime_setting
from tests.delegates.containers import free_port, http_get, read_until, run

Cleanup = Callable[[Delegate, Resource | None], None]
MakeResource = Callable[..., Resource]


@pytest.fixture
def root() -> str:
    return runtime_setting("KHUTULUN_TEST_NSPAWN_ROOT")


@pytest.fixture
async def delegate(root: str, context: DelegateContext, cleanup: Cleanup) -> NspawnDelegate:
    delegate = NspawnDelegate(context)
    cleanup(delegate, None)
    await delegate.start()
    return delegate


@pytest.fixture
def make(host: str) -> MakeResource:
    def make(spec: dict[str, Any], *, node: str = "sys", index: int = 0) -> Resource:
        return Resource(ResourceId("test", host, node, index), "nspawn", host, spec, spec_hash(spec))

    return make


def ours(host: str) -> list[procfs.ProcStat]:
    """Every live process that carries the test host's marker: nspawn, and what runs in its containers."""
    return [s for s in procfs.iter_stats() if s.alive and (procfs.read_environ(s.pid) or {}).get(HOST_MARKER) == host]


def payload(live: Live) -> int:
    """The host pid of the command in a command-mode container: the child of the stub init."""
    nspawn = live.handle["pid"]
    leader = next(s.pid for s in procfs.iter_stats() if s.ppid == nspawn and s.alive)
    return next(s.pid for s in procfs.iter_stats() if s.ppid == leader and s.alive)


# --- without a container ---------------------------------------------------------------------------------------

def test_the_command_line_escapes_bind_paths_and_picks_the_mode() -> None:
    spec = NspawnSpec(root="/r", rootfs_archive=None, command=("sh", "-c", "x"), boot=False,
                      environment={"K": "v"}, mounts=(), stop_timeout=1.0)
    from khutulun.delegates._containers import Mount

    spec = replace(spec, mounts=(Mount("/a:b", "/c\\d", False), Mount("/ro", "/ro", True)))
    argv = nspawn_command("/usr/bin/systemd-nspawn", "/r", spec, {"KHUTULUN_HOST": "h"})
    assert argv == ["/usr/bin/systemd-nspawn", "--register=no", "--keep-unit", "--quiet", "--directory=/r",
                    "--as-pid2", "--console=pipe", "--kill-signal=SIGRTMIN+3", "--setenv=K=v",
                    "--setenv=KHUTULUN_HOST=h", "--bind=/a\\:b:/c\\\\d", "--bind-ro=/ro:/ro", "--", "sh", "-c", "x"]
    booted = nspawn_command("nspawn", "/r", replace(spec, boot=True, command=None, mounts=()), {})
    assert booted[5:] == ["--boot", "--console=read-only", "--kill-signal=SIGRTMIN+4", "--setenv=K=v"]


@pytest.mark.parametrize(("changes", "problem"), [
    ({"rootfs_archive": "/a.tar"}, "give exactly one of 'root' and 'rootfs_archive'"),
    ({"root": None}, "give exactly one of 'root' and 'rootfs_archive'"),
    ({"root": "relative"}, "'root' must be an absolute path or null"),
    ({"boot": True}, "a container that boots runs its own init: 'command' must be null"),
    ({"command": None}, "'command' must be a non-empty list of strings (or 'boot' true)"),
    ({"mounts": [{"source": "/a", "target": "b"}]}, "a mount's 'source' and 'target' must be absolute paths"),
    ({"ports": []}, "unknown keys ['ports']"),
])
def test_a_spec_that_is_not_valid_says_what_is_wrong(changes: dict[str, Any], problem: str, host: str) -> None:
    spec = {**nspawn_spec("/r"), **changes}
    with pytest.raises(DelegateError, match="the nspawn spec of .* is not valid: .*" + problem.replace("(", r"\(")
                       .replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        NspawnSpec.parse(Resource(ResourceId("t", "s", "n", 0), "nspawn", host, spec, spec_hash(spec)), 10.0)


# --- with containers -------------------------------------------------------------------------------------------

pytestmark = pytest.mark.containers


async def test_a_command_runs_in_the_root_on_the_host_network_with_its_environment_and_logs(
        delegate: NspawnDelegate, make: MakeResource, root: str) -> None:
    port = free_port()
    resource = make(nspawn_spec(root, environment={"GREETING": "hello"}, command=[
        "sh", "-c", f"echo started $GREETING $KHUTULUN_RESOURCE; exec httpd -f -v -p {port} -h /www"]))
    live = await delegate.apply(resource, None)
    assert live.state is LiveState.RUNNING and live.spec_hash == resource.spec_hash
    assert await asyncio.to_thread(http_get, port) == b"hello from khutulun\n"
    recorded = replace(resource, handle=live.handle)
    logged = await read_until(delegate.logs(recorded, follow=True), b"response:200")
    assert f"started hello {resource.id}\n".encode() in logged

    # A command run next to it gets the container's environment, not the markers: it is not the resource.
    code, out, err = await run(delegate, recorded, ["sh", "-c", "echo $GREETING $KHUTULUN_RESOURCE; read x; "
                                                                "echo $x >&2; cat /proc/1/comm; exit 3"], b"in\n")
    assert (code, out, err) == (3, b"hello\n(sd-stubinit)\n", b"in\n")
    code, out, _ = await run(delegate, recorded, ["sh", "-c", "test -t 0 && test -t 1 && echo terminal"], tty=True)
    assert (code, out) == (0, b"terminal\r\n")

    await delegate.delete(recorded, live)
    with pytest.raises(DelegateError, match="its container is not running"):
        await delegate.exec(recorded, ["true"])


async def test_mounts_are_bound_read_only_or_writable(delegate: NspawnDelegate, make: MakeResource, root: str,
                                                      tmp_path: Path) -> None:
    shared, writable = tmp_path / "sha:red", tmp_path / "writable"  # a ':' to escape
    shared.mkdir()
    writable.mkdir()
    (shared / "greeting").write_text("from the host\n")
    resource = make(nspawn_spec(root, mounts=[{"source": str(shared), "target": "/shared", "read_only": True},
                                              {"source": str(writable), "target": "/writable", "read_only": False}]))
    live = await delegate.apply(resource, None)
    recorded = replace(resource, handle=live.handle)
    assert await run(delegate, recorded, ["cat", "/shared/greeting"]) == (0, b"from the host\n", b"")
    assert (await run(delegate, recorded, ["touch", "/shared/nope"]))[0] != 0
    assert (await run(delegate, recorded, ["sh", "-c", "echo out > /writable/file"]))[0] == 0
    assert (writable / "file").read_text() == "out\n"

    missing = make(nspawn_spec(root, mounts=[{"source": str(tmp_path / "gone"), "target": "/x"}]), node="other")
    with pytest.raises(DelegateError, match=r"the source of the mount on '/x', .*gone', does not exist"):
        await delegate.apply(missing, None)


async def test_a_stop_is_a_sigterm_to_the_command_and_a_kill_after_the_grace_period(
        delegate: NspawnDelegate, make: MakeResource, root: str, host: str) -> None:
    polite = make(nspawn_spec(root, stop_timeout=5.0, command=[
        "sh", "-c", "trap 'echo bye; exit 0' TERM; while true; do sleep 0.1; done"]))
    live = await delegate.apply(polite, None)
    replaced = await delegate.apply(replace(polite, spec={**polite.spec, "environment": {"X": "1"}},
                                            spec_hash="changed", handle=live.handle), live)
    assert b"bye\n" in b"".join([c async for c in delegate.logs(polite)]), "SIGTERM reached the command"
    started = time.monotonic()
    await delegate.delete(replace(polite, handle=replaced.handle), replaced)
    assert time.monotonic() - started < 2.0, "the command ended on SIGTERM, long before the grace period"

    stubborn = make(nspawn_spec(root, stop_timeout=1.0, command=["sh", "-c", "trap '' TERM; sleep 300"]))
    live = await delegate.apply(stubborn, None)
    started = time.monotonic()
    await delegate.delete(replace(stubborn, handle=live.handle), live)
    assert 1.0 <= time.monotonic() - started < 4.0, "SIGKILL after the grace period"
    assert ours(host) == [], "nothing of the container outlives it"


async def test_a_fresh_delegate_adopts_it_and_the_process_delegate_leaves_it_alone(
        delegate: NspawnDelegate, make: MakeResource, root: str, context: DelegateContext, cleanup: Cleanup) -> None:
    resource = make(nspawn_spec(root))
    live = await delegate.apply(resource, None)
    fresh = NspawnDelegate(context)  # the agent, started again
    cleanup(fresh, None)
    await fresh.start()
    by_handle = await fresh.inspect(replace(resource, handle=live.handle))
    by_scan = await fresh.inspect(resource)
    assert by_handle is not None and by_scan is not None and by_handle.handle == by_scan.handle == live.handle
    assert [rid for rid, _ in await fresh.list()] == [resource.id]
    assert await fresh.apply(replace(resource, handle=live.handle), by_handle) == by_handle
    await fresh.delete(resource, None)  # found by its markers
    assert await fresh.inspect(replace(resource, handle=live.handle)) is None
    gone = await delegate.inspect(replace(resource, handle=live.handle))
    assert gone is None or not gone.healthy


async def test_the_process_delegate_does_not_list_system_containers(
        delegate: NspawnDelegate, make: MakeResource, root: str, context: DelegateContext, cleanup: Cleanup) -> None:
    await delegate.apply(make(nspawn_spec(root)), None)
    processes = ProcessDelegate(context)
    cleanup(processes, None)
    assert await processes.list() == []


async def test_watch_reports_a_container_that_ends_and_apply_starts_it_again(
        delegate: NspawnDelegate, make: MakeResource, root: str) -> None:
    resource = make(nspawn_spec(root))
    live = await delegate.apply(resource, None)
    recorded = replace(resource, handle=live.handle)
    events = delegate.watch()
    os.kill(payload(live), signal.SIGKILL)  # a process of this test's own container
    assert await asyncio.wait_for(anext(events), 3.0) == resource.id
    ended = await delegate.inspect(recorded)
    assert ended is not None and ended.state is LiveState.FAILED, ended
    back = await delegate.apply(recorded, ended)
    assert back.state is LiveState.RUNNING and back.handle != live.handle

    second = asyncio.ensure_future(anext(events))
    await delegate.delete(replace(resource, handle=back.handle), back)  # a stop of its own is not news
    done, _ = await asyncio.wait({second}, timeout=0.5)
    assert not done
    second.cancel()
    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
        await second
    await events.aclose()


async def test_two_containers_cannot_share_a_root(delegate: NspawnDelegate, make: MakeResource, root: str) -> None:
    await delegate.apply(make(nspawn_spec(root)), None)
    with pytest.raises(DelegateError, match=r"'systemd-nspawn' exited with code 1 right after it started; the last "
                                            r"lines of its log .*\n.*is currently busy"):
        await delegate.apply(make(nspawn_spec(root), index=1), None)


async def test_a_root_filesystem_archive_is_unpacked_once_and_purged(
        delegate: NspawnDelegate, make: MakeResource, context: DelegateContext) -> None:
    archive = runtime_setting("KHUTULUN_TEST_ROOTFS_ARCHIVE")
    resource = make({**nspawn_spec("/unused"), "root": None, "rootfs_archive": archive,
                     "command": ["sh", "-c", "echo unpacked > /marker; exec sleep 300"]})
    live = await delegate.apply(resource, None)
    roots = [p for p in (context.data_dir / "rootfs").iterdir() if not p.name.startswith(".")]  # not nspawn's lock
    assert len(roots) == 1 and len(roots[0].name) == 64
    changed = replace(resource, spec={**resource.spec, "environment": {"X": "1"}}, spec_hash="changed")
    again = await delegate.apply(replace(changed, handle=live.handle), live)  # the same root, not unpacked again
    assert [p for p in (context.data_dir / "rootfs").iterdir() if not p.name.startswith(".")] == roots
    assert (roots[0] / "marker").read_text() == "unpacked\n"
    await delegate.delete(replace(changed, handle=again.handle), again, purge=True)
    assert list((context.data_dir / "rootfs").iterdir()) == []


async def test_a_booted_debian_runs_systemd_and_powers_off_on_stop(
        delegate: NspawnDelegate, make: MakeResource, host: str) -> None:
    boot_root = runtime_setting("KHUTULUN_TEST_NSPAWN_BOOT_ROOT")
    resource = make({**nspawn_spec(boot_root), "command": None, "boot": True, "stop_timeout": 10.0})
    live = await delegate.apply(resource, None)
    recorded = replace(resource, handle=live.handle)
    deadline = time.monotonic() + 15.0
    while (state := (await run(delegate, recorded, ["systemctl", "is-system-running"]))[1].strip()) != b"running":
        assert time.monotonic() < deadline, state
        await asyncio.sleep(0.2)
    started = time.monotonic()
    await delegate.apply(replace(resource, spec={**resource.spec, "environment": {"X": "1"}}, spec_hash="changed",
                                 handle=live.handle), live)  # stops it (a power-off), then boots it again
    assert b"Powering off." in b"".join([c async for c in delegate.logs(recorded)])
    assert time.monotonic() - started < 8.0, "a power-off, not a kill after the grace period"
