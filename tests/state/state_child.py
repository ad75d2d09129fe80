"""A child process for the state tests: each command exercises the store from a process of its own.

Run as ``python state_child.py <command> <args...>``; the tests start it with subprocess and end it by its pid.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from khutulun.bundle import Bundle
from khutulun.errors import BusyError, PlacementError
from khutulun.scheduler import PortRequest
from khutulun.state import HostRecord, StateStore, write_json_atomic
from khutulun.state.locks import exclusive_lock, shared_lock, try_exclusive_lock


def payload(i: int) -> dict[str, object]:
    """Version ``i`` of the record that ``rewrite`` writes: its size varies, and its content proves its version."""
    digest = hashlib.sha256(str(i).encode()).hexdigest()
    return {"i": i, "blob": digest * (1 + i % 300)}


def bundle(tag: str, i: int) -> Bundle:
    """A template whose every file carries ``tag``, so that a mix of two versions shows."""
    files = {
        "main.yaml": f"# {tag} {i}\nimports: [lib/a.yaml, lib/b.yaml]\n",
        "lib/a.yaml": f"# {tag} {i}\n" + "a" * (i % 2000),
        "lib/b.yaml": f"# {tag} {i}\n" + "b" * (i % 700),
    }
    if tag == "A":
        files["only-in-a.yaml"] = f"# {tag} {i}\n"
    return Bundle(main="main.yaml", files=files)


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def rewrite(path: str, first: str) -> None:
    target = Path(path)
    i = int(first)
    say("ready")
    while True:
        write_json_atomic(target, payload(i))
        i += 1


def lock(mode: str, path: str, timeout: str) -> int:
    target = Path(path)
    try:
        if mode == "try":
            with try_exclusive_lock(target, "the test lock") as held:
                say("locked" if held else "busy")
                sys.stdin.readline()
                return 0
        manager = shared_lock if mode == "shared" else exclusive_lock
        with manager(target, "the test lock", float(timeout)):
            say("locked")
            sys.stdin.readline()
    except BusyError:
        say("busy")
        return 3
    return 0


def loop(mode: str, path: str) -> None:
    """Take the lock, hold it a moment, let go, and again, as fast as it goes."""
    target = Path(path)
    manager = shared_lock if mode == "shared" else exclusive_lock
    say("ready")
    while True:
        with manager(target, "the test lock", 60):
            time.sleep(0.002)


def ports(root: str, host: str, prefix: str, count: str, go: str) -> None:
    store = StateStore(root, lock_timeout=30)
    while not Path(go).exists():
        time.sleep(0.001)
    got: dict[str, int] = {}
    for i in range(int(count)):
        owner = f"default/{prefix}/web/{i}"
        got[owner] = store.reserve_ports(host, (20000, 20299), [PortRequest(owner, "http", 0, "tcp")])["http"]
    try:
        store.reserve_ports(host, (20000, 20299), [PortRequest(f"default/{prefix}/fixed/0", "admin", 30000, "tcp")])
        fixed = True
    except PlacementError:
        fixed = False
    say(json.dumps({"ports": got, "fixed": fixed}))


def bound_ports(root: str, host: str, prefix: str, count: str, go: str, low: str, high: str) -> None:
    """Reserve ports one at a time as an agent does (asking the host whether each is free), and bind each at
    once, keeping it bound as its workload would: a port handed out that cannot be bound is a failure."""
    import socket

    from khutulun.agent.operations import port_is_free

    store = StateStore(root, lock_timeout=30)
    held: list[socket.socket] = []
    while not Path(go).exists():
        time.sleep(0.001)
    got: dict[str, int] = {}
    unbindable: list[int] = []
    for i in range(int(count)):
        owner = f"default/{prefix}/web/{i}"
        port = store.reserve_ports(host, (int(low), int(high)), [PortRequest(owner, "http", 0, "tcp")],
                                   port_is_free)["http"]
        got[owner] = port
        listener = socket.socket()
        try:
            listener.bind(("0.0.0.0", port))
            listener.listen()
            held.append(listener)
        except OSError:
            unbindable.append(port)
            listener.close()
    say(json.dumps({"ports": got, "unbindable": unbindable}))
    sys.stdin.read()  # keep the ports bound until the test has looked
    for listener in held:
        listener.close()


def count_on_host(root: str, host: str, count: str, go: str) -> None:
    """Add one to the host record's ``n`` label ``count`` times, each a read-modify-write of the record."""
    store = StateStore(root, lock_timeout=30)
    while not Path(go).exists():
        time.sleep(0.001)

    def add_one(record: HostRecord | None) -> HostRecord:
        assert record is not None
        return replace(record, labels={**record.labels, "n": str(int(record.labels["n"]) + 1)})

    for _ in range(int(count)):
        store.update_host(host, add_one)
    say("done")


def templates(root: str) -> None:
    store = StateStore(root, lock_timeout=30)
    i = 0
    while True:
        store.register_template("default", "app", bundle("AB"[i % 2], i))
        if i == 0:
            say("ready")
        i += 1


def main(argv: list[str]) -> int:
    command, *args = argv
    if command == "rewrite":
        rewrite(*args)
    elif command == "lock":
        return lock(*args)
    elif command == "loop":
        loop(*args)
    elif command == "ports":
        ports(*args)
    elif command == "bound-ports":
        bound_ports(*args)
    elif command == "count-on-host":
        count_on_host(*args)
    elif command == "templates":
        templates(*args)
    else:
        raise SystemExit(f"unknown command {command!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
