"""Streams from a container engine's API (Podman's or Docker's) on its unix socket, read with asyncio.

The podman and docker libraries are synchronous: a followed log, an event stream or an interactive exec would
each hold a worker thread blocked in a read that nothing can cancel, and podman-py cannot hand out the raw
socket of an exec at all. The few endpoints that stream are therefore spoken here, directly: one HTTP/1.1
request per connection (``Connection: close``), its body decoded (chunked, sized or until close), and the
engines' multiplexed stdout/stderr framing taken apart. Everything else goes through the libraries.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import suppress
from typing import Any

from khutulun.delegates.base import ExecSession
from khutulun.errors import DelegateError

__all__ = ["EngineExecSession", "EngineResponse", "frames", "open_request"]

_CHUNK = 64 * 1024
_HEADER_LIMIT = 64 * 1024
_FRAME_HEADER = struct.Struct(">BxxxL")  # stream (0 stdin, 1 stdout, 2 stderr), 3 zero bytes, payload size
_STREAMS = {0: "stdout", 1: "stdout", 2: "stderr"}
_OUTPUT_DRAIN = 1.0
"""Seconds an exec session waits, once its command has exited, for its output to end (as LocalExecSession
does): a background process that inherited the command's output could keep it open for ever."""
_STATE_POLL = 0.1
_ANSWER_TIMEOUT = 60.0  # seconds to connect and get the status and headers (not the body, which may never end)


class EngineResponse:
    """The answer to one request: status and headers read, the body still to come (or, for an upgraded
    connection, the raw stream both ways)."""

    def __init__(self, status: int, headers: Mapping[str, str], reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, *, raw: bool) -> None:
        self.status = status
        self.headers = headers
        self.reader = reader
        self.writer = writer
        self._raw = raw

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The body, as it comes; it ends with the body (or, on a raw stream, when the engine closes it).

        Raises OSError when the connection breaks, ValueError for a body that is not chunked as it says.
        """
        if not self._raw and self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = await self.reader.readline()
                if not size_line:
                    return  # the connection ended mid-body: what came is all there is
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    return
                remaining = size
                while remaining:
                    data = await self.reader.read(min(remaining, _CHUNK))
                    if not data:
                        return
                    remaining -= len(data)
                    yield data
                await self.reader.readline()  # the CRLF that ends each chunk
        length = None if self._raw else self.headers.get("content-length")
        remaining = int(length) if length is not None else -1
        while remaining != 0:
            data = await self.reader.read(_CHUNK if remaining < 0 else min(remaining, _CHUNK))
            if not data:
                return
            if remaining > 0:
                remaining -= len(data)
            yield data

    async def error_message(self) -> str:
        """What an engine says in the body of an error answer (its JSON ``message``, or the text)."""
        body = b""
        with suppress(OSError, ValueError):  # what came before the body broke off is the message
            async for chunk in self.chunks():
                body += chunk
                if len(body) > _HEADER_LIMIT:
                    break
        text = body.decode(errors="replace").strip()
        with suppress(ValueError, AttributeError):
            message = json.loads(text).get("message")
            if isinstance(message, str) and message:
                return message
        return text or f"HTTP status {self.status}"

    async def close(self) -> None:
        self.writer.close()
        with suppress(OSError):
            await self.writer.wait_closed()


async def open_request(socket_path: str, method: str, path: str, *, body: Mapping[str, Any] | None = None,
                       upgrade: bool = False) -> EngineResponse:
    """Send one request on the engine's socket and read the answer's status and headers.

    Raises OSError when the socket does not answer, DelegateError for an answer that is not HTTP. An error
    status is returned, not raised: the caller knows what it means.
    """
    payload = json.dumps(body).encode() if body is not None else b""
    head = [f"{method} {path} HTTP/1.1", "Host: engine", f"Content-Length: {len(payload)}"]
    if body is not None:
        head.append("Content-Type: application/json")
    # A hijacked exec asks for the upgrade that both engines understand; everything else is one request per
    # connection, so that a body ends with the connection when the engine gives no length.
    head += ["Connection: Upgrade", "Upgrade: tcp"] if upgrade else ["Connection: close"]
    async with asyncio.timeout(_ANSWER_TIMEOUT):
        reader, writer = await asyncio.open_unix_connection(socket_path, limit=_HEADER_LIMIT)
        try:
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
            await writer.drain()
            raw_head = await reader.readuntil(b"\r\n\r\n")
        except BaseException:
            writer.close()
            raise
    try:
        status_line, *header_lines = raw_head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
    except (IndexError, ValueError):
        writer.close()
        raise DelegateError(f"the engine on {socket_path} answered {path} with something that is not HTTP: "
                            f"{raw_head[:80]!r}") from None
    headers = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    # After an upgrade (101, or 200 from engines that skip the formality) the connection is the raw stream.
    return EngineResponse(status, headers, reader, writer, raw=upgrade and status < 300)


async def frames(chunks: AsyncIterator[bytes]) -> AsyncGenerator[tuple[str, bytes], None]:
    """Take apart the engines' multiplexed stream: each frame is an 8-byte header (stream, size) and payload."""
    buffer = bytearray()
    async for chunk in chunks:
        buffer += chunk
        while len(buffer) >= _FRAME_HEADER.size:
            kind, size = _FRAME_HEADER.unpack_from(buffer)
            end = _FRAME_HEADER.size + size
            if len(buffer) < end:
                break
            if size:
                yield _STREAMS.get(kind, "stdout"), bytes(buffer[_FRAME_HEADER.size:end])
            del buffer[:end]


