"""Every load runs in a process of its own, with a deadline and a memory limit.

tosca-parser keeps global state that one parse leaks into the next (TOSCA-PARSER-NOTES P13), and some inputs
make it crash or run very long (P11, P15). So loads never run in the caller's process. The caller (the CLI,
or an agent) starts one loader server, ``python -m khutulun.tosca.worker``, on first use: a single-threaded
process that imports tosca-parser once and then, for each request, forks a child that loads one template and
exits. A fork of that process starts clean every time in a few milliseconds (a fork of a multi-threaded
agent would not be safe), and a child that overruns its deadline is killed by the server.

multiprocessing's "forkserver" would do the same, but it re-imports the caller's ``__main__`` module in
every child, which for a console script or a test runner is neither cheap nor harmless.

The protocol on the server's stdin and stdout: frames of an 8-byte big-endian length and a pickle. A request
is ``(LoadRequest, timeout)``; an answer ``("ok", Topology)``, ``("problems", [Problem])`` or
``("crash", message)``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import resource
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO, Any

from khutulun.bundle import Bundle
from khutulun.errors import InternalError, Problem, TemplateError
from khutulun.model import Topology

__all__ = ["LoadRequest", "LoaderClient", "load_in_worker", "run_request"]

MEMORY_LIMIT = 4 * 1024**3  # bytes of address space a single load may take
_HEADER = struct.Struct(">Q")


@dataclass(frozen=True)
class LoadRequest:
    """What a load needs; plain data, since it crosses a process boundary."""

    inputs: dict[str, Any]
    bundle: Bundle | None = None
    path: str | None = None
    """A file on disk, when there is no bundle."""
    profile_roots: tuple[str, ...] | None = None
    """Profile libraries; None for the ones that come with Khutulun."""
    registered: tuple[tuple[str, str], ...] = ()
    """(template name, directory of its files) of the namespace's registered templates."""


def run_request(request: LoadRequest) -> Topology:
    """Load in this process. Only for a process that loads once; see :func:`load_in_worker`."""
    from pathlib import Path

    from khutulun.tosca.files import BundleSource, DiskSource, FileRef, ProfileLibrary
    from khutulun.tosca.load import load_template

    registered = dict(request.registered)
    library = ProfileLibrary(
        roots=None if request.profile_roots is None else [Path(r) for r in request.profile_roots],
        registered=lambda name: Path(registered[name]) if name in registered else None)
    if request.bundle is not None:
        main = FileRef(BundleSource(request.bundle), request.bundle.main)
    elif request.path is not None:
        absolute = Path(request.path).absolute()
        main = FileRef(DiskSource("/"), str(absolute)[1:])
    else:
        raise InternalError("a load request needs a bundle or a path")
    return load_template(main, library, request.inputs)


def _write_frame(stream: IO[bytes], obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _read_frame(stream: IO[bytes]) -> Any:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError
    (size,) = _HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return pickle.loads(data)


# -- the server side ------------------------------------------------------------------------------------------

def _answer(request: LoadRequest) -> tuple[str, Any]:
    try:
        return ("ok", run_request(request))
    except TemplateError as e:
        return ("problems", list(e.problems))
    except MemoryError:
        return ("crash", f"loading the template took more than {MEMORY_LIMIT // 1024**3} GiB of memory")
    except RecursionError:
        return ("crash", "the template is nested too deeply to load")
    except Exception as e:  # whatever goes wrong in one load is reported as a problem of that load
        return ("crash", f"{type(e).__name__}: {e}")


def _serve_one(request: LoadRequest, timeout: float) -> tuple[str, Any]:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: load, answer, and leave without running any cleanup of the server's
        os.close(read_fd)
        with contextlib.suppress(ValueError, OSError):  # a lower hard limit is already in place: keep it
            resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
        with os.fdopen(write_fd, "wb") as out:
            _write_frame(out, _answer(request))
        os._exit(0)
    os.close(write_fd)
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read_fd], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                return ("crash", f"loading the template took longer than {timeout:g} s and was stopped")
            chunk = os.read(read_fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
    data = b"".join(chunks)
    if len(data) < _HEADER.size:
        return ("crash", f"the template loader ended without an answer (status {status})")
    return pickle.loads(data[_HEADER.size:])  # type: ignore[no-any-return]


def serve() -> None:
    """The loader server's main loop: one request at a time, until stdin closes."""
    protocol_in = os.fdopen(os.dup(0), "rb")
    protocol_out = os.fdopen(os.dup(1), "wb")
    # Nothing but frames may reach the protocol stream: whatever else is printed goes to stderr.
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import khutulun.tosca.load  # noqa: F401  (imported once here, so every child starts with it)
    while True:
        try:
            request, timeout = _read_frame(protocol_in)
        except EOFError:
            return
        _write_frame(protocol_out, _serve_one(request, timeout))


# -- the client side ------------------------------------------------------------------------------------------

class LoaderClient:
    """A connection to a loader server, started on first use and again if it dies. Thread-safe: requests
    are answered one at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None

    def _server(self) -> subprocess.Popen[bytes]:
        if self._process is None or self._process.poll() is not None:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "khutulun.tosca.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, close_fds=True)
        return self._process

    def load(self, request: LoadRequest, *, timeout: float, display: str) -> Topology:
        with self._lock:
            process = self._server()
            assert process.stdin is not None and process.stdout is not None
            try:
                _write_frame(process.stdin, (request, timeout))
                kind, value = _read_frame(process.stdout)
            except (EOFError, BrokenPipeError, OSError) as e:
                self.close()
                raise TemplateError([Problem(f"the template loader stopped unexpectedly ({e or 'no answer'})",
                                             display)]) from None
        if kind == "ok":
            assert isinstance(value, Topology)
            return value
        if kind == "problems":
            raise TemplateError(value)
        raise TemplateError([Problem(f"the template could not be loaded: {value}", display)])

    def close(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


_client = LoaderClient()
# The server would end anyway when this process's end closes the pipe; closing it here also reaps it, rather
# than leaving a running child to the interpreter's last garbage collection.
atexit.register(_client.close)


def load_in_worker(request: LoadRequest, *, timeout: float, display: str) -> Topology:
    """Load through this process's loader server; ``display`` names the template in messages about the
    load itself (a timeout, a crash of the loader)."""
    return _client.load(request, timeout=timeout, display=display)


if __name__ == "__main__":
    serve()
