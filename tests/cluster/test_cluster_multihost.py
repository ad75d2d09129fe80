"""Membership between real agents' processes, each on its own host (network namespace, address, bind mount of the
shared directory), over real UDP gossip: joins, crashes, leaves, metadata, and the workarounds that need a
network to show (B1, B3, B8, the secret).

Timing is ClusterSettings.fast: probe every 0.25 s, suspicion 1 s (4 x 0.25 s; log10 N < 1 here).
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable

import pytest

from tests.cluster.conftest import Nodes
from tests.cluster.rig import Line, Proc

pytestmark = pytest.mark.multihost

# Until every other host reports a crash: the first probe of the dead host (round-robin over 2 others: 0.5 s),
# its direct and indirect probes (0.15 + 0.3 s), the suspicion (1 s); and a margin for a loaded 2-core machine.
CRASH_BOUND = 0.5 + 0.45 + 1.0 + 1.5


def member(name: str, kind: str) -> object:
    return lambda line: line.get("event") == "member" and line["name"] == name and line["kind"] == kind


def wait_member(proc: Proc, name: str, kind: str, timeout: float = 5.0, start: int = 0) -> Line:
    return proc.wait_for(member(name, kind), timeout, start=start)  # type: ignore[arg-type]


def cluster(nodes: Nodes, count: int, **options: object) -> list[Proc]:
    """h1 alone, then h2..hN joining through it; returns once everyone has seen everyone."""
    procs = [nodes.start(1, **options)]  # type: ignore[arg-type]
    procs += [nodes.start(i, 1, **options) for i in range(2, count + 1)]  # type: ignore[arg-type]
    for proc in procs:
        for other in procs:
            if other is not proc:
                wait_member(proc, other.name, "joined")
    return procs


def members(proc: Proc) -> list[dict[str, object]]:
    mark = proc.mark()
    proc.send(cmd="members")
    listed: list[dict[str, object]] = proc.wait_for(lambda line: line["event"] == "members", 5, start=mark)["members"]
    return listed


def test_hosts_join_through_one_seed_and_see_each_others_metadata(nodes: Nodes) -> None:
    h1 = nodes.start(1)
    h2 = nodes.start(2, 1, labels={"zone": "2"})
    h3 = nodes.start(3, 1, labels={"zone": "3"})
    started = max(p.lines[0]["t"] for p in (h1, h2, h3))
    for proc in (h1, h2, h3):
        for other in {"h1", "h2", "h3"} - {proc.name}:
            line = wait_member(proc, other, "joined")
            assert line["t"] - started < 2.0, f"{proc.name} saw {other} only after {line['t'] - started:.2f} s"
            host = nodes.host(int(other[1]))
            assert line["address"] == f"{host.address}:7946"
            assert line["metadata"]["address"] == host.address
            assert line["metadata"]["labels"] == ({} if other == "h1" else {"zone": other[1]})
            assert line["metadata"]["incarnation"]
    listed = members(h2)
    assert [(m["name"], m["status"]) for m in listed] == [("h1", "alive"), ("h2", "alive"), ("h3", "alive")]


def test_hosts_that_all_list_each_other_as_seeds_converge_at_once(nodes: Nodes) -> None:
    """B2: a member that probes a pre-listed peer stamps it ONLINE with its own clock, and swim then drops the
    peer's metadata when it comes from anyone but the peer itself: 25-72 s at 30 members."""
    hosts = range(1, len(nodes.rig.hosts) + 1)
    # swim's own gossip rounds slowed down to one every 2 s, so that only the direct pushes can pass the test.
    procs = [nodes.start(i, *(j for j in hosts if j != i), ready=False, settings={"sync_interval": 2.0})
             for i in hosts]
    for proc in procs:
        proc.wait_for(lambda line: line["event"] == "ready", 20)
    started = max(p.lines[0]["t"] for p in procs)
    for proc in procs:
        for other in procs:
            if other is not proc:
                line = wait_member(proc, other.name, "joined")
                assert line["t"] - started < 1.0 and line["metadata"]["name"] == other.name


def test_a_killed_host_is_seen_dead_by_every_other(nodes: Nodes) -> None:
    h1, h2, h3 = cluster(nodes, 3)
    marks = [h1.mark(), h2.mark()]
    h3.kill(signal.SIGKILL)
    killed = time.time()
    for proc, mark in zip((h1, h2), marks, strict=True):
        dead = wait_member(proc, "h3", "dead", timeout=10, start=mark)
        assert dead["t"] - killed < CRASH_BOUND, f"{proc.name} saw h3 dead after {dead['t'] - killed:.2f} s"
    assert [m["status"] for m in members(h1)] == ["alive", "alive", "dead"]


