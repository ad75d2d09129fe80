"""The /proc parsers on crafted input (the awkward cases), and the readers on this very process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from khutulun.delegates import procfs

# A real line (from a `sleep`), fields 3 to 52.
_REST = ("S 1 4242 4242 0 -1 4194560 101 0 0 0 0 0 0 0 20 0 1 0 107526 2289664 128 18446744073709551615 1 1 0 0 "
         "0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0")


def test_parse_stat_reads_the_fields_it_names() -> None:
    stat = procfs.parse_stat(f"4242 (sleep) {_REST}\n")
    assert stat == procfs.ProcStat(pid=4242, comm="sleep", state="S", ppid=1, pgrp=4242, session=4242,
                                   start_time=107526)
    assert stat.alive
    assert stat.session_leader


@pytest.mark.parametrize("comm", ["a b", "(sd-pam)", "x) S 1 2 3 (y", ")", "((", "", "tab\there", "new\nline"])
def test_parse_stat_takes_the_command_name_up_to_the_last_parenthesis(comm: str) -> None:
    stat = procfs.parse_stat(f"17 ({comm}) {_REST.replace('4242', '17')}")
    assert (stat.pid, stat.comm, stat.state, stat.session, stat.start_time) == (17, comm, "S", 17, 107526)


@given(comm=st.text(alphabet=st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]), max_size=64),
       pid=st.integers(1, 2**22), start=st.integers(0, 2**63))
def test_parse_stat_round_trips_any_command_name(comm: str, pid: int, start: int) -> None:
    fields = _REST.split()
    fields[19] = str(start)
    stat = procfs.parse_stat(f"{pid} ({comm}) {' '.join(fields)}\n")
    assert (stat.pid, stat.comm, stat.start_time) == (pid, comm, start)


@pytest.mark.parametrize("state", ["Z", "X", "x"])
def test_a_zombie_or_dead_process_is_not_alive(state: str) -> None:
    assert not procfs.parse_stat(f"5 (z) {state} {_REST[2:]}").alive


@pytest.mark.parametrize("text", ["", "garbage", "12 (x", "12 (x) S 1 2", f"x (y) {_REST}"])
def test_parse_stat_rejects_what_is_not_a_stat_line(text: str) -> None:
    with pytest.raises(ValueError, match=r"stat line|invalid literal"):
        procfs.parse_stat(text)


def test_parse_environ() -> None:
    data = b"A=1\0B=x=y\0NOEQUALS\0=novalue\0A=2\0EMPTY=\0\0"
    assert procfs.parse_environ(data) == {"A": "1", "B": "x=y", "EMPTY": ""}  # the first A wins, as getenv finds
    assert procfs.parse_environ(b"") == {}


def test_parse_environ_keeps_bytes_that_are_not_utf8() -> None:
    env = procfs.parse_environ(b"NAME=caf\xe9\0")
    assert os.fsencode(env["NAME"]) == b"caf\xe9"


def test_parse_boot_time() -> None:
    assert procfs.parse_boot_time("cpu  1 2 3\nintr 5\nbtime 1700000000\nprocesses 9\n") == 1700000000.0
    with pytest.raises(ValueError, match="btime"):
        procfs.parse_boot_time("cpu  1 2 3\n")


def test_readers_on_this_process() -> None:
    stat = procfs.read_stat(os.getpid())
    assert stat is not None
    assert (stat.pid, stat.ppid, stat.pgrp, stat.session) == (os.getpid(), os.getppid(), os.getpgrp(), os.getsid(0))
    assert stat.alive
    assert any(s.pid == os.getpid() for s in procfs.iter_stats())
    # Started before now, and after boot.
    assert procfs.boot_time() < procfs.start_time_to_epoch(stat.start_time) <= time.time() + 1


def test_readers_on_a_child(tmp_path: Path) -> None:
    with subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                          env={"ONE": "1", "TWO": "two words"}, start_new_session=True) as child:
        try:
            # Popen returns once exec has closed its error pipe, which the kernel does before the new program's
            # environment is in place: for a moment the environment reads as empty.
            deadline = time.monotonic() + 5
            while (environment := procfs.read_environ(child.pid)) is None and time.monotonic() < deadline:
                time.sleep(0.001)
            stat = procfs.read_stat(child.pid)
            assert environment is not None
            assert environment["ONE"] == "1"
            assert environment["TWO"] == "two words"
            assert stat is not None
            assert stat.session_leader
            assert stat.ppid == os.getpid()
            assert abs(procfs.start_time_to_epoch(stat.start_time) - time.time()) < 5
        finally:
            assert child.stdin is not None
            child.stdin.close()
    # Reaped: the entry is gone.
    assert procfs.read_stat(child.pid) is None
    assert procfs.read_environ(child.pid) is None


def test_readers_on_a_proc_tree_that_is_not_there(tmp_path: Path) -> None:
    assert procfs.read_stat(1, proc=tmp_path) is None
    assert procfs.read_environ(1, proc=tmp_path) is None
    assert list(procfs.iter_stats(proc=tmp_path / "missing")) == []
