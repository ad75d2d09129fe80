"""Gossip membership: Khutulun's cluster against bare swim-protocol, same machine, same run.

    .venv/bin/python -m benchmarks.bench_gossip [--sizes 3,10,30] [--rounds 3] [--settle 30] [--idle 10]

For each size N, each side runs N members as separate processes on loopback (distinct ports), all with default
timing: N-1 start (one seed, the others seeded with it) and are left to converge; then each round

* starts an N-th member and times, from its "ready", until every other member sees it with its metadata
  (**join**), then has it leave and times until every other sees it gone (**leave**: Khutulun's ``leave()``;
  swim has no leave, so a clean ``aclose()``, which the others see as a crash);
* starts another, waits until everyone has it (a second join sample), kills it with SIGKILL and times until
  every other sees it dead (**crash**).

Idle CPU, memory and threads are the members' own (``/proc``), over ``--idle`` seconds with N members, once
``--settle`` seconds have passed since the first round's join (swim's gossip rounds still send every change to
every member, one packet each, for about N x 0.5 s after it).
Khutulun's members are ``tests/cluster/node.py``; swim's are this module with ``--swim-node``, which prints
the same kind of lines. Every member prints ``time.time()`` with each change, so times compare across processes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.cluster.rig import Line, Proc, node_argv, spawn_local, write_secret

AIMS = {"join": (2.0, 5.0), "crash": (8.0, 15.0), "leave": (1.0, 1.0)}
TIMEOUT = {"join": 120.0, "crash": 60.0, "leave": 60.0}
HZ = os.sysconf("SC_CLK_TCK")


# -- a bare swim-protocol member -------------------------------------------------------------------------------

def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, "t": time.time(), **fields}) + "\n")
    sys.stdout.flush()


async def swim_node(bind: str, seeds: list[str], secret: str, name: str) -> None:
    """swim-protocol as its README shows it, with metadata of the size Khutulun's takes."""
    from swimprotocol.members import Member, Members
    from swimprotocol.udp import UdpTransport
    from swimprotocol.udp.config import UdpConfig
    from swimprotocol.worker import Worker

    metadata = {"name": name.encode(), "api": f"http://{bind}".encode(), "labels": b'{"zone":"a"}',
                "cpus": b"2", "memory": b"8589934592", "version": b"0.1.0"}
    config = UdpConfig(secret=secret, local_name=bind, peers=seeds, local_metadata=metadata)
    members = Members(config)
    worker = Worker(config, members)

    async def changed(member: Member) -> None:
        if not member.local:
            _emit("swim", address=member.name, status=member.status.name.lower(), meta=bool(member.metadata))

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(UdpTransport(config, worker))
        await stack.enter_async_context(worker)
        await stack.enter_async_context(members.listener.on_notify(changed))
        _emit("ready", address=bind, pid=os.getpid())
        while line := await reader.readline():
            command = json.loads(line)["cmd"]
            if command == "leave":
                _emit("leaving")
                break
            if command == "exit":
                break
    _emit("left")


# -- the two sides ---------------------------------------------------------------------------------------------

@dataclass
class Side:
    name: str
    start: Callable[[str, str, list[str], Path, Path], Proc]
    sees: Callable[[Line, str], bool]
    dead: Callable[[Line, str], bool]
    gone: Callable[[Line, str], bool]


def _start_khutulun(bind: str, name: str, seeds: list[str], secret: Path, log: Path) -> Proc:
    return spawn_local(node_argv(bind=bind, name=name, secret_file=secret, seeds=seeds, fast=False,
                                 labels={"zone": "a"}, log_level="warning"), name=name, log=log)


def _start_swim(bind: str, name: str, seeds: list[str], secret: Path, log: Path) -> Proc:
    argv = [sys.executable, "-m", "benchmarks.bench_gossip", "--swim-node", bind, "--name", name,
            "--secret", secret.read_text().strip()]
    for seed in seeds:
        argv += ["--seed", seed]
    return spawn_local(argv, name=name, log=log)