def test_a_graceful_leave_is_seen_within_a_second(nodes: Nodes) -> None:
    """B3: swim has no leave; others would see a crash after the suspicion timeout."""
    h1, h2, h3 = cluster(nodes, 3)
    marks = [h1.mark(), h3.mark()]
    h2.send(cmd="leave")
    leaving = h2.wait_for(lambda line: line["event"] == "leaving", 5)
    for proc, mark in zip((h1, h3), marks, strict=True):
        left = wait_member(proc, "h2", "left", timeout=3, start=mark)
        assert left["t"] - leaving["t"] < 1.0
    h2.wait_for(lambda line: line["event"] == "left", 2)
    assert h2.wait(5) == 0
    time.sleep(2.0)  # longer than a crash takes to be seen: still left, never dead
    assert [m["status"] for m in members(h1)] == ["alive", "left", "alive"]


def test_a_metadata_update_spreads(nodes: Nodes) -> None:
    h1, h2, h3 = cluster(nodes, 3)
    marks = [h1.mark(), h2.mark()]
    h3.send(cmd="update", changes={"labels": {"disk": "ssd"}, "eligible": False})
    sent = h3.wait_for(lambda line: line["event"] == "updated", 5)
    for proc, mark in zip((h1, h2), marks, strict=True):
        update = wait_member(proc, "h3", "updated", timeout=3, start=mark)
        assert update["metadata"]["labels"] == {"disk": "ssd"} and update["metadata"]["eligible"] is False
        assert update["t"] - sent["t"] < 0.5


def test_a_seed_started_alone_still_detects_failures(nodes: Nodes) -> None:
    """B1: swim's failure detector died on ``assert targets`` in a member started without peers."""
    h1 = nodes.start(1)
    time.sleep(1.0)  # four probe intervals with nobody to probe
    h2 = nodes.start(2, 1)
    wait_member(h1, "h2", "joined")
    mark = h1.mark()
    h2.kill(signal.SIGKILL)
    killed = time.time()
    # Nobody else is left to gossip it: only h1's own failure detector can find h2 dead.
    dead = wait_member(h1, "h2", "dead", timeout=10, start=mark)
    assert dead["t"] - killed < CRASH_BOUND


def test_a_host_with_the_wrong_secret_never_joins(nodes: Nodes, tmp_path_factory: pytest.TempPathFactory) -> None:
    h1, h2 = cluster(nodes, 2)
    other = nodes.rig.root / "other.key"
    other.write_text("a different secret, long enough\n")
    other.chmod(0o600)
    h3 = nodes.start(3, 1, secret=other)
    time.sleep(3.0)  # twelve probe intervals; joining takes a fraction of one
    assert not [line for proc in (h1, h2, h3) for line in proc.lines if line.get("event") == "member"
                and "h3" in (line["name"], proc.name)]
    assert [m["name"] for m in members(h3)] == ["h3"]


def test_a_second_agent_on_the_same_address_fails_clearly(nodes: Nodes) -> None:
    """B8: swim's SO_REUSEPORT let a second agent bind the same host:port and take half the datagrams."""
    h1 = nodes.start(1)
    twin = nodes.start(1, name="twin")
    error = twin.wait_for(lambda line: line["event"] == "error", 5)
    assert error["type"] == "ConflictError"
    assert "another Khutulun agent already gossips on port 7946" in error["message"]
    assert twin.wait(5) == 3
    h2 = nodes.start(2, 1)  # the first one is unaffected
    wait_member(h1, "h2", "joined")
    wait_member(h2, "h1", "joined")


def test_a_secret_others_can_read_is_refused(nodes: Nodes) -> None:
    loose = nodes.rig.root / "loose.key"
    loose.write_text(nodes.secret.read_text())
    loose.chmod(0o644)
    proc = nodes.start(1, secret=loose)
    error = proc.wait_for(lambda line: line["event"] == "error", 5)
    assert error["type"] == "InvalidInputError" and "group or others (mode 0644)" in error["message"]
    assert proc.wait(5) == 3


