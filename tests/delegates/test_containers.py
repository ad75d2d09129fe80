"""What the podman and docker delegates share, without a runtime: names, labels, specs, states, and the streams
of ``_enginehttp`` against a fake engine on a unix socket."""

from __future__ import annotations

import asyncio
import json
import re
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from khutulun.config import Timeouts
from khutulun.delegates import DelegateContext
from khutulun.delegates._containerdelegate import ContainerDelegate, _LogLine
from khutulun.delegates._containers import (
    ContainerSpec,
    Engine,
    EngineContainer,
    Mount,
    Port,
    container_labels,
    container_name,
    parse_engine_time,
)
from khutulun.delegates._enginehttp import frames, open_request
from khutulun.errors import DelegateError
from khutulun.resources import LiveState, Resource, ResourceId, spec_hash

ENGINE_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")  # what Podman and Docker accept
PORT: dict[str, Any] = {"name": "endpoint", "host_address": "127.0.0.1", "host_port": 23456, "container_port": 8080,
                        "protocol": "tcp"}
DOCUMENTED: dict[str, Any] = {  # the example in docs/delegate-specs.md
    "image": "localhost/web:1.0",
    "image_archive": "/srv/khutulun/namespaces/ns/services/svc/artifacts/3f2a.tar",
    "rootfs_archive": None,
    "command": ["httpd", "-f", "-p", "8080", "-h", "/www"],
    "environment": {"KHUTULUN_ENDPOINT_PORT": "23456"},
    "ports": [PORT],
    "mounts": [{"source": "/var/lib/khutulun/directory/directories/ns/svc/site.0", "target": "/www",
                "read_only": False}],
    "cpus": 0.5,
    "memory": 67108864,
    "stop_timeout": 10.0,
}


def parse(spec: dict[str, Any]) -> ContainerSpec:
    return ContainerSpec.parse(Resource(ResourceId("ns", "svc", "web", 0), "podman", "h", spec, spec_hash(spec)), 7.0)


# --- names and labels --------------------------------------------------------------------------------------------

def test_a_plain_name_reads_as_the_resource() -> None:
    assert container_name(ResourceId("default", "shop", "web_frontend", 2)) == "khutulun-default-shop-web_frontend-2"
    assert container_name(ResourceId("default", "shop", "web-front", 0)) == "khutulun-default-shop-web-front-0"


def test_a_name_that_could_be_another_resources_gets_a_digest() -> None:
    replaced = container_name(ResourceId("default", "shop", "web server", 0))
    assert re.fullmatch(r"khutulun-default-shop-web_server-0-[0-9a-f]{8}", replaced)
    assert replaced != container_name(ResourceId("default", "shop", "web_server", 0))
    # A dash in the namespace or service could move the boundary between them: "a-b"/"c" is not "a"/"b-c".
    assert container_name(ResourceId("a-b", "c", "web", 0)) != container_name(ResourceId("a", "b-c", "web", 0))
    long = container_name(ResourceId("ns", "svc", "n" * 300, 0))
    assert len(long) == 128 and ENGINE_NAME.match(long)


node_names = st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=80)
part_names = st.from_regex(r"\A[a-z0-9]([a-z0-9._-]{0,10}[a-z0-9])?\Z")


@given(st.lists(st.builds(ResourceId, part_names, part_names, node_names, st.integers(0, 1000)), min_size=2,
                max_size=8, unique=True))
def test_names_are_valid_for_the_engines_and_never_shared(ids: list[ResourceId]) -> None:
    names = [container_name(rid) for rid in ids]
    assert all(ENGINE_NAME.match(name) and len(name) <= 128 for name in names), names
    assert len(set(names)) == len(names)


def test_the_labels_say_whose_it_is() -> None:
    assert container_labels(ResourceId("ns", "svc", "web/a", 3), "host-1", "abc") == {
        "khutulun.resource": "ns/svc/web/a/3", "khutulun.spec-hash": "abc", "khutulun.host": "host-1",
        "khutulun.namespace": "ns", "khutulun.service": "svc", "khutulun.node": "web/a", "khutulun.instance": "3"}


# --- the spec ------------------------------------------------------------------------------------------------

def test_the_documented_spec_parses() -> None:
    spec = parse(DOCUMENTED)
    assert spec.ports == (Port("endpoint", "127.0.0.1", 23456, 8080, "tcp"),)
    assert spec.mounts == (Mount("/var/lib/khutulun/directory/directories/ns/svc/site.0", "/www", False),)
    assert (spec.cpus, spec.memory, spec.stop_timeout) == (0.5, 67108864, 10.0)
    assert spec.archive == DOCUMENTED["image_archive"]
    assert parse({"image": "x"}) == ContainerSpec("x", None, None, None, {}, (), (), None, None, 7.0)


