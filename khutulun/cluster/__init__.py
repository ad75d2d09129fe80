"""Cluster membership: which hosts are there, alive or not, and what each says about itself.

:class:`Cluster` runs SWIM gossip (the swim-protocol package, kept inside this package and worked around where
``../shared/GOSSIP-NOTES.md`` found it wanting) and reports :class:`Member` s, a stream of
:class:`MembershipEvent` s and each host's :class:`HostMetadata`::

    settings = ClusterSettings(secret_file=Path("/etc/khutulun/gossip.key"), bind="10.0.0.5:7946",
                               seeds=("10.0.0.1:7946",))
    async with Cluster(settings, HostMetadata(name="web-1", api="http://10.0.0.5:7070")) as cluster:
        events = cluster.events()
        for member in cluster.members(): ...
        async for event in events: ...
        await cluster.leave()

Only :mod:`khutulun.errors` exceptions leave this package.
"""

from khutulun.cluster.membership import Cluster, ClusterState, EventStream
from khutulun.cluster.metadata import HostMetadata
from khutulun.cluster.settings import (
    DEFAULT_GROUP,
    DEFAULT_PORT,
    Clock,
    ClusterSettings,
    SystemClock,
    suspicion_timeout,
)
from khutulun.cluster.view import EventKind, Member, MembershipEvent, MemberStatus

__all__ = [
    "DEFAULT_GROUP",
    "DEFAULT_PORT",
    "Clock",
    "Cluster",
    "ClusterSettings",
    "ClusterState",
    "EventKind",
    "EventStream",
    "HostMetadata",
    "Member",
    "MemberStatus",
    "MembershipEvent",
    "SystemClock",
    "suspicion_timeout",
]
