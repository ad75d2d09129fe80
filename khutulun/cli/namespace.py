"""``khutulun namespace``: the isolated groups of services and templates."""

from __future__ import annotations

import click

from khutulun.cli.context import CliState, pass_state
from khutulun.cli.render import emit, table

__all__ = ["namespace"]


@click.group()
def namespace() -> None:
    """Namespaces (choose one with --namespace or KHUTULUN_NAMESPACE)."""


@namespace.command(name="list")
@pass_state
def list_(state: CliState) -> None:
    """List the namespaces."""
    data = state.with_client(lambda c: c.get("/v1/namespaces"))
    emit(state, data["namespaces"], lambda: table(state, ["NAMESPACE"], [[n] for n in data["namespaces"]]))
