"""The delegate interface: what an agent asks of the code that knows one kind of resource.

A delegate never sees TOSCA: it gets a :class:`~khutulun.resources.Resource` whose spec is plain data in its
own format, and it answers with :class:`~khutulun.resources.Live`. One instance of each delegate lives in an
agent, between :meth:`Delegate.start` and :meth:`Delegate.close`.

Rules every delegate keeps (``tests/delegates/test_conformance.py`` holds them to it):

- ``apply`` is idempotent: applying the spec a live resource was made from changes nothing; a different
  spec replaces what runs. It returns once the resource is running (or ready), or raises ``DelegateError``.
- What a delegate creates carries markers (an environment variable, a label, a file) with the resource id and
  spec hash, so that ``inspect`` and ``list`` find it after any restart of the agent, and so that it never
  touches anything without them.
- Restarting is the agent's job, not the runtime's: a delegate does not configure restart policies of its own.
- Optional operations are declared in :class:`Capabilities`; the defaults raise ``NotSupportedError``.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from khutulun.config import Timeouts
from khutulun.errors import NotSupportedError
from khutulun.resources import Live, Resource, ResourceId

__all__ = ["Capabilities", "Delegate", "DelegateContext", "ExecSession"]


@dataclass(frozen=True)
class Capabilities:
    """What a delegate offers beyond inspect, apply and delete. Asked, never probed."""

    supervised: bool = True
    """Its resources run and can stop; the agent restarts them. False for things that just exist."""
    logs: bool = False
    exec: bool = False
    list: bool = False
    """It can find everything it made on this host by its markers (for adoption and for orphans)."""
    watch: bool = False
    """It reports when a resource stops, as it happens, so restarts do not wait for the next check."""


@dataclass(frozen=True)
class DelegateContext:
    """What the agent hands every delegate."""

    host: str
    data_dir: Path
    """This delegate's own directory on this host (logs, working directories); it creates it as needed."""
    timeouts: Timeouts


class ExecSession(abc.ABC):
    """A command running next to a resource, as ``exec`` started it."""

    @abc.abstractmethod
    async def write(self, data: bytes) -> None:
        """Send bytes to the command's standard input."""

    @abc.abstractmethod
    async def close_stdin(self) -> None: ...

    @abc.abstractmethod
    def output(self) -> AsyncIterator[tuple[str, bytes]]:
        """Chunks of output, each tagged "stdout" or "stderr" (a terminal gives only "stdout")."""

    @abc.abstractmethod
    async def wait(self) -> int:
        """The exit code, once the command has ended and its output has been read."""

    async def resize(self, rows: int, columns: int) -> None:
        """Resize the terminal, when there is one."""

    @abc.abstractmethod
    async def kill(self) -> None: ...


class Delegate(abc.ABC):
    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    def __init__(self, context: DelegateContext) -> None:
        self.context = context

    async def start(self) -> None:
        """Get ready to work (connect to a runtime, adopt what runs). Called once, before anything else."""

    async def close(self) -> None:
        """Let go of connections. What runs keeps running."""

    @abc.abstractmethod
    async def inspect(self, resource: Resource) -> Live | None:
        """What runs for ``resource`` now, or None if nothing does."""

    @abc.abstractmethod
    async def apply(self, resource: Resource, live: Live | None) -> Live:
        """Create the resource, or replace ``live`` with one made from ``resource.spec``."""

    @abc.abstractmethod
    async def delete(self, resource: Resource, live: Live | None, *, purge: bool = False) -> None:
        """Remove the resource and what it made. ``purge`` also removes what is otherwise kept (data)."""

    async def list(self) -> Sequence[tuple[ResourceId, Live]]:
        """Everything on this host that carries this delegate's markers."""
        raise NotSupportedError(f"the {self.name} delegate cannot list its resources")

    def logs(self, resource: Resource, *, follow: bool = False, tail: int | None = None) -> AsyncIterator[bytes]:
        raise NotSupportedError(f"the {self.name} delegate has no logs")

    async def exec(self, resource: Resource, argv: Sequence[str], *, tty: bool = False) -> ExecSession:
        raise NotSupportedError(f"the {self.name} delegate cannot run commands in its resources")

    def watch(self) -> AsyncIterator[ResourceId]:
        """Ids of resources that stopped, as they stop."""
        raise NotSupportedError(f"the {self.name} delegate cannot watch its resources")
