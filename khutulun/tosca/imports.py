"""Resolving a template's imports, offline, before tosca-parser sees any of them.

An import is looked for next to the file that imports it, then among the profiles (``khutulun/profile.yaml``
and the templates registered in the namespace). Imports by URL or from a repository are refused: tosca-parser
would fetch them with no timeout (TOSCA-PARSER-NOTES P14), and Khutulun never reaches out to the network
while loading a template.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

from khutulun.errors import Problem
from khutulun.tosca.files import FileRef, ProfileLibrary
from khutulun.tosca.source import Document, FieldPath, parse_yaml

__all__ = ["Import", "LoadedFile", "SourceSet", "load_sources"]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
_IMPORT_KEYS = {"file", "repository", "namespace_uri", "namespace_prefix"}


@dataclass(frozen=True)
class Import:
    path: FieldPath
    """Where the import is written in the importing file."""
    target: FileRef
    namespace_prefix: str | None = None


@dataclass
class LoadedFile:
    ref: FileRef
    doc: Document
    imports: list[Import] = field(default_factory=list)


@dataclass
class SourceSet:
    """Every file of a template, the main one first, each loaded once."""

    main: LoadedFile | None
    files: dict[FileRef, LoadedFile]
    problems: list[Problem]


def _entries(doc: Document, problems: list[Problem]) -> list[tuple[FieldPath, Any, str | None]]:
    """(path, file, namespace prefix) of each import entry, in every form TOSCA 1.0 to 1.3 allows."""
    imports = doc.data.get("imports") if isinstance(doc.data, dict) else None
    if imports is None:
        return []
    if not isinstance(imports, list):
        problems.append(doc.problem(("imports",), "imports must be a list"))
        return []
    out: list[tuple[FieldPath, Any, str | None]] = []
    for i, entry in enumerate(imports):
        path: FieldPath = ("imports", i)
        if isinstance(entry, dict) and "file" in entry and set(entry) <= _IMPORT_KEYS:
            definition: Any = entry
        elif isinstance(entry, dict) and len(entry) == 1:  # TOSCA 1.0 named import: {name: file-or-definition}
            (name, definition), = entry.items()
            path = (*path, name)
        else:
            definition = entry
        if isinstance(definition, dict):
            if definition.get("repository") is not None:
                problems.append(doc.problem((*path, "repository"),
                                            f"import from repository {definition['repository']!r} refused: "
                                            "Khutulun never fetches templates from the network; download the "
                                            "file and import it by a relative path"))
                continue
            prefix = definition.get("namespace_prefix")
            out.append(((*path, "file"), definition.get("file"),
                        prefix if isinstance(prefix, str) else None))
        else:
            out.append((path, definition, None))
    return out


def _resolve(importer: LoadedFile, main: FileRef, name: str, library: ProfileLibrary) -> FileRef | None:
    source = importer.ref.source
    if name.startswith("/"):
        if source.root and (name == source.root or name.startswith(source.root.rstrip("/") + "/")):
            rel = posixpath.relpath(name, source.root)
            return FileRef(source, rel) if source.read(rel) is not None else None
        return None
    candidates = [importer.ref.sibling(name)]
    if main.source is source:
        # Templates written for CSARs import relative to the archive's root, where the main file is.
        candidates.append(main.sibling(name))
    head, _, tail = name.rpartition("/")
    if head and posixpath.dirname(importer.ref.rel).endswith(head):
        # tosca-parser also takes "dir/file.yaml" from a file inside "dir/" as its sibling; templates that
        # others wrote rely on it.
        candidates.append(importer.ref.sibling(tail))
    for candidate in candidates:
        if not candidate.startswith("..") and source.read(candidate) is not None:
            return FileRef(source, candidate)
    return library.find(name)


def load_sources(main: FileRef, library: ProfileLibrary, *, positions: bool = True) -> SourceSet:
    problems: list[Problem] = []
    files: dict[FileRef, LoadedFile] = {}

    def load(ref: FileRef) -> LoadedFile | None:
        text = ref.read()
        if text is None:
            problems.append(Problem(f"cannot read the file {ref.display!r}", ref.display))
            return None
        doc, found = parse_yaml(ref.display, text, positions=positions)
        problems.extend(found)
        if doc is None:
            return None
        if not isinstance(doc.data, dict):
            problems.append(doc.problem((), "a TOSCA file must be a map (with tosca_definitions_version at the top)"))
            return None
        loaded = LoadedFile(ref, doc)
        files[ref] = loaded
        return loaded

    first = load(main)
    queue = [first] if first else []
    while queue:
        current = queue.pop(0)
        for path, name, prefix in _entries(current.doc, problems):
            if not isinstance(name, str) or not name.strip():
                problems.append(current.doc.problem(path, "an import needs a file name"))
                continue
            if _URL.match(name):
                problems.append(current.doc.problem(
                    path, f"import by URL refused: {name!r}. Khutulun never fetches templates from the network; "
                    "download the file and import it by a relative path"))
                continue
            target = _resolve(current, main, name, library)
            if target is None:
                problems.append(current.doc.problem(
                    path, f"import {name!r} not found (looked next to {current.ref.display} and among the "
                    "profiles Khutulun has)"))
                continue
            current.imports.append(Import(path, target, prefix))
            if target not in files:
                loaded = load(target)
                if loaded is not None:
                    queue.append(loaded)
    return SourceSet(first, files, problems)
