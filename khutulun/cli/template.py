"""``khutulun template``: register templates (and profiles) in a namespace, list, fetch and delist them."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from khutulun.bundle import Bundle
from khutulun.cli.context import CliState, pass_state
from khutulun.cli.render import ago, emit, table
from khutulun.errors import InvalidInputError
from khutulun.resources import check_name
from khutulun.tosca import collect_bundle

__all__ = ["template"]


@click.group()
def template() -> None:
    """Templates registered in the namespace (deploy them with --template NAME, import them as NAME/file)."""


@template.command()
@click.argument("name")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--description", default="", help="What it is, for 'template list'.")
@click.option("--no-validate", is_flag=True, help="Register without loading it first (a profile of types only).")
@pass_state
def register(state: CliState, name: str, file: Path, description: str, no_validate: bool) -> None:
    """Register FILE, and the files it imports, as template NAME."""
    check_name("template", name)
    bundle = collect_bundle(file)
    body = {"bundle": bundle.to_wire(), "description": description, "validate": not no_validate}
    data = state.with_client(lambda c: c.request("PUT", f"/v1/namespaces/{state.namespace}/templates/{name}", body))
    emit(state, data["template"], lambda: state.out.print(
        f"registered [bold]{escape(name)}[/bold] ({len(bundle.files)} files)"))


@template.command(name="list")
@pass_state
def list_(state: CliState) -> None:
    """List the registered templates."""
    data = state.with_client(lambda c: c.get(f"/v1/namespaces/{state.namespace}/templates"))
    emit(state, data["templates"], lambda: table(state, ["TEMPLATE", "MAIN", "FILES", "REGISTERED", "DESCRIPTION"], [
        [t["name"], t["main"], len(t["files"]), ago(t["registered_at"]), t["description"]] for t in data["templates"]]))


@template.command()
@click.argument("name")
@click.option("--output-dir", "-d", type=click.Path(path_type=Path), help="Where to write its files (default: NAME/).")
@pass_state
def fetch(state: CliState, name: str, output_dir: Path | None) -> None:
    """Write the files of a registered template into a directory."""
    data = state.with_client(lambda c: c.get(f"/v1/namespaces/{state.namespace}/templates/{name}"))
    target = output_dir or Path(name)
    bundle = Bundle.from_wire(data["bundle"])
    written = []
    contents = {**{rel: text.encode() for rel, text in bundle.files.items()}, **bundle.blobs}
    for rel, content in contents.items():
        path = (target / rel).resolve()
        if not path.is_relative_to(target.resolve()):
            raise InvalidInputError(f"the template has a file outside its directory: {rel!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        written.append(str(target / rel))
    emit(state, {"template": name, "files": written}, lambda: state.out.print(
        f"wrote {len(written)} files to {escape(str(target))}/ (main: {escape(data['bundle']['main'])})"))


@template.command()
@click.argument("name")
@pass_state
def delist(state: CliState, name: str) -> None:
    """Remove a registered template (services deployed from it keep running)."""
    state.with_client(lambda c: c.request("DELETE", f"/v1/namespaces/{state.namespace}/templates/{name}"))
    emit(state, {"delisted": name}, lambda: state.out.print(f"delisted {escape(name)}"))