def test_a_restarted_host_joins_again_as_a_new_incarnation(nodes: Nodes) -> None:
    h1, h2 = cluster(nodes, 2)
    before = wait_member(h1, "h2", "joined")["metadata"]["incarnation"]
    mark = h1.mark()
    h2.kill(signal.SIGKILL)
    h2.wait(5)
    again = nodes.start(2, 1)
    rejoined = wait_member(h1, "h2", "joined", timeout=5, start=mark)
    assert rejoined["metadata"]["incarnation"] != before
    assert rejoined["t"] - again.lines[0]["t"] < 1.0
    wait_member(again, "h1", "joined")


def test_a_host_frozen_until_dead_comes_back_alive(nodes: Nodes) -> None:
    """A false death (a stopped process, a partition) heals: the dead are pinged now and then."""
    h1, h2, h3 = cluster(nodes, 3)
    marks = [h1.mark(), h2.mark()]
    h3.kill(signal.SIGSTOP)
    try:
        for proc, mark in zip((h1, h2), marks, strict=True):
            wait_member(proc, "h3", "dead", timeout=10, start=mark)
    finally:
        h3.kill(signal.SIGCONT)
    resumed = time.time()
    for proc, mark in zip((h1, h2), marks, strict=True):
        alive = wait_member(proc, "h3", "alive", timeout=10, start=mark)
        assert alive["t"] - resumed < 3.0
    time.sleep(0.5)
    for proc in (h1, h2, h3):
        assert {m["status"] for m in members(proc)} == {"alive"}, proc.name


def test_a_partition_heals(nodes: Nodes) -> None:
    """Each side of a partition declares the other dead; once it heals, the dead are pinged, answer, and are
    probed back to life on both sides."""
    h1, h2, h3 = cluster(nodes, 3)
    marks = [p.mark() for p in (h1, h2, h3)]
    nodes.rig.disconnect(nodes.host(3))
    try:
        for proc, mark in zip((h1, h2), marks[:2], strict=True):
            wait_member(proc, "h3", "dead", timeout=10, start=mark)
        for other in ("h1", "h2"):
            wait_member(h3, other, "dead", timeout=10, start=marks[2])
    finally:
        nodes.rig.reconnect(nodes.host(3))
    healed = time.time()
    for proc, mark in zip((h1, h2), marks[:2], strict=True):
        assert wait_member(proc, "h3", "alive", timeout=10, start=mark)["t"] - healed < 3.0
    for other in ("h1", "h2"):
        assert wait_member(h3, other, "alive", timeout=10, start=marks[2])["t"] - healed < 3.0


def test_every_host_sees_one_shared_directory_with_working_locks(nodes: Nodes) -> None:
    """The rig itself: each host's bind mount is the same directory, and flock works across hosts."""
    rig = nodes.rig
    hold = ("import fcntl, json, os, sys, time\n"
            f"p = os.path.join({str(rig.mount)!r}, 'lock')\n"
            "f = open(p, 'w'); fcntl.flock(f, fcntl.LOCK_EX); f.write('h1'); f.flush()\n"
            "print(json.dumps({'event': 'held'}), flush=True); time.sleep(30)\n")
    try_lock = ("import fcntl, json, os\n"
                f"p = os.path.join({str(rig.mount)!r}, 'lock')\n"
                "f = open(p, 'r+')\n"
                "try:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB); got = True\n"
                "except BlockingIOError:\n    got = False\n"
                "print(json.dumps({'event': 'tried', 'got': got, 'content': f.read()}), flush=True)\n")
    holder = rig.spawn(rig.hosts[0], [sys.executable, "-c", hold], name="holder")
    try:
        holder.wait_for(lambda line: line["event"] == "held", 10)
        tried = rig.spawn(rig.hosts[1], [sys.executable, "-c", try_lock], name="trier")
        line = tried.wait_for(lambda line: line["event"] == "tried", 10)
        assert line == {"event": "tried", "got": False, "content": "h1"}
        assert (rig.shared / "lock").read_text() == "h1"
        assert not (rig.mount / "lock").exists()  # outside the hosts, the mount point is an empty directory
    finally:
        holder.stop()


def test_hosts_on_one_segment_find_each_other_by_multicast_without_seeds(nodes: Nodes) -> None:
    group = {"discovery": "239.255.70.46:17947", "beacon_interval": 2.0}
    procs = [nodes.start(host, settings=group) for host in (1, 2, 3)]

    def joined(address: str) -> Callable[[Line], bool]:
        return lambda line: (line["event"] == "member" and line["kind"] == "joined" and line["address"] == address
                             and line["metadata"] is not None)

    for proc, host in zip(procs, (1, 2, 3), strict=True):
        for other in {1, 2, 3} - {host}:
            proc.wait_for(joined(nodes.address(other)), 15)

