"""A real agent for end-to-end tests: its own process, data and state directories, and host name.

The CLI runs as a subprocess, exactly as a user runs it. Workloads are found through the markers the process
delegate puts in their environment; the host name is unique per harness, so a harness only ever sees, and
cleans up, what its own agent started.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from khutulun.delegates.podman import stop_own_service

ROOT = Path(__file__).resolve().parents[2]
PASSED = frozenset({"KHUTULUN_PODMAN_SOCKET", "KHUTULUN_DOCKER_SOCKET"})
"""Settings of this machine's runtimes (scripts/setup-containers) that the agents under test use too."""


def run_cli(args: Sequence[str], env: Mapping[str, str], *, check: bool = True, timeout: float = 120.0,
            where: str = "") -> subprocess.CompletedProcess[str]:
    """``khutulun ARGS`` as a user runs it, in ``env``; with ``check``, an exit status other than 0 fails the test
    with what the command said (``where`` says which agent it was asked of)."""
    result = subprocess.run([sys.executable, "-m", "khutulun.cli", *args], env=dict(env), capture_output=True,
                            text=True, timeout=timeout, cwd=ROOT, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"khutulun {' '.join(args)}{where} exited {result.returncode}\nstdout:\n"
                             f"{result.stdout}\nstderr:\n{result.stderr}")
    return result


@dataclass(frozen=True)
class Workload:
    pid: int
    resource: str


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return [text[: text.index("(")].strip(), "comm", *text[text.rindex(")") + 2:].split()]


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting to be reaped."""
    stat = _stat(pid)
    return stat is not None and stat[2] not in ("Z", "X")


class Agent:
    def __init__(self, root: Path | None = None, *, host: str | None = None) -> None:
        self.root = root or Path(tempfile.mkdtemp(prefix="kh-", dir="/tmp"))
        self.host = host or f"t-{uuid.uuid4().hex[:8]}"
        self.log = self.root / "agent.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("KHUTULUN_") or k in PASSED},
            "KHUTULUN_DATA_DIR": str(self.root / "data"),
            "KHUTULUN_STATE_DIR": str(self.root / "state"),
            "KHUTULUN_HOST_NAME": self.host,
            "KHUTULUN_RECONCILE_INTERVAL": "0.5",
        }
        self.process: subprocess.Popen[bytes] | None = None

    # -- the agent ----------------------------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "khutulun.agent.main", "--log-level", "debug"],
                                            env=self.env, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the agent exited with {self.process.returncode}:\n{self.log.read_text()}")
            if self.cli("agent", "status", check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError(f"the agent did not answer within {timeout} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        """SIGTERM: a clean stop that leaves the workloads running."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)
        self.process = None

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        self.process = None

    # -- the CLI ------------------------------------------------------------------------------------------

    def cli(self, *args: str, check: bool = True, timeout: float = 120.0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return run_cli(args, {**self.env, **(env or {})}, check=check, timeout=timeout)

    def json(self, *args: str) -> Any:
        return json.loads(self.cli("-o", "json", *args).stdout)

    # -- what runs ----------------------------------------------------------------------------------------

    def workloads(self, service: str | None = None) -> list[Workload]:
        """Running session leaders that this harness's agent started (optionally of one service)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            stat = _stat(pid)
            if stat is None or stat[2] in ("Z", "X") or int(stat[5]) != pid:
                continue
            env = _environ(pid)
            if env.get("KHUTULUN_HOST") != self.host or "KHUTULUN_RESOURCE" not in env:
                continue
            resource = env["KHUTULUN_RESOURCE"]
            if service is None or resource.split("/")[1] == service:
                found.append(Workload(pid, resource))
        return sorted(found, key=lambda w: w.resource)

    def pid_of(self, resource: str, *, timeout: float = 5.0, not_pid: int | None = None) -> int:
        deadline = time.monotonic() + timeout
        while True:
            pids = [w.pid for w in self.workloads() if w.resource == resource and w.pid != not_pid]
            if pids:
                return pids[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no process for {resource}")
            time.sleep(0.01)

    def cleanup(self) -> None:
        """Stop the agent, then end what it started and left (by pid, after checking its markers)."""
        with contextlib.suppress(Exception):
            self.kill()
        for workload in self.workloads():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(workload.pid, signal.SIGKILL)
        # Without KHUTULUN_PODMAN_SOCKET (scripts/setup-containers not run) the agent started its own Podman
        # service, which outlives it by design.
        stop_own_service(self.root / "data" / "podman")
