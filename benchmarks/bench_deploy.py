"""Deploy N processes from one template, against starting the same N processes from a shell loop.

    .venv/bin/python -m benchmarks.bench_deploy [N] [ROUNDS]

Each process is ``python3 -m http.server`` on its own port; both sides are timed from the command until every
process answers an HTTP GET, and their teardown until none is left. Khutulun runs a real agent (its own data
and state directories) and the real CLI. The shell side is what a user would otherwise type:
``for p in ...; do python3 -m http.server $p & done``. Prints one line per round and the medians.
"""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.e2e.harness import Agent

IDLE = 10.0  # seconds the agent's CPU is measured over while it only supervises


def template(count: int) -> str:
    lines = ["tosca_definitions_version: tosca_simple_yaml_1_3", "imports: [khutulun/profile.yaml]",
             "topology_template:", "  node_templates:"]
    for i in range(count):
        lines += [f"    web{i:03d}:", "      type: khutulun.nodes.Process", "      properties:",
                  "        command: [python3, -m, http.server, --bind, 127.0.0.1, "
                  "{get_attribute: [SELF, endpoint, port]}]",
                  "      capabilities: {endpoint: {properties: {port: 0}}}"]
    return "\n".join(lines) + "\n"


def answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return s.recv(12).startswith(b"HTTP/1.")
        except OSError:
            return False


def wait_all(ports: list[int], timeout: float = 120.0) -> None:
    pending = set(ports)
    deadline = time.monotonic() + timeout
    while pending:
        pending = {p for p in pending if not answers(p)}
        if pending and time.monotonic() > deadline:
            raise RuntimeError(f"ports never answered: {sorted(pending)}")
        if pending:
            time.sleep(0.02)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def khutulun_round(agent: Agent, path: Path, count: int) -> tuple[float, float, float, float, float]:
    started = time.monotonic()
    agent.cli("deploy", str(path), timeout=600)
    deployed = time.monotonic() - started
    status = agent.json("status", path.stem)
    ports = [int(i["ports"]["endpoint"]) for i in status["instances"]]
    wait_all(ports)
    answered = time.monotonic() - started
    assert len(ports) == count
    assert agent.process is not None
    agent_rss = rss_mib(agent.process.pid)
    before = cpu_seconds(agent.process.pid)
    time.sleep(IDLE)  # supervising: reconcile passes over the running processes
    idle_cpu = (cpu_seconds(agent.process.pid) - before) / IDLE * 100
    started = time.monotonic()
    agent.cli("destroy", path.stem, timeout=600)
    while agent.workloads():
        time.sleep(0.02)
    return deployed, answered, time.monotonic() - started, agent_rss, idle_cpu


def shell_round(count: int, base_port: int) -> tuple[float, float]:
    ports = list(range(base_port, base_port + count))
    script = ("for p in " + " ".join(map(str, ports)) + "; do "
              "setsid python3 -m http.server --bind 127.0.0.1 $p >/dev/null 2>&1 & echo $!; done")
    started = time.monotonic()
    pids = [int(p) for p in subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                                           check=True).stdout.split()]
    wait_all(ports)
    answered = time.monotonic() - started
    started = time.monotonic()
    for pid in pids:  # what the loop started, by pid
        os.kill(pid, signal.SIGTERM)
    for pid in pids:
        while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
            time.sleep(0.01)
    return answered, time.monotonic() - started


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    work = Path(tempfile.mkdtemp(prefix="kh-bench-", dir="/tmp"))
    path = work / f"bench{count}.yaml"
    path.write_text(template(count))
    agent = Agent(work / "agent")
    agent.env.pop("KHUTULUN_RECONCILE_INTERVAL")  # the default (1 s), not the tests' faster one
    (work / "agent").mkdir()
    agent.start()
    keys = ("k_deploy", "k_answer", "k_down", "k_rss", "k_idle", "s_answer", "s_down")
    rows: dict[str, list[float]] = {k: [] for k in keys}
    try:
        for r in range(rounds):
            deployed, answered, down, agent_rss, idle = khutulun_round(agent, path, count)
            s_answer, s_down = shell_round(count, 15000)  # below the ephemeral range, clear of ours
            for key, value in zip(keys, (deployed, answered, down, agent_rss, idle, s_answer, s_down), strict=True):
                rows[key].append(value)
            print(f"round {r + 1}: khutulun deploy {deployed:.2f} s, all answer {answered:.2f} s, destroy "
                  f"{down:.2f} s, agent RSS {agent_rss:.0f} MiB, idle CPU {idle:.1f} % | shell loop all answer "
                  f"{s_answer:.2f} s, kill {s_down:.2f} s", flush=True)
    finally:
        agent.cleanup()
    m = {k: statistics.median(v) for k, v in rows.items()}
    print(f"\nmedian of {rounds} rounds, {count} processes:")
    print(f"  khutulun deploy returns      {m['k_deploy']:.2f} s")
    print(f"  khutulun: all answer         {m['k_answer']:.2f} s   shell loop: {m['s_answer']:.2f} s   "
          f"ratio {m['k_answer'] / m['s_answer']:.2f}")
    print(f"  khutulun destroy             {m['k_down']:.2f} s   shell kill: {m['s_down']:.2f} s")
    print(f"  agent RSS after deploy       {m['k_rss']:.0f} MiB")
    print(f"  agent CPU while supervising  {m['k_idle']:.1f} % of one core (reconcile every second)")


if __name__ == "__main__":
    main()