@pytest.mark.parametrize(("changes", "problem"), [
    ({"registry": "docker.io"}, "unknown keys ['registry']"),
    ({"image": ""}, "'image' must be an image reference"),
    ({"rootfs_archive": "/r.tar"}, "give 'image_archive' or 'rootfs_archive', not both"),
    ({"image_archive": "relative.tar"}, "'image_archive' must be an absolute path or null"),
    ({"command": []}, "'command' must be a non-empty list of strings or null"),
    ({"environment": {"A=B": "c"}}, "is not a name (without '=') and a string"),
    ({"ports": [{**PORT, "host_port": 0}]}, "'host_port' and 'container_port' must be ports"),
    ({"ports": [{**PORT, "protocol": "sctp"}]}, "'protocol' must be tcp or udp"),
    ({"ports": [PORT, {**PORT, "name": "again"}]},
     "127.0.0.1:23456/tcp is published twice"),
    ({"ports": [{**PORT, "hostPort": 1}]}, "has unknown keys ['hostPort']"),
    ({"mounts": [{"source": "rel", "target": "/x"}]}, "a mount's 'source' and 'target' must be absolute paths"),
    ({"mounts": [{"source": "/a", "target": "/x", "read_only": "yes"}]}, "'read_only' must be true or false"),
    ({"cpus": 0}, "'cpus' must be a number of CPUs above 0"),
    ({"memory": True}, "'memory' must be a number of bytes above 0"),
    ({"stop_timeout": -1}, "'stop_timeout' must be a number of seconds (0 or more)"),
])
def test_a_spec_that_is_not_valid_names_each_problem(changes: dict[str, Any], problem: str) -> None:
    with pytest.raises(DelegateError) as failed:
        parse({**DOCUMENTED, **changes})
    assert failed.value.message.startswith("the container spec of ns/svc/web/0 is not valid: ")
    assert problem in failed.value.message


# --- what the engines say ------------------------------------------------------------------------------------

def test_engine_times() -> None:
    assert parse_engine_time("2026-11-22T00:28:43.207488621Z") == pytest.approx(1795307323.2074886)
    assert parse_engine_time("2026-11-22T01:28:43+01:00") == 1795307323.0
    assert parse_engine_time("0001-01-01T00:00:00Z") is None
    assert parse_engine_time(1795307322) == 1795307322.0
    assert parse_engine_time(-62135596800) is None
    assert parse_engine_time("yesterday") is None


def container(state: str, exit_code: int | None = 0, **changes: Any) -> EngineContainer:
    fields: dict[str, Any] = {"id": "c1", "name": "khutulun-x", "labels": {"khutulun.spec-hash": "h"},
                              "state": state, "exit_code": exit_code, "started_at": 5.0, "finished_at": None,
                              "error": "", "oom_killed": False, "image_id": "i", **changes}
    return EngineContainer(**fields)


@pytest.mark.parametrize(("found", "state", "message"), [
    (container("running", None), LiveState.RUNNING, ""),
    (container("exited", 0), LiveState.STOPPED, "exited with code 0"),
    (container("exited", 3), LiveState.FAILED, "exited with code 3"),
    (container("exited", 137), LiveState.FAILED, "was killed by SIGKILL (exit code 137)"),
    (container("exited", 137, oom_killed=True), LiveState.FAILED,
     "was killed by SIGKILL (exit code 137) (it used more memory than its limit)"),
    (container("created", 0), LiveState.STOPPED, "was created and never started"),
    (container("created", 0, error="port is taken"), LiveState.FAILED, "was created and never started: port is taken"),
    (container("paused", None), LiveState.FAILED, "is paused"),
])
def test_a_containers_state_as_the_agent_sees_it(found: EngineContainer, state: LiveState, message: str) -> None:
    live = found.live()
    assert (live.state, live.message, live.spec_hash) == (state, message, "h")
    assert live.handle == {"id": "c1", "name": "khutulun-x"}


# --- streams -------------------------------------------------------------------------------------------------

def frame(stream: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxL", stream, len(payload)) + payload


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_frames_are_taken_apart_wherever_the_chunks_split_them() -> None:
    data = frame(1, b"out\n") + frame(2, b"err\n") + frame(1, b"") + frame(1, b"more")
    for cut in range(len(data)):
        assert [f async for f in frames(chunks(data[:cut], data[cut:]))] == [
            ("stdout", b"out\n"), ("stderr", b"err\n"), ("stdout", b"more")]


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    """``await engine(handler)``: a fake engine answering on a unix socket; its path."""
    servers: list[asyncio.Server] = []

    async def serve(handler: Handler) -> str:
        path = str(tmp_path / f"engine{len(servers)}.sock")
        servers.append(await asyncio.start_unix_server(handler, path))
        return path

    yield serve
    for server in servers:
        server.close()
        await server.wait_closed()


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, *body: bytes) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(head)
    for part in body:
        writer.write(part)
        await writer.drain()
    writer.close()


