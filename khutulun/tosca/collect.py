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
from typing import Any

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
    blobs = {"/" + rel: data for loaded in sources.files.values() if loaded.ref.source is disk
             for rel in _artifact_files(loaded.doc.data, loaded.ref)
             if rel not in texts and (data := disk.read_bytes(rel)) is not None}
    root = os.path.commonpath([posixpath.dirname(p) for p in (*texts, *blobs)])
    files = {posixpath.relpath(p, root): text for p, text in texts.items() if text is not None}
    return Bundle(main=posixpath.relpath(str(absolute), root), files=files, root=root,
                  blobs={posixpath.relpath(p, root): data for p, data in blobs.items()})


def _artifact_files(data: Any, ref: FileRef) -> list[str]:
    """The files the node templates of one document name as artifacts, relative to the source's root."""
    topology = data.get("topology_template") if isinstance(data, dict) else None
    templates = topology.get("node_templates") if isinstance(topology, dict) else None
    found = []
    for template in (templates or {}).values() if isinstance(templates, dict) else ():
        artifacts = template.get("artifacts") if isinstance(template, dict) else None
        for artifact in (artifacts or {}).values() if isinstance(artifacts, dict) else ():
            name = artifact.get("file") if isinstance(artifact, dict) else artifact
            if isinstance(name, str) and "://" not in name:
                found.append(posixpath.normpath(name[1:]) if name.startswith("/") else ref.sibling(name))
    return found
