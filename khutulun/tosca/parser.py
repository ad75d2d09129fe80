"""Running tosca-parser over a template whose files are already loaded, and collecting what it reports.

tosca-parser is used for what it does well: the TOSCA type system, required and unknown fields, value
types, constraints, occurrences, policies and groups. Its defects are worked around here:

- It would read each import again, and fetch URLs (P14). Its YAML loader is swapped, for the duration of
  one parse, for one that serves the documents already loaded (with imports rewritten to absolute paths),
  so nothing is read twice and nothing is fetched.
- Its exception collector is global and left "collecting" after a crash (P13). The loader runs every parse
  in a fresh worker process (``khutulun.tosca.worker``), and the collector is reset here anyway.
- It crashes on a custom requirement definition without ``node`` (P7): it is given ``node:
  tosca.nodes.Root`` there, which is what the missing key means. It also crashes on the short notations of a
  capability definition (``host: tosca.capabilities.Container``) and of a requirement definition: it is
  given the long ones.
- It has no ``join`` (P9), so it checks a ``join`` call as if it were a plain value ("is not a string"):
  it is given a ``concat`` call in its place, a function it knows and leaves alone. Khutulun evaluates both.
- It crashes on an output that refers to a missing node (P11), and it does not evaluate nested functions in
  outputs (P9): outputs are checked and evaluated by Khutulun, and not given to it.
- It builds a graph of the node templates twice, in time quadratic in their number (``ToscaGraph``, most of
  P15's super-linear cost), and nothing of Khutulun reads it: an empty stand-in takes its place.
- It prints some messages to stdout: its output is captured and dropped.

tosca-parser may change the data it is given (it extends import lists, for one), so it gets the documents
only after Khutulun is done reading them.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections.abc import Mapping
from typing import Any

__all__ = ["ParserReport", "for_parser", "run_tosca_parser"]


class ParserReport:
    def __init__(self) -> None:
        self.errors: list[tuple[str, str]] = []
        """(exception class name, message) of every problem tosca-parser collected."""
        self.crash: str | None = None
        """What tosca-parser raised when it failed on its own, if it did."""


def _patch_node_types(data: dict[str, Any]) -> None:
    types = data.get("node_types")
    if not isinstance(types, dict):
        return
    for definition in types.values():
        if not isinstance(definition, dict):
            continue
        capabilities = definition.get("capabilities")
        if isinstance(capabilities, dict):
            for name, capability in capabilities.items():
                if isinstance(capability, str):
                    capabilities[name] = {"type": capability}
        requirements = definition.get("requirements")
        if not isinstance(requirements, list):
            continue
        for entry in requirements:
            if isinstance(entry, dict) and len(entry) == 1:
                (name, req), = entry.items()
                if isinstance(req, str):
                    entry[name] = req = {"capability": req}
                if isinstance(req, dict) and "node" not in req:
                    req["node"] = "tosca.nodes.Root"


def _without_join(value: Any) -> Any:
    if isinstance(value, dict):
        if len(value) == 1 and "join" in value:
            return {"concat": [""]}
        return {k: _without_join(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_join(v) for v in value]
    return value


class _NoGraph:
    def __init__(self, nodetemplates: Any) -> None:
        self.nodetemplates = nodetemplates
        self.vertices: dict[str, Any] = {}

    def __iter__(self) -> Any:
        return iter(())


def for_parser(data: dict[str, Any], imports: list[Any] | None, *, main: bool) -> dict[str, Any]:
    """One file as tosca-parser gets it: imports as given (absolute paths), P7 patched and, for the main
    file, no outputs and no workflows (P1). Changes ``data`` in place: call it after reading ``data``."""
    out = data
    if imports:
        out["imports"] = imports
    else:
        out.pop("imports", None)
    _patch_node_types(out)
    topology = out.get("topology_template")
    if isinstance(topology, dict) and isinstance(topology.get("node_templates"), dict):
        topology["node_templates"] = _without_join(topology["node_templates"])
    if main and isinstance(topology, dict):
        topology.pop("outputs", None)
        topology.pop("workflows", None)  # valid TOSCA 1.3 that tosca-parser rejects (P1); Khutulun ignores it
    return out


def run_tosca_parser(main: dict[str, Any], files: Mapping[str, dict[str, Any]],
                     inputs: Mapping[str, Any]) -> ParserReport:
    """Parse ``main`` with ``files`` (every imported file, by the absolute path its import names; both as
    :func:`for_parser` made them) and the given input values."""
    import toscaparser.imports
    import toscaparser.topology_template
    import toscaparser.tosca_template
    from toscaparser.common.exception import ExceptionCollector, ValidationError
    from toscaparser.tosca_template import ToscaTemplate

    report = ParserReport()

    def serve(path: str, a_file: bool = True) -> Any:
        if path not in files:
            raise FileNotFoundError(path)  # cannot happen: every import was resolved beforehand
        return copy.deepcopy(files[path])

    logging.getLogger("tosca").setLevel(logging.CRITICAL)
    logging.getLogger("tosca.model").setLevel(logging.CRITICAL)
    original = (toscaparser.imports.YAML_LOADER, toscaparser.tosca_template.ToscaGraph,
                toscaparser.topology_template.ToscaGraph)
    toscaparser.imports.YAML_LOADER = serve
    toscaparser.tosca_template.ToscaGraph = toscaparser.topology_template.ToscaGraph = _NoGraph
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ToscaTemplate(yaml_dict_tpl=main, parsed_params=dict(inputs) or None)
    except ValidationError:
        pass  # its details are the collected exceptions
    except Exception as e:  # tosca-parser fails in many ways (P11): each becomes one reported problem
        report.crash = f"{type(e).__name__}: {e}"
    finally:
        (toscaparser.imports.YAML_LOADER, toscaparser.tosca_template.ToscaGraph,
         toscaparser.topology_template.ToscaGraph) = original
        report.errors = [(type(x).__name__, str(x)) for x in ExceptionCollector.getExceptions()]
        ExceptionCollector.stop()
        ExceptionCollector.clear()
    return report
