"""The ``directory`` delegate: directories on this host, for a service's data or scratch space.

A spec, as the agent builds it::

    {"path": "/srv/www" | null, "temporary": false, "files": {"conf/site.conf": "listen 8080\\n"},
     "copies": {"data/seed.db": "/srv/khutulun/.../artifacts/3f2a..."}}

Without a path the directory is ``<data_dir>/directories/<ns>/<svc>/<node>.<index>``. ``files`` (text) are
written into it and ``copies`` (artifact files, by absolute path) copied into it, atomically, and only when
their content differs. The ``digest`` attribute changes whenever what the spec puts in the directory does: it
is how the workloads attached to the directory learn that they must restart. Deleting removes the directory
only when it is ``temporary`` or the delete is a purge: a persistent directory holds data, which outlives its
service unless the user says otherwise.

The directory may be the user's own, so the marker does not go into it: it is a sidecar file,
``<data_dir>/markers/<ns>/<svc>/<node>.<index>.json``, holding the id, the path, the spec hash, the host,
whether this delegate created the directory, and which files it wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import tempfile
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from khutulun.delegates._specfields import valid_or_none
from khutulun.delegates.base import Capabilities, Delegate
from khutulun.errors import DelegateError
from khutulun.resources import Live, LiveState, Resource, ResourceId

__all__ = ["DirectoryDelegate", "DirectorySpec", "Sidecar"]

_SPEC_KEYS = frozenset({"path", "temporary", "files", "copies"})


@dataclass(frozen=True)
class DirectorySpec:
    path: str | None
    """Absolute; None for the default under the delegate's data directory."""
    temporary: bool
    files: Mapping[str, str]
    """Relative path inside the directory → text content (written as UTF-8)."""
    copies: Mapping[str, str]
    """Relative path inside the directory → absolute path of a file to copy there."""

    @classmethod
    def parse(cls, resource: Resource) -> DirectorySpec:
        """Validate a spec; every problem is named in one DelegateError."""
        spec = resource.spec
        problems: list[str] = []
        unknown = sorted(set(spec) - _SPEC_KEYS)
        if unknown:
            problems.append(f"unknown keys {unknown!r} (known: {sorted(_SPEC_KEYS)!r})")
        path = spec.get("path")
        if path is not None and not (isinstance(path, str) and "\0" not in path and Path(path).is_absolute()):
            problems.append(f"'path' must be an absolute path or null, not {path!r}")
        temporary = spec.get("temporary", False)
        if not isinstance(temporary, bool):
            problems.append(f"'temporary' must be true or false, not {temporary!r}")
        files = spec.get("files") or {}
        if not isinstance(files, Mapping):
            problems.append(f"'files' must map relative paths to text, not {files!r}")
            files = {}
        for name, content in files.items():
            if not isinstance(content, str):
                problems.append(f"'files' entry {name!r} must be text, not {content!r}")
            if (reason := _bad_file_name(name)) is not None:
                problems.append(f"'files' entry {name!r} {reason}")
        copies = spec.get("copies") or {}
        if not isinstance(copies, Mapping):
            problems.append(f"'copies' must map relative paths to absolute paths, not {copies!r}")
            copies = {}
        for name, source in copies.items():
            if not (isinstance(source, str) and Path(source).is_absolute()):
                problems.append(f"'copies' entry {name!r} must name an absolute path, not {source!r}")
            if (reason := _bad_file_name(name)) is not None or name in files:
                problems.append(f"'copies' entry {name!r} {reason or 'is also in files'}")
        if problems:
            raise DelegateError(f"the directory spec of {resource.id} is not valid: " + "; ".join(problems))
        return cls(path, temporary, dict(files), dict(copies))


def _bad_file_name(name: Any) -> str | None:
    if not isinstance(name, str) or not name or "\0" in name:
        return "is not a file name"
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or name.endswith("/") or pure == PurePosixPath("."):
        return "must be a relative path to a file inside the directory"
    return None


