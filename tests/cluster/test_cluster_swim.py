"""The workarounds inside swim-protocol's own objects (B1, B4, B5, B6, B11), without a network."""

from __future__ import annotations

import asyncio
import time

from swimprotocol.packet import Gossip, Ping
from swimprotocol.status import Status

from khutulun.cluster._swim import GossipConfig, GossipMembers, GossipWorker


class Hooks:
    def __init__(self) -> None:
        self.changed: list[str] = []
        self.verdicts: list[tuple[str, Status]] = []
        self.accusations = 0
        self.contacts: list[tuple[str, bool]] = []

    def member_changed(self, member: object) -> None:
        self.changed.append(getattr(member, "name", "?"))

    def verdict(self, member: object) -> None:
        self.verdicts.append((getattr(member, "name", "?"), getattr(member, "status", Status.ALL)))

    def accused(self) -> None:
        self.accusations += 1

    def acked(self) -> None:
        pass

    def contact(self, name: str, *, pinged: bool) -> None:
        self.contacts.append((name, pinged))


def _later() -> int:
    """A clock above every clock made so far (they follow the wall clock in microseconds, B13)."""
    return time.time_ns() // 1000 + 10**6


def _swim(suspicion: float = 2.0) -> tuple[GossipConfig, GossipMembers, Hooks]:
    hooks = Hooks()
    config = GossipConfig(suspicion=lambda: suspicion, secret=b"0123456789abcdef", local_name="127.0.0.1:1",
                          peers=[], ping_interval=0.02, ping_timeout=0.01, ping_req_timeout=0.01)
    return config, GossipMembers(config, hooks), hooks


def _online(members: GossipMembers, *names: str) -> None:
    for name in names:
        members.update(members.get(name), new_status=Status.ONLINE, new_metadata={"k": name.encode()})


def test_find_honours_exclude_and_skips_members_that_left() -> None:
    """B4: swim's find() could return the excluded member (the suspect, for its own ping-req)."""
    _, members, _ = _swim()
    _online(members, "a:1", "b:1", "c:1")
    a, b = members.get("a:1"), members.get("b:1")
    members.gone.add("c:1")
    for _ in range(200):
        assert members.find(3, status=Status.AVAILABLE, exclude={a}) == {b}
    assert members.find(1, exclude={a, b}) == frozenset()


def test_forget_drops_a_member_everywhere() -> None:
    """B5: swim never removes a member."""
    _, members, _ = _swim()
    _online(members, "a:1", "b:1")
    a = members.get("a:1")
    members.update(a, new_status=Status.OFFLINE)
    members.update(a, new_status=Status.OFFLINE)
    members.forget(a)
    assert members.lookup("a:1") is None
    assert [m.name for m in members.available()] == ["b:1"]
    assert a not in members.get_status(Status.OFFLINE) and "a:1" not in members


def test_the_local_member_never_suspects_itself() -> None:
    """B11: an accusation started a suspicion timer for the local member, which then marked itself SUSPECT."""
    _, members, hooks = _swim()
    members.update(members.local, new_status=Status.SUSPECT)
    members.update(members.local, new_status=Status.OFFLINE)
    assert members.local.status == Status.ONLINE
    _online(members, "a:1")
    members.apply(members.local, members.get("a:1"), _later(), status=Status.SUSPECT, metadata=None)
    assert members.local.status == Status.ONLINE and hooks.accusations == 1


def test_only_this_hosts_own_status_changes_are_verdicts() -> None:
    _, members, hooks = _swim()
    _online(members, "a:1", "b:1")
    members.update(members.get("a:1"), new_status=Status.SUSPECT)
    members.apply(members.get("b:1"), members.get("a:1"), _later(), status=Status.SUSPECT, metadata=None)
    assert hooks.verdicts == [("a:1", Status.ONLINE), ("b:1", Status.ONLINE), ("a:1", Status.SUSPECT)]
    assert members.get("b:1").status == Status.SUSPECT


def test_the_suspicion_timeout_is_asked_each_time() -> None:
    """B6: a property, so that it follows the size of the cluster."""
    size = [1]
    config = GossipConfig(suspicion=lambda: 4.0 * size[0], secret=b"0123456789abcdef", local_name="127.0.0.1:1",
                          peers=[], suspect_timeout=5.0)
    assert config.suspect_timeout == 4.0
    size[0] = 3
    assert config.suspect_timeout == 12.0


