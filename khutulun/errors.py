"""Khutulun's one error tree.

Every error a user can meet derives from :class:`KhutulunError`. Each class carries the exit code the CLI
ends with and a stable ``code`` string that the agent's API puts on the wire, so that the client can raise
the same class on the other side.

    KhutulunError                  1   something failed; the message says what
    ├── InvalidInputError          3   bad input from the user: a template, an input value, a name
    │   └── TemplateError          3   a template with problems (file, line, column and field path each)
    ├── NotFoundError              5   no such service, template, instance or namespace (also a KeyError)
    ├── ConflictError              4   the request does not fit the current state
    │   ├── StaleIndexError        4   ``deploy --check-index`` saw a different service revision
    │   └── BusyError              8   another deploy or destroy of the service is running
    ├── PlacementError             7   the instances cannot be placed on the hosts there are
    ├── DeployError                1   a deploy or destroy ran and some of its steps failed
    ├── DelegateError              1   a delegate could not do what a step asked
    │   └── NotSupportedError      1   the delegate does not offer that operation (see its capabilities)
    ├── AgentUnavailableError      6   the CLI cannot reach an agent, or lost it mid-request
    ├── StateError                 1   the shared state directory is unusable (layout, permissions, a bad record)
    └── InternalError             70   a bug in Khutulun: the message asks for a report

Exit code 2 is click's: the command line itself was wrong. 0 is success.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "AgentUnavailableError",
    "BusyError",
    "ConflictError",
    "DelegateError",
    "DeployError",
    "InternalError",
    "InvalidInputError",
    "KhutulunError",
    "NotFoundError",
    "NotSupportedError",
    "PlacementError",
    "Problem",
    "StaleIndexError",
    "StateError",
    "TemplateError",
    "error_from_wire",
]


class KhutulunError(Exception):
    """The root of every error Khutulun reports to a user."""

    exit_code: ClassVar[int] = 1
    code: ClassVar[str] = "error"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_wire(self) -> dict[str, Any]:
        """The JSON body the agent's API answers with."""
        return {"code": self.code, "message": self.message}


class InvalidInputError(KhutulunError):
    exit_code = 3
    code = "invalid-input"
    http_status = 422


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a template, located in its source.

    ``file`` is the path as the loader was given it (for a bundle sent to an agent: relative to the bundle),
    ``line`` and ``column`` are 1-based (0 when only the file is known), and ``path`` is the dotted path of
    the offending field, e.g. ``topology_template.node_templates.web.properties.port``.
    """

    message: str
    file: str
    line: int = 0
    column: int = 0
    path: str = ""

    def __str__(self) -> str:
        where = self.file
        if self.line:
            where += f":{self.line}:{self.column}"
        field = f" [{self.path}]" if self.path else ""
        return f"{where}: {self.message}{field}"

    def to_wire(self) -> dict[str, Any]:
        return {"message": self.message, "file": self.file, "line": self.line, "column": self.column,
                "path": self.path}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Problem:
        return cls(message=str(data["message"]), file=str(data.get("file", "")), line=int(data.get("line", 0)),
                   column=int(data.get("column", 0)), path=str(data.get("path", "")))


class TemplateError(InvalidInputError):
    """A template with one or more problems; all of them are reported at once."""

    code = "invalid-template"

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        count = len(self.problems)
        summary = f"the template has {count} problem{'s' if count != 1 else ''}"
        super().__init__("\n".join([summary, *(str(p) for p in self.problems)]))

    def to_wire(self) -> dict[str, Any]:
        return {**super().to_wire(), "problems": [p.to_wire() for p in self.problems]}


class NotFoundError(KhutulunError, KeyError):
    exit_code = 5
    code = "not-found"
    http_status = 404

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class ConflictError(KhutulunError):
    exit_code = 4
    code = "conflict"
    http_status = 409


class StaleIndexError(ConflictError):
    code = "stale-index"


class BusyError(ConflictError):
    exit_code = 8
    code = "busy"


class PlacementError(KhutulunError):
    exit_code = 7
    code = "placement"
    http_status = 422


class DeployError(KhutulunError):
    code = "deploy-failed"


class DelegateError(KhutulunError):
    code = "delegate"


class NotSupportedError(DelegateError):
    code = "not-supported"
    http_status = 501


class AgentUnavailableError(KhutulunError):
    exit_code = 6
    code = "agent-unavailable"
    http_status = 503


class StateError(KhutulunError):
    code = "state"


class InternalError(KhutulunError):
    exit_code = 70
    code = "internal"


_BY_CODE: dict[str, type[KhutulunError]] = {
    cls.code: cls
    for cls in (KhutulunError, InvalidInputError, NotFoundError, ConflictError, StaleIndexError, BusyError,
                PlacementError, DeployError, DelegateError, NotSupportedError, AgentUnavailableError, StateError,
                InternalError)
}


def error_from_wire(data: dict[str, Any]) -> KhutulunError:
    """Rebuild, on the client side, the error an agent answered with."""
    code = str(data.get("code", "error"))
    message = str(data.get("message", "the agent reported an error without a message"))
    if code == TemplateError.code:
        return TemplateError([Problem.from_wire(p) for p in data.get("problems", [])])
    return _BY_CODE.get(code, KhutulunError)(message)
