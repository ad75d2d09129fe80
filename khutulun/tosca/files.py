"""Where the files of a template come from: the disk, a bundle sent by a client, or a profile library.

Every file of a template is named by a :class:`FileRef`: a source and a POSIX path relative to its root.
A bundle is a small virtual file system; to hand its files to tosca-parser, which reads paths, they are
written once into a private directory (:meth:`BundleSource.real_path`).
"""

from __future__ import annotations

import posixpath
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from khutulun.bundle import Bundle

__all__ = ["BundleSource", "DiskSource", "FileRef", "FileSource", "ProfileLibrary", "packaged_profile_roots"]


class FileSource:
    """A tree of template files. ``root`` is the absolute directory it stands for, when it has one."""

    root: str = ""

    def read(self, rel: str) -> str | None:
        raise NotImplementedError

    def read_bytes(self, rel: str) -> bytes | None:
        """A file as it is (an artifact: an image, an archive, a template)."""
        raise NotImplementedError

    def display(self, rel: str) -> str:
        raise NotImplementedError

    def real_path(self, rel: str) -> str:
        raise NotImplementedError


def _shown(path: str) -> str:
    """A path as a user would type it: relative to the working directory when it is below it."""
    try:
        cwd = str(Path.cwd())
    except OSError:
        return path
    if path.startswith(cwd.rstrip("/") + "/"):
        return path[len(cwd.rstrip("/")) + 1:]
    return path


class DiskSource(FileSource):
    def __init__(self, root: str | Path, *, shown_root: str | None = None) -> None:
        self.root = str(Path(root).absolute())
        self.shown_root = shown_root

    def read(self, rel: str) -> str | None:
        try:
            return Path(self.real_path(rel)).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError, ValueError):
            return None

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            return Path(self.real_path(rel)).read_bytes()
        except (OSError, ValueError):
            return None

    def is_file(self, rel: str) -> bool:
        return Path(self.real_path(rel)).is_file()

    def display(self, rel: str) -> str:
        if self.shown_root is not None:
            return posixpath.join(self.shown_root, rel)
        return _shown(self.real_path(rel))

    def real_path(self, rel: str) -> str:
        return posixpath.join(self.root, rel)


class BundleSource(FileSource):
    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.root = bundle.root
        self._staged: str | None = None

    def read(self, rel: str) -> str | None:
        return self.bundle.files.get(rel)

    def read_bytes(self, rel: str) -> bytes | None:
        if rel in self.bundle.blobs:
            return self.bundle.blobs[rel]
        text = self.bundle.files.get(rel)
        return text.encode() if text is not None else None

    def display(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if self.root else rel

    def real_path(self, rel: str) -> str:
        if self._staged is None:
            # Lives as long as the process that loads the template: the loader runs in a worker process of
            # its own, and the directory goes with the rest of its temporary files.
            self._staged = tempfile.mkdtemp(prefix="khutulun-bundle-")
            for name, text in self.bundle.files.items():
                target = Path(self._staged, name)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text, encoding="utf-8")
        return posixpath.join(self._staged, rel)


@dataclass(frozen=True)
class FileRef:
    source: FileSource
    rel: str

    def __hash__(self) -> int:
        return hash((id(self.source), self.rel))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FileRef) and other.source is self.source and other.rel == self.rel

    def read(self) -> str | None:
        return self.source.read(self.rel)

    @property
    def display(self) -> str:
        return self.source.display(self.rel)

    @property
    def real_path(self) -> str:
        return self.source.real_path(self.rel)

    def sibling(self, name: str) -> str:
        """``name`` relative to this file's directory, normalized; may climb above the root ("..")."""
        return posixpath.normpath(posixpath.join(posixpath.dirname(self.rel), name))


def packaged_profile_roots() -> list[Path]:
    """The profile libraries that come with Khutulun.

    In a wheel the profiles travel inside the package (``khutulun/_profiles``, see pyproject.toml); in a
    source checkout, including an editable install, they are the repository's ``profiles/`` directory.
    """
    package = Path(__file__).resolve().parent.parent
    roots = [package / "_profiles" / "tosca", package.parent / "profiles" / "tosca"]
    return [r for r in roots if r.is_dir()]


class ProfileLibrary:
    """Resolves an import such as ``khutulun/profile.yaml`` offline.

    First the profiles that come with Khutulun, then the templates registered in the namespace: an import
    ``acme/types.yaml`` names the file ``types.yaml`` of the registered template ``acme``.
    """

    def __init__(self, roots: Sequence[Path] | None = None,
                 registered: Callable[[str], Path | None] | None = None) -> None:
        self.sources = [DiskSource(r, shown_root=f"<profile {r.name}>") for r in
                        (packaged_profile_roots() if roots is None else roots)]
        self.registered = registered
        self._registered_sources: dict[str, DiskSource] = {}

    def find(self, name: str) -> FileRef | None:
        normal = posixpath.normpath(name)
        if normal.startswith(("/", "..")):
            return None
        for source in self.sources:
            if source.is_file(normal):
                return FileRef(source, normal)
        if self.registered is not None and "/" in normal:
            template, rest = normal.split("/", 1)
            if template not in self._registered_sources:
                directory = self.registered(template)
                if directory is None:
                    return None
                self._registered_sources[template] = DiskSource(directory, shown_root=f"<template {template}>")
            source = self._registered_sources[template]
            if source.is_file(rest):
                return FileRef(source, rest)
        return None
