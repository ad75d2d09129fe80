"""Loading TOSCA service templates into Khutulun's model.

tosca-parser (TOSCA 1.3) does the type system; Khutulun adds source locations, the checks and the function
evaluation tosca-parser lacks, and isolation from its global state (see ``../shared/TOSCA-PARSER-NOTES.md``
and the docstrings of the modules here). Nothing of tosca-parser leaves this package: the result is a
:class:`khutulun.model.Topology`, or a :class:`khutulun.errors.TemplateError` with every problem found.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from khutulun.bundle import Bundle
from khutulun.model import Topology
from khutulun.tosca.collect import collect_bundle
from khutulun.tosca.worker import LoadRequest, load_in_worker

__all__ = ["collect_bundle", "load_bundle", "load_file"]

DEFAULT_TIMEOUT = 60.0


def _request(inputs: Mapping[str, Any] | None, registered: Mapping[str, str | Path] | None,
             profile_roots: list[Path] | None, **source: Any) -> LoadRequest:
    return LoadRequest(inputs=dict(inputs or {}),
                       profile_roots=None if profile_roots is None else tuple(str(p) for p in profile_roots),
                       registered=tuple((k, str(v)) for k, v in (registered or {}).items()), **source)


def load_bundle(bundle: Bundle, inputs: Mapping[str, Any] | None = None, *,
                registered: Mapping[str, str | Path] | None = None, profile_roots: list[Path] | None = None,
                timeout: float = DEFAULT_TIMEOUT) -> Topology:
    """Load a template bundle. ``registered`` maps the names of templates registered in the namespace to the
    directories of their files, for imports such as ``acme/types.yaml``."""
    display = f"{bundle.root}/{bundle.main}" if bundle.root else bundle.main
    return load_in_worker(_request(inputs, registered, profile_roots, bundle=bundle), timeout=timeout,
                          display=display)


def load_file(path: str | Path, inputs: Mapping[str, Any] | None = None, *,
              registered: Mapping[str, str | Path] | None = None, profile_roots: list[Path] | None = None,
              timeout: float = DEFAULT_TIMEOUT) -> Topology:
    """Load a template from a file on this machine."""
    return load_in_worker(_request(inputs, registered, profile_roots, path=str(path)), timeout=timeout,
                          display=str(path))
