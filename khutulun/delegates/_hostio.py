"""Plumbing for delegates that run things directly on this host: waiting on pidfds, log files, exec sessions.

Kept apart from the process delegate because none of it knows about resources, and the next delegate that
starts local commands (an nspawn machine's ``exec``, a unit's log file) needs the same parts.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import termios
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from typing import IO, BinaryIO

from khutulun.delegates.base import ExecSession
from khutulun.errors import DelegateError

__all__ = [
    "LocalExecSession", "ended_within", "exit_status", "follow_file", "start_exec", "tail_offset", "wait_readable",
]

_CHUNK = 64 * 1024
_OUTPUT_DRAIN = 1.0
"""Seconds an exec session waits, once its command has exited, for the output to reach its end. A background
process that inherited the pipes or the terminal could keep them open for ever; the session does not wait
for it."""


def exit_status(returncode: int) -> tuple[int, str]:
    """A ``Popen.returncode`` as a shell would report it (128 + n for signal n), and in words."""
    if returncode >= 0:
        return returncode, f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return 128 - returncode, f"was killed by {name}"


async def wait_readable(fd: int) -> None:
    """Wait until ``fd`` is readable; for a pidfd, until its process has ended."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if poller.poll(0):  # already readable: answer without suspending, so even a deadline of 0 lets it through
        return
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, _set_done, ready)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def ended_within(pidfd: int, seconds: float) -> bool:
    """Whether the process behind ``pidfd`` ends within ``seconds``."""
    try:
        async with asyncio.timeout(seconds):
            await wait_readable(pidfd)
    except TimeoutError:
        return False
    return True


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# --- log files ---------------------------------------------------------------------------------------------

def tail_offset(f: BinaryIO, lines: int, start: int = 0) -> int:
    """Where the last ``lines`` lines of ``f`` begin, looking no further back than ``start``.

    A newline at the very end closes the last line rather than starting an empty one, as ``tail -n`` counts.
    """
    end = f.seek(0, os.SEEK_END)
    if lines <= 0 or end <= start:
        return end
    f.seek(end - 1)
    pos = end - 1 if f.read(1) == b"\n" else end
    found = 0
    while pos > start:
        size = min(_CHUNK, pos - start)
        pos -= size
        f.seek(pos)
        chunk = f.read(size)
        index = len(chunk)
        while (index := chunk.rfind(b"\n", 0, index)) >= 0:
            found += 1
            if found == lines:
                return pos + index + 1
    return start


def _open(path: Path) -> BinaryIO | None:
    try:
        return path.open("rb")
    except FileNotFoundError:
        return None


def _replaced(path: Path, f: BinaryIO) -> bool:
    """True when ``path`` now names another file than ``f`` (it was removed and written anew)."""
    try:
        now = path.stat()
    except FileNotFoundError:
        return False  # gone for now: keep what is open and wait for a new one to appear
    was = os.fstat(f.fileno())
    return (now.st_dev, now.st_ino) != (was.st_dev, was.st_ino)


def _truncated(f: BinaryIO) -> bool:
    return os.fstat(f.fileno()).st_size < f.tell()


async def follow_file(path: Path, *, follow: bool = False, tail: int | None = None,
                      poll_interval: float = 0.2) -> AsyncGenerator[bytes, None]:
    """The bytes of a file, in chunks: the last ``tail`` lines or all of it, then (``follow``) what is added.

    Following polls, as ``tail -F`` does: the file may be truncated (read again from its start) or removed
    and created again (the rest of the old one is read, then the new one from its start). It ends when the
    caller stops iterating or is cancelled. A file that does not exist yet reads as empty.
    """
    f = _open(path)
    try:
        if f is not None and tail is not None:
            f.seek(tail_offset(f, tail))
        while True:
            if f is not None:
                while chunk := f.read(_CHUNK):
                    yield chunk
            if not follow:
                return
            await asyncio.sleep(poll_interval)
            if f is None:
                f = _open(path)
            elif _replaced(path, f):
                while chunk := f.read(_CHUNK):
                    yield chunk
                f.close()
                f = _open(path)
            elif _truncated(f):
                f.seek(0)
    finally:
        if f is not None:
            f.close()


