"""How a cluster member is configured and timed: a frozen :class:`ClusterSettings`, and the clock it reads.

Every interval comes from here, so that tests can run the protocol fast (STYLE 19) and the benchmark can
measure the defaults. The defaults follow hashicorp/memberlist's LAN profile where swim-protocol has an
equivalent: probe every second, three indirect probes, suspicion 4 x log10(N) probe intervals.
"""

from __future__ import annotations

import ipaddress
import math
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from khutulun.errors import InvalidInputError

__all__ = ["DEFAULT_GROUP", "DEFAULT_PORT", "Clock", "ClusterSettings", "SystemClock", "is_ip", "parse_address",
           "parse_group", "suspicion_timeout"]

DEFAULT_PORT = 7946  # memberlist's and Serf's gossip port: operators' firewalls already know it


class Clock(Protocol):
    """Where the cluster reads the time: ``time()`` for the ``since`` it reports (wall clock, comparable between
    hosts), ``monotonic()`` for every duration it measures itself."""

    def time(self) -> float: ...

    def monotonic(self) -> float: ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


def parse_address(text: str, *, default_port: int = DEFAULT_PORT, what: str = "address") -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port`` → (host, port). The port may be 0 only where the caller allows it."""
    text = text.strip()
    if not text:
        raise InvalidInputError(f"the {what} is empty")
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise InvalidInputError(f"the {what} {text!r} has no closing ']'")
        host, rest = text[1:end], text[end + 1:]
        if rest and not rest.startswith(":"):
            raise InvalidInputError(f"the {what} {text!r} is not [host]:port")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:  # a bare IPv6 address, without a port
        host = text
    if not host:
        raise InvalidInputError(f"the {what} {text!r} has no host")
    if not port_text:
        return host, default_port
    try:
        port = int(port_text)
    except ValueError:
        raise InvalidInputError(f"the {what} {text!r} has a port that is not a number") from None
    if not 0 <= port <= 65535:
        raise InvalidInputError(f"the {what} {text!r} has a port outside 0-65535")
    return host, port


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


DEFAULT_GROUP = "239.255.70.46:7947"
"""Multicast discovery's group: organization-local (RFC 2365), on the port after gossip's."""


def parse_group(text: str) -> tuple[str, int]:
    """``group[:port]`` → (group, port); the group must be an IPv4 multicast address."""
    group, port = parse_address(text, default_port=int(DEFAULT_GROUP.rpartition(":")[2]), what="discovery group")
    try:
        packed = socket.inet_aton(group)
    except OSError:
        raise InvalidInputError(f"the discovery group {text!r} is not an IPv4 address") from None
    if not 224 <= packed[0] <= 239 or group.count(".") != 3:
        raise InvalidInputError(f"the discovery group {text!r} is not a multicast address (224.0.0.0/4)")
    if port == 0:
        raise InvalidInputError(f"the discovery group {text!r} needs a port")
    return group, port


@dataclass(frozen=True)
class ClusterSettings:
    """Everything a :class:`~khutulun.cluster.Cluster` needs from outside, in seconds where it is a time."""

    secret_file: Path
    """The gossip secret, shared by every host; readable by root or the agent's user only."""
    bind: str = f"127.0.0.1:{DEFAULT_PORT}"
    """Where gossip listens (UDP and TCP on the same port). Port 0 picks a free port. The default makes a
    cluster of one host; a real cluster binds the host's address (or 0.0.0.0 with ``advertise``)."""
    advertise: str | None = None
    """The ``host:port`` other members reach this one at; needed when ``bind`` is a wildcard address."""
    seeds: tuple[str, ...] = ()
    """Members to join through (``host:port``); none for the first host of a cluster."""
    discovery: str | None = None
    """A multicast ``group:port`` to find other hosts on the segment by (:data:`DEFAULT_GROUP`); None: off."""
    beacon_interval: float = 10.0  # discovery's beacons, the first five at a fifth of it

    ping_interval: float = 1.0  # one probe of one member, round-robin
    ping_timeout: float = 0.3  # a direct probe's ack
    ping_req_count: int = 3  # indirect probes when the direct one fails (swim's default of 1: B6)
    ping_req_timeout: float = 0.6  # the indirect probes' acks
    suspicion_mult: float = 4.0  # suspicion lasts suspicion_mult x max(1, log10 N) x ping_interval (B6)
    sync_interval: float = 0.5  # swim's own gossip round, to one random member
    push_interval: float = 0.2  # direct pushes (joins, verdicts, metadata, leave) are re-sent this often until acked
    push_attempts: int = 3
    leave_timeout: float = 1.0  # the longest leave() waits for every member to acknowledge
    reconnect_interval: float = 10.0  # seeds and dead members are pinged with backoff up to this
    forget_after: float = 1800.0  # a dead or left member is forgotten this long after (B5)
    resolve_timeout: float = 5.0  # resolving a seed's host name
    mtu: int = 1400  # larger gossip packets go over TCP; 1400 leaves room for IP/UDP headers and tunnels

    def __post_init__(self) -> None:
        host, _ = parse_address(self.bind, what="gossip bind address")
        if self.advertise is None and host in ("0.0.0.0", "::", ""):
            raise InvalidInputError(f"gossip binds to the wildcard address {self.bind!r}: also set the address to "
                                    "advertise to other hosts (advertise = 'HOST:PORT')")
        if self.advertise is not None:
            adv_host, adv_port = parse_address(self.advertise, what="gossip advertise address")
            if not is_ip(adv_host):
                raise InvalidInputError(f"the gossip advertise address {self.advertise!r} must be an IP address")
            if adv_port == 0:
                raise InvalidInputError(f"the gossip advertise address {self.advertise!r} needs a port")
        for seed in self.seeds:
            parse_address(seed, what="seed address")
        if self.discovery is not None:
            parse_group(self.discovery)
        positive = {name: getattr(self, name) for name in (
            "ping_interval", "ping_timeout", "ping_req_timeout", "suspicion_mult", "sync_interval", "push_interval",
            "leave_timeout", "reconnect_interval", "forget_after", "resolve_timeout", "beacon_interval")}
        for name, value in positive.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise InvalidInputError(f"the gossip setting {name} = {value!r} must be a positive number of seconds")
        if self.ping_timeout >= self.ping_interval:
            raise InvalidInputError(f"ping_timeout ({self.ping_timeout}) must be shorter than ping_interval "
                                    f"({self.ping_interval})")
        if self.ping_req_count < 1 or self.push_attempts < 1:
            raise InvalidInputError("ping_req_count and push_attempts must be at least 1")
        if not 576 <= self.mtu <= 65000:
            raise InvalidInputError(f"the gossip mtu {self.mtu} must be between 576 and 65000")

    @classmethod
    def fast(cls, secret_file: Path, **overrides: Any) -> ClusterSettings:
        """Timing for tests: about four times faster than the defaults, still safe on a loaded 2-core machine."""
        timing: dict[str, Any] = {"ping_interval": 0.25, "ping_timeout": 0.15, "ping_req_timeout": 0.3,
                                  "sync_interval": 0.1, "push_interval": 0.1, "reconnect_interval": 1.0}
        return cls(secret_file=secret_file, **(timing | overrides))


def suspicion_timeout(settings: ClusterSettings, members: int) -> float:
    """How long a suspected member has to refute before it is declared dead, for a cluster of ``members``.

    B6: swim-protocol waits a fixed ``suspect_timeout`` whatever the size of the cluster, while the time for a
    refutation to get back to everyone grows with log N. This is memberlist's rule (without Lifeguard's
    confirmations): ``suspicion_mult x max(1, log10 N) x ping_interval``.
    """
    scale = max(1.0, math.log10(max(1, members)))
    return settings.suspicion_mult * scale * settings.ping_interval
