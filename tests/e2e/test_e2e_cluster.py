"""Several real agents, each in its own network namespace, gossiping over real UDP, sharing one state directory.

The rig (tests/cluster/rig.py) gives each host an address on one bridge and the shared directory at the same
path; each agent listens on its host's address (API and gossip) and reaches the others' through the bridge.
The CLI talks to one agent through its unix socket, as a user on that host would.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from khutulun.delegates.podman import stop_own_service
from tests.cluster.rig import Host, Proc, Rig, write_secret
from tests.e2e.harness import PASSED, _environ, _stat, run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.multihost]

API_PORT = 7070
GOSSIP_PORT = 7946


class HostAgent:
    """The agent of one rig host: its configuration, its process, and the CLI pointed at it."""

    def __init__(self, cluster: Cluster, host: Host) -> None:
        self.cluster = cluster
        self.host = host
        self.name = f"{cluster.prefix}-h{host.index}"
        self.data = cluster.rig.root / f"data-h{host.index}"
        self.data.mkdir(exist_ok=True)
        self.socket = self.data / "agent.sock"
        self.proc: Proc | None = None

    def settings(self) -> dict[str, str]:
        rig = self.cluster.rig
        address = self.host.address
        seeds = "" if self.host.index == 1 else f"{rig.hosts[0].address}:{GOSSIP_PORT}"
        return {
            "KHUTULUN_STATE_DIR": str(rig.mount / "state"),
            "KHUTULUN_DATA_DIR": str(self.data),
            "KHUTULUN_SOCKET": str(self.socket),
            "KHUTULUN_HOST_NAME": self.name,
            "KHUTULUN_HOST_ADDRESS": address,
            "KHUTULUN_LISTEN": f"{address}:{API_PORT}",
            "KHUTULUN_TOKEN_FILE": str(self.cluster.token),
            "KHUTULUN_GOSSIP": f"{address}:{GOSSIP_PORT}",
            "KHUTULUN_SEEDS": seeds,
            "KHUTULUN_GOSSIP_SECRET_FILE": str(self.cluster.secret),
            "KHUTULUN_RECONCILE_INTERVAL": "0.5",
            "KHUTULUN_FAILOVER_GRACE": "2",
            "KHUTULUN_LABELS": f"rack=r{host_rack(self.host)}",
        }

    def start(self) -> None:
        passed = {k: os.environ[k] for k in PASSED if k in os.environ}
        argv = ["env", *(f"{k}={v}" for k, v in (passed | self.settings()).items()),
                sys.executable, "-m", "khutulun.agent.main", "--log-level", "debug"]
        self.proc = self.cluster.rig.spawn(self.host, argv, name=self.name)
        deadline = time.monotonic() + 30
        while self.cli("agent", "status", check=False).returncode != 0:
            if not self.proc.alive() or time.monotonic() > deadline:
                raise AssertionError(f"agent {self.name} did not start:\n{self.proc.stderr()}")
            time.sleep(0.1)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("KHUTULUN_") or k in PASSED},
               "KHUTULUN_AGENT": f"unix:{self.socket}", "KHUTULUN_DATA_DIR": str(self.data)}
        return run_cli(args, env, check=check, timeout=180, where=f" (on {self.name})")

    def json(self, *args: str) -> Any:
        return json.loads(self.cli("-o", "json", *args).stdout)

    def workloads(self) -> list[int]:
        """Session leaders this host's agent started (found by the markers the process delegate sets)."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                stat = _stat(int(entry.name))
                if stat is not None and stat[2] not in ("Z", "X") and int(stat[5]) == int(entry.name) \
                        and _environ(int(entry.name)).get("KHUTULUN_HOST") == self.name:
                    found.append(int(entry.name))
        return found

    def crash(self) -> None:
        """The host dies: its agent and everything it started are killed (by pid), its network goes down."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        for pid in self.workloads():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        self.cluster.rig.disconnect(self.host)

    def cleanup(self) -> None:
        if self.proc is not None:
            self.proc.kill(signal.SIGCONT)  # a test that froze it and failed before waking it
            self.proc.stop(grace=10)
        for pid in self.workloads():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        stop_own_service(self.data / "podman")  # started when the machine's Podman socket was not passed on


def host_rack(host: Host) -> int:
    return 1 if host.index == 1 else 2


class Cluster:
    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.prefix = f"c{secrets.token_hex(2)}"
        self.secret = write_secret(rig.root / "gossip.key")
        self.token = rig.root / "api.token"
        self.token.write_text(secrets.token_urlsafe(24) + "\n")
        self.token.chmod(0o600)
        self.agents = [HostAgent(self, host) for host in rig.hosts]

    def agent(self, name: str) -> HostAgent:
        return next(a for a in self.agents if a.name == name)

    def fetch(self, source: Host, url: str) -> str:
        """GET ``url`` from inside ``source``'s network namespace (as a client on that host would)."""
        code = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())"
        result = subprocess.run(["ip", "netns", "exec", source.netns, sys.executable, "-c", code, url],
                                capture_output=True, text=True, timeout=20, check=False)
        if result.returncode != 0:
            raise AssertionError(f"GET {url} from host {source.index} failed: {result.stderr.strip()[-500:]}")
        return result.stdout.rstrip("\n")


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("unshare") is None:
        pytest.skip("the multi-host rig needs root, iproute2 and util-linux")
    with Rig(3) as rig:
        group = Cluster(rig)
        try:
            for agent in group.agents:
                agent.start()
            yield group
        finally:
            for agent in group.agents:
                agent.cleanup()