# --- exec sessions -----------------------------------------------------------------------------------------

def _take_controlling_terminal() -> None:  # pragma: no cover - runs in the child, between fork and exec
    # The child is already a session leader (start_new_session runs before this); its stdin is the pty's
    # slave, opened by the parent, so it must claim it as its controlling terminal explicitly. Only a system
    # call here: nothing that could need a lock another thread of the agent held at fork time.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


async def start_exec(argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], tty: bool) -> LocalExecSession:
    """Start ``argv`` as a new session (so that ``kill`` reaches everything it starts), with pipes or a pty."""
    if not argv or not all(isinstance(a, str) and "\0" not in a for a in argv) or not argv[0]:
        raise DelegateError(f"exec needs a command: a non-empty list of strings, not {list(argv)!r}")
    command = list(argv)
    try:
        if tty:
            master, slave = pty.openpty()
            try:
                popen = _spawn(command, cwd, env, stdio=slave)
            except BaseException:
                os.close(master)
                raise
            finally:
                os.close(slave)  # the child has its copies; ours would keep the terminal from ever hanging up
            return LocalExecSession(popen, stdin=master, outputs={master: "stdout"}, tty=True)
        popen = _spawn(command, cwd, env, stdio=None)
    except OSError as e:
        where = f" in {str(cwd)!r}" if e.filename == str(cwd) else ""
        raise DelegateError(f"cannot run {command[0]!r}{where}: {e.strerror}") from e
    assert popen.stdin is not None and popen.stdout is not None and popen.stderr is not None
    return LocalExecSession(popen, stdin=popen.stdin.fileno(),
                            outputs={popen.stdout.fileno(): "stdout", popen.stderr.fileno(): "stderr"},
                            tty=False, files=(popen.stdin, popen.stdout, popen.stderr))


def _spawn(command: list[str], cwd: Path, env: Mapping[str, str], *, stdio: int | None) -> subprocess.Popen[bytes]:
    """Fork and exec: quick enough to do on the event loop's thread, as asyncio's own subprocesses do."""
    if stdio is None:
        return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=cwd, env=dict(env), start_new_session=True, close_fds=True)
    return subprocess.Popen(command, stdin=stdio, stdout=stdio, stderr=stdio, cwd=cwd, env=dict(env),
                            start_new_session=True, close_fds=True,
                            preexec_fn=_take_controlling_terminal)  # noqa: PLW1509 - see that function


def _eof_character(fd: int) -> bytes:
    special = termios.tcgetattr(fd)[6]
    eof = special[termios.VEOF] if isinstance(special, list) else b"\x04"
    return bytes([eof]) if isinstance(eof, int) else eof


