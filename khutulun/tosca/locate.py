"""Placing tosca-parser's messages in the source.

tosca-parser's messages carry no location (TOSCA-PARSER-NOTES P12), only the names involved: the template,
the section, the field, the offending value, in double quotes. Those names are matched against the recorded
field paths of the documents to find the line and column, with the most specific match winning. A message
whose names match nothing is placed at the top of the main file, rather than dropped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from khutulun.errors import Problem
from khutulun.tosca.source import Document, FieldPath

__all__ = ["clean_message", "locate"]

_QUOTED = re.compile(r'"([^"]*)"')
_NOISE = re.compile(r"\s*Refer to the definition to verify valid values\.?")
_ENTITY = [
    (re.compile(r'(?:[Nn]ode template|template|Template) "([^"]+)"'), ("topology_template", "node_templates")),
    (re.compile(r'Output "([^"]+)"'), ("topology_template", "outputs")),
    (re.compile(r'Input "([^"]+)"'), ("topology_template", "inputs")),
    (re.compile(r'Group[s]? "([^"]+)"'), ("topology_template", "groups")),
]
_SECTION = re.compile(r'"(properties|requirements|capabilities|interfaces|artifacts|attributes)" of template')
_TYPE_KEYS = {"type", "derived_from", "node", "capability", "relationship", "valid_target_types", "entry_schema",
              "valid_source_types", "targets", "members"}


_MISSING = re.compile(r'^"(\w+)" of template "([^"]+)" is missing required field "\[(.*)\]"\.?$')


def clean_message(kind: str, message: str) -> str:
    """tosca-parser's message without Python's wrapping (a KeyError's quotes) or boilerplate."""
    text = message.strip()
    if kind == "KeyError" and len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    text = _NOISE.sub("", text).strip().replace("\n", " ")
    if text.count('"') > 2 and text[0] == text[-1] == '"':
        text = text[1:-1]  # some messages come wrapped in quotes of their own
    missing = _MISSING.match(text)
    if missing:
        section, template, fields = missing.groups()
        names = ", ".join(f.strip().strip("'\"") for f in fields.split(","))
        what = {"properties": "property", "requirements": "requirement"}.get(section, "field")
        plural = "" if "," not in fields else ("ies" if what == "property" else "s")
        what = what[:-1] + plural if plural == "ies" else what + plural
        text = f'node template "{template}" is missing the required {what} {names}'
    return text


def _policy_path(doc: Document, name: str) -> FieldPath | None:
    policies = doc.get(("topology_template", "policies"))
    if isinstance(policies, list):
        for i, entry in enumerate(policies):
            if isinstance(entry, dict) and name in entry:
                return ("topology_template", "policies", i, name)
    return None


def _scope(doc: Document, message: str) -> FieldPath:
    """The entity a message is about, as a path in ``doc`` (empty when it names none that exists there)."""
    policy = re.search(r'[Pp]olicy "([^"]+)"', message)
    if policy:
        found = _policy_path(doc, policy.group(1))
        if found:
            return found
    for pattern, base in _ENTITY:
        match = pattern.search(message)
        if match and doc.get((*base, match.group(1))) is not None:
            path: FieldPath = (*base, match.group(1))
            section = _SECTION.search(message)
            if section and doc.get((*path, section.group(1))) is not None:
                path = (*path, section.group(1))
            return path
    return ()


def _matches(value: Any, token: str) -> bool:
    if isinstance(value, bool):
        return token in (str(value), str(value).lower())
    if isinstance(value, (str, int, float, list, dict)):
        return str(value) == token  # tosca-parser quotes values as Python's str() writes them
    return False


def _best(doc: Document, scope: FieldPath, tokens: Sequence[str], message: str) -> tuple[FieldPath, bool] | None:
    """The deepest field under ``scope`` whose key or value is one of the quoted names (key: True when the
    key itself is the culprit, e.g. an unknown field)."""
    unknown_field = re.search(r'unknown field "([^"]+)"', message)
    invalid_type = re.search(r'(?:Type|type|Node type) "([^"]+)" is not a valid', message)
    best: tuple[int, FieldPath, bool] | None = None
    for path, value in doc.walk(scope):
        if not path[len(scope):]:
            continue
        key = path[-1]
        score = 0
        is_key = False
        if unknown_field and key == unknown_field.group(1):
            score, is_key = 100, True
        elif invalid_type and _matches(value, invalid_type.group(1)) and (
                key in _TYPE_KEYS or (isinstance(key, int) and len(path) > 1 and path[-2] in _TYPE_KEYS)):
            score = 90
        else:
            if isinstance(key, str) and key in tokens:
                score += 10
                is_key = True
            if _matches(value, tokens[0] if tokens else "") or any(_matches(value, t) for t in tokens):
                score += 20
                is_key = False
        if score:
            score = score * 100 + len(path)
            if best is None or score > best[0]:
                best = (score, path, is_key)
    return (best[1], best[2]) if best else None


def locate(documents: Sequence[Document], kind: str, raw_message: str) -> Problem:
    """A tosca-parser exception as a located problem; ``documents`` starts with the main file."""
    message = clean_message(kind, raw_message)
    tokens = _QUOTED.findall(message)
    main = documents[0]
    scope = _scope(main, message)
    version = re.search(r'template version "([^"]*)" is invalid', message)
    if version:
        for doc in documents:
            if str(doc.get(("tosca_definitions_version",))) == version.group(1):
                return doc.problem(("tosca_definitions_version",), message)
    for doc in documents:
        found = _best(doc, scope if doc is main else (), tokens, message)
        if found:
            path, is_key = found
            return doc.problem(path, message, key=is_key)
        if doc is main and scope:
            return doc.problem(scope, message, key=True)
    return main.problem((), message)
