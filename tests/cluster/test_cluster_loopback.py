"""Clusters in this process, on loopback: the lifecycle, the port claim (B8), the secret, forgetting (B5).

Membership between real processes on separate hosts is in ``test_cluster_multihost.py``; these need no root.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from khutulun.cluster import (
    Cluster,
    ClusterSettings,
    ClusterState,
    EventKind,
    HostMetadata,
    MembershipEvent,
    MemberStatus,
)
from khutulun.errors import ConflictError, InternalError, InvalidInputError
from tests.cluster.rig import write_secret


class FakeClock:
    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return 1_700_000_000 + self.offset

    def monotonic(self) -> float:
        return asyncio.get_running_loop().time() + self.offset


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    return write_secret(tmp_path / "gossip.key")


def _settings(secret: Path, *seeds: str, **overrides: object) -> ClusterSettings:
    return ClusterSettings.fast(secret, seeds=seeds, **{"bind": "127.0.0.1:0", **overrides})


async def _until(condition: Callable[[], bool], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 -- the conditions read members(), which has no event of its own
            await asyncio.sleep(0.01)


async def test_join_update_and_leave(secret: Path) -> None:
    async with Cluster(_settings(secret), HostMetadata(name="a")) as a:
        events = a.events()
        async with Cluster(_settings(secret, a.address), HostMetadata(name="b", labels={"zone": "1"})) as b:
            await _until(lambda: len(a.members()) == len(b.members()) == 2)
            assert [m.name for m in b.members()] == ["a", "b"]
            assert [m.local for m in b.members()] == [False, True]
            b.update_metadata(labels={"zone": "2"}, eligible=False)
            await _until(lambda: a.members()[1].metadata == b.metadata)
            await b.leave()
            assert b.state is ClusterState.CLOSED
            await _until(lambda: a.members()[1].status is MemberStatus.LEFT, within=1.0)
        seen: list[MembershipEvent] = []
        async with asyncio.timeout(1):
            async for event in events:
                seen.append(event)
                if event.kind is EventKind.LEFT:
                    break
        assert [(e.kind.value, e.member.name) for e in seen] == [("joined", "b"), ("updated", "b"), ("left", "b")]
        assert seen[1].member.metadata is not None and dict(seen[1].member.metadata.labels) == {"zone": "2"}


async def test_a_second_cluster_on_the_same_port_fails(secret: Path) -> None:
    """B8: swim binds with SO_REUSEPORT, so a second agent would share the port's datagrams silently."""
    async with Cluster(_settings(secret), HostMetadata(name="a")) as a:
        port = a.address.rpartition(":")[2]
        twin = Cluster(_settings(secret, bind=f"127.0.0.1:{port}"), HostMetadata(name="twin"))
        with pytest.raises(ConflictError, match=f"another Khutulun agent already gossips on port {port}"):
            await twin.__aenter__()
        assert twin.state is ClusterState.CLOSED


async def test_a_port_held_by_another_process_is_refused(secret: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as swim itself would
        other.bind(("127.0.0.1", 0))
        port = other.getsockname()[1]
        cluster = Cluster(_settings(secret, bind=f"127.0.0.1:{port}"), HostMetadata(name="a"))
        with pytest.raises(ConflictError, match=f"127.0.0.1:{port} \\(UDP\\) is already in use"):
            await cluster.__aenter__()
    with pytest.raises(InvalidInputError, match="not an address of this host"):
        await Cluster(_settings(secret, bind="192.0.2.1:7946"), HostMetadata(name="a")).__aenter__()


async def test_a_secret_others_can_read_is_refused_and_a_cluster_opens_once(secret: Path) -> None:
    os.chmod(secret, 0o644)
    cluster = Cluster(_settings(secret), HostMetadata(name="a"))
    with pytest.raises(InvalidInputError, match="group or others"):
        async with cluster:
            pass
    with pytest.raises(InternalError, match="opened once only"):
        async with cluster:
            pass


async def test_metadata_changes_are_checked(secret: Path) -> None:
    async with Cluster(_settings(secret), HostMetadata(name="a")) as a:
        with pytest.raises(InvalidInputError, match="name cannot change"):
            a.update_metadata(name="b")
        with pytest.raises(InvalidInputError, match="not a host metadata field"):
            a.update_metadata(colour="red")
        with pytest.raises(InvalidInputError, match="more than the 1024"):
            a.update_metadata(labels={str(i): "x" * 100 for i in range(20)})
        assert a.metadata.labels == {}


async def test_dead_members_are_forgotten(secret: Path) -> None:
    """B5, with the clock moved forward instead of waiting ``forget_after``."""
    clock = FakeClock()
    async with Cluster(_settings(secret, forget_after=600), HostMetadata(name="a"), clock=clock) as a:
        async with Cluster(_settings(secret, a.address), HostMetadata(name="b")):
            await _until(lambda: len(a.members()) == 2)
        await _until(lambda: a.members()[1].status is MemberStatus.DEAD)  # closed without leave(): a crash
        clock.offset += 600
        await _until(lambda: len(a.members()) == 1, within=2)
        assert a._gossip.gossip_members.lookup(a.members()[0].address) is not None  # itself, still
        assert len(a._gossip.gossip_members) == 1


async def test_a_dead_gossip_worker_fails_the_cluster_loudly(secret: Path) -> None:
    """swim runs its worker as a bare task; if it ends, the cluster must not carry on as if nothing happened."""
    with pytest.raises(InternalError, match="swim's gossip worker stopped"):
        async with Cluster(_settings(secret), HostMetadata(name="a")) as a:
            a._gossip._task.cancel()  # type: ignore[union-attr]
            await asyncio.sleep(5)
    assert a.state is ClusterState.CLOSED