class LocalExecSession(ExecSession):
    """A command started by :func:`start_exec`, driven by the event loop's readers on its descriptors.

    Output is read as soon as it comes, into a queue, so the command never blocks on a full pipe even when
    nobody reads ``output()`` (``wait()`` then cannot deadlock). Callers must ``wait()`` (after ``kill()`` if
    need be): that reaps the command and closes the descriptors.
    """

    def __init__(self, popen: subprocess.Popen[bytes], *, stdin: int, outputs: Mapping[int, str], tty: bool,
                 files: Sequence[IO[bytes]] = ()) -> None:
        self._loop = asyncio.get_running_loop()
        self._popen = popen
        self._tty = tty
        self._stdin = stdin  # for a terminal, its master: input, output and size all go through it
        self._input_open = True
        self._files = tuple(files)  # pipes, closed through their file objects; a pty's master is a bare fd
        self._streams = len(outputs)
        self._open = dict(outputs)
        self._queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()
        self._ended = 0
        self._streams_done = asyncio.Event()
        self._exited: asyncio.Future[int] = self._loop.create_future()
        self._finished = False
        self._let_go: asyncio.TimerHandle | None = None
        for fd, name in outputs.items():
            os.set_blocking(fd, False)
            self._loop.add_reader(fd, self._on_output, fd, name)
        os.set_blocking(stdin, False)
        self._pidfd = os.pidfd_open(popen.pid)  # an unreaped child: its pid cannot be gone yet
        self._loop.add_reader(self._pidfd, self._on_exit)

    def _on_output(self, fd: int, name: str) -> bool:
        """Read what there is; False once there is nothing now (the stream may have ended)."""
        try:
            data = os.read(fd, _CHUNK)
        except BlockingIOError:
            return False
        except OSError:
            data = b""  # EIO from a pty's master: every copy of the slave is closed, the terminal hung up
        if data:
            self._queue.put_nowait((name, data))
            return True
        self._end_stream(fd)
        return False

    def _end_stream(self, fd: int) -> None:
        if self._open.pop(fd, None) is not None:
            self._loop.remove_reader(fd)
            self._queue.put_nowait(None)
            if not self._open:
                self._streams_done.set()

    def _on_exit(self) -> None:
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        returncode = self._popen.poll()  # reaps it: the pidfd says it has ended
        if returncode is None:  # pragma: no cover - a pidfd is readable only once the process has ended
            returncode = self._popen.wait()
        self._exited.set_result(returncode)
        if self._open:
            self._let_go = self._loop.call_later(_OUTPUT_DRAIN, self._end_output)

    def _end_output(self) -> None:
        """End the output streams that are still open, with what can be read from them now."""
        for fd, name in list(self._open.items()):
            while self._on_output(fd, name):
                pass
            self._end_stream(fd)

    async def write(self, data: bytes) -> None:
        if not self._input_open or self._finished:
            raise DelegateError("the command's input is closed")
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._stdin, view):]
            except BlockingIOError:
                await self._writable(self._stdin)
            except OSError as e:
                raise DelegateError(f"cannot write to the command's input: {e.strerror}") from e

    async def _writable(self, fd: int) -> None:
        ready: asyncio.Future[None] = self._loop.create_future()
        self._loop.add_writer(fd, _set_done, ready)
        try:
            await ready
        finally:
            self._loop.remove_writer(fd)

    async def close_stdin(self) -> None:
        if not self._input_open or self._finished:
            return
        if self._tty:
            # Closing a pty's master would hang up the terminal; end of input on a terminal is its EOF
            # character (^D), which a program reading in canonical mode sees as end of file.
            await self.write(_eof_character(self._stdin))
        else:
            self._files[0].close()
        self._input_open = False

    async def output(self) -> AsyncGenerator[tuple[str, bytes], None]:
        while self._ended < self._streams:
            item = await self._queue.get()
            if item is None:
                self._ended += 1
            else:
                yield item

    async def wait(self) -> int:
        returncode = await asyncio.shield(self._exited)
        await self._streams_done.wait()  # soon: at the latest _OUTPUT_DRAIN after the exit
        self._finish()
        return exit_status(returncode)[0]

    def _finish(self) -> None:
        if self._finished:  # a second wait(), perhaps a concurrent one
            return
        if self._let_go is not None:
            self._let_go.cancel()
        self._finished = True
        if self._tty:
            os.close(self._stdin)
        else:
            for f in self._files:
                f.close()

    async def resize(self, rows: int, columns: int) -> None:
        if self._tty and not self._finished:
            # The kernel sends SIGWINCH to the terminal's foreground process group.
            fcntl.ioctl(self._stdin, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

    async def kill(self) -> None:
        if self._popen.returncode is None:  # not reaped yet, so its pid (and process group) is still its own
            with suppress(ProcessLookupError):
                os.killpg(self._popen.pid, signal.SIGKILL)
