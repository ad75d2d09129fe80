"""The README's first command, run as a new user would: in a copy of the repository's tracked files, with a
fresh home directory and no configuration. It must serve the example."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.e2e.harness import ROOT, Agent

pytestmark = pytest.mark.e2e


def first_command() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- first-command -->\s*```sh\n(.+?)\n```", text, re.S)
    assert match, "the README has no first command"
    return match.group(1)


def copy_of_the_repository(target: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(source.read_bytes())
            (target / name).chmod(source.stat().st_mode)


def test_the_readmes_first_command_serves_the_example(tmp_path: Path) -> None:
    clone = tmp_path / "khutulun"
    home = tmp_path / "home"
    clone.mkdir()
    home.mkdir()
    copy_of_the_repository(clone)
    host = f"t-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KHUTULUN_", "XDG_", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), KHUTULUN_HOST_NAME=host,
               PIP_CACHE_DIR=os.environ.get("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip")))
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    khutulun = str(clone / ".venv" / "bin" / "khutulun")
    leftovers = Agent(tmp_path / "unused", host=host)  # only to find what the README's agent started
    try:
        result = subprocess.run(["bash", "-c", first_command()], cwd=clone, env=env, capture_output=True,
                                text=True, timeout=600, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        url = re.search(r"url = (http://\S+)", result.stdout)
        assert url, result.stdout
        with urllib.request.urlopen(url.group(1), timeout=5) as answer:
            assert "Hello from Khutulun" in answer.read().decode()
        status = json.loads(subprocess.run([khutulun, "-o", "json", "status", "hello-world"], cwd=clone, env=env,
                                           capture_output=True, text=True, check=True).stdout)
        assert {i["state"] for i in status["instances"]} <= {"running", "ready"}
        assert (home / ".local" / "share" / "khutulun" / "state" / "VERSION").is_file()
        pids = [w.pid for w in leftovers.workloads()]
        assert len(pids) == 2
        subprocess.run([khutulun, "destroy", "hello-world"], cwd=clone, env=env, check=True, capture_output=True)
        deadline = time.monotonic() + 3
        while leftovers.workloads() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert leftovers.workloads() == []
    finally:
        subprocess.run([khutulun, "agent", "stop"], cwd=clone, env=env, capture_output=True, check=False)
        pid_file = home / ".local" / "share" / "khutulun" / "agent.pid"
        if pid_file.exists():  # "agent stop" failed: end the agent the command started, by its pid
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
        for workload in leftovers.workloads():
            os.killpg(workload.pid, signal.SIGKILL)
