"""``khutulun agent``: start, stop and look at this user's local agent."""

from __future__ import annotations

import asyncio
import os
import time

import click
from rich.markup import escape

from khutulun.cli.context import CliState, pass_state, run
from khutulun.cli.render import emit
from khutulun.client import Client, ensure_local_agent
from khutulun.errors import AgentUnavailableError, InvalidInputError, KhutulunError

__all__ = ["agent"]


@click.group()
def agent() -> None:
    """The local agent (the one the embedded default starts on demand)."""


def _local_only(state: CliState, what: str) -> None:
    if not state.config.embedded:
        raise InvalidInputError(f"'agent {what}' manages this user's local agent; KHUTULUN_AGENT points at "
                                f"{state.config.agent}")


@agent.command()
@click.option("--foreground", is_flag=True, help="Run it here, until Ctrl-C, instead of in the background.")
@pass_state
def start(state: CliState, foreground: bool) -> None:
    """Start the local agent (nothing happens if it runs already)."""
    _local_only(state, "start")
    if foreground:
        from khutulun.agent.main import main as agent_main

        agent_main.main(args=[], standalone_mode=True)  # exits when the agent stops
    started = run(ensure_local_agent(state.config))
    pid = state.config.pid_file.read_text().strip() if state.config.pid_file.exists() else "?"
    emit(state, {"started": started, "pid": pid, "socket": str(state.config.socket)}, lambda: state.out.print(
        f"{'started' if started else 'already running:'} agent pid {pid} on {escape(str(state.config.socket))}"))


@agent.command()
@pass_state
def stop(state: CliState) -> None:
    """Stop the local agent. Workloads keep running; the next agent adopts them."""
    _local_only(state, "stop")

    async def go() -> bool:
        try:
            async with Client(state.config.agent_url, connect_timeout=2.0) as client:
                await client.request("POST", "/v1/agent/stop")
        except AgentUnavailableError:
            return False
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and state.config.socket.exists():  # noqa: ASYNC110 (a file, no event)
            await asyncio.sleep(0.1)
        return True

    stopped = run(go())
    emit(state, {"stopped": stopped}, lambda: state.out.print(
        "agent stopped; workloads keep running" if stopped else "no agent was running"))


@agent.command()
@pass_state
def status(state: CliState) -> None:
    """Show whether the agent answers, and where its files are."""

    async def go() -> dict[str, object]:
        async with Client(state.config.agent_url, connect_timeout=2.0) as client:
            return dict(await client.get("/v1/health"))

    try:
        health = run(go())
    except KhutulunError:
        emit(state, {"running": False, "agent": state.config.agent_url},
             lambda: state.out.print(f"no agent answers at {escape(state.config.agent_url)}"))
        raise SystemExit(AgentUnavailableError.exit_code) from None
    pid = state.config.pid_file.read_text().strip() if state.config.pid_file.exists() else None
    data = {"running": True, "agent": state.config.agent_url, "pid": pid, "log": str(state.config.log_file),
            "uid": os.getuid(), **health}
    emit(state, data, lambda: state.out.print("\n".join(f"{k}: {escape(str(v))}" for k, v in data.items())))
