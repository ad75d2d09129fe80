"""``khutulun host``: the hosts of the cluster, their status and capacity, and draining them."""

from __future__ import annotations

from typing import Any

import click
from rich.markup import escape

from khutulun.cli.context import CliState, pass_state
from khutulun.cli.render import ago, emit, table

__all__ = ["host"]


@click.group()
def host() -> None:
    """The hosts of the cluster (a single host is a cluster of one)."""


@host.command(name="list")
@pass_state
def list_(state: CliState) -> None:
    """Name, address, status (alive, suspect, left, dead), capacity and what is placed on each host."""
    data = state.with_client(lambda c: c.get("/v1/hosts"))
    rows = [[h["name"], h["address"], h["status"] + _still_writes(h) + ("" if h["eligible"] else ", drained"),
             f"{h['cpus']:g}" if h["cpus"] else "", f"{h['memory'] // 2**20} MiB" if h["memory"] else "",
             ",".join(f"{k}={v}" for k, v in sorted(h["labels"].items())), h["instances"], ago(h["since"])]
            for h in data["hosts"]]
    emit(state, data["hosts"], lambda: table(state, ["HOST", "ADDRESS", "STATUS", "CPUS", "MEMORY", "LABELS",
                                                      "INSTANCES", "SINCE"], rows))


def _still_writes(host: dict[str, Any]) -> str:
    """A host gossip calls dead whose agent still writes the shared state is cut off, not gone: its instances
    stay where they are, and the table says why."""
    return " (cut off: its agent still writes the shared state)" if host.get("cut_off") else ""


@host.command()
@click.argument("address")
@pass_state
def add(state: CliState, address: str) -> None:
    """Join the agent's cluster to the one a host's gossip ADDRESS (host:port) belongs to."""
    state.with_client(lambda c: c.request("POST", "/v1/hosts", {"address": address}))
    emit(state, {"added": address}, lambda: state.out.print(f"asked {escape(address)} to join"))


@host.command()
@click.argument("name")
@pass_state
def drain(state: CliState, name: str) -> None:
    """Move a host's instances elsewhere and keep new ones away (until 'eligibility NAME on')."""
    data = state.with_client(lambda c: c.request("POST", f"/v1/hosts/{name}/drain"))
    emit(state, data, lambda: state.out.print(
        f"{escape(name)} is drained; {len(data['moved'])} instances placed elsewhere"))


@host.command()
@click.argument("name")
@click.argument("switch", type=click.Choice(["on", "off"]))
@pass_state
def eligibility(state: CliState, name: str, switch: str) -> None:
    """Let a host take new instances (on) or not (off), without moving what it runs."""
    data = state.with_client(lambda c: c.request("POST", f"/v1/hosts/{name}/eligibility",
                                                 {"eligible": switch == "on"}))
    emit(state, data, lambda: state.out.print(f"{escape(name)} is {'eligible' if data['eligible'] else 'ineligible'}"))
