"""The ``khutulun`` command: one module per noun; every error leaves through :class:`KhutulunGroup`.

Exit codes: 0 success; 1 a deploy or destroy with failed steps (or another failure); 2 a wrong command line;
3 an invalid template or input; 4 a stale ``--check-index``; 5 not found; 6 no agent answers; 7 cannot be
placed; 8 busy (another deploy of the service runs); 70 a bug in Khutulun.
"""

from __future__ import annotations

import os
import traceback
from typing import Any

import click

from khutulun import __version__
from khutulun.cli.agent import agent
from khutulun.cli.context import CliState
from khutulun.cli.host import host
from khutulun.cli.namespace import namespace
from khutulun.cli.render import show_error
from khutulun.cli.service import COMMANDS
from khutulun.cli.template import template
from khutulun.config import load_config
from khutulun.errors import InternalError, KhutulunError
from khutulun.resources import check_name

__all__ = ["cli", "main"]


class KhutulunGroup(click.Group):
    """Turns Khutulun's errors into a message and their exit code, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KhutulunError as e:
            state = ctx.find_object(CliState)
            if state is None:
                click.echo(f"error: {e.message}", err=True)
            else:
                show_error(state, e)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as e:  # a bug: one line for the user, the traceback only when asked for
            if os.environ.get("KHUTULUN_DEBUG"):
                traceback.print_exc()
            click.echo(f"error: internal error in khutulun ({type(e).__name__}: {e}); please report it, with "
                       "the output of the same command run with KHUTULUN_DEBUG=1", err=True)
            ctx.exit(InternalError.exit_code)


@click.group(cls=KhutulunGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--agent", "agent_url", envvar="KHUTULUN_AGENT", help="The agent to talk to (unix:/path or "
              "http://host:port); by default this user's local agent, started when needed.")
@click.option("--namespace", "-n", envvar="KHUTULUN_NAMESPACE", help="The namespace (default: default).")
@click.option("--output", "-o", type=click.Choice(["table", "json", "yaml"]), default="table",
              help="Tables for people, JSON or YAML for scripts.")
@click.version_option(__version__, prog_name="khutulun")
@click.pass_context
def cli(ctx: click.Context, agent_url: str | None, namespace: str | None, output: str) -> None:
    """Khutulun: deploy TOSCA service templates as processes, containers and VMs."""
    try:
        config = load_config(agent=agent_url, namespace=namespace)
        check_name("namespace", config.namespace)
    except KhutulunError as e:
        click.echo(f"error: {e.message}", err=True)
        ctx.exit(e.exit_code)
    ctx.obj = CliState(config=config, output=output, namespace=config.namespace)


for command in COMMANDS:
    cli.add_command(command)
cli.add_command(template)
cli.add_command(namespace)
cli.add_command(agent)
cli.add_command(host)


def main() -> None:
    cli.main(prog_name="khutulun")


if __name__ == "__main__":
    main()
