"""``khutulun-agent``: run this host's agent in the foreground (systemd, or ``khutulun agent start``)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

import click

from khutulun.agent.agent import Agent
from khutulun.config import load_config
from khutulun.errors import KhutulunError

__all__ = ["main"]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--state-dir", type=click.Path(path_type=Path), help="The shared state directory.")
@click.option("--data-dir", type=click.Path(path_type=Path), help="This host's own files.")
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), help="The API's unix socket.")
@click.option("--listen", help="Also serve the API on TCP, HOST:PORT (needs --token-file).")
@click.option("--token-file", type=click.Path(path_type=Path), help="The bearer token for TCP clients.")
@click.option("--host-name", help="This host's name in the cluster.")
@click.option("--host-address", help="The address this host's endpoints are reachable at.")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
def main(state_dir: Path | None, data_dir: Path | None, socket_path: Path | None, listen: str | None,
         token_file: Path | None, host_name: str | None, host_address: str | None, log_level: str) -> None:
    """Run the Khutulun agent of this host until SIGTERM. Workloads keep running when it stops."""
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(state_dir=state_dir, data_dir=data_dir, socket=socket_path, listen=listen,
                             token_file=token_file, host_name=host_name, host_address=host_address)
        asyncio.run(_run(Agent(config)))
    except KhutulunError as e:
        click.echo(f"khutulun-agent: {e.message}", err=True)
        sys.exit(e.exit_code)


async def _run(agent: Agent) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, agent.request_stop)
    await agent.run()


if __name__ == "__main__":
    main()
