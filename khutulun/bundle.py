"""A template bundle: a main service template and the files it imports, as text, by relative path.

It is what the CLI sends to an agent for ``preview`` and ``deploy``, and what ``template register`` stores,
so that an agent on any host can load the template without the user's files.
"""

from __future__ import annotations

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

    def __post_init__(self) -> None:
        check_relative_path(self.main)
        for name in self.files:
            check_relative_path(name)
        if self.main not in self.files:
            raise InvalidInputError(f"the template bundle has no file {self.main!r}")

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self.files):
            h.update(name.encode() + b"\0" + self.files[name].encode() + b"\0")
        return h.hexdigest()[:20]