@dataclass(frozen=True)
class Sidecar:
    """The marker of one directory, kept beside it rather than in it."""

    id: str
    path: str
    spec_hash: str
    created: bool
    """Whether this delegate made the directory (it did not exist before the first apply)."""
    host: str
    temporary: bool = False
    files: tuple[str, ...] = ()
    """The files this delegate wrote into it, so that those a new spec drops are removed."""

    @classmethod
    def read(cls, path: Path) -> Sidecar | None:
        """The sidecar at ``path``; None if there is none, or if it is not one of ours (unreadable, malformed)."""
        try:
            data = json.loads(path.read_text())
            sidecar = cls(id=data["id"], path=data["path"], spec_hash=data["spec_hash"], created=data["created"],
                          host=data["host"], temporary=data.get("temporary", False),
                          files=tuple(data.get("files", ())))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        text_fields = (sidecar.id, sidecar.path, sidecar.spec_hash, sidecar.host, *sidecar.files)
        if not all(isinstance(v, str) for v in text_fields) or not isinstance(sidecar.created, bool) \
                or not isinstance(sidecar.temporary, bool):
            return None
        return sidecar

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "files": list(self.files)}, indent=2, sort_keys=True) + "\n"

    def live(self) -> Live:
        # The spec hash covers the files' text and the copies' sources (content-addressed): it is the digest.
        attributes = {"path": self.path, "digest": self.spec_hash}
        if not Path(self.path).is_dir():
            return Live(LiveState.FAILED, self.spec_hash, handle={"path": self.path}, attributes=attributes,
                        message=f"the directory {self.path!r} is missing")
        return Live(LiveState.READY, self.spec_hash, handle={"path": self.path}, attributes=attributes)