def wait_until(what: str, check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except AssertionError as e:
            last = e
        else:
            if last:
                return last
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout} s; last: {last}")


def template(tmp: Path, *, count: int, separate: bool, rack: str | None = None) -> Path:
    """A web server process that says which host it runs on, ``count`` times."""
    policies = [f"      - copies:\n          type: khutulun.policies.Redundancy\n          targets: [web]\n"
                f"          properties: {{count: {count}}}"]
    if separate:
        policies.append("      - apart:\n          type: khutulun.policies.Separation\n          targets: [web]")
    if rack:
        policies.append("      - where:\n          type: khutulun.policies.Placement\n          targets: [web]\n"
                        f"          properties: {{labels: {{rack: {rack}}}}}")
    server = ("import http.server, os, sys\n"
              "class Hello(http.server.BaseHTTPRequestHandler):\n"
              "    def do_GET(self):\n"
              "        body = os.environ['KHUTULUN_HOST'].encode()\n"
              "        self.send_response(200); self.end_headers(); self.wfile.write(body)\n"
              "http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), Hello).serve_forever()\n")
    text = textwrap.dedent("""\
        tosca_definitions_version: tosca_simple_yaml_1_3
        imports: [khutulun/profile.yaml]
        topology_template:
          node_templates:
            web:
              type: khutulun.nodes.Process
              properties:
                command:
                  - python3
                  - -c
                  - {server}
                  - {{ get_attribute: [SELF, endpoint, address] }}
                  - {{ get_attribute: [SELF, endpoint, port] }}
          policies:
        """).format(server=json.dumps(server)) + "\n".join(policies) + "\n"
    path = tmp / f"web-{count}-{separate}-{rack}.yaml"
    path.write_text(text)
    return path


def alive_hosts(agent: HostAgent, count: int) -> list[dict[str, Any]] | None:
    """The hosts ``agent`` knows alive, once there are ``count`` of them."""
    alive = [h for h in agent.json("host", "list") if h["status"] == "alive"]
    return alive if len(alive) == count else None


def instances(agent: HostAgent, service: str) -> list[dict[str, Any]]:
    return list(agent.json("status", service)["instances"])


def answers(cluster: Cluster, instance: dict[str, Any]) -> str:
    host = next(a for a in cluster.agents if a.name == instance["host"]).host
    return cluster.fetch(cluster.rig.hosts[0] if host.index != 1 else cluster.rig.hosts[1],
                         f"http://{host.address}:{instance['ports']['endpoint']}/")


