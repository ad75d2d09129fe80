"""swim-protocol 0.6.3, subclassed where it falls short; the only module that imports it.

The defects are those of ``../shared/GOSSIP-NOTES.md`` (B1-B10). Each workaround lives in a subclass here or in
:mod:`khutulun.cluster.membership`, with a comment naming the defect; nothing of swim's code is copied. What this
module adds to swim:

* :class:`GossipConfig`: the suspicion timeout is asked for each time a suspicion starts, so that it grows with
  the cluster (B6), instead of swim's fixed value;
* :class:`GossipMembers`: ``find`` that honours ``exclude`` (B4) and skips members that left (B3); ``forget``
  (B5); hooks on the failure detector's own verdicts, on gossip that accuses the local member, on acks and on
  every change; and the local member can no longer suspect itself (B11 below);
* :class:`GossipWorker`: a failure detector that never dies without peers (B1) and probes round-robin; a tap
  on received packets (every verified packet, before swim handles it); direct sends of one member's gossip,
  and of a bare ping;
* :class:`GossipTransport`: swim's wire format (its ``UdpPack``: pickle, HMAC), carried by our own
  implementation of its ``Transport`` interface, so that the sockets are exclusive (B8), nothing runs in
  threads, every task is owned and awaited on close (B9), and TCP input is bounded.

Found while building on 0.6.3, not in the notes:

* B11: gossip saying the *local* member is SUSPECT starts, in ``Worker._apply_gossip``, a suspicion timer for
  the local member, whose expiry marks the local member SUSPECT (and, on the next accusation, OFFLINE) in its
  own table, and gossips that with a fresh clock.
* B12: ``Worker._apply_gossip`` starts or cancels the suspicion timer from the gossip's status *before* the
  gossip is applied, and whether or not it is: a stale ONLINE (swim re-sends every entry to every member) or
  a stale OFFLINE cancels the timer of a member that stays SUSPECT, which then waits for this host's next
  probe of it. Measured: 1 crash in 8 at 30 members seen dead after 13 s instead of 7.
* B13: the clocks are Lamport counters per host, and a host drops third-party gossip whose clock is not above
  its own stamp for that member. Hosts' counters drift apart, so a verdict made later by a host with a lower
  counter (a suspicion, a death) is dropped by the hosts that stamped the member last. Measured with B12.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NoReturn, Protocol

from swimprotocol.listener import Listener
from swimprotocol.members import Member, Members
from swimprotocol.packet import Gossip, GossipAck, Packet, Ping
from swimprotocol.status import Status
from swimprotocol.transport import Transport
from swimprotocol.udp.config import UdpConfig
from swimprotocol.udp.pack import UdpPack
from swimprotocol.worker import Worker

__all__ = [
    "GossipConfig",
    "GossipMembers",
    "GossipTransport",
    "GossipWorker",
    "Hooks",
    "Member",
    "Status",
    "metadata_known",
]

log = logging.getLogger(__name__)

TCP_LIMIT = 256 * 1024  # bytes one gossip packet may take over TCP (swim reads without a limit, before the signature)
TCP_TIMEOUT = 5.0  # seconds one TCP send or receive may take


class Hooks(Protocol):
    """What the cluster is told, synchronously, from inside swim's code: record and return, never raise."""

    def member_changed(self, member: Member) -> None: ...

    def verdict(self, member: Member) -> None:
        """This host's failure detector changed ``member``'s status."""

    def accused(self) -> None:
        """Gossip says the local member is suspect or offline."""

    def acked(self) -> None: ...

    def contact(self, name: str, *, pinged: bool) -> None:
        """A verified packet came from ``name``, which is unknown, unavailable or has restarted."""


def metadata_known(member: Member) -> bool:
    return member.metadata is not Member.METADATA_UNKNOWN


class GossipConfig(UdpConfig):
    def __init__(self, *, suspicion: Callable[[], float], **kwargs: Any) -> None:
        self._suspicion = suspicion
        super().__init__(**kwargs)

    # B6: swim reads ``config.suspect_timeout`` when a suspicion starts; this makes it the current
    # suspicion_mult x log10(N) x ping_interval rather than one fixed number. (BaseConfig declares the attribute
    # Final; a property is the only way to make it follow the cluster's size.)
    @property  # type: ignore[misc]
    def suspect_timeout(self) -> float:
        return self._suspicion()

    @suspect_timeout.setter
    def suspect_timeout(self, value: float) -> None:
        pass  # BaseConfig.__init__ assigns its fixed default; ours is computed


class _Listener(Listener[Member]):
    def __init__(self, hooks: Hooks) -> None:
        super().__init__()
        self._hooks = hooks

    def notify(self, item: Member) -> None:
        # Called synchronously by Members._update right after a change is saved: nothing is lost, unlike
        # Listener.poll(), which misses what happens while its caller is busy.
        super().notify(item)
        self._hooks.member_changed(item)


