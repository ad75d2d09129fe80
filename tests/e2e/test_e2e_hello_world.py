"""The example from the README, end to end: real agent, real processes, real HTTP."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.harness import ROOT, Agent, alive

pytestmark = pytest.mark.e2e

EXAMPLE = str(ROOT / "examples" / "hello-world.yaml")


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return str(answer.read().decode())


def test_hello_world_serves_and_destroy_leaves_nothing(agent: Agent) -> None:
    deployed = agent.cli("deploy", EXAMPLE)
    assert "hello-world is deployed" in deployed.stdout
    url = agent.json("outputs", "hello-world")["url"]
    assert "Hello from Khutulun" in fetch(url)
    status = agent.json("status", "hello-world")
    assert status["status"] == "deployed"
    assert {i["instance"]: i["state"] for i in status["instances"]} == {
        "checker/0": "running", "site/0": "ready", "web/0": "running"}
    pids = [w.pid for w in agent.workloads("hello-world")]
    assert len(pids) == 2

    agent.cli("destroy", "hello-world")
    deadline = time.monotonic() + 3
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if alive(p)]
    assert agent.workloads() == []
    assert agent.json("list") == []
    assert not (agent.root / "data" / "directory" / "directories" / "default").exists()


def test_a_killed_workload_runs_again_within_two_seconds(agent: Agent) -> None:
    agent.cli("deploy", EXAMPLE)
    url = agent.json("outputs", "hello-world")["url"]
    before = agent.pid_of("default/hello-world/web/0")
    os.kill(before, signal.SIGKILL)
    killed = time.monotonic()
    after = agent.pid_of("default/hello-world/web/0", not_pid=before, timeout=2.0)
    elapsed = time.monotonic() - killed
    assert after != before and elapsed < 2.0, elapsed
    deadline = time.monotonic() + 5
    while True:  # the new process answers once it has bound its (same) port
        try:
            assert "Hello" in fetch(url)
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert agent.json("status", "hello-world")["instances"][2]["restarts"] == 1


def test_preview_after_deploy_is_empty_and_one_changed_property_is_one_update(agent: Agent, tmp_path: Path) -> None:
    agent.cli("deploy", EXAMPLE)
    plan = agent.json("preview", EXAMPLE)["plan"]
    assert plan["counts"] == {"create": 0, "update": 0, "delete": 0, "keep": 3}
    before = {w.resource: w.pid for w in agent.workloads("hello-world")}

    changed = tmp_path / "hello-world.yaml"
    changed.write_text(Path(EXAMPLE).read_text().replace("time.sleep(5)", "time.sleep(7)"))
    plan = agent.json("preview", str(changed))["plan"]
    updates = [s for s in plan["steps"] if s["action"] != "keep"]
    assert [(s["instance"], s["action"]) for s in updates] == [("checker/0", "update")]
    assert updates[0]["changes"] == ["command"]

    result = agent.json("deploy", str(changed))
    assert result["revision"] == 2 and result["failed"] == []
    after = {w.resource: w.pid for w in agent.workloads("hello-world")}
    assert after["default/hello-world/web/0"] == before["default/hello-world/web/0"]
    assert after["default/hello-world/checker/0"] != before["default/hello-world/checker/0"]
    assert agent.json("preview", str(changed))["plan"]["counts"]["keep"] == 3


def test_a_stopped_agent_leaves_workloads_running_and_the_next_one_adopts_them(agent: Agent) -> None:
    agent.cli("deploy", EXAMPLE)
    before = agent.workloads("hello-world")
    agent.stop()
    assert all(alive(w.pid) for w in before)
    agent.start()
    time.sleep(1.5)  # a few reconcile passes
    assert agent.workloads("hello-world") == before
    status = agent.json("status", "hello-world")
    assert all(i["state"] in ("running", "ready") for i in status["instances"])


def test_logs_and_exec(agent: Agent) -> None:
    agent.cli("deploy", EXAMPLE)
    deadline = time.monotonic() + 10
    while "answered 200" not in agent.cli("logs", "hello-world", "checker").stdout:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    both = agent.cli("logs", "hello-world").stdout
    assert "checker/0 | " in both
    result = agent.cli("exec", "hello-world", "web", "--", "sh", "-c", "echo $KHUTULUN_SERVICE; exit 3",
                       check=False)
    assert result.returncode == 3 and result.stdout.strip() == "hello-world"


def test_a_stale_check_index_is_refused(agent: Agent) -> None:
    agent.cli("deploy", EXAMPLE)
    revision = agent.json("preview", EXAMPLE)["plan"]["revision"]
    assert revision == 1
    stale = agent.cli("deploy", EXAMPLE, "--check-index", "0", check=False)
    assert stale.returncode == 4 and "stale" in stale.stderr
    agent.cli("deploy", EXAMPLE, "--check-index", "1")
    assert agent.json("status", "hello-world")["revision"] == 2


def test_exit_codes_for_what_is_not_there(agent: Agent) -> None:
    missing = agent.cli("status", "nothing-here", check=False)
    assert missing.returncode == 5 and "no service" in missing.stderr
    nowhere = agent.cli("--agent", "unix:/tmp/no-such-khutulun.sock", "list", check=False)
    assert nowhere.returncode == 6 and "no agent answers" in nowhere.stderr
    assert "Traceback" not in missing.stderr + nowhere.stderr
