"""One load of a template, in the current process: files, types, our checks, tosca-parser, evaluation, model.

Every problem found on the way is collected and reported together, sorted by file and line; tosca-parser's
messages that only repeat one of ours, or cascade from a node whose type is unknown, are dropped.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from typing import Any

from khutulun.errors import Problem, TemplateError
from khutulun.model import Topology
from khutulun.tosca.build import build_topology, find_cycles, resolve_inputs
from khutulun.tosca.files import FileRef
from khutulun.tosca.functions import Evaluator
from khutulun.tosca.imports import LoadedFile, SourceSet, load_sources
from khutulun.tosca.locate import locate
from khutulun.tosca.parser import for_parser, run_tosca_parser
from khutulun.tosca.source import Document, format_path
from khutulun.tosca.types import TypeIndex
from khutulun.tosca.views import NODE_TEMPLATES, TopologyViews, check_types_used, read_topology

__all__ = ["SUPPORTED_VERSIONS", "load_template"]

SUPPORTED_VERSIONS = ("tosca_simple_yaml_1_3", "tosca_simple_yaml_1_2", "tosca_simple_yaml_1_0")

# tosca-parser messages that say nothing a user can act on, produced as a side effect of another problem.
_NOISE = ("parent_req is None",)


def _normative() -> Mapping[str, Any]:
    from toscaparser.elements.entity_type import EntityType

    return EntityType.TOSCA_DEF  # type: ignore[no-any-return]


def _check_version(doc: Document) -> Problem | None:
    version = doc.get(("tosca_definitions_version",))
    if version is None:
        return doc.problem((), "tosca_definitions_version is missing; Khutulun reads tosca_simple_yaml_1_3")
    if version not in SUPPORTED_VERSIONS:
        return doc.problem(("tosca_definitions_version",),
                           f"unsupported TOSCA version {version!r}; Khutulun reads {', '.join(SUPPORTED_VERSIONS)}")
    return None


def _typed_files(sources: SourceSet) -> list[tuple[Document, str | None]]:
    """Each file with the namespace prefix its types are known by; a file imported under two prefixes (or
    under one and none) is known by both."""
    prefixes: dict[FileRef, set[str | None]] = {ref: set() for ref in sources.files}
    for loaded in sources.files.values():
        for imp in loaded.imports:
            prefixes[imp.target].add(imp.namespace_prefix)
    return [(sources.files[ref].doc, prefix) for ref, found in prefixes.items()
            for prefix in (found or {None})]


def _parser_inputs(sources: SourceSet, main: LoadedFile) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Every file as tosca-parser gets it, imports rewritten to absolute paths (in place: the documents are
    not read after this). An import that closes a loop is left out: tosca-parser follows imports recursively
    and would never stop."""
    files: dict[str, dict[str, Any]] = {}

    def imports_of(loaded: LoadedFile, ancestors: set[FileRef]) -> list[Any]:
        out: list[Any] = []
        for i, imp in enumerate(loaded.imports):
            if imp.target in ancestors:
                continue
            real = imp.target.real_path
            # tosca-parser takes a namespace prefix only in the named form {name: {file, namespace_prefix}}
            out.append({f"import_{i}": {"file": real, "namespace_prefix": imp.namespace_prefix}}
                       if imp.namespace_prefix else real)
            if real not in files:
                target = sources.files[imp.target]
                files[real] = {}  # claimed before recursing, so a diamond is copied once
                files[real] = for_parser(target.doc.data, imports_of(target, ancestors | {imp.target}), main=False)
        return out

    return for_parser(main.doc.data, imports_of(main, {main.ref}), main=True), files


def _floats_for_parser(views: TopologyViews) -> None:
    """tosca-parser refuses an integer where a float is declared (``cpus: 2``), which TOSCA's YAML allows and
    Khutulun accepts: the data it gets has those integers as floats. (After Khutulun read it, like for_parser.)"""
    for view in views.nodes.values():
        sections = [(view.raw.get("properties"), view.property_defs)]
        capabilities = view.raw.get("capabilities")
        if isinstance(capabilities, dict):
            sections += [(c.get("properties") if isinstance(c, dict) else None, view.capabilities[n].property_defs)
                         for n, c in capabilities.items() if n in view.capabilities]
        for values, defs in sections:
            if not isinstance(values, dict):
                continue
            for name, value in values.items():
                definition = defs.get(name)
                if isinstance(definition, dict) and definition.get("type") == "float" \
                        and isinstance(value, int) and not isinstance(value, bool):
                    values[name] = float(value)


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith((prefix + ".", prefix + "["))


def _merge(ours: list[Problem], theirs: list[Problem], broken: set[str], main: Document) -> list[Problem]:
    broken_paths = [format_path((*NODE_TEMPLATES, name)) for name in broken]
    out = list(ours)
    seen = {(p.file, p.path) for p in ours}
    located = [p for p in theirs if p.path]
    for problem in theirs:
        if problem.file == main.display and any(_under(problem.path, b) for b in broken_paths):
            continue  # a cascade from a node we already reported as broken
        if not problem.path and (ours or located):
            continue  # a message that names nothing we can find, beside ones we could: almost always a cascade
        if (problem.file, problem.path) in seen:
            continue
        seen.add((problem.file, problem.path))
        out.append(problem)
    return out


def _sorted(problems: list[Problem], main: Document) -> list[Problem]:
    unique = list(dict.fromkeys(problems))
    return sorted(unique, key=lambda p: (p.file != main.display, p.file, p.line, p.column, p.message))


def load_template(main: FileRef, library: Any, given_inputs: Mapping[str, Any]) -> Topology:
    """Load, check and evaluate one template; raise :class:`TemplateError` with every problem found."""
    sources = load_sources(main, library)
    if sources.problems or sources.main is None:
        raise TemplateError(sources.problems or [Problem("cannot load the template", main.display)])
    entry = sources.main
    doc = entry.doc
    version_problems = [p for f in sources.files.values() if (p := _check_version(f.doc)) is not None]
    if version_problems:  # every other check would only cascade from reading the wrong language
        raise TemplateError(version_problems)

    index = TypeIndex.build(_normative(), _typed_files(sources))
    inputs, typed_inputs, problems = resolve_inputs(doc, given_inputs)
    views = read_topology(doc, index)
    problems += views.problems + check_types_used(doc, index)

    def find_artifact(name: str) -> tuple[str, bytes | None]:
        rel = posixpath.normpath(name[1:]) if name.startswith("/") else entry.ref.sibling(name)
        return rel, (entry.ref.source.read_bytes(rel) if not rel.startswith("..") else None)

    evaluator = Evaluator(doc, views, index, inputs)
    topology, build_problems = build_topology(doc, views, evaluator, index, inputs, find_artifact)
    problems += build_problems + find_cycles(doc, views, evaluator.attribute_refs)

    _floats_for_parser(views)
    main_data, files = _parser_inputs(sources, entry)
    report = run_tosca_parser(main_data, files, typed_inputs)
    documents = [doc] + [f.doc for ref, f in sources.files.items() if ref != entry.ref]
    theirs = [locate(documents, kind, message) for kind, message in report.errors
              if not any(noise in message for noise in _NOISE)]
    problems = _merge(problems, theirs, views.broken, doc)
    if report.crash and not problems:
        problems.append(doc.problem((), f"tosca-parser could not read this template ({report.crash}); this is "
                                    "a limitation of the parser Khutulun uses, please report it"))
    if problems or topology is None:
        raise TemplateError(_sorted(problems, doc))
    return topology