class GossipMembers(Members):
    def __init__(self, config: GossipConfig, hooks: Hooks) -> None:
        self._hooks: Hooks | None = None  # Members.__init__ updates the local member before hooks apply
        super().__init__(config)
        self._hooks = hooks
        self.listener = _Listener(hooks)
        self.gone: set[str] = set()
        """Members that left (B3): not probed, not gossiped to, until they come back as a new incarnation."""

    def lookup(self, name: str) -> Member | None:
        """The member called ``name``, if known (``get`` creates it)."""
        return self._members.get(name)

    def available(self) -> list[Member]:
        """Non-local members that answer, or may still: the targets of pushes and probes."""
        return [m for m in self.get_status(Status.AVAILABLE) if m.name not in self.gone]

    def acked(self, target: Member, subject: Member) -> bool:
        """Whether ``target`` acknowledged ``subject``'s current gossip (swim keeps this per member)."""
        return not target._needs_gossip(subject)

    # B4: swim's find() draws from the whole status set and never applies ``exclude``, so check() can send the
    # ping-req for a suspect to the suspect itself. This draws only from the members it may return, and never
    # from members that left (B3), so that neither probes nor swim's gossip rounds go to them.
    def find(self, count: int, *, status: Status = Status.ALL,
             exclude: Iterable[Member] = frozenset()) -> frozenset[Member]:
        excluded = set(exclude)
        candidates = [m for m in self.get_status(status) if m not in excluded and m.name not in self.gone]
        return frozenset(random.sample(candidates, min(count, len(candidates))))

    def update(self, member: Member, *, new_status: Status | None = None,
               new_metadata: Mapping[str, bytes] | None = None) -> None:
        if member.local and new_status is not None and new_status != Status.ONLINE:
            # B11: the local member never suspects itself; it refutes instead (see accused()).
            new_status = None
            if new_metadata is None:
                return
        # B13: every change this host makes is stamped with a hybrid logical clock, never below the wall clock in
        # microseconds; hosts still take the largest clock they see, as swim does. A verdict made later is then a
        # larger clock wherever the member was stamped before (to within the hosts' clock skew).
        self._next_clock = max(self._next_clock, time.time_ns() // 1000)
        before = member.status
        super().update(member, new_status=new_status, new_metadata=new_metadata)
        if self._hooks is not None and not member.local and member.status != before:
            self._hooks.verdict(member)

    def apply(self, member: Member, source: Member, clock: int, *, status: Status,
              metadata: Mapping[str, bytes] | None) -> None:
        super().apply(member, source, clock, status=status, metadata=metadata)
        if member.local and status != Status.ONLINE and self._hooks is not None:
            self._hooks.accused()

    def ack_gossip(self, member: Member, source: Member, clock: int) -> None:
        super().ack_gossip(member, source, clock)
        if self._hooks is not None:
            self._hooks.acked()

    # B5: swim never drops a member. Its tables hold members weakly except for ``_non_local``; dropping it there
    # and in the name and status indexes forgets the member at once.
    def forget(self, member: Member) -> None:
        if member.local:
            return
        self._non_local.discard(member)
        if self._members.get(member.name) is member:
            del self._members[member.name]
        for shuffle in self._statuses.values():
            shuffle.discard(member)
        self.gone.discard(member.name)


class _Inbox(asyncio.Queue[Packet]):
    """swim's receive queue, with a tap: every packet whose signature verified passes ``tap`` first."""

    def __init__(self, tap: Callable[[Packet], None]) -> None:
        super().__init__()
        self._tap = tap

    def put_nowait(self, item: Packet) -> None:
        self._tap(item)
        super().put_nowait(item)


class GossipWorker(Worker):
    def __init__(self, config: GossipConfig, members: GossipMembers, hooks: Hooks) -> None:
        super().__init__(config, members)
        self.gossip_members = members
        self._hooks = hooks
        self._inbox = _Inbox(self._tap)
        self._applying = False
        self._order: list[str] = []  # this round's members still to probe, popped from the end
        self._round: set[str] = set()  # every member in this round, probed or not

    @property
    def recv_queue(self) -> asyncio.Queue[Packet]:
        return self._inbox  # both the transport and swim's handler take the queue from this property

    # B12: swim sets the suspicion timer from the gossip's status before applying the gossip, stale or not. The
    # timer follows the member's status once the gossip is applied instead: a stale ONLINE no longer cancels the
    # suspicion of a member that stays SUSPECT, and the local member (never SUSPECT to itself, B11) never has one.
    def _apply_gossip(self, local: Member, source: Member, member: Member, gossip: Gossip) -> GossipAck:
        self._applying = True
        try:
            ack = super()._apply_gossip(local, source, member, gossip)
        finally:
            self._applying = False
        super()._handle_status(member, member.status)
        return ack

    def _handle_status(self, target: Member, status: Status) -> None:
        if not self._applying:  # check() calls it with its own verdict, which stands
            super()._handle_status(target, status)

    def _tap(self, packet: Packet) -> None:
        name, validity = packet.source.name, packet.source.validity
        member = self.gossip_members.lookup(name)
        if member is not None and member.local:
            return
        if member is None or member.source.validity != validity or not member.status & Status.AVAILABLE:
            self._hooks.contact(name, pinged=isinstance(packet, Ping))

    # B1: swim's loop does ``assert targets`` and dies for good when there is nobody to probe (a seed started
    # alone), while the rest of the worker runs on. This loop waits for members instead. It also probes
    # round-robin in a shuffled order, as memberlist does, so that every member is probed once per N rounds
    # (swim picks at random, any status, so a dead member can wait unboundedly long for its probe).
    async def run_failure_detection(self) -> NoReturn:
        while True:
            target = self._next_target()
            if target is not None:
                self.run_subtask(self.check(target))
            await asyncio.sleep(self.config.ping_interval)

    def _next_target(self) -> Member | None:
        available = self.gossip_members.available()
        # A member that appeared during this round goes in at a random place, as in memberlist: appended to the
        # next round instead, a member that crashes right after joining would wait up to N intervals for a probe.
        for new in available:
            if new.name not in self._round:
                self._round.add(new.name)
                self._order.insert(random.randint(0, len(self._order)), new.name)
        for _ in range(2):
            while self._order:
                member = self.gossip_members.lookup(self._order.pop())
                if member is not None and member.status & Status.AVAILABLE \
                        and member.name not in self.gossip_members.gone:
                    return member
            self._order = [m.name for m in available]
            self._round = set(self._order)
            random.shuffle(self._order)
        return None

    def probe(self, member: Member) -> None:
        """Probe ``member`` now, as the failure detector would (ping, then ping-reqs)."""
        self.run_subtask(self.check(member))

    def send_gossip(self, target: Member, subject: Member) -> None:
        """Send ``target`` one gossip packet about ``subject`` now (swim's own rounds send to one random member)."""
        self.send_queue.put_nowait((target, self._build_gossip(self.members.local, subject)))

    def send_ping(self, target: Member) -> None:
        """A bare ping: an answer reaches the tap, swim itself ignores it (nobody waits for it)."""
        self.send_queue.put_nowait((target, Ping(source=self.members.local.source)))

    def dump(self, target: Member) -> None:
        """Send ``target`` all the gossip it has not acknowledged: what a newcomer needs."""
        self.run_subtask(self.disseminate(target))

    async def stop(self) -> None:
        """Cancel the worker and every task it started, and wait for them (swim's __aexit__ only cancels)."""
        tasks = [t for t in (self._task, *self._running, *self._suspect.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, pack: UdpPack, deliver: Callable[[Packet], None]) -> None:
        self._pack = pack
        self._deliver = deliver

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        # B9: swim makes a task per datagram and unpacks in a thread pool; a signature check and an unpickle of a
        # few hundred bytes take microseconds, so this does them here, in order, with nothing left behind.
        packet = self._pack.unpack(data)
        if packet is not None:
            self._deliver(packet)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP port unreachable from a member that has gone: its probes will tell


class GossipTransport(Transport[UdpConfig]):
    """UDP for packets that fit ``mtu_size``, a TCP connection each for larger ones, both on one port.

    B8: the sockets are bound without SO_REUSEPORT (swim sets it), so a second process cannot share the port.
    """

    config_type = UdpConfig

    def __init__(self, config: UdpConfig, worker: Worker) -> None:
        super().__init__(config, worker)
        self._pack = UdpPack(config.signatures)
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.config.bind_host, self.config.bind_port
        if host is None or port is None:
            raise ValueError("GossipTransport needs bind_host and bind_port")
        self._tcp = await asyncio.start_server(self._receive_tcp, host, port, reuse_address=True)
        try:
            self._udp, _ = await loop.create_datagram_endpoint(
                lambda: _Datagrams(self._pack, self.worker.recv_queue.put_nowait), local_addr=(host, port))
        except BaseException:
            self._tcp.close()
            raise
        self._spawn(self._send_loop())

    async def __aexit__(self, *exc_info: object) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._tcp is not None:
            await self._tcp.wait_closed()

    def _spawn(self, coroutine: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_loop(self) -> NoReturn:
        parser, mtu = self.config.address_parser, self.config.mtu_size
        while True:
            member, packet = await self.worker.send_queue.get()
            data = bytes(self._pack.pack(packet))
            address = parser.parse(member.name)
            if len(data) <= mtu:
                if self._udp is not None and not self._udp.is_closing():
                    self._udp.sendto(data, (address.host, address.port))
            else:
                self._spawn(self._send_tcp(data, address.host, address.port))

    async def _send_tcp(self, data: bytes, host: str, port: int) -> None:
        try:
            async with asyncio.timeout(TCP_TIMEOUT):
                _, writer = await asyncio.open_connection(host, port)
                try:
                    writer.write(data)
                    await writer.drain()
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except (OSError, TimeoutError) as e:
            log.debug("gossip over TCP to %s:%s failed: %s", host, port, e)  # like a lost datagram

    async def _receive_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(TCP_TIMEOUT):
                while chunk := await reader.read(65536):
                    size += len(chunk)
                    if size > TCP_LIMIT:
                        return
                    chunks.append(chunk)
        except (OSError, TimeoutError):
            return
        finally:
            writer.close()
        packet = self._pack.unpack(b"".join(chunks))
        if packet is not None:
            self.worker.recv_queue.put_nowait(packet)
