"""The process delegate against real processes: starting, finding, adopting, stopping, watching, logs, exec.

Every test has a host name of its own (see ``conftest.host``), and the ``cleanup`` fixture deletes what it
started, by pid, whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from khutulun.config import Timeouts
from khutulun.delegates import Delegate, DelegateContext, ExecSession, procfs
from khutulun.delegates.process import ProcessDelegate
from khutulun.errors import DelegateError
from khutulun.resources import Live, LiveState, Resource

MakeResource = Callable[..., Resource]
Cleanup = Callable[[Delegate, Resource | None], None]

SLEEP: dict[str, Any] = {"command": ["sleep", "300"], "environment": {}, "working_directory": None, "stop_timeout": 2.0}


def sh(script: str, **spec: Any) -> dict[str, Any]:
    return {"command": ["sh", "-c", script], "environment": {}, "working_directory": None, "stop_timeout": 2.0,
            **spec}


def python(script: str, **spec: Any) -> dict[str, Any]:
    return {"command": [sys.executable, "-c", script], "environment": {}, "working_directory": None,
            "stop_timeout": 2.0, **spec}


def running(pid: int, start_time: int) -> bool:
    """The process is there and has not ended. (An orphan that ended stays a zombie until PID 1 reaps it.)"""
    stat = procfs.read_stat(pid)
    return stat is not None and stat.start_time == start_time and stat.alive


def members(leader: int) -> list[procfs.ProcStat]:
    """The live processes of the session ``leader`` leads, but for the leader."""
    return [s for s in procfs.iter_stats() if s.session == leader and s.pid != leader and s.alive]


async def eventually(condition: Callable[[], bool], within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {within} s")
        await asyncio.sleep(0.02)


def handle_of(live: Live) -> tuple[int, int]:
    return int(live.handle["pid"]), int(live.handle["start_time"])


@pytest.fixture
def delegate(context: DelegateContext, cleanup: Cleanup) -> ProcessDelegate:
    made = ProcessDelegate(context)
    cleanup(made, None)
    return made


async def started(delegate: ProcessDelegate, resource: Resource, cleanup: Cleanup,
                  live: Live | None = None) -> Live:
    cleanup(delegate, resource)
    return await delegate.apply(resource, live)


# --- starting ---------------------------------------------------------------------------------------------

async def test_apply_starts_a_session_leader_with_its_markers_and_environment(
        delegate: ProcessDelegate, context: DelegateContext, make_resource: MakeResource, cleanup: Cleanup,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KHUTULUN_STATE_DIR", "/the/agent/own")  # the agent's settings stay the agent's
    monkeypatch.setenv("LC_TIME", "C")
    monkeypatch.setenv("UNRELATED", "x")
    resource = make_resource({**SLEEP, "environment": {"GREETING": "hello", "PATH": "/custom:/usr/bin:/bin"}})
    before = time.time()
    live = await started(delegate, resource, cleanup)

    assert live.state is LiveState.RUNNING
    assert live.healthy
    assert live.spec_hash == resource.spec_hash
    pid, _ = handle_of(live)
    assert live.attributes == {"pid": pid}
    assert live.started_at is not None and before <= live.started_at <= time.time()
    assert os.getsid(pid) == pid == os.getpgid(pid)  # its own session and process group

    environment = procfs.read_environ(pid)
    assert environment is not None
    assert environment["KHUTULUN_RESOURCE"] == "test/svc/web/0"
    assert environment["KHUTULUN_SPEC_HASH"] == resource.spec_hash
    assert environment["KHUTULUN_HOST"] == context.host
    assert environment["GREETING"] == "hello"
    assert environment["PATH"] == "/custom:/usr/bin:/bin"  # the spec wins over the agent's
    assert environment["LC_TIME"] == "C"
    assert "KHUTULUN_STATE_DIR" not in environment
    assert "UNRELATED" not in environment

    workdir = context.data_dir / "work" / "test" / "svc" / "web.0"
    log = context.data_dir / "logs" / "test" / "svc" / "web.0.log"
    assert os.readlink(f"/proc/{pid}/cwd") == str(workdir)
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    assert os.readlink(f"/proc/{pid}/fd/1") == str(log)
    assert os.readlink(f"/proc/{pid}/fd/2") == str(log)


async def test_stdout_and_stderr_are_appended_to_the_log(
        delegate: ProcessDelegate, context: DelegateContext, make_resource: MakeResource, cleanup: Cleanup) -> None:
    resource = make_resource(sh("echo out; echo err >&2; exec sleep 300"))
    log = delegate.log_path(resource.id)
    log.parent.mkdir(parents=True)
    log.write_bytes(b"from before\n")
    await started(delegate, resource, cleanup)
    await eventually(lambda: log.read_bytes().count(b"\n") == 3)
    assert log.read_bytes() == b"from before\nout\nerr\n"


async def test_a_given_working_directory_is_used_and_kept(
        delegate: ProcessDelegate, make_resource: MakeResource, cleanup: Cleanup, tmp_path: Path) -> None:
    workdir = tmp_path / "mine"
    workdir.mkdir()
    resource = make_resource({**SLEEP, "working_directory": str(workdir)})
    live = await started(delegate, resource, cleanup)
    assert os.readlink(f"/proc/{handle_of(live)[0]}/cwd") == str(workdir)
    await delegate.delete(resource, live)
    assert workdir.is_dir()


async def test_inspect_finds_it_and_applying_the_same_spec_again_changes_nothing(
        delegate: ProcessDelegate, make_resource: MakeResource, cleanup: Cleanup) -> None:
    resource = make_resource(SLEEP)
    live = await started(delegate, resource, cleanup)
    found = await delegate.inspect(replace(resource, handle=live.handle))
    assert found is not None
    assert (found.state, found.spec_hash, found.handle) == (LiveState.RUNNING, resource.spec_hash, live.handle)
    assert await delegate.apply(resource, found) is found
    assert running(*handle_of(live))


async def test_a_changed_spec_replaces_the_process(
        delegate: ProcessDelegate, make_resource: MakeResource, cleanup: Cleanup) -> None:
    old = make_resource(SLEEP)
    old_live = await started(delegate, old, cleanup)
    new = make_resource({**SLEEP, "environment": {"V": "2"}})
    new_live = await started(delegate, new, cleanup, old_live)

    assert new_live.spec_hash == new.spec_hash != old.spec_hash
    assert new_live.handle != old_live.handle
    assert not running(*handle_of(old_live))
    assert running(*handle_of(new_live))
    listed = [live for rid, live in await delegate.list() if rid == new.id]
    assert [live.handle for live in listed] == [new_live.handle]  # one process for the resource, not two


# --- start failures ---------------------------------------------------------------------------------------

async def test_a_command_that_cannot_be_executed_is_named(
        delegate: ProcessDelegate, make_resource: MakeResource, cleanup: Cleanup) -> None:
    resource = make_resource({**SLEEP, "command": ["/nonexistent/khutulun-test"]})
    with pytest.raises(DelegateError) as raised:
        await started(delegate, resource, cleanup)
    assert raised.value.message == "cannot start '/nonexistent/khutulun-test': No such file or directory"


async def test_a_missing_working_directory_is_named(
        delegate: ProcessDelegate, make_resource: MakeResource, cleanup: Cleanup, tmp_path: Path) -> None:
    resource = make_resource({**SLEEP, "working_directory": str(tmp_path / "missing")})
    with pytest.raises(DelegateError, match=r"cannot start 'sleep': the working directory '.*/missing' does not"):
        await started(delegate, resource, cleanup)


async def test_a_bad_spec_is_refused_with_every_problem_named(
        delegate: ProcessDelegate, make_resource: MakeResource) -> None:
    resource = make_resource({"command": [], "environment": {"A=B": 1}, "working_directory": "relative",
                              "stop_timeout": -1, "restart": "always"})
    with pytest.raises(DelegateError) as raised:
        await delegate.apply(resource, None)
    message = raised.value.message
    assert message.startswith("the process spec of test/svc/web/0 is not valid: unknown keys ['restart']")
    for part in ("'command' must be a non-empty list of strings, not []", "'environment' entry 'A=B': 1",
                 "'working_directory' must be an absolute path or null, not 'relative'",
                 "'stop_timeout' must be a number of seconds (0 or more), not -1"):
        assert part in message


@pytest.fixture
def patient(context: DelegateContext, cleanup: Cleanup) -> ProcessDelegate:
    """A delegate with a long startup grace, so that a process meant to exit early does so within it even on a
    loaded machine. It fails as soon as the process exits, so the long grace costs nothing."""
    made = ProcessDelegate(replace(context, timeouts=Timeouts(stop=2.0, startup_grace=3.0)))
    cleanup(made, None)
    return made


async def test_an_early_exit_is_reported_with_its_code_and_the_end_of_its_log(
        patient: ProcessDelegate, make_resource: MakeResource, cleanup: Cleanup) -> None:
    delegate = patient
    resource = make_resource(sh("for i in 1 2 3 4 5 6 7; do echo line $i; done; echo oops >&2; exit 3"))
    log = delegate.log_path(resource.id)
    log.parent.mkdir(parents=True)
    log.write_bytes(b"an earlier run\n")  # not this start's output: not in the message
    start = time.monotonic()
    with pytest.raises(DelegateError) as raised:
        await started(delegate, resource, cleanup)
    assert time.monotonic() - start < 1.5  # as soon as it exited, not at the end of the grace
    assert raised.value.message == (f"'sh' exited with code 3 right after it started; the last lines of its log "
                                    f"({log}):\n  line 4\n  line 5\n  line 6\n  line 7\n  oops")
    # The delegate saw it end, and says so until the resource is applied again or deleted.
    live = await delegate.inspect(resource)
    assert live is not None
    assert (live.state, live.exit_code, live.message, live.healthy) == (LiveState.FAILED, 3, "exited with code 3",
                                                                         False)
    await delegate.delete(resource, live)
    assert await delegate.inspect(resource) is None


async def test_an_early_exit_by_a_signal_says_which_and_leaves_nothing_behind(
        patient: ProcessDelegate, make_resource: MakeResource, cleanup: Cleanup) -> None:
    delegate = patient
    resource = make_resource(sh("sleep 300 & echo $! > child; kill -9 $$"))
    with pytest.raises(DelegateError, match=r"^'sh' was killed by SIGKILL right after it started \(its log, .*, "
                                            r"is empty\)$"):
        await started(delegate, resource, cleanup)
    child = int((delegate.context.data_dir / "work" / "test" / "svc" / "web.0" / "child").read_text())
    await eventually(lambda: (s := procfs.read_stat(child)) is None or not s.alive)  # the sleep it started too


# --- stopping ---------------------------------------------------------------------------------------------

async def test_delete_stops_the_whole_group_and_removes_its_files(
        delegate: ProcessDelegate, context: DelegateContext, make_resource: MakeResource, cleanup: Cleanup) -> None:
    resource = make_resource(sh("sleep 300 & sleep 301; true"))
    live = await started(delegate, resource, cleanup)
    pid, start_time = handle_of(live)
    await eventually(lambda: len(members(pid)) == 2)
    children = [(s.pid, s.start_time) for s in members(pid)]

    start = time.monotonic()
    await delegate.delete(resource, live)
    assert time.monotonic() - start < 1.5  # SIGTERM was enough: no wait for the 2 s stop timeout
    assert not running(pid, start_time)
    await eventually(lambda: not any(running(*child) for child in children))
    assert procfs.read_stat(pid) is None  # our child, so reaped: no zombie left
    assert not (context.data_dir / "work" / "test" / "svc" / "web.0").exists()
    assert not delegate.log_path(resource.id).exists()
    assert await delegate.inspect(resource) is None
    await delegate.delete(resource, live)  # again: nothing to do, and no error
    await delegate.delete(resource, None)


async def test_a_process_that_ignores_sigterm_gets_sigkill_after_the_stop_timeout(
        delegate: ProcessDelegate, make_resource: MakeResource, cleanup: Cleanup) -> None:
    script = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
              "time.sleep(300)")
    resource = make_resource(python(script, stop_timeout=0.5))
    live = await started(delegate, resource, cleanup)
    log = delegate.log_path(resource.id)
    await eventually(lambda: log.read_bytes() == b"ready\n")  # SIGTERM is ignored from here on
    start = time.monotonic()
    await delegate.delete(resource, live)
    elapsed = time.monotonic() - start
    assert 0.5 <= elapsed < 2.5  # the stop timeout, then SIGKILL at once
    assert not running(*handle_of(live))


async def test_what_is_left_in_the_session_after_the_leader_ends_is_killed(
        delegate: ProcessDelegate, make_resource: MakeResource, cleanup: Cleanup) -> None:
    # The background sleep ignores SIGTERM (an ignored signal stays ignored across exec); the leader does not.
    resource = make_resource(sh("trap '' TERM; sleep 300 & trap - TERM; exec sleep 301", stop_timeout=10))
    live = await started(delegate, resource, cleanup)
    pid, _ = handle_of(live)
    await eventually(lambda: len(members(pid)) == 1)
    (child,) = [(s.pid, s.start_time) for s in members(pid)]
    start = time.monotonic()
    await delegate.delete(resource, live)
    assert time.monotonic() - start < 3  # no wait for the 10 s stop timeout: the leader went at once
    await eventually(lambda: not running(*child))


async def test_nothing_is_signalled_on_the_word_of_a_pid_alone(
        delegate: ProcessDelegate, make_resource: MakeResource) -> None:
    stranger = await asyncio.create_subprocess_exec("sleep", "300", start_new_session=True)
    try:
        stat = procfs.read_stat(stranger.pid)
        assert stat is not None
        # A handle that names a live process, with the right start time, but without our markers.
        handle = {"pid": stranger.pid, "start_time": stat.start_time}
        resource = make_resource(SLEEP, handle=handle)
        assert await delegate.inspect(resource) is None
        await delegate.delete(resource, Live(LiveState.RUNNING, resource.spec_hash, handle=handle))
        assert running(stranger.pid, stat.start_time)
    finally:
        stranger.kill()
        await stranger.wait()


# --- adoption and watching --------------------------------------------------------------------------------

async def test_a_restarted_agent_adopts_its_processes_and_watches_them(
        delegate: ProcessDelegate, context: DelegateContext, make_resource: MakeResource, cleanup: Cleanup) -> None:
    resource = make_resource(SLEEP)
    live = await started(delegate, resource, cleanup)
    await delegate.close()  # the agent goes away; its processes stay
    assert running(*handle_of(live))

    restarted = ProcessDelegate(context)
    cleanup(restarted, resource)
    by_handle = await restarted.inspect(replace(resource, handle=live.handle))
    assert by_handle is not None
    assert (by_handle.state, by_handle.spec_hash, by_handle.handle) == (LiveState.RUNNING, resource.spec_hash,
                                                                         live.handle)
    # No handle (the agent died before recording it), or a stale one: found by its markers.
    stale = {"pid": live.handle["pid"], "start_time": live.handle["start_time"] + 1}
    for handle in ({}, stale):
        fresh = ProcessDelegate(context)
        cleanup(fresh, None)
        by_scan = await fresh.inspect(replace(resource, handle=handle))
        assert by_scan is not None
        assert by_scan.handle == live.handle
    assert (resource.id, by_handle) in [(rid, found) for rid, found in await restarted.list()]

    events = restarted.watch()
    next_event = asyncio.ensure_future(anext(events))
    await asyncio.sleep(0.05)
    assert not next_event.done()
    os.kill(handle_of(live)[0], signal.SIGKILL)
    assert await asyncio.wait_for(next_event, 2) == resource.id
    after = await restarted.inspect(resource)
    assert after is None or not after.healthy
    await restarted.close()
    assert [rid async for rid in events] == []  # close ends the watch


_AGENT = """
import asyncio, json, sys
from pathlib import Path
from khutulun.config import Timeouts
from khutulun.delegates import DelegateContext
from khutulun.delegates.process import ProcessDelegate
from khutulun.resources import Resource, ResourceId, spec_hash