async def _raw(chunks: AsyncIterator[bytes]) -> AsyncGenerator[tuple[str, bytes], None]:
    async for chunk in chunks:
        yield "stdout", chunk


ExecState = Callable[[], Awaitable[tuple[bool, int | None]]]
"""Asks the engine whether the exec still runs, and its exit code once it has ended."""


class EngineExecSession(ExecSession):
    """A command that an engine runs in a container, attached through a hijacked connection.

    Its output is read as it comes, into a queue, so the command never blocks on a full socket even when
    nobody reads ``output()``. ``wait()`` must be called (after ``kill()`` if need be): it closes the connection.
    """

    def __init__(self, response: EngineResponse, *, tty: bool, state: ExecState,
                 resize: Callable[[int, int], Awaitable[None]], kill: Callable[[], Awaitable[None]]) -> None:
        self._response = response
        self._tty = tty
        self._state = state
        self._resize = resize
        self._kill = kill
        self._input_open = True
        self._finished = False
        self._queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        # Owned by the session: wait() awaits it, or cancels it once the command has ended.
        stream = _raw if self._tty else frames
        try:
            async for item in stream(self._response.chunks()):
                self._queue.put_nowait(item)
        except OSError:
            pass  # the connection broke: the output ends here, and wait() asks the engine for the exit code
        finally:
            self._queue.put_nowait(None)

    async def write(self, data: bytes) -> None:
        if not self._input_open or self._finished:
            raise DelegateError("the command's input is closed")
        try:
            self._response.writer.write(data)
            await self._response.writer.drain()
        except OSError as e:
            raise DelegateError(f"cannot write to the command's input: {e.strerror or e}") from e

    async def close_stdin(self) -> None:
        if not self._input_open or self._finished:
            return
        if self._tty:
            # Closing a terminal's input would hang it up; a program reading it sees ^D as end of file.
            await self.write(b"\x04")
        else:
            with suppress(OSError):
                self._response.writer.write_eof()  # half-close: the engine closes the command's stdin
        self._input_open = False

    async def output(self) -> AsyncGenerator[tuple[str, bytes], None]:
        while (item := await self._queue.get()) is not None:
            yield item
        self._queue.put_nowait(None)  # for a second reader, or a later call

    async def wait(self) -> int:
        try:
            while not self._reader.done():
                done, _ = await asyncio.wait({self._reader}, timeout=_STATE_POLL * 2)
                if done:
                    break
                running, _ = await self._state()
                if not running:
                    await asyncio.wait({self._reader}, timeout=_OUTPUT_DRAIN)
                    break
            while True:  # the output can end a moment before the engine records the exit code
                running, exit_code = await self._state()
                if not running:
                    return exit_code if exit_code is not None else -1
                await asyncio.sleep(_STATE_POLL)
        finally:
            await self._finish()

    async def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._reader.cancel()
        with suppress(asyncio.CancelledError):
            await self._reader
        await self._response.close()

    async def resize(self, rows: int, columns: int) -> None:
        if self._tty and not self._finished:
            await self._resize(rows, columns)

    async def kill(self) -> None:
        if not self._finished:
            await self._kill()
