"""Commands about services: validate, preview, deploy, status, list, outputs, logs, exec, destroy."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import yaml
from rich.markup import escape

from khutulun.bundle import Bundle
from khutulun.cli.context import CliState, pass_state
from khutulun.cli.render import ago, emit, table
from khutulun.client import Client
from khutulun.errors import DeployError, InvalidInputError, NotFoundError, error_from_wire
from khutulun.resources import check_name
from khutulun.tosca import collect_bundle, load_file

__all__ = ["COMMANDS"]

_ICONS = {"done": "[green]✓[/green]", "failed": "[red]✗[/red]", "skipped": "[yellow]-[/yellow]"}
_VERBS = {"create": "created", "update": "updated", "delete": "deleted"}


def _inputs(pairs: tuple[str, ...], files: tuple[Path, ...]) -> dict[str, Any]:
    """Inputs from ``--inputs FILE`` (YAML or JSON maps, in order), then ``--input name=value``."""
    inputs: dict[str, Any] = {}
    for path in files:
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise InvalidInputError(f"cannot read the inputs file {str(path)!r}: {e}") from e
        if data is None:
            continue
        if not isinstance(data, dict):
            raise InvalidInputError(f"the inputs file {str(path)!r} must hold a map of input names to values")
        inputs.update(data)
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise InvalidInputError(f"--input {pair!r} is not NAME=VALUE")
        inputs[name] = value
    return inputs


def _service_name(service: str | None, template: Path | None, registered: str | None) -> str:
    if service:
        return check_name("service", service)
    base = template.stem if template is not None else registered or ""
    return check_name("service", re.sub(r"[^a-z0-9._-]+", "-", base.lower()).strip("-._") or "service")


def _request_body(template: Path | None, registered: str | None, inputs: dict[str, Any]) -> dict[str, Any]:
    if (template is None) == (registered is None):
        raise InvalidInputError("give a template file, or --template NAME of a registered one (not both)")
    body: dict[str, Any] = {"inputs": inputs}
    if template is not None:
        bundle: Bundle = collect_bundle(template)
        body["bundle"] = bundle.to_wire()
    else:
        body["template"] = registered
    return body


template_options = [  # what preview and deploy take: a template file or a registered one, and a service
    click.argument("template", required=False, type=click.Path(path_type=Path)),
    click.option("--template", "registered", help="A registered template instead of a file."),
    click.option("--service", "-s", help="The service name (default: the template's file name)."),
]
input_options = [
    click.option("--input", "-i", "pairs", multiple=True, metavar="NAME=VALUE", help="An input value (repeatable)."),
    click.option("--inputs", "input_files", multiple=True, type=click.Path(path_type=Path, exists=True,
                                                                             dir_okay=False),
                 help="A YAML or JSON file of input values (repeatable)."),
]


def _each(options: list[Any]) -> Callable[[Any], Any]:
    def decorate(fn: Any) -> Any:
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


with_inputs = _each(input_options)
with_template = _each(template_options)


@click.command()
@click.argument("template", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@with_inputs
@pass_state
def validate(state: CliState, template: Path, pairs: tuple[str, ...], input_files: tuple[Path, ...]) -> None:
    """Check a service template, and the inputs given, without deploying anything."""
    from khutulun.state import StateStore

    registered: dict[str, Path] = {}
    if state.config.state_dir.is_dir():  # the namespace's registered profiles, when this host shares the state
        store = StateStore(state.config.state_dir, lock_timeout=state.config.timeouts.lock)
        registered = {t.name: store.template_files_dir(state.namespace, t.name)
                      for t in store.templates(state.namespace)}
    topology = load_file(template, _inputs(pairs, input_files), registered=registered,
                         timeout=state.config.timeouts.parse)
    nodes = list(topology.nodes.values())
    data = {"valid": True, "template": str(template),
            "nodes": [{"name": n.name, "type": n.type, "instances": topology.instance_count(n.name)} for n in nodes],
            "outputs": list(topology.outputs)}

    def people() -> None:
        instances = sum(topology.instance_count(n.name) for n in nodes)
        state.out.print(f"[green]{escape(str(template))} is valid[/green]: {len(nodes)} node templates, "
                        f"{instances} instances")

    emit(state, data, people)


def _plan_rows(plan: dict[str, Any], *, everything: bool) -> list[list[Any]]:
    return [[s["action"], s["instance"], s["host"], s["delegate"], s["reason"]] for s in plan["steps"]
            if everything or s["action"] != "keep"]


def _plan_summary(plan: dict[str, Any]) -> str:
    counts = plan["counts"]
    return (f"{counts['create']} to create, {counts['update']} to update, {counts['delete']} to delete, "
            f"{counts['keep']} unchanged")


@click.command()
@with_template
@click.option("--all", "everything", is_flag=True, help="Also list what stays as it is.")
@with_inputs
@pass_state
def preview(state: CliState, template: Path | None, registered: str | None, service: str | None, everything: bool,
            pairs: tuple[str, ...], input_files: tuple[Path, ...]) -> None:
    """Show what a deploy would create, update and delete, and on which host."""
    name = _service_name(service, template, registered)
    body = _request_body(template, registered, _inputs(pairs, input_files))
    answer = state.with_client(lambda c: c.request("POST", f"/v1/namespaces/{state.namespace}/services/{name}/preview",
                                                   body))
    plan = answer["plan"]

    def people() -> None:
        rows = _plan_rows(plan, everything=everything)
        if rows:
            table(state, ["ACTION", "INSTANCE", "HOST", "DELEGATE", "WHY"], rows)
        placed = {f"{i['node']}/{i['index']}": i for i in answer["placement"]["instances"]}
        moving = [s["instance"] for s in plan["steps"] if everything or s["action"] == "create"]
        if moving:
            state.out.print()
            table(state, ["INSTANCE", "PLACED ON", "BECAUSE"],
                  [[name, placed[name]["host"], placed[name]["reason"]] for name in moving if name in placed])
        changes = len(plan["steps"]) - plan["counts"]["keep"]
        state.out.print(f"\n{'Nothing to do' if not changes else 'Plan'}: {_plan_summary(plan)}.")
        if changes:
            source = f"--template {registered}" if registered else str(template)
            state.out.print(f"To apply exactly this plan: khutulun deploy {source} --service {name} "
                            f"--check-index {plan['revision']}", style="dim")

    emit(state, answer, people)


async def _follow(state: CliState, client: Client, method: str, path: str, body: Any = None,
                  **params: Any) -> dict[str, Any]:
    """Show a deploy's or a destroy's progress as it comes; answer its last event."""
    last: dict[str, Any] = {}
    async for event in client.stream(method, path, body, **params):
        kind = event.get("event")
        if kind == "error":
            raise error_from_wire(event["error"])
        if kind == "done":
            last = event
        elif state.machine:
            continue
        elif kind == "plan":
            state.out.print(f"Plan: {_plan_summary(event['plan'])}")
        elif kind in ("step-done", "step-failed", "step-skipped"):
            outcome = kind.removeprefix("step-")
            verb = _VERBS.get(event["action"], event["action"]) if outcome == "done" else event["action"]
            detail = event.get("message") if outcome != "done" else event.get("reason")
            if outcome == "done":  # what the step adds to its reason: a gate that opened, a port exposed
                said = str(event.get("message") or "").split("; ", 1)
                detail = "; ".join(filter(None, [str(detail or ""), said[1] if len(said) > 1 else ""]))
                if said[0].startswith("unchanged"):
                    verb = "kept"
            state.out.print(f"  {_ICONS[outcome]} {verb:<8} {escape(event['instance']):<24} "
                            f"{escape(event['host'])}  [dim]{escape(str(detail or ''))}[/dim]")
    return last


def _failure(service: str, failed: list[dict[str, Any]], *, machine: bool) -> str:
    """What to say when steps failed: in full for scripts, briefly for people (the steps were shown)."""
    if machine:
        return "; ".join(f"{f['instance']}: {f['message']}" for f in failed)
    names = ", ".join(f["instance"] for f in failed)
    return (f"{len(failed)} step{'s' if len(failed) != 1 else ''} did not succeed ({names}); "
            f"'khutulun status {service}' shows the service")


@click.command()
@with_template
@click.option("--check-index", type=int, help="Refuse unless the service is still at this revision (from preview).")
@with_inputs
@pass_state
def deploy(state: CliState, template: Path | None, registered: str | None, service: str | None,
           check_index: int | None, pairs: tuple[str, ...], input_files: tuple[Path, ...]) -> None:
    """Create or update a service from a template, and wait until it runs."""
    name = _service_name(service, template, registered)
    body = {**_request_body(template, registered, _inputs(pairs, input_files)), "check_index": check_index}

    async def work(client: Client) -> dict[str, Any]:
        result = await _follow(state, client, "POST", f"/v1/namespaces/{state.namespace}/services/{name}/deploy",
                               body)
        if not result.get("failed"):
            result["outputs"] = (await client.get(f"/v1/namespaces/{state.namespace}/services/{name}/outputs")
                                 )["outputs"]
        return result

    if not state.machine:
        state.out.print(f"Deploying [bold]{escape(name)}[/bold] in namespace {escape(state.namespace)}")
    result = state.with_client(work)
    result["service"] = name

    def people() -> None:
        if result.get("failed"):
            return
        state.out.print(f"[green]{escape(name)} is deployed[/green] (revision {result.get('revision')})")
        for key, value in (result.get("outputs") or {}).items():
            state.out.print(f"  {escape(key)} = {escape(json.dumps(value) if not isinstance(value, str) else value)}")

    emit(state, result, people)
    if result.get("failed"):
        raise DeployError(_failure(name, result["failed"], machine=state.machine))


@click.command()
@click.argument("service")
@click.option("--purge", is_flag=True, help="Also remove persistent directories and the data kept otherwise.")
@pass_state
def destroy(state: CliState, service: str, purge: bool) -> None:
    """Remove every resource of a service, and the service."""
    if not state.machine:
        state.out.print(f"Destroying [bold]{escape(service)}[/bold]")
    result = state.with_client(lambda c: _follow(state, c, "DELETE",
                                                 f"/v1/namespaces/{state.namespace}/services/{service}",
                                                 purge="true" if purge else None))

    def people() -> None:
        if not result.get("failed"):
            state.out.print(f"[green]{escape(service)} is destroyed[/green]")

    emit(state, {"service": service, **result}, people)
    if result.get("failed"):
        raise DeployError(_failure(service, result["failed"], machine=state.machine)
                          + "; the agent keeps trying to remove what is left")


@click.command()
@click.argument("service")
@pass_state
def status(state: CliState, service: str) -> None:
    """Show every instance of a service: where it runs and how it is."""
    data = state.with_client(lambda c: c.get(f"/v1/namespaces/{state.namespace}/services/{service}"))

    def people() -> None:
        state.out.print(f"[bold]{escape(service)}[/bold]  revision {data['revision']}  {data['status']}"
                        + (f"  [red]{escape(data['message'])}[/red]" if data.get("message") else ""))
        rows = [[i["instance"], i["host"], i["delegate"], i["state"], i.get("pid") or "",
                 ",".join(f"{k}:{v}" for k, v in (i.get("ports") or {}).items()), i["restarts"], ago(i.get("since")),
                 i.get("message") or ""] for i in data["instances"]]
        table(state, ["INSTANCE", "HOST", "DELEGATE", "STATE", "PID", "PORTS", "RESTARTS", "SINCE", "MESSAGE"],
              rows)

    emit(state, data, people)


@click.command(name="list")
@pass_state
def list_(state: CliState) -> None:
    """List the services of the namespace."""
    data = state.with_client(lambda c: c.get(f"/v1/namespaces/{state.namespace}/services"))

    def people() -> None:
        table(state, ["SERVICE", "REVISION", "STATUS", "HEALTHY", "TEMPLATE", "UPDATED"],
              [[s["service"], s["revision"], s["status"], f"{s['healthy']}/{s['instances']}", s["template"],
                ago(s["updated_at"])] for s in data["services"]])

    emit(state, data["services"], people)


@click.command()
@click.argument("service")
@click.option("--limit", "-n", type=int, default=50, show_default=True, help="How many of the latest events.")
@pass_state
def events(state: CliState, service: str, limit: int) -> None:
    """What happened to a service: deploys, starts, restarts, failures, moves between hosts."""
    data = state.with_client(lambda c: c.get(
        f"/v1/namespaces/{state.namespace}/services/{service}/events?limit={limit}"))

    def people() -> None:
        table(state, ["WHEN", "KIND", "HOST", "INSTANCE", "MESSAGE"],
              [[ago(e["time"]), e["kind"], e["host"], e["resource"].split("/", 2)[-1] if e["resource"] else "",
                escape(e["message"])] for e in data["events"]])

    emit(state, data["events"], people)


@click.command()
@click.argument("service")
@pass_state
def outputs(state: CliState, service: str) -> None:
    """Show the outputs of a service."""
    data = state.with_client(lambda c: c.get(f"/v1/namespaces/{state.namespace}/services/{service}/outputs"))

    def people() -> None:
        table(state, ["OUTPUT", "VALUE"], [[k, v if isinstance(v, str) else json.dumps(v)]
                                           for k, v in data["outputs"].items()])

    emit(state, data["outputs"], people)


async def _instances(client: Client, namespace: str, service: str, selector: str | None,
                     capability: str) -> list[tuple[str, int]]:
    """The instances a selector names (all, a node's, one); without a selector, only those whose delegate
    offers ``capability`` (a directory has no logs)."""
    data = await client.get(f"/v1/namespaces/{namespace}/services/{service}")
    chosen = []
    for instance in data["instances"]:
        if selector is None and not instance.get(capability):
            continue
        if selector is None or selector in (instance["node"], instance["instance"]):
            chosen.append((instance["node"], int(instance["index"])))
    if not chosen:
        raise NotFoundError(f"service {service!r} has no instance {selector!r}")
    return chosen


@click.command()
@click.argument("service")
@click.argument("instance", required=False)
@click.option("--follow", "-f", is_flag=True, help="Keep printing what is written.")
@click.option("--tail", "-n", type=int, help="Only the last N lines of each instance.")
@pass_state
def logs(state: CliState, service: str, instance: str | None, follow: bool, tail: int | None) -> None:
    """Print what the instances of a service write (INSTANCE: a node, or node/index)."""

    async def one(client: Client, node: str, index: int, prefix: str) -> None:
        pending = b""
        path = f"/v1/namespaces/{state.namespace}/services/{service}/instances/{node}/{index}/logs"
        async for chunk in client.raw(path, follow="true" if follow else None, tail=tail):
            if not prefix:
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
                continue
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                sys.stdout.buffer.write(prefix.encode() + line + b"\n")
            sys.stdout.buffer.flush()
        if pending:
            sys.stdout.buffer.write(prefix.encode() + pending + b"\n")

    async def work(client: Client) -> None:
        chosen = await _instances(client, state.namespace, service, instance, "logs")
        width = max(len(f"{n}/{i}") for n, i in chosen)
        prefixed = len(chosen) > 1
        if follow:
            await asyncio.gather(*(one(client, n, i, f"{n}/{i}".ljust(width) + " | " if prefixed else "")
                                   for n, i in chosen))
        else:
            for n, i in chosen:
                await one(client, n, i, f"{n}/{i}".ljust(width) + " | " if prefixed else "")

    with contextlib.suppress(KeyboardInterrupt):  # the way to end "logs --follow"
        state.with_client(work)


@click.command(name="exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--interactive", "-i", is_flag=True, help="Send this terminal's input to the command.")
@click.option("--tty", "-t", is_flag=True, help="Give the command a terminal.")
@click.argument("service")
@click.argument("instance")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@pass_state
def exec_(state: CliState, interactive: bool, tty: bool, service: str, instance: str,
          command: tuple[str, ...]) -> None:
    """Run a command next to an instance (INSTANCE: node or node/index), like docker exec."""
    from khutulun.cli.terminal import run_session

    if command and command[0] == "--":  # "exec SERVICE INSTANCE -- CMD ...", as with kubectl
        command = command[1:]
    if not command:
        raise InvalidInputError("exec needs a command to run")

    async def work(client: Client) -> int:
        node, index = (await _instances(client, state.namespace, service, instance, "exec"))[0]
        ws = await client.websocket(f"/v1/namespaces/{state.namespace}/services/{service}/instances/{node}/{index}"
                                    "/exec")
        async with ws:
            return await run_session(ws, list(command), tty=tty, interactive=interactive or tty)

    code = state.with_client(work)
    sys.exit(code)


COMMANDS = [validate, preview, deploy, status, list_, events, outputs, logs, exec_, destroy]