async def main():
    host, data_dir, spec = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    delegate = ProcessDelegate(DelegateContext(host, data_dir, Timeouts()))
    resource = Resource(ResourceId("test", "svc", "web", 0), "process", host, spec, spec_hash(spec))
    print(json.dumps(dict((await delegate.apply(resource, None)).handle)))

asyncio.run(main())
"""


async def test_the_processes_of_an_agent_that_died_are_adopted(
        delegate: ProcessDelegate, context: DelegateContext, make_resource: MakeResource, cleanup: Cleanup) -> None:
    # Another OS process plays the agent: it starts the workload and exits, so the workload is an orphan
    # (reparented to PID 1), not a child of the agent that adopts it, as after a real restart.
    spec = sh("sleep 300 & sleep 301; true")
    resource = make_resource(spec)
    cleanup(delegate, resource)
    agent = await asyncio.create_subprocess_exec(sys.executable, "-c", _AGENT, context.host, str(context.data_dir),
                                                 json.dumps(spec), stdout=asyncio.subprocess.PIPE)
    out, _ = await agent.communicate()
    assert agent.returncode == 0
    handle = json.loads(out)
    pid = handle["pid"]
    stat = procfs.read_stat(pid)
    assert stat is not None and stat.ppid not in (os.getpid(), agent.pid)
    await eventually(lambda: len(members(pid)) == 2)

    by_handle = await delegate.inspect(replace(resource, handle=handle))
    by_scan = await delegate.inspect(resource)
    assert by_handle is not None and by_scan is not None
    assert by_handle.handle == by_scan.handle == handle
    assert by_handle.spec_hash == resource.spec_hash
    assert await delegate.apply(resource, by_scan) is by_scan  # adopted, not started twice
    assert [(rid, live.handle) for rid, live in await delegate.list()] == [(resource.id, handle)]

    events = delegate.watch()
    next_event = asyncio.ensure_future(anext(events))
    await asyncio.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    assert await asyncio.wait_for(next_event, 2) == resource.id
    await events.aclose()
    assert await delegate.inspect(replace(resource, handle=handle)) is None  # a zombie until PID 1 reaps it
    left = [(s.pid, s.start_time) for s in members(pid)]
    assert len(left) == 2  # its session lives on without it

    await delegate.delete(replace(resource, handle=handle), None)
    await eventually(lambda: not any(running(*member) for member in left))


async def test_watch_reports_a_killed_child_at_once_and_reaps_it(
        delegate: ProcessDelegate, make_resource: MakeResource, cleanup: Cleanup) -> None:
    resource = make_resource(SLEEP)
    live = await started(delegate, resource, cleanup)
    pid, _ = handle_of(live)
    events = delegate.watch()
    next_event = asyncio.ensure_future(anext(events))
    await asyncio.sleep(0.05)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    assert await asyncio.wait_for(next_event, 2) == resource.id
    assert time.monotonic() - killed < 0.5  # at once, not at the next reconcile (every second)
    assert procfs.read_stat(pid) is None  # reaped, not a zombie
    ended = await delegate.inspect(resource)
    assert ended is not None
    assert (ended.state, ended.exit_code, ended.message) == (LiveState.FAILED, 137, "was killed by SIGKILL")
    assert not ended.healthy
    await events.aclose()


async def test_watch_is_quiet_about_stops_the_delegate_makes(
        delegate: ProcessDelegate, make_resource: MakeResource, cleanup: Cleanup) -> None:
    resource = make_resource(SLEEP)
    live = await started(delegate, resource, cleanup)
    changed = make_resource({**SLEEP, "environment": {"V": "2"}})
    live = await started(delegate, changed, cleanup, live)
    await delegate.delete(changed, live)
    events = delegate.watch()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(events), 0.2)
    await events.aclose()


async def test_hosts_sharing_a_pid_namespace_keep_to_their_own_processes(
        delegate: ProcessDelegate, context: DelegateContext, make_resource: MakeResource, cleanup: Cleanup,
        tmp_path: Path) -> None:
    resource = make_resource(SLEEP)
    live = await started(delegate, resource, cleanup)
    other = ProcessDelegate(DelegateContext("another-host", tmp_path / "other", Timeouts()))
    cleanup(other, None)

    assert resource.id not in [rid for rid, _ in await other.list()]
    assert await other.inspect(resource) is None
    assert await other.inspect(replace(resource, handle=live.handle)) is None
    await other.delete(replace(resource, handle=live.handle), live)
    assert running(*handle_of(live))
    assert [rid for rid, _ in await delegate.list()] == [resource.id]


async def test_close_leaves_processes_running(delegate: ProcessDelegate, make_resource: MakeResource,
                                              cleanup: Cleanup) -> None:
    live = await started(delegate, make_resource(SLEEP), cleanup)
    await delegate.close()
    await asyncio.sleep(0.05)
    assert running(*handle_of(live))


# --- logs -------------------------------------------------------------------------------------------------

async def collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


async def test_logs_whole_and_tail(delegate: ProcessDelegate, make_resource: MakeResource, cleanup: Cleanup) -> None:
    resource = make_resource(sh("for i in 1 2 3 4 5; do echo line$i; done; exec sleep 300"))
    await started(delegate, resource, cleanup)
    log = delegate.log_path(resource.id)
    await eventually(lambda: log.read_bytes().endswith(b"line5\n"))
    assert await collect(delegate.logs(resource)) == b"line1\nline2\nline3\nline4\nline5\n"
    assert await collect(delegate.logs(resource, tail=2)) == b"line4\nline5\n"
    assert await collect(delegate.logs(resource, tail=0)) == b""
    assert await collect(delegate.logs(resource, tail=99)) == b"line1\nline2\nline3\nline4\nline5\n"
    with log.open("ab") as f:
        f.write(b"no newline at the end")
    assert await collect(delegate.logs(resource, tail=2)) == b"line5\nno newline at the end"


async def test_logs_of_a_resource_never_started_are_empty(delegate: ProcessDelegate,
                                                          make_resource: MakeResource) -> None:
    assert await collect(delegate.logs(make_resource(SLEEP), tail=10)) == b""


async def test_logs_follow_a_running_process(delegate: ProcessDelegate, make_resource: MakeResource,
                                             cleanup: Cleanup) -> None:
    resource = make_resource(sh("i=0; while :; do i=$((i+1)); echo tick$i; sleep 0.05; done"))
    await started(delegate, resource, cleanup)
    received = bytearray()

    async def follow() -> None:
        async for chunk in delegate.logs(resource, follow=True, tail=1):
            received.extend(chunk)

    follower = asyncio.ensure_future(follow())
    try:
        await eventually(lambda: received.count(b"\n") >= 5)
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
    ticks = [int(line.removeprefix(b"tick")) for line in bytes(received).splitlines()[:5]]
    assert ticks == list(range(ticks[0], ticks[0] + 5))  # nothing lost, nothing repeated


async def test_logs_follow_a_file_that_is_truncated_or_recreated(delegate: ProcessDelegate,
                                                                  make_resource: MakeResource) -> None:
    resource = make_resource(SLEEP)
    log = delegate.log_path(resource.id)
    received = bytearray()

    async def follow() -> None:
        async for chunk in delegate.logs(resource, follow=True):
            received.extend(chunk)

    follower = asyncio.ensure_future(follow())
    try:
        await asyncio.sleep(0.05)
        log.parent.mkdir(parents=True)
        log.write_bytes(b"first line, long\n")  # appears after following started
        await eventually(lambda: bytes(received) == b"first line, long\n")
        log.write_bytes(b"truncated\n")  # opened with O_TRUNC: the same file, shorter
        await eventually(lambda: bytes(received).endswith(b"\ntruncated\n"))
        with log.open("ab") as f:
            f.write(b"last words\n")
        log.unlink()
        log.write_bytes(b"new file\n")
        await eventually(lambda: bytes(received).endswith(b"\nnew file\n"))
        assert bytes(received) == b"first line, long\ntruncated\nlast words\nnew file\n"
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower


# --- exec -------------------------------------------------------------------------------------------------

async def run(session: ExecSession) -> tuple[dict[str, bytes], int]:
    out: dict[str, bytes] = {"stdout": b"", "stderr": b""}
    async for stream, chunk in session.output():
        out[stream] += chunk
    return out, await session.wait()


async def test_exec_runs_next_to_the_process(delegate: ProcessDelegate, context: DelegateContext,
                                             make_resource: MakeResource, cleanup: Cleanup) -> None:
    resource = make_resource({**SLEEP, "environment": {"GREETING": "hello"}})
    await started(delegate, resource, cleanup)
    session = await delegate.exec(resource, ["sh", "-c", 'pwd; echo "$GREETING ${KHUTULUN_RESOURCE-unmarked}"; '
                                                         "echo oops >&2; exit 4"])
    out, code = await run(session)
    assert out == {"stdout": f"{context.data_dir}/work/test/svc/web.0\nhello unmarked\n".encode(),
                   "stderr": b"oops\n"}
    assert code == 4


async def test_exec_takes_input(delegate: ProcessDelegate, make_resource: MakeResource, cleanup: Cleanup) -> None:
    resource = make_resource(SLEEP)
    await started(delegate, resource, cleanup)
    session = await delegate.exec(resource, ["cat"])
    await session.write(b"ping\n" * 20000)  # more than a pipe holds: written as the command reads
    await session.close_stdin()
    out, code = await run(session)
    assert (out["stdout"], code) == (b"ping\n" * 20000, 0)
    with pytest.raises(DelegateError, match="input is closed"):
        await session.write(b"late")


async def test_exec_with_a_terminal(delegate: ProcessDelegate, make_resource: MakeResource,
                                    cleanup: Cleanup) -> None:
    resource = make_resource(SLEEP)
    await started(delegate, resource, cleanup)
    script = ("import os, sys; print('tty', os.isatty(0), os.isatty(1)); "
              "print('foreground', os.tcgetpgrp(0) == os.getpgrp()); "  # only with a controlling terminal
              "line = sys.stdin.readline(); print('got', line.strip()); print('size', *os.get_terminal_size(0))")
    session = await delegate.exec(resource, [sys.executable, "-c", script], tty=True)
    await session.resize(30, 100)
    await session.write(b"hello\n")
    out, code = await run(session)
    text = out["stdout"].decode()
    assert code == 0
    assert out["stderr"] == b""
    for line in ("tty True True\r\n", "foreground True\r\n", "got hello\r\n", "size 100 30\r\n"):
        assert line in text


async def test_exec_with_a_terminal_ends_input_with_eof(delegate: ProcessDelegate, make_resource: MakeResource,
                                                        cleanup: Cleanup) -> None:
    resource = make_resource(SLEEP)
    await started(delegate, resource, cleanup)
    session = await delegate.exec(resource, ["cat"], tty=True)
    await session.write(b"abc\n")
    await session.close_stdin()
    out, code = await run(session)
    assert code == 0
    assert out["stdout"].count(b"abc\r\n") == 2  # the terminal's echo, then cat's


@pytest.mark.parametrize("tty", [False, True])
async def test_exec_kill(delegate: ProcessDelegate, make_resource: MakeResource, cleanup: Cleanup,
                         tty: bool) -> None:
    resource = make_resource(SLEEP)
    await started(delegate, resource, cleanup)
    session = await delegate.exec(resource, ["sh", "-c", "sleep 300 & sleep 300"], tty=tty)
    await asyncio.sleep(0.05)
    await session.kill()
    start = time.monotonic()
    assert await asyncio.wait_for(session.wait(), 3) == 137
    assert time.monotonic() - start < 1.5


async def test_exec_does_not_wait_for_background_processes_that_keep_its_output(
        delegate: ProcessDelegate, make_resource: MakeResource, cleanup: Cleanup) -> None:
    resource = make_resource(SLEEP)
    await started(delegate, resource, cleanup)
    session = await delegate.exec(resource, ["sh", "-c", "sleep 300 & echo $!"])
    start = time.monotonic()
    out, code = await asyncio.wait_for(run(session), 5)
    background = int(out["stdout"])
    try:
        assert code == 0
        assert time.monotonic() - start < 3  # the output is let go a second after the command ended
    finally:
        stat = procfs.read_stat(background)
        if stat is not None and stat.comm == "sleep":
            os.kill(background, signal.SIGKILL)


async def test_exec_failures_are_named(delegate: ProcessDelegate, make_resource: MakeResource,
                                       cleanup: Cleanup) -> None:
    resource = make_resource(SLEEP)
    with pytest.raises(DelegateError, match=r"working directory '.*/work/test/svc/web.0' does not exist"):
        await delegate.exec(resource, ["true"])
    await started(delegate, resource, cleanup)
    for tty in (False, True):
        with pytest.raises(DelegateError, match=r"^cannot run 'no-such-command-x': No such file or directory$"):
            await delegate.exec(resource, ["no-such-command-x"], tty=tty)
    with pytest.raises(DelegateError, match="exec needs a command"):
        await delegate.exec(resource, [])


async def test_odd_node_names_make_safe_file_names_and_are_listed(
        delegate: ProcessDelegate, context: DelegateContext, make_resource: MakeResource, cleanup: Cleanup) -> None:
    resource = make_resource(SLEEP, node="../web/a b", index=2)
    live = await started(delegate, resource, cleanup)
    assert delegate.log_path(resource.id) == context.data_dir / "logs" / "test" / "svc" / "..%2Fweb%2Fa%20b.2.log"
    assert os.readlink(f"/proc/{handle_of(live)[0]}/cwd") == str(context.data_dir / "work/test/svc/..%2Fweb%2Fa%20b.2")
    assert [rid for rid, _ in await delegate.list()] == [resource.id]


def test_an_environment_without_markers_is_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between fork and exec a child shows the agent's environment under the pid and start time the workload
    will keep: a read then must not be remembered (it once hid a workload from every later inspect)."""
    delegate = ProcessDelegate(DelegateContext("h", tmp_path, Timeouts()))
    stat = procfs.ProcStat(pid=4242, comm="x", state="S", ppid=1, pgrp=4242, session=4242, start_time=99)
    answers = iter([{"PATH": "/bin"}, {"KHUTULUN_RESOURCE": "ns/svc/web/0", "KHUTULUN_HOST": "h"}])
    monkeypatch.setattr(procfs, "read_environ", lambda pid: next(answers))
    assert "KHUTULUN_RESOURCE" not in (delegate._environment(stat) or {})
    assert (delegate._environment(stat) or {}).get("KHUTULUN_RESOURCE") == "ns/svc/web/0"
    assert (delegate._environment(stat) or {}).get("KHUTULUN_RESOURCE") == "ns/svc/web/0"  # kept now
