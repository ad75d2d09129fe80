"""What a host tells the others about itself, and its compact form on the wire.

swim-protocol carries a member's metadata as ``Mapping[str, bytes]``, re-pickled whole into every gossip packet
about that member. So it is kept to one key, whose name carries the format's version (a later Khutulun can
send a second key beside it during an upgrade), and one compact JSON value with one-letter keys and defaults
left out: a typical host takes about 150 bytes, so that a gossip packet stays in one UDP datagram.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from khutulun.errors import InvalidInputError

__all__ = ["FORMAT_KEY", "MAX_ENCODED", "Announcement", "HostMetadata", "decode", "encode"]

FORMAT_KEY = "khutulun/1"
MAX_ENCODED = 1024
"""Bytes. With swim's pickle and signature around it a gossip packet stays under the 1400-byte MTU; larger
packets would go over a new TCP connection each (swim's fallback), with their errors swallowed."""


@dataclass(frozen=True)
class HostMetadata:
    """A host as the cluster knows it. ``name`` identifies the host; the rest may change while it runs."""

    name: str
    api: str = ""
    """How other agents reach this host's agent, e.g. ``http://10.0.0.5:7070``."""
    address: str = ""
    """The IP address where this host's workloads' endpoints are reachable."""
    cpus: float = 0.0
    memory: int = 0
    """Bytes."""
    labels: Mapping[str, str] = field(default_factory=dict)
    eligible: bool = True
    """False: the host stays a member but takes no new workloads (drained)."""
    version: str = ""
    """The Khutulun version the host's agent runs."""
    incarnation: str = ""
    """Different for every start of the agent (set by the cluster): tells a restart from a recovery."""

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 253 or any(c.isspace() for c in self.name):
            raise InvalidInputError(f"the host name {self.name!r} must be 1-253 characters without spaces")
        if not (math.isfinite(self.cpus) and self.cpus >= 0) or self.memory < 0:
            raise InvalidInputError(f"host {self.name!r}: cpus and memory must be non-negative "
                                    f"(got {self.cpus!r}, {self.memory!r})")
        for key, value in self.labels.items():
            if not isinstance(key, str) or not isinstance(value, str) or not key:
                raise InvalidInputError(f"host {self.name!r}: label {key!r}={value!r} must be a non-empty string "
                                        "key with a string value")
        # Read-only, so that the dataclass is as frozen as it says.
        object.__setattr__(self, "labels", MappingProxyType(dict(sorted(self.labels.items()))))


@dataclass(frozen=True)
class Announcement:
    """The metadata as gossiped, with what the cluster adds for its own workarounds."""

    metadata: HostMetadata
    leaving: bool = False
    """B3: swim-protocol has no leave message; a member that leaves says so in its metadata first."""


def encode(announcement: Announcement) -> dict[str, bytes]:
    meta = announcement.metadata
    data: dict[str, Any] = {"n": meta.name}
    optional: dict[str, Any] = {"a": meta.api, "h": meta.address, "c": meta.cpus, "m": meta.memory,
                                "l": dict(meta.labels), "v": meta.version, "i": meta.incarnation}
    data.update((k, v) for k, v in optional.items() if v)
    if isinstance(data.get("c"), float) and data["c"].is_integer():
        data["c"] = int(data["c"])  # "2" rather than "2.0"
    if not meta.eligible:
        data["e"] = 0
    if announcement.leaving:
        data["x"] = 1
    raw = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
    if len(raw) > MAX_ENCODED:
        raise InvalidInputError(f"host {meta.name!r}: its metadata takes {len(raw)} bytes, more than the "
                                f"{MAX_ENCODED} gossip allows: use fewer or shorter labels")
    return {FORMAT_KEY: raw}


def _get(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, kind):  # JSON true is no number here
        raise ValueError(f"field {key!r} has the wrong type: {value!r}")
    return value


def decode(raw: Mapping[str, bytes]) -> Announcement | None:
    """The announcement in swim metadata; None when there is none in a format this version reads.

    Raises InvalidInputError when the key is there but its value is malformed.
    """
    value = raw.get(FORMAT_KEY)
    if value is None:
        return None
    try:
        data = json.loads(value)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        labels = _get(data, "l", dict, {})
        meta = HostMetadata(
            name=_get(data, "n", str, ""), api=_get(data, "a", str, ""), address=_get(data, "h", str, ""),
            cpus=float(_get(data, "c", (int, float), 0)), memory=_get(data, "m", int, 0), labels=labels,
            eligible=bool(_get(data, "e", int, 1)), version=_get(data, "v", str, ""),
            incarnation=_get(data, "i", str, ""))
        return Announcement(meta, leaving=bool(_get(data, "x", int, 0)))
    except (ValueError, UnicodeDecodeError, InvalidInputError) as e:
        raise InvalidInputError(f"unreadable host metadata {bytes(value[:200])!r}: {e}") from e