def test_three_agents_gossip_place_apart_and_serve_at_their_host_addresses(cluster: Cluster, tmp_path: Path) -> None:
    first = cluster.agents[0]
    listed = wait_until("three alive hosts", lambda: alive_hosts(first, 3), 30)
    assert sorted(h["name"] for h in listed) == sorted(a.name for a in cluster.agents)
    assert {h["labels"]["rack"] for h in listed} == {"r1", "r2"}

    # Preview says which host gets each instance, and why.
    shown = first.cli("preview", str(template(tmp_path, count=3, separate=True)), "--service", "spread").stdout
    assert all(a.name in shown for a in cluster.agents) and "PLACED ON" in shown and "BECAUSE" in shown, shown
    # Four instances kept apart on three hosts cannot be placed: the deploy fails before anything starts.
    refused = first.cli("deploy", str(template(tmp_path, count=4, separate=True)), "--service", "crowded",
                        check=False)
    assert refused.returncode == 7, refused.stdout + refused.stderr
    assert "cannot place web/" in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
    assert "crowded" not in first.cli("list").stdout and not any(a.workloads() for a in cluster.agents)

    # Deployed through the first agent; each agent starts its own part.
    first.cli("deploy", str(template(tmp_path, count=3, separate=True)), "--service", "spread")
    placed = instances(first, "spread")
    assert sorted(i["host"] for i in placed) == sorted(a.name for a in cluster.agents)
    for instance in placed:
        assert wait_until(f"{instance['instance']} answers", functools.partial(answers, cluster, instance), 20) \
            == instance["host"]

    # A preview right after, on any agent, has nothing to do on any host.
    again = cluster.agents[1].cli("preview", str(template(tmp_path, count=3, separate=True)), "--service",
                                  "spread").stdout
    assert "Nothing to do" in again, again

    # Another agent sees the same service, in the same shared state, running where it was placed.
    seen = instances(cluster.agents[2], "spread")
    assert [(i["instance"], i["host"]) for i in seen] == [(i["instance"], i["host"]) for i in placed]
    own = [i for i in seen if i["host"] == cluster.agents[2].name]
    assert own and own[0]["state"] in ("running", "ready")

    # Logs and exec of an instance on another host, asked of this one: relayed to the agent that runs it.
    far = next(i for i in placed if i["host"] == cluster.agents[2].name)
    assert "GET / HTTP" in first.cli("logs", "spread", far["instance"]).stdout
    ran = first.cli("exec", "spread", far["instance"], "--", "ip", "-4", "-o", "addr", "show", "eth0").stdout
    assert cluster.rig.hosts[2].address in ran  # in the far host's network namespace
    failed = first.cli("exec", "spread", far["instance"], "--", "sh", "-c", "exit 7", check=False)
    assert failed.returncode == 7

    # A Placement policy by label keeps instances on the hosts that carry it.
    first.cli("deploy", str(template(tmp_path, count=2, separate=False, rack="r2")), "--service", "racked")
    assert {i["host"] for i in instances(first, "racked")} <= {a.name for a in cluster.agents[1:]}

    # Destroy, asked of one agent, stops every host's part.
    first.cli("destroy", "spread")
    first.cli("destroy", "racked")
    wait_until("no workloads left", lambda: not any(a.workloads() for a in cluster.agents), 20)


def two_apart(cluster: Cluster, tmp_path: Path,
              service: str) -> tuple[dict[str, str], HostAgent, HostAgent, str]:
    """Deploy two instances on two hosts; answer where each is, the victim (a host that runs one and is not the
    first, which the CLI talks to), the survivor (the host that is neither), and the victim's instance."""
    first = cluster.agents[0]
    wait_until("three alive hosts", lambda: alive_hosts(first, 3), 30)
    first.cli("deploy", str(template(tmp_path, count=2, separate=True)), "--service", service)
    placed = {i["instance"]: i["host"] for i in instances(first, service)}
    victim = next(cluster.agent(h) for h in placed.values() if h != first.name)
    survivor = next(a for a in cluster.agents if a is not victim and a is not first)
    return placed, victim, survivor, next(i for i, h in placed.items() if h == victim.name)


def test_a_dead_host_has_its_instances_moved_to_the_others(cluster: Cluster, tmp_path: Path) -> None:
    _, victim, survivor, lost = two_apart(cluster, tmp_path, "moving")
    # The CLI now talks to the survivor: a user of the dead host's agent would go to another.
    started = time.monotonic()
    victim.crash()
    dead = wait_until("the victim declared dead",
                      lambda: next((h for h in survivor.json("host", "list")
                                    if h["name"] == victim.name and h["status"] == "dead"), None), 30)
    detected = time.monotonic() - started

    def moved() -> dict[str, Any] | None:
        found = next(i for i in instances(survivor, "moving") if i["instance"] == lost)
        return found if found["host"] != victim.name and found["state"] in ("running", "ready") else None

    instance = wait_until(f"{lost} moved off {victim.name}", moved, 60)
    assert wait_until("the moved instance answers", lambda: answers(cluster, instance), 20) == instance["host"]
    recovered = time.monotonic() - started
    # Separation still holds across the survivors, and no duplicate runs of the instance that stayed.
    final = instances(survivor, "moving")
    assert len({i["host"] for i in final}) == 2 and victim.name not in {i["host"] for i in final}
    assert sum(len(a.workloads()) for a in cluster.agents if a is not victim) == 2
    events = survivor.json("events", "moving")
    assert any(e["kind"] == "move" and victim.name in e["message"] for e in events)
    print(f"\nfailover: dead after {detected:.1f} s, moved instance answering after {recovered:.1f} s "
          f"(grace 2 s, default gossip timing); {dead['name']} {dead['status']}")


