"""What the parts of an agent share: its settings, the shared state, its host and its delegates."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

from khutulun.config import Config
from khutulun.delegates.base import Delegate
from khutulun.errors import DelegateError
from khutulun.state import StateStore, layout

__all__ = ["AgentContext"]

P = ParamSpec("P")
T = TypeVar("T")


@dataclass
class AgentContext:
    config: Config
    store: StateStore
    host: str
    delegates: dict[str, Delegate] = field(default_factory=dict)

    @property
    def shared_root(self) -> str:
        """Where ``shared`` directories go: inside the shared state directory, the same path on every host."""
        return str(layout.volumes_dir(self.store.root))

    def delegate(self, name: str) -> Delegate:
        found = self.delegates.get(name)
        if found is None:
            have = ", ".join(sorted(self.delegates)) or "none"
            raise DelegateError(f"host {self.host!r} has no {name!r} delegate (it has: {have})")
        return found

    async def io(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a blocking call (the shared state: files and flock, perhaps on NFS) off the event loop."""
        return await asyncio.to_thread(fn, *args, **kwargs)
