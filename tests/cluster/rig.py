"""Several hosts on one machine, for tests and benchmarks: network namespaces, one bridge, one shared directory.

A :class:`Rig` of N hosts makes (as root, with iproute2 and util-linux):

* a network namespace ``khrig-K-TOKEN-sw`` holding a bridge, so that nothing is added to the host's own
  network namespace, and for each host ``khrig-K-TOKEN-hI`` with an ``eth0`` (a veth pair made from inside
  the bridge's namespace) and the address ``10.99.K.I/24``. ``K`` is claimed for the rig's lifetime through the
  abstract unix socket ``@khutulun-rig-K``, so two rigs (two test runs at once) never share a subnet;
* a shared directory, which every process the rig starts sees at the same path (:attr:`Rig.mount`) through
  its own bind mount in its own mount namespace: the shared state directory, as NFS would give it.

:meth:`Rig.spawn` runs a command in a host (``ip netns exec H unshare -m sh -c 'mount --bind ...; exec ...'``,
the same process all the way, so its pid is the command's) and returns a :class:`Proc`. :meth:`Rig.close` ends
the processes it started, by pid, and deletes the namespaces it made, by name; nothing else.
:func:`spawn_local` runs the same kind of process without a rig (the benchmark's loopback clusters).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
NODE = Path(__file__).resolve().parent / "node.py"

Line = dict[str, Any]


class Proc:
    """A process whose stdout is JSON lines, read by a thread; stdin takes JSON commands."""

    def __init__(self, argv: Sequence[str], *, name: str, log: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = log
        with log.open("ab") as err:
            self.popen = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                          env=env, cwd=ROOT, start_new_session=True)
        self.lines: list[Line] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name=f"read {name}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            try:
                line = json.loads(raw)
            except ValueError:
                line = {"event": "output", "text": raw.decode(errors="replace")}
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self.lines.append({"event": "eof", "t": time.time()})
            self._cond.notify_all()

    def send(self, **command: Any) -> None:
        assert self.popen.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.popen.stdin.write((json.dumps(command) + "\n").encode())
            self.popen.stdin.flush()

    def wait_for(self, predicate: Callable[[Line], bool], timeout: float, *, start: int = 0) -> Line:
        """The first line from index ``start`` on that satisfies ``predicate``; AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            index = start
            while True:
                while index < len(self.lines):
                    if predicate(self.lines[index]):
                        return self.lines[index]
                    if self.lines[index].get("event") == "eof":
                        raise AssertionError(f"{self.name} ended ({self.popen.poll()}) without the line "
                                             f"awaited:\n{self.stderr()}")
                    index += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{self.name}: no such line within {timeout} s; it printed "
                                         f"{self.lines[start:][-10:]}\n{self.stderr()}")
                self._cond.wait(remaining)

    def mark(self) -> int:
        """The index of the next line, for ``wait_for(start=...)``."""
        with self._cond:
            return len(self.lines)

    def stderr(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def stop(self, grace: float = 3.0) -> None:
        """End the process (SIGTERM, then SIGKILL) and reap it."""
        if self.popen.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.popen.wait()
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._reader.join(5)


def node_argv(*, bind: str, name: str, secret_file: Path, seeds: Sequence[str] = (), fast: bool = True,
              settings: dict[str, Any] | None = None, labels: dict[str, str] | None = None,
              log_level: str = "info") -> list[str]:
    """The command line of ``node.py``, the cluster member the tests and the benchmark run."""
    argv = [sys.executable, str(NODE), "--bind", bind, "--name", name, "--secret-file", str(secret_file),
            "--log-level", log_level]
    for seed in seeds:
        argv += ["--seed", seed]
    for key, value in (labels or {}).items():
        argv += ["--label", f"{key}={value}"]
    if fast:
        argv.append("--fast")
    if settings:
        argv += ["--settings", json.dumps(settings)]
    return argv


def spawn_local(argv: Sequence[str], *, name: str, log: Path) -> Proc:
    return Proc(argv, name=name, log=log)


def write_secret(path: Path, secret: str | None = None) -> Path:
    path.write_text((secret or secrets.token_urlsafe(32)) + "\n")
    path.chmod(0o600)
    return path


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


@dataclass(frozen=True)
class Host:
    index: int
    netns: str
    address: str


class Rig:
    def __init__(self, hosts: int, *, root: Path | None = None) -> None:
        if not 1 <= hosts <= 250:
            raise ValueError("a rig has 1 to 250 hosts")
        self.count = hosts
        self._own_root = root is None
        self.root = root or Path(tempfile.mkdtemp(prefix="khrig-", dir="/tmp"))
        self.shared = self.root / "shared"
        self.mount = self.root / "mnt"
        """Where every process the rig starts sees the shared directory."""
        self.token = secrets.token_hex(3)
        self.subnet = 0
        self.hosts: list[Host] = []
        self._claim: socket.socket | None = None
        self._netns: list[str] = []
        self._procs: list[Proc] = []

    def __enter__(self) -> Rig:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _claim_subnet(self) -> None:
        candidates = list(range(1, 255))
        random.shuffle(candidates)
        for k in candidates:
            claim = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                claim.bind(f"\0khutulun-rig-{k}")
            except OSError:
                claim.close()
                continue
            self._claim, self.subnet = claim, k
            return
        raise RuntimeError("every rig subnet 10.99.1-254.0/24 is taken")

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._netns.append(name)

    def start(self) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("the multi-host rig needs root (network namespaces, bind mounts)")
        self._claim_subnet()
        self.shared.mkdir(parents=True, exist_ok=True)
        self.mount.mkdir(parents=True, exist_ok=True)
        prefix = f"khrig-{self.subnet}-{self.token}"
        switch = f"{prefix}-sw"
        self._add_netns(switch)
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        _ip("-n", switch, "link", "set", "lo", "up")
        for i in range(1, self.count + 1):
            host = Host(i, f"{prefix}-h{i}", f"10.99.{self.subnet}.{i}")
            self._add_netns(host.netns)
            # Both ends are made from inside the bridge's namespace: the host's own namespace never sees them.
            _ip("-n", switch, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", host.netns)
            _ip("-n", switch, "link", "set", f"v{i}", "master", "br0", "up")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
            self.hosts.append(host)

    def disconnect(self, host: Host) -> None:
        """Cut ``host`` off the bridge (a network partition), until :meth:`reconnect`."""
        _ip("-n", self._netns[0], "link", "set", f"v{host.index}", "down")

    def reconnect(self, host: Host) -> None:
        _ip("-n", self._netns[0], "link", "set", f"v{host.index}", "up")

    def spawn(self, host: Host, argv: Sequence[str], *, name: str | None = None) -> Proc:
        """Run ``argv`` in ``host``, with the shared directory bind-mounted at :attr:`mount`."""
        script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
        wrapped = ["ip", "netns", "exec", host.netns, "unshare", "--mount", "--propagation", "private",
                   "sh", "-c", script, "rig", str(self.shared), str(self.mount), *argv]
        name = name or f"h{host.index}"
        proc = Proc(wrapped, name=name, log=self.root / f"{name}-{len(self._procs)}.log")
        self._procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self._procs:
            proc.stop()
        self._procs.clear()
        for name in reversed(self._netns):
            with contextlib.suppress(RuntimeError):
                _ip("netns", "del", name)
        self._netns.clear()
        if self._claim is not None:
            self._claim.close()
            self._claim = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)