class DirectoryDelegate(Delegate):
    name = "directory"
    capabilities = Capabilities(supervised=False, list=True)

    def _default_path(self, rid: ResourceId) -> Path:
        # Beside "markers", not beside namespaces: a namespace could be called "markers".
        return self.context.data_dir / "directories" / rid.namespace / rid.service / rid.filename

    def _sidecar_path(self, rid: ResourceId) -> Path:
        return self.context.data_dir / "markers" / rid.namespace / rid.service / f"{rid.filename}.json"

    def _sidecar(self, rid: ResourceId) -> Sidecar | None:
        sidecar = Sidecar.read(self._sidecar_path(rid))
        if sidecar is None or sidecar.id != str(rid) or sidecar.host != self.context.host:
            return None
        return sidecar

    async def inspect(self, resource: Resource) -> Live | None:
        return self._inspect(resource.id)  # a file read and a stat: not worth a thread

    def _inspect(self, rid: ResourceId) -> Live | None:
        sidecar = self._sidecar(rid)
        live = sidecar.live() if sidecar is not None else None
        return live if live is not None and live.healthy else None  # a missing directory is nothing to find

    async def apply(self, resource: Resource, live: Live | None) -> Live:
        spec = DirectorySpec.parse(resource)
        # Applying is cheap and converges (files are written only when they differ), so an unchanged spec is
        # applied again rather than trusted: a managed file someone edited by hand is put back.
        return await asyncio.to_thread(self._apply, resource, spec)

    def _apply(self, resource: Resource, spec: DirectorySpec) -> Live:
        rid = resource.id
        path = Path(spec.path) if spec.path else self._default_path(rid)
        targets = {name: _inside(path, name, rid) for name in spec.files}
        previous = self._sidecar(rid)
        if previous is not None and Path(previous.path) != path and previous.temporary:
            self._remove(Path(previous.path), rid)  # the spec moved a scratch directory: the old one goes

        try:
            path.mkdir(parents=True)
            created = True
        except FileExistsError:
            if not path.is_dir():
                raise DelegateError(f"cannot make the directory of {rid}: {str(path)!r} exists and is not a "
                                    "directory") from None
            created = previous is not None and Path(previous.path) == path and previous.created
        except OSError as e:
            raise DelegateError(f"cannot make the directory of {rid} at {str(path)!r}: {e.strerror}") from e

        for name, target in targets.items():
            _write_if_changed(target, spec.files[name].encode(), rid)
        for name, source in spec.copies.items():
            try:
                data = Path(source).read_bytes()
            except OSError as e:
                raise DelegateError(f"cannot copy {source!r} into the directory of {rid}: {e.strerror}") from e
            _write_if_changed(_inside(path, name, rid), data, rid)
        managed = {*spec.files, *spec.copies}
        if previous is not None and Path(previous.path) == path:
            for name in set(previous.files) - managed:
                if _bad_file_name(name) is None:  # a sidecar is our own file, but a path is checked all the same
                    with contextlib.suppress(DelegateError, FileNotFoundError, IsADirectoryError):
                        _inside(path, name, rid).unlink()

        sidecar = Sidecar(id=str(rid), path=str(path.absolute()), spec_hash=resource.spec_hash, created=created,
                          host=self.context.host, temporary=spec.temporary, files=tuple(sorted(managed)))
        _write_if_changed(self._sidecar_path(rid), sidecar.to_json().encode(), rid)
        return sidecar.live()

    async def delete(self, resource: Resource, live: Live | None, *, purge: bool = False) -> None:
        await asyncio.to_thread(self._delete, resource, purge)

    def _delete(self, resource: Resource, purge: bool) -> None:
        rid = resource.id
        sidecar = self._sidecar(rid)
        if sidecar is not None:
            path = Path(sidecar.path)
            remove = sidecar.temporary or purge
        else:
            # No sidecar: deleted already, or never applied. A directory the user named was then never ours, so
            # only a purge removes it; the default path is ours by construction.
            spec = valid_or_none(lambda: DirectorySpec.parse(resource))
            path = Path(spec.path) if spec and spec.path else self._default_path(rid)
            remove = purge or (spec is not None and spec.temporary and spec.path is None)
        if remove:
            self._remove(path, rid)
        try:
            self._sidecar_path(rid).unlink(missing_ok=True)
        except OSError as e:
            raise DelegateError(f"cannot remove the marker of {rid}: {e.strerror}") from e

    def _remove(self, path: Path, rid: ResourceId) -> None:
        if reason := self._protected(path):
            raise DelegateError(f"will not remove the directory of {rid}, {str(path)!r}: {reason}")
        try:
            if path.is_symlink():
                path.unlink()  # the link is what was declared; where it points is not ours to remove
            elif path.is_dir():
                shutil.rmtree(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise DelegateError(f"cannot remove the directory of {rid}, {str(path)!r}: {e}") from e
        self._prune(path.parent)

    def _prune(self, directory: Path) -> None:
        """Remove the service and namespace levels of our own tree once they are empty."""
        own = self.context.data_dir / "directories"
        while directory != own and directory.is_relative_to(own):
            try:
                directory.rmdir()
            except OSError:  # not empty (or gone): what is left is someone's
                return
            directory = directory.parent

    def _protected(self, path: Path) -> str | None:
        """Why removing ``path`` would be a disaster rather than a cleanup, if it would."""
        resolved = path.resolve()
        if resolved.parent == resolved:
            return "it is the root directory"
        if resolved.parent == Path("/"):
            return "it is a top-level directory of the system"
        if resolved in _homes():
            return "it is the user's home directory"
        if self.context.data_dir.resolve().is_relative_to(resolved):
            return "it holds the delegate's own data directory"
        return None

    async def list(self) -> Sequence[tuple[ResourceId, Live]]:
        return await asyncio.to_thread(self._list)

    def _list(self) -> Sequence[tuple[ResourceId, Live]]:
        found: list[tuple[ResourceId, Live]] = []
        for path in sorted((self.context.data_dir / "markers").glob("*/*/*.json")):
            # The id comes from the sidecar's path, which escapes the node name, rather than from its "id" text:
            # a node name may hold a "/", which ResourceId.parse cannot tell from a separator.
            node, _, index = path.name.removesuffix(".json").rpartition(".")
            if not index.isdigit():
                continue
            rid = ResourceId(path.parent.parent.name, path.parent.name, urllib.parse.unquote(node), int(index))
            sidecar = Sidecar.read(path)
            if sidecar is not None and sidecar.id == str(rid) and sidecar.host == self.context.host \
                    and path == self._sidecar_path(rid):
                found.append((rid, sidecar.live()))
        return found


def _inside(root: Path, name: str, rid: ResourceId) -> Path:
    """``root/name``, provided it stays inside ``root`` once symbolic links are followed."""
    target = root / name
    base = root.resolve()
    resolved = target.resolve()
    if resolved == base or not resolved.is_relative_to(base):
        raise DelegateError(f"the file {name!r} of {rid} would be written outside its directory {str(root)!r}")
    return target


def _write_if_changed(target: Path, data: bytes, rid: ResourceId) -> None:
    """Write ``target`` atomically (a temporary file renamed over it), unless it already holds ``data``."""
    try:
        try:
            if target.read_bytes() == data:
                return
            mode = target.stat().st_mode & 0o7777  # keep the mode of a file someone made readable otherwise
        except FileNotFoundError:
            mode = 0o644
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        temporary = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            temporary.chmod(mode)
            temporary.replace(target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    except OSError as e:
        raise DelegateError(f"cannot write {str(target)!r} for {rid}: {e.strerror or e}") from e


def _homes() -> set[Path]:
    homes = set()
    with contextlib.suppress(RuntimeError, KeyError):
        homes.add(Path.home().resolve())
    with contextlib.suppress(KeyError):
        homes.add(Path(pwd.getpwuid(os.getuid()).pw_dir).resolve())
    return homes
