"""The records kept in the shared state directory, as frozen dataclasses (written as JSON by the codec)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from khutulun.model import Topology
from khutulun.resources import LiveState, ResourceId
from khutulun.scheduler import Placement

__all__ = [
    "Event",
    "HostRecord",
    "ResourceRecord",
    "ServiceRecord",
    "ServiceStatus",
    "TemplateRecord",
]


class ServiceStatus(enum.StrEnum):
    DEPLOYING = "deploying"  # desired state written; converging to it
    DEPLOYED = "deployed"  # the last deploy finished with every step done
    FAILED = "failed"  # the last deploy finished with failed steps
    DESTROYING = "destroying"  # desired: nothing; removing what runs


@dataclass(frozen=True)
class ServiceRecord:
    """``services/<name>/service.json``: the desired state of a service, and its revision."""

    namespace: str
    name: str
    revision: int
    """Grows by one with every change of the desired state (a deploy, a destroy)."""
    status: ServiceStatus
    topology: Topology
    placement: Placement
    inputs: Mapping[str, Any] = field(default_factory=dict)
    template_main: str = ""
    template_digest: str = ""
    template_name: str | None = None
    """The registered template it was deployed from, if any."""
    artifacts: Mapping[str, str] = field(default_factory=dict)
    """The artifact files of its template (as the template names them) → their digests in the shared state."""
    message: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0


@dataclass(frozen=True)
class ResourceRecord:
    """``services/<name>/resources/<node>.<index>.json``: what was applied for one instance (the prior state)."""

    id: ResourceId
    delegate: str
    host: str
    revision: int
    """The service revision this record was written for."""
    spec: Mapping[str, Any]
    spec_hash: str
    state: LiveState
    depends_on: tuple[ResourceId, ...] = ()
    handle: Mapping[str, Any] = field(default_factory=dict)
    attributes: Mapping[str, Any] = field(default_factory=dict)
    message: str = ""
    restarts: int = 0
    started_at: float | None = None
    updated_at: float = 0.0
    exposed: tuple[str, ...] = ()
    """Ports opened in the host's firewall for it (``23456/tcp``), to close when it goes."""


@dataclass(frozen=True)
class HostRecord:
    """``hosts/<name>.json``: a host as its agent registered it."""

    name: str
    address: str
    api: str
    """How other agents and clients reach this host's agent (``unix:/path`` or ``http://host:port``)."""
    cpus: float = 0.0
    memory: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    eligible: bool = True
    version: str = ""
    pid: int = 0
    started_at: float = 0.0
    port_range: tuple[int, int] = (20000, 32000)


@dataclass(frozen=True)
class Event:
    """One line of ``services/<name>/events.jsonl``."""

    time: float
    kind: str
    """deploy, destroy, create, update, delete, restart, adopt, fail, ..."""
    message: str
    resource: str = ""
    host: str = ""
    revision: int = 0


@dataclass(frozen=True)
class TemplateRecord:
    """``templates/<name>/template.json``: a registered template; its files lie beside it in ``files/``."""

    namespace: str
    name: str
    main: str
    digest: str
    files: tuple[str, ...]
    description: str = ""
    registered_at: float = 0.0
    blobs: tuple[str, ...] = ()
    """Artifact files, kept as bytes beside the text files."""