def _member(line: Line, address: str, *kinds: str) -> bool:
    return line.get("event") == "member" and line["address"] == address and line["kind"] in kinds


def _swim(line: Line, address: str, *statuses: str, meta: bool = False) -> bool:
    return (line.get("event") == "swim" and line["address"] == address and line["status"] in statuses
            and (line["meta"] or not meta))


KHUTULUN = Side("khutulun", _start_khutulun, lambda line, a: _member(line, a, "joined", "alive"),
                lambda line, a: _member(line, a, "dead"), lambda line, a: _member(line, a, "left", "dead"))
SWIM = Side("swim-protocol", _start_swim, lambda line, a: _swim(line, a, "online", "suspect", meta=True),
            lambda line, a: _swim(line, a, "offline"), lambda line, a: _swim(line, a, "offline"))


# -- measuring -------------------------------------------------------------------------------------------------

def free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        if port not in ports:
            ports.append(port)
    return ports


def state_of(proc: Proc, address: str, test: Callable[[Line, str], bool], start: int) -> float | None:
    """When ``proc`` printed a line about ``address`` that passes ``test``, looking from line ``start`` on."""
    for line in proc.lines[start:]:
        if test(line, address):
            return float(line["t"])
    return None


def until_all(observers: Sequence[Proc], address: str, test: Callable[[Line, str], bool], marks: Sequence[int],
              since: float, timeout: float) -> float | None:
    """Seconds from ``since`` until every observer has seen it; None if one has not after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        times = [state_of(p, address, test, m) for p, m in zip(observers, marks, strict=True)]
        if all(t is not None for t in times):
            return max(t for t in times if t is not None) - since
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)


def converged(procs: Sequence[Proc], addresses: Sequence[str], side: Side, timeout: float) -> float | None:
    start = time.monotonic()
    deadline = start + timeout
    while time.monotonic() < deadline:
        if all(state_of(p, a, side.sees, 0) is not None for p, own in zip(procs, addresses, strict=True)
               for a in addresses if a != own):
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1])
    raise LookupError(name)


@dataclass
class Result:
    side: str
    size: int
    samples: dict[str, list[float | None]] = field(default_factory=lambda: {"join": [], "crash": [], "leave": []})
    cpu: float = float("nan")
    rss: float = float("nan")
    threads: float = float("nan")
    startup: float | None = None


def run(side: Side, size: int, rounds: int, settle: float, idle: float, secret: Path, logs: Path) -> Result:
    result = Result(side.name, size)
    ports = free_ports(size - 1 + 2 * rounds)
    addresses = [f"127.0.0.1:{p}" for p in ports]
    seed = addresses[0]
    procs: list[Proc] = []

    def start(address: str) -> Proc:
        proc = side.start(address, f"m{address.rpartition(':')[2]}", [] if address == seed else [seed], secret,
                          logs / f"{side.name}-{size}-{address.rpartition(':')[2]}.log")
        proc.wait_for(lambda line: line["event"] == "ready", 60)
        procs.append(proc)
        return proc

    try:
        base = [start(a) for a in addresses[: size - 1]]
        result.startup = converged(base, addresses[: size - 1], side, TIMEOUT["join"])
        for r in range(rounds):
            joiner_address, victim_address = addresses[size - 1 + 2 * r], addresses[size + 2 * r]
            marks = [p.mark() for p in base]
            joiner = start(joiner_address)
            ready = float(joiner.lines[0]["t"])
            result.samples["join"].append(until_all(base, joiner_address, side.sees, marks, ready, TIMEOUT["join"]))
            if r == 0:
                everyone = [*base, joiner]
                time.sleep(settle)
                before = {p.pid: cpu_ticks(p.pid) for p in everyone}
                time.sleep(idle)
                result.cpu = statistics.mean((cpu_ticks(p.pid) - before[p.pid]) / HZ / idle * 100 for p in everyone)
                result.rss = statistics.mean(status_field(p.pid, "VmRSS") / 1024 for p in everyone)
                result.threads = statistics.mean(status_field(p.pid, "Threads") for p in everyone)
            marks = [p.mark() for p in base]
            joiner.send(cmd="leave")
            leaving = float(joiner.wait_for(lambda line: line["event"] == "leaving", 10)["t"])
            result.samples["leave"].append(until_all(base, joiner_address, side.gone, marks, leaving,
                                                     TIMEOUT["leave"]))
            joiner.wait(10)

            marks = [p.mark() for p in base]
            victim = start(victim_address)
            ready = float(victim.lines[0]["t"])
            result.samples["join"].append(until_all(base, victim_address, side.sees, marks, ready, TIMEOUT["join"]))
            marks = [p.mark() for p in base]
            victim.kill(signal.SIGKILL)
            killed = time.time()
            result.samples["crash"].append(until_all(base, victim_address, side.dead, marks, killed,
                                                     TIMEOUT["crash"]))
            victim.wait(10)
            print(f"  {side.name} N={size} round {r + 1}: " + ", ".join(
                f"{k} {_fmt(v[-1])}" for k, v in result.samples.items()), flush=True)
    finally:
        for proc in procs:
            proc.stop()
    return result


def _fmt(value: float | None) -> str:
    return "timeout" if value is None else f"{value:.2f} s"


def _summary(values: list[float | None]) -> str:
    done = [v for v in values if v is not None]
    missing = len(values) - len(done)
    if not done:
        return "never" if values else "-"
    text = f"{statistics.median(done):.2f} / {max(done):.2f}"
    return text + (f" ({missing} timed out)" if missing else "")


def table(results: list[Result]) -> str:
    rows = ["| N | measure (median / worst, s) | swim-protocol | Khutulun | aim |", "|---|---|---|---|---|"]
    sizes = sorted({r.size for r in results})
    for size in sizes:
        by_side = {r.side: r for r in results if r.size == size}
        swim, ours = by_side.get(SWIM.name), by_side.get(KHUTULUN.name)
        for measure in ("join", "crash", "leave"):
            median, worst = AIMS[measure]
            aim = f"{median:.0f} / {worst:.0f}" if measure != "leave" else "1"
            rows.append(f"| {size} | {measure} | {_summary(swim.samples[measure]) if swim else '-'} | "
                        f"{_summary(ours.samples[measure]) if ours else '-'} | {aim} |")
        rows.append(f"| {size} | first N-1 all see each other (after the last start) | "
                    f"{_fmt(swim.startup) if swim else '-'} | {_fmt(ours.startup) if ours else '-'} | |")
        rows.append(f"| {size} | idle CPU per member (% of a core) | {f'{swim.cpu:.2f}' if swim else '-'} | "
                    f"{f'{ours.cpu:.2f}' if ours else '-'} | |")
        rows.append(f"| {size} | RSS per member (MiB) | {f'{swim.rss:.0f}' if swim else '-'} | "
                    f"{f'{ours.rss:.0f}' if ours else '-'} | |")
        rows.append(f"| {size} | threads per member | {f'{swim.threads:.1f}' if swim else '-'} | "
                    f"{f'{ours.threads:.1f}' if ours else '-'} | |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="3,10,30")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settle", type=float, default=30.0)
    parser.add_argument("--idle", type=float, default=10.0)
    parser.add_argument("--side", choices=["both", "khutulun", "swim"], default="both")
    parser.add_argument("--swim-node", metavar="BIND", help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--seed", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--secret", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.swim_node:
        asyncio.run(swim_node(args.swim_node, args.seed, args.secret, args.name))
        return 0
    sides = {"both": [SWIM, KHUTULUN], "khutulun": [KHUTULUN], "swim": [SWIM]}[args.side]
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-gossip-") as tmp:
        root = Path(tmp)
        secret = write_secret(root / "gossip.key")
        for size in (int(s) for s in args.sizes.split(",")):
            for side in sides:
                print(f"{side.name}, {size} members ...", flush=True)
                results.append(run(side, size, args.rounds, args.settle, args.idle, secret, root))
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
