"""The shared state: a directory that every host mounts, its layout, locks, atomic records and revisions.

:class:`StateStore` is the way in; the records are in :mod:`khutulun.state.records`.
"""

from khutulun.state.atomic import read_json, sweep_tmp, write_atomic, write_json_atomic
from khutulun.state.layout import LAYOUT_VERSION, check_host_name
from khutulun.state.locks import exclusive_lock, shared_lock, try_exclusive_lock
from khutulun.state.records import Event, HostRecord, ResourceRecord, ServiceRecord, ServiceStatus, TemplateRecord
from khutulun.state.store import PortReservation, ServiceSnapshot, StateStore

__all__ = [
    "LAYOUT_VERSION",
    "Event",
    "HostRecord",
    "PortReservation",
    "ResourceRecord",
    "ServiceRecord",
    "ServiceSnapshot",
    "ServiceStatus",
    "StateStore",
    "TemplateRecord",
    "check_host_name",
    "exclusive_lock",
    "read_json",
    "shared_lock",
    "sweep_tmp",
    "try_exclusive_lock",
    "write_atomic",
    "write_json_atomic",
]
