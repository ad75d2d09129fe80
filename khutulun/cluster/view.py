"""The membership as Khutulun reports it, derived from what gossip says: pure, no network and no swim types.

swim-protocol knows ONLINE, SUSPECT and OFFLINE and has no notion of a member leaving. The view adds LEFT
(from the leave flag in a member's metadata, B3), tells a restart (a new incarnation) from a recovery, and
turns every change into one :class:`MembershipEvent`. It reports a member once its metadata is known; a member
first seen already dead or gone is not reported at all (a joiner learns about old corpses from its seed).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from khutulun.cluster.metadata import HostMetadata
from khutulun.cluster.settings import Clock

__all__ = ["EventKind", "Member", "MemberStatus", "MembershipEvent", "Observation", "Seen", "View"]


class MemberStatus(enum.StrEnum):
    ALIVE = "alive"
    SUSPECT = "suspect"  # missed its probes; dead unless it refutes within the suspicion timeout
    LEFT = "left"  # said goodbye
    DEAD = "dead"  # did not refute in time


class EventKind(enum.StrEnum):
    JOINED = "joined"  # a member appeared, or appeared again as a new incarnation (the agent restarted)
    UPDATED = "updated"  # its metadata changed
    SUSPECT = "suspect"
    ALIVE = "alive"  # back from suspect or dead, same incarnation
    LEFT = "left"
    DEAD = "dead"


@dataclass(frozen=True)
class Member:
    address: str
    """Its gossip ``host:port``: what identifies it in the cluster."""
    status: MemberStatus
    metadata: HostMetadata | None
    """None only when its metadata is there but unreadable (a Khutulun version with another format)."""
    since: float
    """Wall-clock time when this host last saw its status change."""
    local: bool = False

    @property
    def name(self) -> str:
        return self.metadata.name if self.metadata is not None else self.address

    @property
    def available(self) -> bool:
        return self.status in (MemberStatus.ALIVE, MemberStatus.SUSPECT)


@dataclass(frozen=True)
class MembershipEvent:
    kind: EventKind
    member: Member


class Seen(enum.Enum):
    """What the failure detector says, in swim's terms."""

    ONLINE = "online"
    SUSPECT = "suspect"
    OFFLINE = "offline"


@dataclass(frozen=True)
class Observation:
    address: str
    seen: Seen
    metadata: HostMetadata | None
    leaving: bool = False
    unreadable: bool = False
    """Its metadata is there but could not be decoded: report it without metadata."""


_STATUS = {Seen.ONLINE: MemberStatus.ALIVE, Seen.SUSPECT: MemberStatus.SUSPECT, Seen.OFFLINE: MemberStatus.DEAD}


class View:
    def __init__(self, clock: Clock, local: Member) -> None:
        self._clock = clock
        self._members: dict[str, Member] = {}
        self._changed_at: dict[str, float] = {}  # monotonic time of the last status change, for forgetting
        self.local = local

    def members(self) -> list[Member]:
        return sorted([self.local, *self._members.values()], key=lambda m: (m.name, m.address))

    def get(self, address: str) -> Member | None:
        return self._members.get(address)

    def set_local(self, metadata: HostMetadata, status: MemberStatus = MemberStatus.ALIVE) -> Member:
        if status != self.local.status:
            self.local = replace(self.local, metadata=metadata, status=status, since=self._clock.time())
        else:
            self.local = replace(self.local, metadata=metadata)
        return self.local

    def observe(self, obs: Observation) -> list[MembershipEvent]:
        """Apply what gossip says about one member; the events it makes (none when nothing changed)."""
        if obs.metadata is None and not obs.unreadable:
            return []  # not reported until its metadata arrives
        status = MemberStatus.LEFT if obs.leaving else _STATUS[obs.seen]
        previous = self._members.get(obs.address)
        restarted = (previous is not None and previous.metadata is not None and obs.metadata is not None
                     and previous.metadata.incarnation != obs.metadata.incarnation)
        if previous is None or restarted:
            if status not in (MemberStatus.ALIVE, MemberStatus.SUSPECT):
                if previous is not None and previous.status != status:  # the restart is already over
                    return self._change(obs, previous, status)
                return []
            return [self._add(obs, status, EventKind.JOINED)]
        if previous.status == MemberStatus.LEFT and status != MemberStatus.LEFT:
            # Once it said goodbye, failing probes (or stale gossip) must not turn it into dead or alive again;
            # only a new incarnation (above) brings it back.
            return []
        return self._change(obs, previous, status)

    def _add(self, obs: Observation, status: MemberStatus, kind: EventKind) -> MembershipEvent:
        member = Member(obs.address, status, obs.metadata, self._clock.time())
        self._members[obs.address] = member
        self._changed_at[obs.address] = self._clock.monotonic()
        return MembershipEvent(kind, member)

    def _change(self, obs: Observation, previous: Member, status: MemberStatus) -> list[MembershipEvent]:
        metadata = obs.metadata if obs.metadata is not None or obs.unreadable else previous.metadata
        if status == previous.status and metadata == previous.metadata:
            return []
        if status == previous.status:
            member = replace(previous, metadata=metadata)
            self._members[obs.address] = member
            return [MembershipEvent(EventKind.UPDATED, member)]
        member = replace(previous, status=status, metadata=metadata, since=self._clock.time())
        self._members[obs.address] = member
        self._changed_at[obs.address] = self._clock.monotonic()
        return [MembershipEvent(EventKind(status.value), member)]

    def remove(self, address: str) -> None:
        self._members.pop(address, None)
        self._changed_at.pop(address, None)

    def expired(self, forget_after: float) -> list[str]:
        """Members dead or left for ``forget_after`` seconds: to be forgotten (B5)."""
        now = self._clock.monotonic()
        return [address for address, member in self._members.items()
                if not member.available and now - self._changed_at[address] >= forget_after]