async def test_a_chunked_body_is_decoded(engine: Callable[[Handler], Awaitable[str]]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await answer(reader, writer, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                     b"5\r\nhello\r\n", b"6;ext=1\r\n world\r\n", b"0\r\n\r\n")

    response = await open_request(await engine(handler), "GET", "/logs")
    try:
        assert response.status == 200
        assert b"".join([c async for c in response.chunks()]) == b"hello world"
    finally:
        await response.close()


async def test_an_error_answer_gives_the_engines_message(engine: Callable[[Handler], Awaitable[str]]) -> None:
    body = b'{"cause": "no such container", "message": "no container with name or ID \\"x\\" found"}'

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await answer(reader, writer, b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n" % len(body), body)

    response = await open_request(await engine(handler), "GET", "/containers/x/logs")
    try:
        assert response.status == 404
        assert await response.error_message() == 'no container with name or ID "x" found'
    finally:
        await response.close()


async def test_an_upgraded_connection_is_raw_both_ways(engine: Callable[[Handler], Awaitable[str]]) -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"Content-Length: (\d+)", request)
        assert length is not None
        seen.append(request + await reader.readexactly(int(length[1])))
        writer.write(b"HTTP/1.1 101 UPGRADED\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n")
        seen.append(await reader.read())  # until the client half-closes: its stdin ended
        writer.write(frame(1, b"echoed: " + seen[-1]))
        writer.close()

    response = await open_request(await engine(handler), "POST", "/exec/1/start", body={"Detach": False},
                                  upgrade=True)
    try:
        response.writer.write(b"input")
        response.writer.write_eof()
        assert [f async for f in frames(response.chunks())] == [("stdout", b"echoed: input")]
    finally:
        await response.close()
    assert b"Upgrade: tcp" in seen[0] and seen[0].endswith(b'{"Detach": false}')


async def test_an_answer_that_is_not_http_is_an_error(engine: Callable[[Handler], Awaitable[str]]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await answer(reader, writer, b"SSH-2.0-OpenSSH\r\n\r\n")

    with pytest.raises(DelegateError, match="something that is not HTTP"):
        await open_request(await engine(handler), "GET", "/_ping")


# --- watch, against a fake engine ------------------------------------------------------------------------------

class FakeEngine(Engine):
    """Only the event stream is real (a unix socket that a test serves); nothing else is called."""

    runtime = "Fake"
    died_event = "die"

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.paths: list[str] = []

    def events_path(self, label: str, since: float | None) -> str:
        self.paths.append(f"/events?label={label}&since={since}")
        return self.paths[-1]

    def close(self) -> None:
        pass

    # Nothing else is called: each raises.
    def containers(self, label: str | None) -> list[EngineContainer]:
        raise AssertionError

    def container(self, container_id: str) -> EngineContainer | None:
        raise AssertionError

    def create(self, name: str, labels: Mapping[str, str], spec: ContainerSpec) -> str:
        raise AssertionError

    def start(self, container_id: str) -> None:
        raise AssertionError

    def stop(self, container_id: str, timeout: int) -> None:
        raise AssertionError

    def remove(self, container_id: str) -> None:
        raise AssertionError

    def image_id(self, reference: str) -> str | None:
        raise AssertionError

    def load_image(self, archive: Path) -> list[str]:
        raise AssertionError

    def import_image(self, archive: Path, reference: str) -> None:
        raise AssertionError

    def remove_image(self, reference: str) -> bool:
        raise AssertionError

    def exec_create(self, container_id: str, argv: Sequence[str], *, tty: bool) -> str:
        raise AssertionError

    def exec_state(self, exec_id: str) -> tuple[bool, int | None, int]:
        raise AssertionError

    def exec_resize(self, exec_id: str, rows: int, columns: int) -> None:
        raise AssertionError


class FakeDelegate(ContainerDelegate):
    name = "fake"

    def __init__(self, context: DelegateContext, engine: Engine) -> None:
        super().__init__(context)
        self.fake = engine

    async def _connect(self) -> Engine:
        return self.fake


def event(action: str, host: str, resource: str, container_id: str = "c1") -> bytes:
    line = json.dumps({"Action": action, "id": container_id, "Actor": {"ID": container_id, "Attributes": {
        "khutulun.host": host, "khutulun.resource": resource}}}).encode() + b"\n"
    return b"%x\r\n%s\r\n" % (len(line), line)


async def test_watch_opens_a_broken_stream_again_and_reports_only_this_hosts_deaths(
        engine: Callable[[Handler], Awaitable[str]], tmp_path: Path) -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        if connections == 1:
            writer.write(b"zz\r\n")  # not a chunk size: the stream is broken
        else:
            writer.write(event("die", "elsewhere", "ns/svc/web/0") + event("start", "h", "ns/svc/web/0")
                         + event("die", "h", "ns/svc/web/1", "c2"))
        await writer.drain()
        if connections > 1:
            await reader.read()  # hold the stream open until the delegate lets go
        writer.close()

    fake = FakeEngine(await engine(handler))
    delegate = FakeDelegate(DelegateContext("h", tmp_path / "data", Timeouts()), fake)
    await delegate.start()
    events = delegate.watch()
    try:
        assert await asyncio.wait_for(anext(events), 5.0) == ResourceId("ns", "svc", "web", 1)
        assert connections == 2 and fake.paths[0].endswith("since=None") and "since=None" not in fake.paths[1]
    finally:
        await delegate.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(events), 5.0)


# --- a followed log across a restart, against a fake engine ------------------------------------------------------

def test_log_lines_lose_their_stamp() -> None:
    parsed = _LogLine.parse("stdout", b"2026-11-22T03:05:52Z two words\n")
    assert (parsed.stamp, parsed.payload) == (1795316752.0, b"two words\n")
    assert _LogLine.parse("stderr", b"2026-11-22T03:05:52.970855860Z \n").payload == b"\n"
    assert _LogLine.parse("stdout", b"no stamp here\n") == _LogLine("stdout", None, b"no stamp here\n")
    paths = RestartingEngine("/no.sock", "h", ResourceId("ns", "svc", "web", 0))
    assert paths.logs_path("c1", follow=True, tail=None, since=None) == \
        "/containers/c1/logs?stdout=true&stderr=true&timestamps=true&follow=true&tail=-1"
    assert paths.logs_path("c1", follow=False, tail=5, since=1.5, until=2.25).endswith(
        "&follow=false&tail=5&since=1.500000&until=2.250000")


class RestartingEngine(FakeEngine):
    """One container that ran, stopped and runs again; its logs as Podman gives them, stamped to the second."""

    log_stamp_resolution = 1.0
    api_prefix = ""

    def __init__(self, socket_path: str, host: str, rid: ResourceId) -> None:
        super().__init__(socket_path)
        self.labels = container_labels(rid, host, "h")
        self.restarted = False

    def _container(self) -> EngineContainer:
        run = {"started_at": 40.9, "finished_at": 40.8} if self.restarted else {"started_at": 40.1}
        return container("running", None, labels=self.labels, **run)

    def containers(self, label: str | None) -> list[EngineContainer]:
        return [self._container()]

    def container(self, container_id: str) -> EngineContainer | None:
        return self._container()



def stamped(stream: int, second: int, line: bytes) -> bytes:
    payload = b"1970-01-01T00:00:%02dZ %s" % (second, line)
    return struct.pack(">BxxxL", stream, len(payload)) + payload


async def test_a_followed_log_gives_each_line_of_a_quick_restart_once(
        engine: Callable[[Handler], Awaitable[str]], tmp_path: Path) -> None:
    # The old run wrote "one" and "three" (at 40.2 and 40.7, both stamped 40) and ended at 40.8; the new run
    # started at 40.9 and wrote "one" (40.95, stamped 40) and "two" (41.1). The old run's stream ended late, with
    # the new run's first line in it: the stream of the new run must not give that line again, and the old
    # run's own "one", stamped as the new one is, must stay.
    old_run = [stamped(1, 40, b"one\n"), stamped(1, 40, b"three\n")]
    logs = "/containers/c1/logs?stdout=true&stderr=true&timestamps=true"
    answers = {f"{logs}&follow=true&tail=-1": [*old_run, stamped(1, 40, b"one\n")],
               f"{logs}&follow=false&tail=-1&since=40.000000&until=40.850000": old_run,
               f"{logs}&follow=true&tail=-1&since=40.850000": [stamped(1, 40, b"one\n"), stamped(2, 41, b"two\n")]}

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = (await reader.readuntil(b"\r\n\r\n")).split()[1].decode()
        fake.restarted = True  # by the time any stream ends
        body = b"".join(answers.pop(request))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    rid = ResourceId("ns", "svc", "web", 0)
    fake = RestartingEngine(await engine(handler), "h", rid)
    delegate = FakeDelegate(DelegateContext("h", tmp_path / "data", Timeouts()), fake)
    await delegate.start()
    resource = Resource(rid, "fake", "h", {}, "h", handle={"id": "c1"})
    followed = delegate.logs(resource, follow=True)
    try:
        lines = [await asyncio.wait_for(anext(followed), 5.0) for _ in range(4)]
        assert b"".join(lines) == b"one\nthree\none\ntwo\n" and not answers
    finally:
        await followed.aclose()
        await delegate.close()
