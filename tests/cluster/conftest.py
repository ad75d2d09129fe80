"""Fixtures for the cluster tests: a multi-host rig shared by a module, and its nodes cleaned up per test."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.rig import Host, Proc, Rig, node_argv, write_secret

GOSSIP_PORT = 7946


class Nodes:
    """Starts node.py processes in the rig's hosts, and stops them when the test ends."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.secret = write_secret(rig.root / "gossip.key")
        self._started: list[Proc] = []

    def address(self, host: int) -> str:
        return f"{self.rig.hosts[host - 1].address}:{GOSSIP_PORT}"

    def host(self, host: int) -> Host:
        return self.rig.hosts[host - 1]

    def start(self, host: int, *seeds: int, ready: bool = True, secret: Path | None = None,
              name: str | None = None, **options: Any) -> Proc:
        argv = node_argv(bind=self.address(host), name=name or f"h{host}", secret_file=secret or self.secret,
                         seeds=[self.address(s) for s in seeds], **options)
        proc = self.rig.spawn(self.host(host), argv, name=name or f"h{host}")
        self._started.append(proc)
        if ready:
            proc.wait_for(lambda line: line["event"] in ("ready", "error"), 20)
        return proc

    def stop_all(self) -> None:
        for proc in self._started:
            proc.stop()
        self._started.clear()


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("unshare") is None:
        pytest.skip("the multi-host rig needs root, iproute2 and util-linux")
    with Rig(6) as rig:
        yield rig


@pytest.fixture
def nodes(rig: Rig) -> Iterator[Nodes]:
    nodes = Nodes(rig)
    try:
        yield nodes
    finally:
        nodes.stop_all()
