"""The cluster as one host sees it: :class:`Cluster` runs SWIM gossip (swim-protocol) and reports members.

Gossip alone, as swim-protocol 0.6.3 does it, is slow to spread metadata (B2), has no leave (B3), and
detects crashes with a fixed timer (B6). On top of its random gossip rounds this class pushes what matters
*directly*, to every member, and resends until acknowledged:

* a member that becomes reachable is sent this host's own gossip at once; a stranger (or a restarted
  member) that pings this host is sent everything it has not acknowledged, so a joiner learns every member
  from its seed in one round trip and introduces itself to each (B2);
* this host's failure-detector verdicts (suspect, dead, alive again) go to every member, the accused
  included, which refutes a false suspicion by pushing its own gossip;
* metadata changes, and the leave flag (B3), go to every member.

swim accepts a member's gossip about itself whatever its clock, so direct pushes of self-gossip are never
dropped as stale (the cause of B2). Everything here runs on the event loop of the task that entered the
cluster, in one task group: a failure in it cancels that task and leaves ``async with`` as a KhutulunError.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import math
import secrets
import socket
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any

from khutulun.cluster import _swim
from khutulun.cluster.discovery import Discovery
from khutulun.cluster.metadata import Announcement, HostMetadata, decode, encode
from khutulun.cluster.ports import PortClaim
from khutulun.cluster.secret import read_secret
from khutulun.cluster.settings import (
    Clock,
    ClusterSettings,
    SystemClock,
    is_ip,
    parse_address,
    suspicion_timeout,
)
from khutulun.cluster.view import (
    EventKind,
    Member,
    MembershipEvent,
    MemberStatus,
    Observation,
    Seen,
    View,
)
from khutulun.errors import ConflictError, InternalError, InvalidInputError, KhutulunError

__all__ = ["Cluster", "ClusterState", "EventStream"]

log = logging.getLogger(__name__)

_SEEN = {_swim.Status.ONLINE: Seen.ONLINE, _swim.Status.SUSPECT: Seen.SUSPECT, _swim.Status.OFFLINE: Seen.OFFLINE}
_FIXED = ("name", "incarnation")


class ClusterState(enum.Enum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


class EventStream:
    """Membership events from the moment :meth:`Cluster.events` made it until the cluster closes (or
    :meth:`close`). Take :meth:`Cluster.members` after making it for a snapshot that nothing falls between."""

    def __init__(self, subscribers: set[asyncio.Queue[MembershipEvent | None]]) -> None:
        self._queue: asyncio.Queue[MembershipEvent | None] = asyncio.Queue()
        self._subscribers = subscribers
        subscribers.add(self._queue)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> MembershipEvent:
        event = await self._queue.get()
        if event is None:
            self.close()
            raise StopAsyncIteration
        return event

    def close(self) -> None:
        self._subscribers.discard(self._queue)


class Cluster:
    """This host's membership of the cluster: ``async with Cluster(settings, metadata) as cluster: ...``.

    Leaving the ``async with`` without :meth:`leave` stops answering at once: the others see a crash.
    """

    def __init__(self, settings: ClusterSettings, metadata: HostMetadata, *, clock: Clock | None = None) -> None:
        self.settings = settings
        self._clock: Clock = clock or SystemClock()
        if not metadata.incarnation:
            metadata = dataclasses.replace(metadata, incarnation=secrets.token_hex(6))
        self._metadata = metadata
        self._state = ClusterState.UNOPENED
        self._stack = AsyncExitStack()
        self._tasks: list[asyncio.Task[None]] = []
        self._group: asyncio.TaskGroup | None = None
        self._gossip: _swim.GossipWorker  # made by _open
        self._subscribers: set[asyncio.Queue[MembershipEvent | None]] = set()
        self._claim: PortClaim | None = None
        self._name = ""
        self._view: View | None = None
        self._leaving = False
        # Filled synchronously from inside swim (the Hooks), handled by the run loop.
        self._wake = asyncio.Event()
        self._acked = asyncio.Event()
        self._changed: dict[str, _swim.Member] = {}
        self._verdicts: set[str] = set()
        self._contacts: dict[str, bool] = {}
        self._accusation = False
        # The run loop's own bookkeeping.
        self._reachable: set[str] = set()
        self._pushes: dict[tuple[str, str], tuple[int, float]] = {}  # (target, subject) → (resends left, last sent)
        self._retry: dict[str, tuple[float, float]] = {}  # member → (when to ping next, backoff)
        self._last_contact: dict[str, float] = {}
        self._seeds: set[str] = set()
        self._unresolved: set[str] = set()
        self._resolving = False
        self._unreadable: set[str] = set()
        self._last_refute = -math.inf

    # -- what the rest of Khutulun sees -------------------------------------------------------------------

    @property
    def state(self) -> ClusterState:
        return self._state

    @property
    def address(self) -> str:
        """This member's gossip ``host:port`` (the port chosen, when the settings said 0)."""
        return self._name

    @property
    def metadata(self) -> HostMetadata:
        return self._metadata

    @property
    def local(self) -> Member:
        """This host as a member."""
        return self._require_view().local

    def members(self) -> list[Member]:
        """Every member this host knows, itself included, sorted by name. Members that are dead or left stay
        listed until ``forget_after``."""
        return self._require_view().members()

    def member(self, address: str) -> Member | None:
        view = self._require_view()
        return view.local if address == view.local.address else view.get(address)

    def events(self) -> EventStream:
        if self._state is ClusterState.CLOSED:
            raise InternalError("the cluster is closed: it has no more events")
        return EventStream(self._subscribers)

    def update_metadata(self, **changes: Any) -> HostMetadata:
        """Change this host's metadata (not its name) and tell every member; returns the new metadata."""
        self._require_open()
        fixed = sorted(set(changes) & set(_FIXED))
        if fixed:
            raise InvalidInputError(f"a host's {', '.join(fixed)} cannot change while its agent runs")
        try:
            metadata = dataclasses.replace(self._metadata, **changes)
        except TypeError as e:
            raise InvalidInputError(f"not a host metadata field: {e}") from None
        if metadata == self._metadata:
            return metadata
        self._announce(metadata)
        self._publish(MembershipEvent(EventKind.UPDATED, self._require_view().set_local(metadata)))
        return metadata

    async def add_peer(self, address: str) -> None:
        """Join (or rejoin) through the member at ``address``; returns once it is pinged, not joined."""
        self._require_open()
        name = await self._resolve(address)
        if name is None:
            raise InvalidInputError(f"cannot resolve the peer address {address!r}")
        if name != self._name:
            self._seeds.add(name)
            self._retry.pop(name, None)
            self._wake.set()

    async def leave(self) -> None:
        """Say goodbye and stop: others see this member ``left`` rather than ``dead``. Call it from the task
        that entered the cluster (it closes the cluster's task group).

        B3: swim has no leave message. The leave flag goes into this host's metadata, pushed to every member and
        resent until each acknowledges it or ``leave_timeout`` passes; then gossip stops.
        """
        if self._state is not ClusterState.OPEN or self._leaving:
            return
        self._leaving = True
        self._announce(self._metadata)
        self._publish(MembershipEvent(EventKind.LEFT, self._require_view().set_local(self._metadata,
                                                                                      MemberStatus.LEFT)))
        local = self._gossip.members.local
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.leave_timeout
        while True:  # the run loop resends; this waits until every member has acknowledged, or the deadline
            self._drop_acked()
            if not any(subject == local.name for _, subject in self._pushes) or loop.time() >= deadline:
                break
            self._acked.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    await self._acked.wait()
        await self._shutdown()

    # -- the lifecycle --------------------------------------------------------------------------------------

    async def __aenter__(self) -> Cluster:
        if self._state is not ClusterState.UNOPENED:
            raise InternalError(f"a Cluster is opened once only (this one is {self._state.value})")
        self._state = ClusterState.OPEN
        try:
            await self._open()
        except BaseException:
            await self._shutdown()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._shutdown()

    async def _open(self) -> None:
        settings = self.settings
        secret = await asyncio.to_thread(read_secret, settings.secret_file)
        host, port = parse_address(settings.bind, what="gossip bind address")
        self._claim = PortClaim(host, port)
        port = self._claim.acquire()  # B8
        if settings.advertise is not None:
            adv_host, adv_port = parse_address(settings.advertise, what="gossip advertise address")
        else:
            adv_host, adv_port = host, port
        self._name = f"{adv_host}:{adv_port}"
        config = _swim.GossipConfig(
            suspicion=self._suspicion, secret=secret, local_name=self._name,
            peers=[],  # seeds are pinged by this class, with backoff, and again whenever they are unreachable
            local_metadata=encode(Announcement(self._metadata)),
            ping_interval=settings.ping_interval, ping_timeout=settings.ping_timeout,
            ping_req_count=settings.ping_req_count, ping_req_timeout=settings.ping_req_timeout,
            sync_interval=settings.sync_interval, bind_host=host, bind_port=port, mtu_size=settings.mtu)
        hooks = _Hooks(self)
        members = _swim.GossipMembers(config, hooks)
        self._gossip = _swim.GossipWorker(config, members, hooks)
        self._view = View(self._clock, Member(self._name, MemberStatus.ALIVE, self._metadata, self._clock.time(),
                                              local=True))
        try:
            await self._stack.enter_async_context(_swim.GossipTransport(config, self._gossip))
        except OSError as e:  # the claim checked the port a moment ago: this is a race with another process
            raise ConflictError(f"cannot bind the gossip address {host}:{port}: {e.strerror}") from e
        worker_task = await self._stack.enter_async_context(self._gossip)
        self._stack.push_async_callback(self._gossip.stop)
        for seed in settings.seeds:
            await self._add_seed(seed)
        self._group = group = await self._stack.enter_async_context(asyncio.TaskGroup())
        self._tasks = [group.create_task(self._run(), name=f"gossip {self._name}"),
                       group.create_task(self._watch(worker_task), name=f"gossip watch {self._name}")]
        if settings.discovery is not None:
            discovery = Discovery(settings.discovery, secret=secret, interface=adv_host, gossip=self._name,
                                  known=self._knows, join=self.add_peer, interval=settings.beacon_interval)
            self._tasks.append(group.create_task(discovery.run(), name=f"gossip discovery {self._name}"))
        log.info("gossip on %s as %s (seeds: %s)", self._name, self._metadata.name,
                 ", ".join(sorted(self._seeds | self._unresolved)) or "none")

    async def _shutdown(self) -> None:
        if self._state is ClusterState.CLOSED:
            return
        self._state = ClusterState.CLOSED
        for task in self._tasks:
            task.cancel()
        try:
            await self._stack.aclose()
        except BaseExceptionGroup as group:  # from our task group: one of its tasks failed
            first = next((e for e in _leaves(group) if isinstance(e, KhutulunError)), None)
            raise first or InternalError(f"gossip failed: {group.exceptions[0]!r}") from group
        finally:
            if self._claim is not None:
                self._claim.release()
            for queue in self._subscribers:
                queue.put_nowait(None)
            self._subscribers.clear()

    async def _watch(self, worker: asyncio.Task[Any]) -> None:
        """swim's worker is a bare task nobody awaits: if it ends, gossip is dead, and the cluster must say so."""
        await asyncio.wait([worker])
        error = None if worker.cancelled() else worker.exception()
        raise InternalError(f"swim's gossip worker stopped: {error!r}")

    def _knows(self, address: str) -> bool:
        """Whether ``address`` is a member this host has heard from, or is trying to reach."""
        member = self._require_view().get(address)
        return (member is not None and member.available) or address in self._seeds

    # -- hooks: called synchronously from inside swim (through _Hooks); record and wake the run loop ---------

    def _on_change(self, member: _swim.Member) -> None:
        if not member.local:
            self._changed[member.name] = member
            self._wake.set()

    def _on_verdict(self, member: _swim.Member) -> None:
        self._verdicts.add(member.name)
        self._wake.set()

    def _on_accusation(self) -> None:
        self._accusation = True
        self._wake.set()

    def _on_ack(self) -> None:
        self._acked.set()

    def _on_contact(self, name: str, *, pinged: bool) -> None:
        self._contacts[name] = self._contacts.get(name, False) or pinged
        self._wake.set()

    # -- the run loop ---------------------------------------------------------------------------------------

    async def _run(self) -> None:
        settings = self.settings
        loop = asyncio.get_running_loop()
        tick = min(settings.push_interval, settings.ping_interval)
        next_retry = next_maintenance = loop.time()
        while True:
            self._handle_changes()
            self._handle_contacts()
            self._handle_verdicts()
            now = loop.time()
            if self._accusation and now - self._last_refute >= settings.push_interval:
                # Refute a suspicion at once, to everyone: swim would wait for its gossip rounds (B7), and its
                # refutation can carry a lower clock than the accusation, so only direct self-gossip is sure to
                # be accepted.
                self._accusation, self._last_refute = False, now
                self._push(self._gossip.members.local, self._gossip.gossip_members.available())
            if now >= next_retry:
                self._retry_pushes()
                next_retry = now + settings.push_interval
            if now >= next_maintenance:
                self._maintain(now)
                next_maintenance = now + settings.ping_interval
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(tick):
                    await self._wake.wait()
            self._wake.clear()

    def _handle_changes(self) -> None:
        changed, self._changed = self._changed, {}
        members = self._gossip.gossip_members
        view = self._require_view()
        for name, member in changed.items():
            if members.lookup(name) is not member:
                continue  # forgotten since
            available = bool(member.status & _swim.Status.AVAILABLE)
            if available and name not in self._reachable:
                self._reachable.add(name)
                self._retry.pop(name, None)
                # B2: tell a member about this host the moment it is reachable; swim would wait until a gossip
                # round picks it (1 in N-1 every sync_interval), and drops third-party gossip about a member
                # whose clock it has stamped itself. Self-gossip is always accepted.
                self._push(members.local, [member])
            elif not available:
                self._reachable.discard(name)
            for event in view.observe(self._observation(member)):
                self._publish(event)
            current = view.get(name)
            if current is not None and current.status is MemberStatus.LEFT:
                members.gone.add(name)
            else:
                members.gone.discard(name)
            if current is None and not available and _swim.metadata_known(member):
                members.forget(member)  # a corpse the seed told us about: never seen alive, nothing to report

    def _observation(self, member: _swim.Member) -> Observation:
        seen = _SEEN[member.status]
        if not _swim.metadata_known(member):
            return Observation(member.name, seen, None)
        try:
            announcement = decode(member.metadata)
        except InvalidInputError as e:
            if member.name not in self._unreadable:
                self._unreadable.add(member.name)
                log.warning("member %s: %s", member.name, e.message)
            return Observation(member.name, seen, None, unreadable=True)
        if announcement is None:
            if member.name not in self._unreadable:
                self._unreadable.add(member.name)
                log.warning("member %s gossips metadata in another format (%s): another Khutulun version?",
                            member.name, ", ".join(sorted(member.metadata)))
            return Observation(member.name, seen, None, unreadable=True)
        return Observation(member.name, seen, announcement.metadata, leaving=announcement.leaving)

    def _handle_contacts(self) -> None:
        contacts, self._contacts = self._contacts, {}
        now = asyncio.get_running_loop().time()
        members = self._gossip.gossip_members
        for name, pinged in contacts.items():
            if now - self._last_contact.get(name, -math.inf) < self.settings.ping_interval:
                continue
            self._last_contact[name] = now
            member = members.get(name)  # swim's handler has usually created it already
            if member.local:
                continue
            if not member.status & _swim.Status.AVAILABLE:
                self._gossip.probe(member)  # it is alive after all: confirm, as the failure detector would
            if pinged:
                # B2: a stranger, a restarted member or one thought dead pinged us: send it everything at once,
                # so that it learns every member (and introduces itself to each) in one round trip.
                self._gossip.dump(member)

    def _handle_verdicts(self) -> None:
        verdicts, self._verdicts = self._verdicts, set()
        members = self._gossip.gossip_members
        for name in verdicts:
            member = members.lookup(name)
            if member is None:
                continue
            # B6: every member starts its suspicion timer when it hears, and ends it when the first verdict of
            # dead reaches it; pushing verdicts to all at once makes both happen everywhere together. The
            # accused is told too, so that it refutes a false suspicion at once.
            targets = members.available()
            if member not in targets:
                targets.append(member)
            self._push(member, targets)

    def _push(self, subject: _swim.Member, targets: list[_swim.Member]) -> None:
        for target in targets:
            if target.local:
                continue
            self._gossip.send_gossip(target, subject)
            self._pushes[target.name, subject.name] = (self.settings.push_attempts - 1,
                                                       asyncio.get_running_loop().time())

    def _pending_pushes(self) -> list[tuple[tuple[str, str], _swim.Member, _swim.Member]]:
        """Pushes not acknowledged yet (the others are dropped): (key, target, subject)."""
        members = self._gossip.gossip_members
        pending = []
        for key, (left, _) in list(self._pushes.items()):
            target = members.lookup(key[0])
            subject = members.local if key[1] == self._name else members.lookup(key[1])
            if target is None or subject is None or left <= 0 or members.acked(target, subject):
                del self._pushes[key]
            else:
                pending.append((key, target, subject))
        return pending

    def _drop_acked(self) -> None:
        self._pending_pushes()

    def _retry_pushes(self) -> None:
        """Send again what has waited a push_interval for its acknowledgement."""
        now = asyncio.get_running_loop().time()
        for key, target, subject in self._pending_pushes():
            left, sent = self._pushes[key]
            if now - sent >= self.settings.push_interval * 0.9:  # the run loop's timer may fire a little early
                self._gossip.send_gossip(target, subject)
                self._pushes[key] = (left - 1, now)

    def _maintain(self, now: float) -> None:
        members = self._gossip.gossip_members
        view = self._require_view()
        # B5: dead and left members are forgotten after a while, here and in swim's tables.
        for address in view.expired(self.settings.forget_after):
            view.remove(address)
            member = members.lookup(address)
            if member is not None:
                members.forget(member)
            self._reachable.discard(address)
            self._retry.pop(address, None)
            self._last_contact.pop(address, None)
            self._unreadable.discard(address)
            log.info("forgot member %s", address)
        # Seeds that do not answer, and dead members, get a bare ping with backoff; the answer reaches the tap,
        # which has the member probed properly. This is how a cluster heals after a partition, and how a seed
        # that starts later is found.
        settings = self.settings
        wanted = {seed: settings.ping_interval for seed in self._seeds if seed not in self._reachable}
        wanted |= {m.address: settings.reconnect_interval for m in view.members() if m.status is MemberStatus.DEAD}
        for name in set(self._retry) - set(wanted):
            del self._retry[name]
        for name, first in wanted.items():
            when, delay = self._retry.setdefault(name, (now, first))
            if now >= when:
                self._gossip.send_ping(members.get(name))
                self._retry[name] = (now + delay, min(delay * 2, settings.reconnect_interval))
        if self._unresolved and not self._resolving and self._group is not None:
            self._resolving = True
            self._tasks.append(self._group.create_task(self._resolve_seeds(), name=f"gossip resolve {self._name}"))

    # -- helpers -------------------------------------------------------------------------------------------

    def _announce(self, metadata: HostMetadata) -> None:
        encoded = encode(Announcement(metadata, leaving=self._leaving))  # raises before anything changes
        self._metadata = metadata
        members = self._gossip.gossip_members
        members.update(members.local, new_metadata=encoded)
        self._push(members.local, members.available())

    def _publish(self, event: MembershipEvent) -> None:
        log.log(logging.DEBUG if event.kind is EventKind.UPDATED else logging.INFO, "member %s (%s) %s",
                event.member.name, event.member.address, event.kind.value)
        if event.kind is EventKind.JOINED:
            twins = [m.address for m in self._require_view().members()
                     if m.name == event.member.name and m.address != event.member.address and m.available]
            if twins:
                log.warning("two members call themselves %s: %s and %s; give each host its own name",
                            event.member.name, event.member.address, ", ".join(twins))
        for queue in self._subscribers:
            queue.put_nowait(event)

    def _suspicion(self) -> float:
        return suspicion_timeout(self.settings, 1 + len(self._gossip.gossip_members.available()))

    async def _add_seed(self, address: str) -> None:
        name = await self._resolve(address)
        if name is None:
            self._unresolved.add(address)
        elif name != self._name:
            self._seeds.add(name)

    async def _resolve_seeds(self) -> None:
        try:
            for address in list(self._unresolved):
                name = await self._resolve(address)
                if name is not None:
                    self._unresolved.discard(address)
                    if name != self._name:
                        self._seeds.add(name)
        finally:
            self._resolving = False

    async def _resolve(self, address: str) -> str | None:
        """``host:port`` with the host as an IP address, as swim names members; None if it does not resolve."""
        host, port = parse_address(address, what="seed address")
        if port == 0:
            raise InvalidInputError(f"the seed address {address!r} needs a port")
        if is_ip(host):
            return f"{host}:{port}"
        family = socket.AF_INET6 if ":" in self._name.rpartition(":")[0] else socket.AF_INET
        try:
            async with asyncio.timeout(self.settings.resolve_timeout):
                infos = await asyncio.get_running_loop().getaddrinfo(host, port, family=family,
                                                                     type=socket.SOCK_DGRAM)
        except (OSError, TimeoutError) as e:
            log.warning("cannot resolve the seed %s (%s); trying again later", address, e)
            return None
        return f"{infos[0][4][0]}:{port}"

    def _require_open(self) -> None:
        if self._state is not ClusterState.OPEN or self._leaving:
            raise InternalError(f"the cluster is not open (it is {self._state.value})")

    def _require_view(self) -> View:
        if self._view is None:
            raise InternalError("the cluster has not been opened")
        return self._view


class _Hooks:
    """What swim's subclasses call (:class:`khutulun.cluster._swim.Hooks`), kept off the Cluster's own surface."""

    def __init__(self, cluster: Cluster) -> None:
        self.member_changed = cluster._on_change
        self.verdict = cluster._on_verdict
        self.accused = cluster._on_accusation
        self.acked = cluster._on_ack
        self.contact = cluster._on_contact


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out
