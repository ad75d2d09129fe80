"""The store used by several processes at once, as agents on several hosts use the shared directory."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from khutulun.state import HostRecord, StateStore

CHILD = Path(__file__).with_name("state_child.py")


def test_concurrent_port_reservations_never_collide(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    store.initialize()
    go = tmp_path / "go"
    counts = {"alpha": 67, "beta": 67, "gamma": 66}
    children = [
        subprocess.Popen([sys.executable, str(CHILD), "ports", str(store.root), "host-a", prefix, str(count), str(go)],
                         stdout=subprocess.PIPE)
        for prefix, count in counts.items()
    ]
    try:
        time.sleep(0.3)  # let them import, so that they start together
        go.touch()
        results = []
        for child in children:
            out, _ = child.communicate(timeout=60)
            assert child.returncode == 0
            results.append(json.loads(out))
    finally:
        for child in children:
            if child.poll() is None:
                os.kill(child.pid, signal.SIGKILL)
                child.wait()
    ports = [port for result in results for port in result["ports"].values()]
    assert len(ports) == 200
    assert len(set(ports)) == 200, "two owners got the same port"
    assert sum(result["fixed"] for result in results) == 1, "port 30000 went to exactly one owner"
    book = store.port_reservations("host-a")
    assert len(book) == 201
    assert {(owner, r.port) for (owner, _), r in book.items() if r.capability == "http"} == {
        (owner, port) for result in results for owner, port in result["ports"].items()}


def test_concurrent_changes_of_a_host_record_each_hold(tmp_path: Path) -> None:
    # As an agent that starts and another that drains its host both change the one record.
    store = StateStore(tmp_path / "state")
    store.initialize()
    store.write_host(HostRecord(name="host-a", address="10.0.0.1", api="http://10.0.0.1:7070", labels={"n": "0"}))
    go = tmp_path / "go"
    children = [subprocess.Popen([sys.executable, str(CHILD), "count-on-host", str(store.root), "host-a", "100",
                                  str(go)], stdout=subprocess.PIPE) for _ in range(3)]
    try:
        time.sleep(0.3)  # let them import, so that they start together
        go.touch()
        for child in children:
            out, _ = child.communicate(timeout=60)
            assert child.returncode == 0 and out == b"done\n"
    finally:
        for child in children:
            if child.poll() is None:
                os.kill(child.pid, signal.SIGKILL)
                child.wait()
    record = store.host("host-a")
    assert record is not None and record.labels["n"] == "300" and record.address == "10.0.0.1"


def _check_one_version(files: dict[str, str]) -> str:
    """Every file of a version carries the same tag line; answer it."""
    tags = {text.splitlines()[0] for text in files.values()}
    assert len(tags) == 1, f"a mix of versions: {sorted(tags)}"
    tag = tags.pop()
    assert ("only-in-a.yaml" in files) == tag.startswith("# A "), f"{tag} with files {sorted(files)}"
    return tag


def test_a_template_replaced_in_a_loop_is_always_one_whole_version(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    store.initialize()
    seen: set[str] = set()
    rng = random.Random()
    for _ in range(4):
        child = subprocess.Popen([sys.executable, str(CHILD), "templates", str(store.root)], stdout=subprocess.PIPE)
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == b"ready\n"
            deadline = time.monotonic() + rng.uniform(0.2, 0.5)
            while time.monotonic() < deadline:
                # Through the store, under the shared lock (template() also checks the digest)...
                record, bundle = store.template("default", "app")
                assert record.files == tuple(sorted(bundle.files))
                seen.add(_check_one_version(dict(bundle.files)))
                # ...and straight from the files directory, without a lock, as a loader would.
                directory = store.template_files_dir("default", "app")
                files = {str(p.relative_to(directory)): p.read_text()
                         for p in directory.rglob("*") if p.is_file()}
                _check_one_version(files)
        finally:
            os.kill(child.pid, signal.SIGKILL)  # at some moment of a registration
            child.wait()
            if child.stdout is not None:
                child.stdout.close()
        record, bundle = store.template("default", "app")  # a killed writer leaves a whole version
        _check_one_version(dict(bundle.files))
    assert len(seen) > 4, "the writer hardly wrote: the test proved little"
    assert any(tag.startswith("# A ") for tag in seen)
    assert any(tag.startswith("# B ") for tag in seen)


def test_200_ports_from_3_processes_are_distinct_and_each_could_be_bound(tmp_path: Path) -> None:
    """As three agents sharing the state directory would reserve them: no duplicate, none that another program
    already listens on, and every one bindable when handed out (each process binds its own and keeps them)."""
    import socket

    store = StateStore(tmp_path / "state")
    store.initialize()
    low, high = 21000, 21249  # below the ephemeral range, so no outgoing connection takes one meanwhile
    others = []
    for port in range(low, high + 1, 12):  # 21 ports some other program listens on
        taken = socket.socket()
        taken.bind(("0.0.0.0", port))
        taken.listen()
        others.append(taken)
    go = tmp_path / "go"
    children = [subprocess.Popen([sys.executable, str(CHILD), "bound-ports", str(store.root), "host-a", prefix,
                                  str(count), str(go), str(low), str(high)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                for prefix, count in {"alpha": 67, "beta": 67, "gamma": 66}.items()]
    try:
        time.sleep(0.3)
        go.touch()
        results = []
        for child in children:
            assert child.stdout is not None
            results.append(json.loads(child.stdout.readline()))
        ports = [port for result in results for port in result["ports"].values()]
        assert len(ports) == 200 and len(set(ports)) == 200, "two owners got the same port"
        assert [p for result in results for p in result["unbindable"]] == []
        assert not set(ports) & {s.getsockname()[1] for s in others}
    finally:
        for taken in others:
            taken.close()
        for child in children:
            for stream in (child.stdin, child.stdout):
                if stream is not None:
                    stream.close()
            child.wait(30)
