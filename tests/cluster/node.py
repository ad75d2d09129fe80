"""One cluster member in its own process, driven through stdin and reporting on stdout, one JSON object a line.

    python tests/cluster/node.py --bind 10.99.1.1:7946 --name h1 --secret-file S [--seed ADDR]... [--fast]

Out: ``{"event": "ready", "address", "t"}``, then ``{"event": "member", "kind", "address", "name", "status",
"metadata", "t"}`` for every membership event, ``{"event": "members", "members": [...]}`` when asked, and
``{"event": "error", "type", "message"}`` (exit status 3) when the cluster fails. ``t`` is ``time.time()``: all
the rig's hosts share one clock, so the tests and the benchmark compare times across processes.

In: ``{"cmd": "members"}``, ``{"cmd": "update", "changes": {...}}``, ``{"cmd": "leave"}`` (then the process
exits), ``{"cmd": "add_peer", "address": A}``, ``{"cmd": "exit"}`` (stops without leaving).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from khutulun.cluster import Cluster, ClusterSettings, HostMetadata, Member
from khutulun.errors import KhutulunError


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, "t": time.time(), **fields}) + "\n")
    sys.stdout.flush()


def describe(member: Member) -> dict[str, Any]:
    meta = None
    if member.metadata is not None:
        meta = {f.name: getattr(member.metadata, f.name) for f in dataclasses.fields(member.metadata)}
        meta["labels"] = dict(member.metadata.labels)
    return {"address": member.address, "name": member.name, "status": member.status.value, "metadata": meta,
            "since": member.since}


async def commands() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def run(args: argparse.Namespace) -> int:
    timing = json.loads(args.settings) if args.settings else {}
    common: dict[str, Any] = {"bind": args.bind, "seeds": tuple(args.seed), **timing}
    secret = Path(args.secret_file)
    settings = ClusterSettings.fast(secret, **common) if args.fast else ClusterSettings(secret_file=secret, **common)
    labels = dict(item.split("=", 1) for item in args.label)
    metadata = HostMetadata(name=args.name, api=f"http://{args.bind.rpartition(':')[0]}:7070",
                            address=args.bind.rpartition(":")[0], cpus=float(os.cpu_count() or 1),
                            memory=8 << 30, labels=labels, version="0.1.0")
    stdin = await commands()
    async with Cluster(settings, metadata) as cluster:
        events = cluster.events()

        async def report() -> None:
            async for event in events:
                emit("member", kind=event.kind.value, **describe(event.member))

        def died(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                emit("error", type="InternalError", message=f"the reporter failed: {task.exception()!r}")
                os._exit(70)

        reporter = asyncio.create_task(report())
        reporter.add_done_callback(died)
        emit("ready", address=cluster.address, pid=os.getpid())
        try:
            while line := await stdin.readline():
                cmd = json.loads(line)
                if cmd["cmd"] == "members":
                    emit("members", members=[describe(m) for m in cluster.members()])
                elif cmd["cmd"] == "update":
                    cluster.update_metadata(**cmd["changes"])
                    emit("updated")
                elif cmd["cmd"] == "add_peer":
                    await cluster.add_peer(cmd["address"])
                    emit("added")
                elif cmd["cmd"] == "leave":
                    emit("leaving")
                    await cluster.leave()
                    emit("left")
                    break
                elif cmd["cmd"] == "exit":
                    break
        finally:
            reporter.cancel()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--secret-file", required=True)
    parser.add_argument("--seed", action="append", default=[])
    parser.add_argument("--label", action="append", default=[])
    parser.add_argument("--fast", action="store_true", help="the test timing (ClusterSettings.fast)")
    parser.add_argument("--settings", help="JSON object of ClusterSettings fields")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s {args.name} %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(run(args))
    except KhutulunError as e:
        emit("error", type=type(e).__name__, message=e.message)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
