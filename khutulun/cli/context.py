"""What every command shares: settings, output format, namespace, and a connected client."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import click
from rich.console import Console

from khutulun.client import Client, ensure_local_agent
from khutulun.config import Config

__all__ = ["CliState", "pass_state", "run"]

T = TypeVar("T")


@dataclass
class CliState:
    config: Config
    output: str = "table"
    namespace: str = "default"
    out: Console = field(default_factory=lambda: _console(stderr=False))
    err: Console = field(default_factory=lambda: _console(stderr=True))

    @property
    def machine(self) -> bool:
        """Output for scripts (JSON or YAML), so no progress and no decoration."""
        return self.output != "table"

    async def client(self) -> Client:
        """A client of this user's agent (started if it is the embedded default and none runs), or of
        the configured one."""
        config = self.config
        if config.embedded and await ensure_local_agent(config) and not self.machine:
            self.err.print(f"[dim]started the local agent ({config.socket})[/dim]")
        token = config.token() if config.agent and config.agent.startswith("http") else None
        return Client(config.agent_url, token=token, connect_timeout=config.timeouts.connect,
                      request_timeout=config.timeouts.request)

    def with_client(self, work: Callable[[Client], Awaitable[T]]) -> T:
        async def go() -> T:
            async with await self.client() as client:
                return await work(client)

        return run(go())


def _console(*, stderr: bool) -> Console:
    # Into a pipe or a file, nothing is cut to fit a terminal that is not there: scripts grep whole values.
    console = Console(stderr=stderr, highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console = Console(stderr=stderr, highlight=False, soft_wrap=True, width=1000)
    return console


pass_state = click.make_pass_decorator(CliState)


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)