async def test_failure_detection_survives_having_nobody_to_probe() -> None:
    """B1: swim's loop died on ``assert targets`` when started without peers."""
    config, members, hooks = _swim()
    worker = GossipWorker(config, members, hooks)
    task = asyncio.create_task(worker.run_failure_detection())
    try:
        await asyncio.sleep(0.1)
        assert not task.done()
        _online(members, "a:1")
        target, packet = await asyncio.wait_for(worker.send_queue.get(), 1)
        assert target.name == "a:1" and isinstance(packet, Ping)
    finally:
        task.cancel()
        await worker.stop()
        await asyncio.gather(task, return_exceptions=True)


async def test_probes_go_round_robin() -> None:
    config, members, hooks = _swim()
    worker = GossipWorker(config, members, hooks)
    _online(members, *(f"m{i}:1" for i in range(5)))
    first = [worker._next_target() for _ in range(5)]
    second = [worker._next_target() for _ in range(5)]
    assert {m.name for m in first if m} == {m.name for m in second if m} == {f"m{i}:1" for i in range(5)}
    members.gone.add("m0:1")
    assert all(m is not None and m.name != "m0:1" for m in (worker._next_target() for _ in range(8)))
    await worker.stop()


def test_the_tap_reports_strangers_and_restarts_only() -> None:
    config, members, hooks = _swim()
    worker = GossipWorker(config, members, hooks)
    _online(members, "a:1")
    a = members.get("a:1")
    worker.recv_queue.put_nowait(Ping(source=a.source))
    assert hooks.contacts == []
    worker.recv_queue.put_nowait(Ping(source=type(a.source)("a:1", b"restarted")))
    worker.recv_queue.put_nowait(Ping(source=type(a.source)("new:1", b"x")))
    assert hooks.contacts == [("a:1", True), ("new:1", True)]
    assert worker.recv_queue.qsize() == 3  # swim's handler still gets every packet


async def test_an_accusation_does_not_start_a_timer_against_ourselves() -> None:
    """B11, through swim's own path: Worker._apply_gossip starts a suspicion timer for whatever member the
    gossip is about, the local one included, and its expiry used to mark the local member SUSPECT."""
    config, members, hooks = _swim(suspicion=0.01)
    worker = GossipWorker(config, members, hooks)
    _online(members, "a:1")
    accusation = Gossip(source=members.get("a:1").source, name=members.local.name, clock=_later(),
                        status=Status.SUSPECT, metadata=None)
    worker._apply_gossip(members.local, members.get("a:1"), members.local, accusation)
    await asyncio.sleep(0.1)
    assert members.local.status == Status.ONLINE and hooks.accusations == 1
    await worker.stop()


def test_a_later_verdict_beats_an_earlier_stamp_made_elsewhere() -> None:
    """B13: with Lamport counters, a host whose counter ran ahead (it saw more changes) dropped the later
    verdicts of hosts behind it; with clocks that follow the wall clock, later is larger."""
    _, ahead, _ = _swim()
    _, behind, _ = _swim()
    for members in (ahead, behind):
        _online(members, "k:1", "src:1")
    for i in range(100):  # a hundred changes that ``behind`` never hears of
        ahead.update(ahead.get("src:1"), new_metadata={"n": str(i).encode()})
    ahead.update(ahead.get("k:1"), new_status=Status.SUSPECT)
    ahead.update(ahead.get("k:1"), new_status=Status.ONLINE)  # the last stamp on k, by ``ahead``
    time.sleep(0.005)
    behind.update(behind.get("k:1"), new_status=Status.SUSPECT)  # a later verdict, elsewhere
    ahead.apply(ahead.get("k:1"), ahead.get("src:1"), behind.get("k:1").clock, status=Status.SUSPECT,
                metadata=None)
    assert ahead.get("k:1").status == Status.SUSPECT


async def test_a_stale_online_does_not_cancel_a_suspicion() -> None:
    """B12: swim cancelled the suspicion timer on any ONLINE gossip, before finding it stale; the suspect then
    stayed SUSPECT until this host probed it again. The timer must run on, not start over."""
    config, members, hooks = _swim(suspicion=0.3)
    worker = GossipWorker(config, members, hooks)
    _online(members, "k:1", "src:1")
    k, src = members.get("k:1"), members.get("src:1")
    stale = Gossip(source=src.source, name="k:1", clock=k.clock, status=Status.ONLINE, metadata=None)
    members.update(k, new_status=Status.SUSPECT)
    worker._handle_status(k, Status.SUSPECT)  # as check() does
    await asyncio.sleep(0.2)
    worker._apply_gossip(members.local, src, k, stale)
    statuses = [k.status]
    await asyncio.sleep(0.2)  # 0.4 s after the suspicion: dead at 0.3 s, not 0.5 s (nor never)
    statuses.append(k.status)
    assert statuses == [Status.SUSPECT, Status.OFFLINE]
    await worker.stop()
