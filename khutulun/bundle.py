"""A template bundle: a main service template, the files it imports (text) and the artifact files its node
templates name (bytes), by relative path.

It is what the CLI sends to an agent for ``preview`` and ``deploy``, and what ``template register`` stores,
so that an agent on any host can load the template without the user's files.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field

from khutulun.errors import InvalidInputError

__all__ = ["Bundle", "check_relative_path"]


def check_relative_path(path: str) -> str:
    """A path inside a bundle: relative, normalized, and never climbing out of it."""
    normal = posixpath.normpath(path)
    if path.startswith("/") or normal.startswith("..") or normal in ("", "."):
        raise InvalidInputError(f"{path!r} is not a relative path inside the template bundle")
    return normal


@dataclass(frozen=True)
class Bundle:
    main: str
    files: Mapping[str, str] = field(default_factory=dict)
    root: str = ""
    """Where the files came from on the client (for messages); empty for a registered template."""
    blobs: Mapping[str, bytes] = field(default_factory=dict)
    """Artifact files, as they are: images, archives, templates of config files."""

    def __post_init__(self) -> None:
        check_relative_path(self.main)
        for name in (*self.files, *self.blobs):
            check_relative_path(name)
        if self.main not in self.files:
            raise InvalidInputError(f"the template bundle has no file {self.main!r}")

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self.files):
            h.update(name.encode() + b"\0" + self.files[name].encode() + b"\0")
        for name in sorted(self.blobs):
            h.update(name.encode() + b"\1" + hashlib.sha256(self.blobs[name]).digest())
        return h.hexdigest()[:20]

    def to_wire(self) -> dict[str, object]:
        return {"main": self.main, "files": dict(self.files), "root": self.root,
                "blobs": {k: base64.b64encode(v).decode() for k, v in self.blobs.items()}}

    @classmethod
    def from_wire(cls, data: Mapping[str, object]) -> Bundle:
        files, blobs = data.get("files"), data.get("blobs") or {}
        if not isinstance(files, Mapping) or not isinstance(blobs, Mapping):
            raise InvalidInputError("a bundle needs main, files (and blobs) as maps of relative paths")
        try:
            decoded = {str(k): base64.b64decode(str(v), validate=True) for k, v in blobs.items()}
        except binascii.Error as e:
            raise InvalidInputError(f"a blob of the bundle is not base64: {e}") from e
        return cls(main=str(data.get("main", "")), files={str(k): str(v) for k, v in files.items()},
                   root=str(data.get("root", "")), blobs=decoded)