def test_a_drained_host_gives_up_its_instances_and_takes_none_until_eligible(cluster: Cluster,
                                                                             tmp_path: Path) -> None:
    first, second, _third = cluster.agents
    wait_until("three alive hosts", lambda: alive_hosts(first, 3), 30)
    first.cli("deploy", str(template(tmp_path, count=3, separate=False)), "--service", "drainme")
    before = {i["instance"]: i["host"] for i in instances(first, "drainme")}
    on_second = sorted(i for i, h in before.items() if h == second.name)
    assert on_second, f"the scheduler spreads three instances over three hosts: {before}"

    drained = first.json("host", "drain", second.name)
    assert sorted(r.split("/", 2)[2] for r in drained["moved"]) == on_second
    after = {i["instance"]: i["host"] for i in instances(first, "drainme")}
    assert second.name not in after.values()
    assert {i: h for i, h in after.items() if i not in on_second} == \
        {i: h for i, h in before.items() if i not in on_second}  # what was elsewhere stays where it was
    # The drained host's agent stops its copies; the others start the moved ones.
    wait_until("the drained host runs nothing", lambda: not second.workloads(), 20)
    wait_until("every instance runs again", lambda: all(i["state"] in ("running", "ready")
                                                        for i in instances(first, "drainme")), 30)
    listed = {h["name"]: h for h in first.json("host", "list")}
    assert listed[second.name]["eligible"] is False and listed[second.name]["instances"] == 0

    # Nothing new lands on it, whichever agent is asked, until it is eligible again.
    second.cli("deploy", str(template(tmp_path, count=4, separate=False)), "--service", "later")
    assert second.name not in {i["host"] for i in instances(second, "later")}
    first.cli("host", "eligibility", second.name, "on")
    first.cli("deploy", str(template(tmp_path, count=3, separate=True)), "--service", "again")
    assert second.name in {i["host"] for i in instances(first, "again")}


def test_a_cut_off_host_keeps_its_instances_and_a_frozen_one_gives_them_up_when_it_wakes(
        cluster: Cluster, tmp_path: Path) -> None:
    first = cluster.agents[0]
    placed, victim, survivor, lost = two_apart(cluster, tmp_path, "kept")
    wait_until("the victim's instance runs", victim.workloads, 20)
    [copy] = victim.workloads()

    def status_of(name: str) -> str:
        return str(next(h["status"] for h in survivor.json("host", "list") if h["name"] == name))

    # Cut off from the others' network, the victim's agent still writes the shared state: gossip calls it dead,
    # and its instance stays where it is (moving it would run it twice).
    cluster.rig.disconnect(victim.host)
    try:
        wait_until("the cut-off host declared dead", lambda: status_of(victim.name) == "dead", 30)
        time.sleep(2 + 3)  # the failover grace, and then some
        assert {i["instance"]: i["host"] for i in instances(survivor, "kept")} == placed
        assert victim.workloads() == [copy]
        listed = next(h for h in survivor.json("host", "list") if h["name"] == victim.name)
        assert listed["status"] == "dead" and listed["cut_off"] is True
        assert "cut off: its agent still writes the shared state" in survivor.cli("host", "list").stdout
    finally:
        cluster.rig.reconnect(victim.host)
    wait_until("the reconnected host alive again", lambda: status_of(victim.name) == "alive", 30)

    # Frozen (SIGSTOP), the victim's agent neither gossips nor writes: its instance moves, while its copy,
    # which nobody stopped, runs on. Woken, the agent finds the instance placed elsewhere and stops its copy.
    assert victim.proc is not None
    victim.proc.kill(signal.SIGSTOP)
    try:
        def moved() -> dict[str, Any] | None:
            found = next(i for i in instances(survivor, "kept") if i["instance"] == lost)
            return found if found["host"] != victim.name and found["state"] in ("running", "ready") else None

        instance = wait_until(f"{lost} moved off the frozen {victim.name}", moved, 60)
        assert wait_until("the moved instance answers", lambda: answers(cluster, instance), 20) == instance["host"]
        assert victim.workloads() == [copy]  # the frozen agent did not stop it: two copies, for now
    finally:
        victim.proc.kill(signal.SIGCONT)
    woken = time.monotonic()
    wait_until("the woken host stops its copy", lambda: not victim.workloads(), 30)
    handover = time.monotonic() - woken
    wait_until("the woken host alive again", lambda: status_of(victim.name) == "alive", 30)
    assert sum(len(a.workloads()) for a in cluster.agents) == 2
    assert victim.name not in {i["host"] for i in instances(first, "kept")}
    print(f"\nhandover: the woken host stopped its copy {handover:.1f} s after it woke")
