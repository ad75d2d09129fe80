"""Gathering a template and the files it imports from disk into a bundle, for an agent on another host.

The imports are followed with the same resolution the loader uses, so the bundle holds exactly the files
the agent will look for; the profiles that come with Khutulun are left out (every agent has them). Problems
with the files are left for the agent's load to report, with their lines; only an unreadable main file stops
the collection here.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

from khutulun.bundle import Bundle
from khutulun.errors import InvalidInputError
from khutulun.tosca.files import DiskSource, FileRef, ProfileLibrary
from khutulun.tosca.imports import load_sources

__all__ = ["collect_bundle"]


def collect_bundle(path: str | Path, library: ProfileLibrary | None = None) -> Bundle:
    absolute = Path(path).absolute()
    if not absolute.is_file():
        raise InvalidInputError(f"{str(path)!r} is not a file")
    try:
        main_text = absolute.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"cannot read {str(path)!r}: {e}") from e
    disk = DiskSource("/")
    main = FileRef(disk, str(absolute)[1:])
    sources = load_sources(main, library or ProfileLibrary(), positions=False)
    texts = {"/" + ref.rel: ref.read() for ref in sources.files if ref.source is disk}
    texts["/" + main.rel] = main_text
    root = os.path.commonpath([posixpath.dirname(p) for p in texts])
    files = {posixpath.relpath(p, root): text for p, text in texts.items() if text is not None}
    return Bundle(main=posixpath.relpath(str(absolute), root), files=files, root=root)
