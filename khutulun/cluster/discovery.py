"""Optional discovery by UDP multicast: hosts on one network segment find each other without a seed.

Each host sends a beacon to the multicast group from its gossip address's interface (time to live 1: it never
leaves the segment) and listens on the group. A beacon is the sender's gossip address and the time, signed with
HMAC-SHA256 under the cluster's gossip secret; one that does not verify, is older than a minute, or names a
member already known is ignored. Any other is joined through, as ``khutulun host add`` would. The beacon says
nothing that gossip would not, and carries no code (gossip packets are pickles; a beacon is JSON).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import NoReturn

from khutulun.cluster.settings import parse_group
from khutulun.errors import KhutulunError

__all__ = ["Discovery", "beacon", "read_beacon"]

log = logging.getLogger(__name__)

_MAC = hashlib.sha256().digest_size
_MAX_AGE = 60.0  # seconds a beacon stays good: a replayed one is at worst an old address to ping
_FAST_BEACONS = 5  # the first beacons go at a fifth of the interval, so that a cluster forms quickly


def beacon(secret: bytes, gossip: str, now: float) -> bytes:
    payload = json.dumps({"gossip": gossip, "t": now}, separators=(",", ":")).encode()
    return hmac.digest(secret, payload, "sha256") + payload


def read_beacon(secret: bytes, data: bytes, now: float) -> str | None:
    """The gossip address a beacon announces, or None for one that does not verify or is too old."""
    mac, payload = data[:_MAC], data[_MAC:]
    if len(mac) != _MAC or not hmac.compare_digest(mac, hmac.digest(secret, payload, "sha256")):
        return None
    try:
        found = json.loads(payload)
        gossip, sent = str(found["gossip"]), float(found["t"])
    except (ValueError, KeyError, TypeError):
        return None
    return gossip if abs(now - sent) <= _MAX_AGE else None


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, deliver: Callable[[bytes], None]) -> None:
        self._deliver = deliver

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self._deliver(data)

    def error_received(self, exc: Exception) -> None:
        pass  # a beacon is sent again soon


class Discovery:
    """Beacons out, peers in: ``join(address)`` is called for each new host heard of."""

    def __init__(self, group: str, *, secret: bytes, interface: str, gossip: str,
                 known: Callable[[str], bool], join: Callable[[str], Awaitable[None]], interval: float) -> None:
        self.group, self.port = parse_group(group)
        self._secret = secret
        self._interface = interface
        self._gossip = gossip
        self._known = known
        self._join = join
        self._interval = interval
        self._heard: asyncio.Queue[str] = asyncio.Queue()

    def _socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        try:
            # Every agent on one host (and every network namespace's) listens on the same group and port.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.group, self.port))  # the group's datagrams only, not all of the port's
            interface = socket.inet_aton(self._interface)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(self.group) + interface)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, interface)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)  # agents on one host find each other
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _heard_of(self, data: bytes) -> None:
        address = read_beacon(self._secret, data, time.time())
        if address is not None and address != self._gossip and not self._known(address):
            self._heard.put_nowait(address)

    async def run(self) -> None:
        """Until cancelled. Where multicast cannot work (no such interface, no route), it says so once and
        stops: seeds and ``khutulun host add`` still join, and gossip goes on."""
        loop = asyncio.get_running_loop()
        try:
            sock = self._socket()
            transport, _ = await loop.create_datagram_endpoint(lambda: _Receiver(self._heard_of), sock=sock)
        except OSError as e:
            log.warning("multicast discovery on %s:%s from %s is not possible (%s): use seeds or "
                        "'khutulun host add'", self.group, self.port, self._interface, e.strerror or e)
            return
        sender = asyncio.create_task(self._send(transport), name="discovery beacons")
        try:
            while True:
                address = await self._heard.get()
                if self._known(address):
                    continue
                log.info("heard of %s by multicast: joining through it", address)
                with contextlib.suppress(KhutulunError):  # a bad address in a good beacon: never fatal
                    await self._join(address)
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            transport.close()

    async def _send(self, transport: asyncio.DatagramTransport) -> NoReturn:
        sent = 0
        while True:
            with contextlib.suppress(OSError):  # a network that is down for a moment: the next beacon goes
                transport.sendto(beacon(self._secret, self._gossip, time.time()), (self.group, self.port))
            sent += 1
            await asyncio.sleep(self._interval / 5 if sent < _FAST_BEACONS else self._interval)
