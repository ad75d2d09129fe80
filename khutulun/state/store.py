"""The shared state store: records in a directory that every host mounts, changed only under flock.

The layout is in :mod:`khutulun.state.layout`. Every record is one JSON file, replaced atomically
(:mod:`khutulun.state.atomic`), so a reader never sees half a record whether or not it locks. The locks
(:mod:`khutulun.state.locks`) make sequences of reads and writes consistent:

- **A service** (its ``service.json``, its resources and its events) is guarded by the service lock. A writer
  holds it exclusively across its read-modify-write (:meth:`StateStore.service_lock`), then calls the ``write_*``
  and ``remove_*`` methods and the ``read_*`` methods, none of which lock: they check that the lock is held in
  this process and raise :class:`~khutulun.errors.InternalError` if not (a bug). The getters without ``read_``
  (:meth:`~StateStore.service`, :meth:`~StateStore.resources`, :meth:`~StateStore.snapshot`, ...) take the shared
  lock themselves and must not be called while the same flow holds the exclusive one: the locks are not
  reentrant, so that would wait for itself until the timeout.
- Every reader waits for the writer, so **the service lock is for short critical sections**: never hold it
  across a delegate's work. One converge of a service per host at a time is what
  :meth:`~StateStore.converge_lease` is for; it does not block readers.
- **Templates** are guarded per namespace, **port reservations** per host. **Host records** need no lock: each
  agent writes only its own, and a rename replaces it whole.
- **Events** are appended under the exclusive service lock and read without one: a line cut short by a writer
  killed mid-append is skipped.

The methods are synchronous; the agent calls them through ``asyncio.to_thread``. A lock taken in one worker
thread may be released in another.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from khutulun import codec
from khutulun.bundle import Bundle, check_relative_path
from khutulun.errors import (
    ConflictError,
    InternalError,
    InvalidInputError,
    KhutulunError,
    NotFoundError,
    PlacementError,
    StateError,
)
from khutulun.resources import NAME_PATTERN, ResourceId, check_name
from khutulun.scheduler import PortRequest
from khutulun.state import layout
from khutulun.state.atomic import (
    dumps,
    ensure_dir,
    fsync_dir,
    is_tmp_name,
    os_error,
    read_bytes,
    read_json,
    sweep_tmp,
    tmp_name,
    write_atomic,
    write_json_atomic,
)
from khutulun.state.locks import exclusive_lock, holds_exclusive, shared_lock, try_exclusive_lock
from khutulun.state.records import Event, HostRecord, ResourceRecord, ServiceRecord, TemplateRecord

__all__ = ["PortReservation", "ServiceSnapshot", "StateStore"]

_log = logging.getLogger(__name__)

T = TypeVar("T")

_REMOVED_SUFFIX = ".removed"
_FOREIGN_OK = {"lost+found"}  # what a fresh filesystem holds before anything was written to it


@dataclass(frozen=True)
class PortReservation:
    """One endpoint's port on a host, in ``ports/<host>.json``."""

    owner: str
    """The resource id that holds the port."""
    capability: str
    port: int
    protocol: str = "tcp"


@dataclass(frozen=True)
class ServiceSnapshot:
    """A service record and its resource records, read together under one shared lock."""

    service: ServiceRecord | None
    resources: Mapping[ResourceId, ResourceRecord] = field(default_factory=dict)


def _decode(cls: type[T], data: Any, path: Path) -> T:
    if not isinstance(data, dict):
        raise StateError(f"the record {str(path)!r} is not a {cls.__name__}: it holds a JSON {type(data).__name__}")
    try:
        return codec.load(cls, data)
    except (KhutulunError, TypeError, ValueError, KeyError, AttributeError) as e:
        raise StateError(f"the record {str(path)!r} is not a valid {cls.__name__}: {e}") from e


class _Decoded:
    """Records decoded before, by their bytes: the reconcile loop reads every record of every service each
    pass, and JSON parsing and decoding cost far more than the read. The file is still read each time (an
    open is what makes NFS revalidate it), so a record is never older than what the file says now."""

    SIZE = 8192

    def __init__(self) -> None:
        self._entries: OrderedDict[tuple[str, bytes], Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, cls: type[T], path: Path) -> T | None:
        raw = read_bytes(path)
        if raw is None:
            return None
        key = (f"{cls.__qualname__}:{path}", hashlib.blake2b(raw, digest_size=16).digest())
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                return cast(T, found)
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StateError(f"the record {str(path)!r} is not valid JSON: {e}") from e
        record = _decode(cls, data, path)
        with self._lock:  # records are frozen: one decoded object can be handed to every reader
            self._entries[key] = record
            while len(self._entries) > self.SIZE:
                self._entries.popitem(last=False)
        return record


