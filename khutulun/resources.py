"""The one resource abstraction that planning, state and delegates share.

Every instance of a node template becomes a :class:`Resource` with a stable id (``namespace/service/node/index``),
the name of the delegate that realizes it, the host it is placed on, and a spec: plain JSON data, fully
resolved, that means something to that delegate only. What a delegate finds running is a :class:`Live`.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from khutulun.errors import InvalidInputError

__all__ = ["NAME_PATTERN", "Live", "LiveState", "Resource", "ResourceId", "check_name", "spec_hash"]

NAME_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
"""Namespaces, services and registered templates: lowercase, digits, '.', '_' and '-', as DNS labels go."""


def check_name(kind: str, name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise InvalidInputError(
            f"{kind} name {name!r} is not valid: use 1 to 63 lowercase letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit")
    return name


@dataclass(frozen=True, order=True)
class ResourceId:
    namespace: str
    service: str
    node: str
    index: int

    def __str__(self) -> str:
        return f"{self.namespace}/{self.service}/{self.node}/{self.index}"

    @classmethod
    def parse(cls, text: str) -> ResourceId:
        # A node name is any YAML key and may hold a "/"; namespaces and services cannot, and the index is last.
        namespace, _, rest = text.partition("/")
        service, _, rest = rest.partition("/")
        node, _, index = rest.rpartition("/")
        if not (namespace and service and node and index.isdigit()):
            raise InvalidInputError(f"{text!r} is not a resource id (namespace/service/node/index)")
        return cls(namespace, service, node, int(index))

    @property
    def instance(self) -> str:
        """``node/index``, the name a user gives an instance on the command line."""
        return f"{self.node}/{self.index}"

    @property
    def filename(self) -> str:
        """A file name for this instance. Node template names are any YAML key, so they are escaped."""
        return f"{urllib.parse.quote(self.node, safe='')}.{self.index}"


def spec_hash(spec: Mapping[str, Any]) -> str:
    """A short, stable digest of a resolved spec: what tells a changed resource from an unchanged one."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Resource:
    id: ResourceId
    delegate: str
    host: str
    spec: Mapping[str, Any]
    spec_hash: str
    handle: Mapping[str, Any] = field(default_factory=dict)
    """What the delegate recorded the last time it applied this resource (for example a pid and its start
    time); empty when it never did."""


class LiveState(enum.StrEnum):
    RUNNING = "running"  # a workload that runs
    READY = "ready"  # a resource that exists and does not run (a directory)
    STOPPED = "stopped"  # a workload that exited
    FAILED = "failed"  # present but broken (could not start, exited with an error)


@dataclass(frozen=True)
class Live:
    """What a delegate finds for a resource."""

    state: LiveState
    spec_hash: str | None
    """The hash of the spec this was made from, as the delegate's markers say; None if it cannot tell."""
    handle: Mapping[str, Any] = field(default_factory=dict)
    attributes: Mapping[str, Any] = field(default_factory=dict)
    """Values for ``get_attribute`` (a pid, a path)."""
    message: str = ""
    exit_code: int | None = None
    started_at: float | None = None

    @property
    def healthy(self) -> bool:
        return self.state in (LiveState.RUNNING, LiveState.READY)