_decoded = _Decoded()


def _load(cls: type[T], path: Path) -> T | None:
    return _decoded.get(cls, path)


def _list_dir(directory: Path) -> list[str]:
    """The names in ``directory``, sorted; none when it does not exist."""
    try:
        return sorted(entry.name for entry in directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        raise os_error(e, "list", directory) from e


def _exists(path: Path) -> bool:
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise os_error(e, "look up", path) from e
    return True


def _unlink(path: Path) -> bool:
    """Remove a file; answer whether it was there."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as e:
        raise os_error(e, "remove", path) from e
    fsync_dir(path.parent)
    return True


def _normalize_bundle(bundle: Bundle) -> Bundle:
    """The bundle with every path in normal form, as it will be stored and read back."""
    files: dict[str, str] = {}
    blobs: dict[str, bytes] = {}

    def normal_name(name: str) -> str:
        normal = check_relative_path(name)
        if normal in files or normal in blobs:
            raise InvalidInputError(f"the template bundle has the file {normal!r} twice (as {name!r})")
        return normal

    for name, text in bundle.files.items():
        files[normal_name(name)] = text
    for name, data in bundle.blobs.items():
        blobs[normal_name(name)] = data
    every = {*files, *blobs}
    for name in every:
        parent = posixpath.dirname(name)
        while parent:
            if parent in every:
                raise InvalidInputError(f"the template bundle has {parent!r} both as a file and as a directory")
            parent = posixpath.dirname(parent)
    return Bundle(main=check_relative_path(bundle.main), files=files, blobs=blobs)


def _port_start(owner: str, capability: str, size: int) -> int:
    # A stable hash, not hash(): the same endpoint starts its scan at the same place on every run and host, and
    # different endpoints start at different places, so concurrent deploys do not all contend for the first port.
    digest = hashlib.sha256(f"{owner}\0{capability}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % size


class StateStore:
    """The shared state directory at ``root``.

    ``lock_timeout`` is how long, in seconds, a lock is waited for before :class:`~khutulun.errors.BusyError`.
    ``template_grace`` is how long a replaced or delisted template version stays on disk, for readers that
    resolved :meth:`template_files_dir` just before.
    """

    def __init__(self, root: Path | str, *, lock_timeout: float = 60.0, template_grace: float = 600.0) -> None:
        self._root = Path(root)
        self.lock_timeout = lock_timeout
        self.template_grace = template_grace

    @property
    def root(self) -> Path:
        return self._root

    def __repr__(self) -> str:
        return f"StateStore({str(self._root)!r})"

    # The directory --------------------------------------------------------------------------------------------

    def initialize(self) -> None:
        """Create the layout, or check the one that is there. Safe to run on many hosts at once."""
        root = self._root
        ensure_dir(root)
        version_path = layout.version_file(root)
        data = read_bytes(version_path)
        if data is None:
            foreign = [n for n in _list_dir(root) if not n.startswith(".") and n not in _FOREIGN_OK
                       and n not in ("hosts", "ports", "namespaces", "locks")]
            if foreign:
                raise StateError(f"{str(root)!r} is not a Khutulun state directory: it holds no VERSION file, "
                                 f"and other files ({', '.join(foreign[:5])})")
            write_atomic(version_path, f"{layout.LAYOUT_VERSION}\n".encode())
        else:
            version = data.decode(errors="replace").strip()
            if version != layout.LAYOUT_VERSION:
                raise StateError(f"the state directory {str(root)!r} has layout version {version!r}; this version "
                                 f"of Khutulun knows layout version {layout.LAYOUT_VERSION} only")
        for directory in (layout.hosts_dir(root), layout.ports_dir(root), layout.namespaces_dir(root),
                          layout.locks_dir(root)):
            ensure_dir(directory)

    def namespaces(self) -> list[str]:
        """The namespaces something was written in, and "default"."""
        names = {"default"}
        directory = layout.namespaces_dir(self._root)
        names.update(n for n in _list_dir(directory) if NAME_PATTERN.match(n) and (directory / n).is_dir())
        return sorted(names)

    def sweep(self, older_than: float = 3600.0) -> int:
        """Remove what killed writers left behind; answer how many entries went.

        That is: temporary files older than ``older_than`` seconds, the remains of removed services, and template
        versions that were replaced more than ``template_grace`` seconds ago. It walks the whole directory, which
        costs on NFS: run it now and then (hourly), not in every reconcile.
        """
        removed = 0
        for directory, subdirs, _ in os.walk(self._root):
            here = Path(directory)
            if here == self._root and "locks" in subdirs:
                subdirs.remove("locks")  # lock files are never removed, and hold no temporary files
            removed += sweep_tmp(here, older_than)
            if here.name == "services":
                for name in list(subdirs):
                    if name.startswith(".") and name.endswith(_REMOVED_SUFFIX):
                        shutil.rmtree(here / name, ignore_errors=True)
                        subdirs.remove(name)
                        removed += 1
        for namespace in self.namespaces():
            versions = layout.templates_dir(self._root, namespace) / ".versions"
            names = [n for n in _list_dir(versions) if NAME_PATTERN.match(n)]
            if names:
                with self._templates_lock(namespace):
                    for name in names:
                        removed += self._collect_template_versions(namespace, name)
        return removed

    # Locks ----------------------------------------------------------------------------------------------------

    def service_lock(self, namespace: str, service: str, *, shared: bool = False,
                     timeout: float | None = None) -> AbstractContextManager[None]:
        """The lock of a service: exclusive for a writer, shared for a reader. Not reentrant.

        Raises BusyError when it cannot be had within ``timeout`` (default: the store's ``lock_timeout``).
        """
        path = layout.service_lock_file(self._root, namespace, service)
        what = f"the lock of service {namespace}/{service}"
        seconds = self.lock_timeout if timeout is None else timeout
        return shared_lock(path, what, seconds) if shared else exclusive_lock(path, what, seconds)

    def holds_service_lock(self, namespace: str, service: str) -> bool:
        """True when this process holds the exclusive lock of the service."""
        return holds_exclusive(layout.service_lock_file(self._root, namespace, service))

    def converge_lease(self, namespace: str, service: str, host: str) -> AbstractContextManager[bool]:
        """Try to become the one converge of a service on ``host``; yields True when this caller is.

        Never waits. It is a lock of its own, so a long converge does not keep readers of the service waiting.
        """
        path = layout.converge_lease_file(self._root, namespace, service, host)
        return try_exclusive_lock(path, f"the converge lease of service {namespace}/{service} on host {host}")

    def _require_service_lock(self, namespace: str, service: str, action: str) -> None:
        if not self.holds_service_lock(namespace, service):
            raise InternalError(f"{action} of service {namespace}/{service} without holding its exclusive lock "
                                "(a bug in Khutulun)")

    def _templates_lock(self, namespace: str, *, shared: bool = False) -> AbstractContextManager[None]:
        path = layout.templates_lock_file(self._root, namespace)
        what = f"the lock of the templates of namespace {namespace}"
        return (shared_lock(path, what, self.lock_timeout) if shared
                else exclusive_lock(path, what, self.lock_timeout))

    def _ports_lock(self, host: str, *, shared: bool = False) -> AbstractContextManager[None]:
        path = layout.ports_lock_file(self._root, host)
        what = f"the lock of the port reservations of host {host}"
        return (shared_lock(path, what, self.lock_timeout) if shared
                else exclusive_lock(path, what, self.lock_timeout))

    # Services -------------------------------------------------------------------------------------------------

    def read_service(self, namespace: str, service: str) -> ServiceRecord | None:
        """The service record, without locking: for a caller that holds the service lock."""
        path = layout.service_file(self._root, namespace, service)
        record = _load(ServiceRecord, path)
        if record is not None and (record.namespace, record.name) != (namespace, service):
            raise StateError(f"the record {str(path)!r} names service {record.namespace}/{record.name}")
        return record

    def _service_exists(self, namespace: str, service: str) -> bool:
        # Checked before taking a reader's lock, so that asking for a service that does not exist leaves no lock
        # file behind (lock files are never removed).
        return _exists(layout.service_dir(self._root, namespace, service))

    def service(self, namespace: str, service: str) -> ServiceRecord | None:
        """The service record, read under the shared service lock; None when there is no such service."""
        if not self._service_exists(namespace, service):
            return None
        with self.service_lock(namespace, service, shared=True):
            return self.read_service(namespace, service)

    def _service_names(self, namespace: str) -> list[str]:
        return [n for n in _list_dir(layout.services_dir(self._root, namespace)) if NAME_PATTERN.match(n)]

    def services(self, namespace: str) -> list[ServiceRecord]:
        """The services of a namespace, by name; each read under its shared lock."""
        records = []
        for name in self._service_names(namespace):
            record = self.service(namespace, name)
            if record is not None:
                records.append(record)
        return records

    def service_ids(self) -> list[tuple[str, str]]:
        """The (namespace, name) of every service, reading none of their records."""
        return [(namespace, name) for namespace in self.namespaces() for name in self._service_names(namespace)]

    def all_services(self) -> list[ServiceRecord]:
        """The services of every namespace."""
        return [record for namespace in self.namespaces() for record in self.services(namespace)]

    def read_all_services(self) -> list[ServiceRecord]:
        """The services of every namespace, each read without its lock: for a caller that holds one service's
        lock and needs the others (locks are not reentrant). Each record is still whole (written by rename)."""
        return [record for namespace in self.namespaces() for name in self._service_names(namespace)
                if (record := self.read_service(namespace, name)) is not None]

    def write_service(self, record: ServiceRecord) -> None:
        """Write a service record. The caller holds the exclusive service lock.

        The revision never goes back: a record with a lower revision than the one stored is a stale write, and
        raises ConflictError.
        """
        namespace, name = record.namespace, record.name
        self._require_service_lock(namespace, name, "writing the record")
        try:
            current = self.read_service(namespace, name)
        except StateError:
            current = None  # a broken record is replaced, not kept forever
        if current is not None and record.revision < current.revision:
            raise ConflictError(f"service {namespace}/{name} is at revision {current.revision}: refusing to write "
                                f"revision {record.revision} over it")
        ensure_dir(layout.service_dir(self._root, namespace, name))
        write_json_atomic(layout.service_file(self._root, namespace, name), codec.dump(record))

    def remove_service(self, namespace: str, service: str) -> None:
        """Remove a service's directory: its record, resources and events. The caller holds the exclusive lock.

        The directory is renamed away first, so the service disappears at once and whole; what a kill leaves of
        it is removed by :meth:`sweep`. Its lock file stays.
        """
        self._require_service_lock(namespace, service, "removing the directory")
        directory = layout.service_dir(self._root, namespace, service)
        if not _exists(directory):
            return
        trash = directory.parent / f".{service}.{secrets.token_hex(6)}{_REMOVED_SUFFIX}"
        try:
            directory.rename(trash)
        except OSError as e:
            raise os_error(e, "remove", directory) from e
        fsync_dir(directory.parent)
        # NFS may keep files open elsewhere as .nfsXXXX until they are closed; the sweep gets those later.
        shutil.rmtree(trash, ignore_errors=True)

    # Resources ------------------------------------------------------------------------------------------------

    def read_resources(self, namespace: str, service: str) -> dict[ResourceId, ResourceRecord]:
        """The resource records of a service by id, without locking: for a caller that holds the service lock."""
        directory = layout.resources_dir(self._root, namespace, service)
        records: dict[ResourceId, ResourceRecord] = {}
        for name in _list_dir(directory):
            if is_tmp_name(name) or not name.endswith(".json"):
                continue
            path = directory / name
            record = _load(ResourceRecord, path)
            if record is None:
                continue  # removed since the listing
            rid = record.id
            if (rid.namespace, rid.service) != (namespace, service) or f"{rid.filename}.json" != name:
                raise StateError(f"the record {str(path)!r} is for resource {rid}")
            records[rid] = record
        return dict(sorted(records.items()))

    def resources(self, namespace: str, service: str) -> dict[ResourceId, ResourceRecord]:
        """The resource records of a service, read under the shared service lock."""
        if not self._service_exists(namespace, service):
            return {}
        with self.service_lock(namespace, service, shared=True):
            return self.read_resources(namespace, service)

    def snapshot(self, namespace: str, service: str) -> ServiceSnapshot:
        """The service record and its resource records, consistent with each other (one shared lock)."""
        if not self._service_exists(namespace, service):
            return ServiceSnapshot(None, {})
        with self.service_lock(namespace, service, shared=True):
            return ServiceSnapshot(self.read_service(namespace, service), self.read_resources(namespace, service))

    def read_resource(self, rid: ResourceId) -> ResourceRecord | None:
        """One resource record, without locking: for a caller that holds the service lock."""
        return _load(ResourceRecord, layout.resource_file(self._root, rid))

    def write_resource(self, record: ResourceRecord) -> None:
        """Write a resource record. The caller holds the exclusive lock of its service."""
        rid = record.id
        self._require_service_lock(rid.namespace, rid.service, f"writing the record of {rid.instance}")
        ensure_dir(layout.resources_dir(self._root, rid.namespace, rid.service))
        write_json_atomic(layout.resource_file(self._root, rid), codec.dump(record))

    def remove_resource(self, rid: ResourceId) -> None:
        """Remove a resource record, if there is one. The caller holds the exclusive lock of its service."""
        self._require_service_lock(rid.namespace, rid.service, f"removing the record of {rid.instance}")
        _unlink(layout.resource_file(self._root, rid))

    # Events ---------------------------------------------------------------------------------------------------

    def append_event(self, namespace: str, service: str, event: Event) -> None:
        """Append an event to the service's log. The caller holds the exclusive service lock."""
        self._require_service_lock(namespace, service, "appending an event")
        ensure_dir(layout.service_dir(self._root, namespace, service))
        path = layout.events_file(self._root, namespace, service)
        line = json.dumps(codec.dump(event), ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                size = os.fstat(fd).st_size
                # A writer killed mid-append left a line without its end; ending it here keeps this event on a line
                # of its own instead of glued to the fragment, where reading would skip both.
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise os_error(e, "append to", path) from e

    def events(self, namespace: str, service: str, limit: int | None = None) -> list[Event]:
        """The service's events, oldest first; the last ``limit`` of them if given. Needs no lock."""
        path = layout.events_file(self._root, namespace, service)
        data = read_bytes(path)
        if data is None:
            return []
        events = []
        for number, raw in enumerate(data.split(b"\n"), start=1):
            if not raw.strip():
                continue
            try:
                value = json.loads(raw)
                if not isinstance(value, dict):
                    raise TypeError("not an object")
                events.append(codec.load(Event, value))
            except (UnicodeDecodeError, ValueError, TypeError, KeyError) as e:
                # Torn by a kill mid-append: the event was never complete, so it never happened as far as the log
                # goes.
                _log.debug("skipping line %d of %s: %s", number, path, e)
        if limit is not None:
            events = events[max(len(events) - limit, 0):]
        return events

    # Templates ------------------------------------------------------------------------------------------------

    def _template_version(self, namespace: str, name: str) -> Path | None:
        """The directory of the current version of a template, or None when it is not registered."""
        link = layout.template_link(self._root, namespace, name)
        try:
            target = link.readlink()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise os_error(e, "read the template link", link) from e
        version = link.parent / target
        expected = layout.template_versions_dir(self._root, namespace, name)
        if version.parent != expected or not version.name or version.name.startswith("."):
            raise StateError(f"the template link {str(link)!r} points outside its versions: {target!r}")
        return version

    def register_template(self, namespace: str, name: str, bundle: Bundle, description: str = "") -> TemplateRecord:
        """Register a template, or replace the one of that name, at once and whole.

        The new version is written into a directory of its own, made durable, and then the template's symlink is
        replaced by a rename: a reader sees all of the old version or all of the new one.
        """
        check_name("namespace", namespace)
        check_name("template", name)
        normal = _normalize_bundle(bundle)
        encoded = {}
        for relpath, text in normal.files.items():
            try:
                encoded[relpath] = text.encode()
            except UnicodeEncodeError as e:
                raise InvalidInputError(f"the template file {relpath!r} is not valid text: {e}") from e
        with self._templates_lock(namespace):
            version = layout.template_versions_dir(self._root, namespace, name) / (
                f"{time.time_ns():x}-{secrets.token_hex(4)}")
            files = version / "files"
            ensure_dir(files)
            for relpath, data in [*encoded.items(), *normal.blobs.items()]:
                target = files / relpath
                ensure_dir(target.parent)
                write_atomic(target, data)
            record = TemplateRecord(namespace=namespace, name=name, main=normal.main, digest=normal.digest,
                                    files=tuple(sorted(encoded)), description=description,
                                    registered_at=time.time(), blobs=tuple(sorted(normal.blobs)))
            write_json_atomic(version / "template.json", codec.dump(record))
            link = layout.template_link(self._root, namespace, name)
            previous = self._template_version(namespace, name)
            tmp = link.parent / tmp_name(name)
            try:
                tmp.symlink_to(version.relative_to(link.parent))
                tmp.rename(link)
            except OSError as e:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise os_error(e, "register the template at", link) from e
            fsync_dir(link.parent)
            if previous is not None:
                self._retire(previous)
            self._collect_template_versions(namespace, name)
        return record

    def _retire(self, version: Path) -> None:
        # The mtime of a version that is no longer current says since when, which is what the grace counts from.
        try:
            os.utime(version)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise os_error(e, "retire the template version", version) from e

    def _collect_template_versions(self, namespace: str, name: str) -> int:
        """Remove the versions of a template that were retired more than the grace ago. Under the templates lock."""
        versions = layout.template_versions_dir(self._root, namespace, name)
        current = self._template_version(namespace, name)
        cutoff = time.time() - self.template_grace
        removed = 0
        for entry in _list_dir(versions):
            path = versions / entry
            if current is not None and entry == current.name:
                continue
            try:
                if path.lstat().st_mtime > cutoff:
                    continue
            except FileNotFoundError:
                continue
            except OSError as e:
                raise os_error(e, "look up", path) from e
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
        if current is None and not _list_dir(versions):
            with contextlib.suppress(OSError):
                versions.rmdir()
        return removed

    def templates(self, namespace: str) -> list[TemplateRecord]:
        """The templates registered in a namespace, by name."""
        directory = layout.templates_dir(self._root, namespace)
        if not _exists(directory):
            return []
        records = []
        with self._templates_lock(namespace, shared=True):
            for name in _list_dir(directory):
                if not NAME_PATTERN.match(name):
                    continue
                version = self._template_version(namespace, name)
                if version is None:
                    continue
                records.append(self._template_record(version, namespace, name))
        return records

    def _template_record(self, version: Path, namespace: str, name: str) -> TemplateRecord:
        path = version / "template.json"
        record = _load(TemplateRecord, path)
        if record is None:
            raise StateError(f"the template {namespace}/{name} has no record at {str(path)!r}")
        if (record.namespace, record.name) != (namespace, name):
            raise StateError(f"the record {str(path)!r} names template {record.namespace}/{record.name}")
        return record

    def template(self, namespace: str, name: str) -> tuple[TemplateRecord, Bundle]:
        """A registered template: its record and its files. NotFoundError when there is no such template."""
        if not _exists(layout.templates_dir(self._root, namespace)):
            raise NotFoundError(f"no template {name!r} in namespace {namespace!r}")
        with self._templates_lock(namespace, shared=True):
            version = self._template_version(namespace, name)
            if version is None:
                raise NotFoundError(f"no template {name!r} in namespace {namespace!r}")
            record = self._template_record(version, namespace, name)
            files: dict[str, str] = {}
            blobs: dict[str, bytes] = {}
            for relpath in (*record.files, *record.blobs):
                path = version / "files" / relpath
                try:
                    if check_relative_path(relpath) != relpath:
                        raise InvalidInputError(f"{relpath!r} is not in normal form")
                except InvalidInputError as e:
                    raise StateError(f"the template {namespace}/{name} lists a bad file: {e}") from e
                data = read_bytes(path)
                if data is None:
                    raise StateError(f"the template {namespace}/{name} misses its file {str(path)!r}")
                if relpath in record.blobs:
                    blobs[relpath] = data
                    continue
                try:
                    files[relpath] = data.decode()
                except UnicodeDecodeError as e:
                    raise StateError(f"the template file {str(path)!r} is not UTF-8: {e}") from e
        try:
            bundle = Bundle(main=record.main, files=files, blobs=blobs)
        except InvalidInputError as e:
            raise StateError(f"the template {namespace}/{name} is broken: {e}") from e
        if bundle.digest != record.digest:
            raise StateError(f"the files of template {namespace}/{name} do not match its digest: they were changed "
                             "after it was registered")
        return record, bundle

    def template_files_dir(self, namespace: str, name: str) -> Path:
        """The directory of the current version's files (``<relpath>`` under it). NotFoundError when none.

        A version is never changed once written; a replaced one stays at least ``template_grace`` seconds.
        """
        version = self._template_version(namespace, name)
        if version is None:
            raise NotFoundError(f"no template {name!r} in namespace {namespace!r}")
        return version / "files"

    def delist_template(self, namespace: str, name: str) -> None:
        """Remove a registered template. NotFoundError when there is no such template."""
        check_name("template", name)
        if not _exists(layout.templates_dir(self._root, namespace)):
            raise NotFoundError(f"no template {name!r} in namespace {namespace!r}")
        with self._templates_lock(namespace):
            version = self._template_version(namespace, name)
            if version is None:
                raise NotFoundError(f"no template {name!r} in namespace {namespace!r}")
            _unlink(layout.template_link(self._root, namespace, name))
            self._retire(version)
            self._collect_template_versions(namespace, name)

    # Artifacts ------------------------------------------------------------------------------------------------

    @staticmethod
    def artifact_digests(blobs: Mapping[str, bytes]) -> dict[str, str]:
        """The digest each artifact file is stored under (its SHA-256): a path that changes with its content."""
        return {name: hashlib.sha256(data).hexdigest() for name, data in blobs.items()}

    def artifact_path(self, namespace: str, service: str, digest: str) -> Path:
        return layout.artifact_file(self._root, namespace, service, digest)

    def put_artifacts(self, namespace: str, service: str, blobs: Mapping[str, bytes]) -> dict[str, str]:
        """Store a deploy's artifact files where every host can read them; answer name → digest. A file
        already stored (the same content) is not written again."""
        digests = self.artifact_digests(blobs)
        for name, digest in digests.items():
            path = self.artifact_path(namespace, service, digest)
            if not _exists(path):
                ensure_dir(path.parent)
                write_atomic(path, blobs[name])
        return digests

    # Hosts ----------------------------------------------------------------------------------------------------

    def write_host(self, record: HostRecord) -> None:
        """Register or replace a host's record."""
        self.update_host(record.name, lambda _: record)

    def update_host(self, name: str, change: Callable[[HostRecord | None], HostRecord]) -> HostRecord:
        """Write ``change(record as it is)`` as host ``name``'s record, under the host's lock; answer it.

        Under a lock because two writers change one record: its agent (when it starts) and whichever agent is
        asked to drain the host or switch its eligibility, each keeping what the other wrote.
        """
        path = layout.host_file(self._root, name)
        with exclusive_lock(layout.host_lock_file(self._root, name), f"the lock of the record of host {name}",
                            self.lock_timeout):
            record = change(self.host(name))
            if record.name != name:
                raise InternalError(f"the record of host {name!r} cannot name host {record.name!r}")
            ensure_dir(path.parent)
            write_json_atomic(path, codec.dump(record))
        return record

    def host(self, name: str) -> HostRecord | None:
        path = layout.host_file(self._root, name)
        record = _load(HostRecord, path)
        if record is not None and record.name != name:
            raise StateError(f"the record {str(path)!r} names host {record.name!r}")
        return record

    def hosts(self) -> list[HostRecord]:
        """Every registered host, by name."""
        records = []
        for entry in _list_dir(layout.hosts_dir(self._root)):
            if is_tmp_name(entry) or not entry.endswith(".json"):
                continue
            try:
                name = layout.check_host_name(entry.removesuffix(".json"))
            except InvalidInputError:
                continue  # not a file this store wrote
            record = self.host(name)
            if record is not None:
                records.append(record)
        return records

    def beat(self, name: str, now: float) -> None:
        """Say that host ``name``'s agent is alive and reaches the shared state (its own file: no lock).

        Each second, on every host: not synced to disk, as a beat that a crash loses is what a crash should look
        like (an old or empty heartbeat), and two fsyncs a second per host on the shared directory are not free.
        """
        path = layout.heartbeat_file(self._root, name)
        ensure_dir(path.parent)
        write_atomic(path, f"{now}\n".encode(), durable=False)

    def heartbeat(self, name: str) -> float | None:
        """When host ``name``'s agent last said it was alive, by its clock; None if it never did."""
        raw = read_bytes(layout.heartbeat_file(self._root, name))
        try:
            return float(raw) if raw is not None else None
        except ValueError:
            return None  # torn by hand: as good as none

    def remove_host(self, name: str) -> bool:
        """Remove a host's record (and heartbeat); answer whether there was one."""
        _unlink(layout.heartbeat_file(self._root, name))
        return _unlink(layout.host_file(self._root, name))

    # Ports ----------------------------------------------------------------------------------------------------

    def _read_ports(self, host: str) -> dict[tuple[str, str], PortReservation]:
        path = layout.ports_file(self._root, host)
        data = read_json(path)
        if data is None:
            return {}
        if not isinstance(data, dict) or not isinstance(data.get("reservations"), list):
            raise StateError(f"the record {str(path)!r} holds no port reservations")
        book: dict[tuple[str, str], PortReservation] = {}
        for item in data["reservations"]:
            reservation = _decode(PortReservation, item, path)
            book[(reservation.owner, reservation.capability)] = reservation
        return book

    def _write_ports(self, host: str, book: Mapping[tuple[str, str], PortReservation]) -> None:
        path = layout.ports_file(self._root, host)
        ensure_dir(path.parent)
        ordered = sorted(book.values(), key=lambda r: (r.port, r.protocol, r.owner, r.capability))
        write_atomic(path, dumps({"host": host, "reservations": [codec.dump(r) for r in ordered]}, path))

    def port_reservations(self, host: str) -> dict[tuple[str, str], PortReservation]:
        """The port reservations on ``host``, by (owner, capability)."""
        layout.check_host_name(host)
        if not _exists(layout.ports_file(self._root, host)):
            return {}
        with self._ports_lock(host, shared=True):
            return self._read_ports(host)

    def reserve_ports(self, host: str, port_range: tuple[int, int], requests: Sequence[PortRequest],
                      is_free: Callable[[int, str], bool] | None = None) -> dict[str, int]:
        """Reserve a port on ``host`` for each request; answer capability → port. All or nothing.

        A request for a given port gets that port unless another owner holds it (PlacementError, naming the
        holder). A request for any port (0) keeps what its owner holds, or its ``prior`` port if that is free,
        or else takes a free port from ``port_range`` that nobody holds and for which ``is_free(port, protocol)``
        says yes (the caller checks that it can be bound; None skips the check). Asking again for what an owner
        holds changes nothing.
        """
        layout.check_host_name(host)
        low, high = port_range
        if not 0 < low <= high <= 65535:
            raise InvalidInputError(f"{low}-{high} is not a range of ports")
        for request in requests:
            if not 0 <= request.port <= 65535:
                raise InvalidInputError(f"{request.port} is not a port ({request.owner}, {request.capability})")
        with self._ports_lock(host):
            book = self._read_ports(host)
            before = dict(book)
            ports: dict[str, int] = {}
            for request in requests:
                key = (request.owner, request.capability)
                taken = {(r.port, r.protocol): r for k, r in book.items() if k != key}
                if request.port:
                    holder = taken.get((request.port, request.protocol))
                    if holder is not None:
                        raise PlacementError(
                            f"port {request.port}/{request.protocol} on host {host} is held by {holder.owner} "
                            f"(endpoint {holder.capability}); {request.owner} (endpoint {request.capability}) "
                            "asks for it too")
                    port = request.port
                else:
                    port = self._choose_port(host, request, held=book.get(key), taken=taken, port_range=(low, high),
                                              is_free=is_free)
                book[key] = PortReservation(request.owner, request.capability, port, request.protocol)
                ports[request.capability] = port
            if book != before:
                self._write_ports(host, book)
        return ports

    @staticmethod
    def _choose_port(host: str, request: PortRequest, *, held: PortReservation | None,
                     taken: Mapping[tuple[int, str], PortReservation], port_range: tuple[int, int],
                     is_free: Callable[[int, str], bool] | None) -> int:
        protocol = request.protocol
        if held is not None and held.protocol == protocol and (request.prior is None or request.prior == held.port):
            return held.port  # the owner's own port: its workload may be bound to it, so no is_free check
        if request.prior and (request.prior, protocol) not in taken and (
                is_free is None or is_free(request.prior, protocol)):
            return request.prior
        if held is not None and held.protocol == protocol:
            return held.port
        low, high = port_range
        size = high - low + 1
        start = _port_start(request.owner, request.capability, size)
        for offset in range(size):
            port = low + (start + offset) % size
            if (port, protocol) in taken:
                continue
            if is_free is not None and not is_free(port, protocol):
                continue
            return port
        raise PlacementError(f"no free {protocol} port in {low}-{high} on host {host} for {request.owner} (endpoint "
                             f"{request.capability})")

    def release_ports(self, host: str, owners: Iterable[str]) -> None:
        """Drop every reservation on ``host`` held by one of ``owners``."""
        layout.check_host_name(host)
        gone = set(owners)
        if not gone or not _exists(layout.ports_file(self._root, host)):
            return
        with self._ports_lock(host):
            book = self._read_ports(host)
            kept = {key: r for key, r in book.items() if r.owner not in gone}
            if len(kept) != len(book):
                self._write_ports(host, kept)
