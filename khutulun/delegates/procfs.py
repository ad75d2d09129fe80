"""Reading ``/proc``: pure parsers for its formats, and thin readers that call them.

The parsers take the text or bytes of one file and never touch the file system, so they are tested on their
own (including the awkward cases: a command name with spaces and parentheses, an environment with entries
that are not ``KEY=value``). The readers return None for a process that is gone or that cannot be read,
since a process can end between any two reads and callers treat "gone" and "unreadable" alike.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "PROC",
    "ProcStat",
    "boot_time",
    "iter_stats",
    "parse_boot_time",
    "parse_environ",
    "parse_stat",
    "read_environ",
    "read_stat",
    "signal_exactly",
    "start_time_to_epoch",
]

PROC = Path("/proc")

_GONE = frozenset("ZXx")  # zombie, dead: the process has ended even though its entry is still there


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` that Khutulun uses (``proc(5)`` numbers them from 1)."""

    pid: int  # 1
    comm: str  # 2, without its parentheses
    state: str  # 3: R, S, D, Z, T, ...
    ppid: int  # 4
    pgrp: int  # 5
    session: int  # 6
    start_time: int  # 22: clock ticks after boot; with the pid, it names one process for good

    @property
    def alive(self) -> bool:
        return self.state not in _GONE

    @property
    def session_leader(self) -> bool:
        return self.pid == self.session


def parse_stat(text: str) -> ProcStat:
    """Parse ``/proc/<pid>/stat``. Raises ValueError when it is not in that format.

    The command name (field 2) is in parentheses and may itself hold spaces and parentheses, so it runs from
    the first ``(`` to the *last* ``)``; every field after it is a number or a one-letter state.
    """
    open_paren = text.find("(")
    close_paren = text.rfind(")")
    if open_paren < 0 or close_paren < open_paren:
        raise ValueError(f"not a /proc stat line: {text[:80]!r}")
    rest = text[close_paren + 1 :].split()
    if len(rest) < 20:  # fields 3 to 22 at least
        raise ValueError(f"a /proc stat line with too few fields: {text[:80]!r}")
    return ProcStat(
        pid=int(text[:open_paren]),
        comm=text[open_paren + 1 : close_paren],
        state=rest[0],
        ppid=int(rest[1]),
        pgrp=int(rest[2]),
        session=int(rest[3]),
        start_time=int(rest[19]),
    )


def parse_environ(data: bytes) -> dict[str, str]:
    """Parse ``/proc/<pid>/environ``: ``KEY=value`` entries, each ended by a NUL byte.

    Entries without ``=`` are skipped. A repeated key keeps its first value, as ``getenv(3)`` would find.
    Bytes that are not UTF-8 are kept as surrogate escapes (``os.fsdecode``), as ``os.environ`` keeps them.
    """
    env: dict[str, str] = {}
    for entry in data.split(b"\0"):
        key, sep, value = entry.partition(b"=")
        if sep and key:
            env.setdefault(os.fsdecode(key), os.fsdecode(value))
    return env


def parse_boot_time(text: str) -> float:
    """The ``btime`` line of ``/proc/stat``: when the system booted, in seconds since the epoch."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == "btime":
            return float(value.strip())
    raise ValueError("/proc/stat has no btime line")


def _read(path: str, limit: int) -> bytes:
    # os.open and one os.read: a scan reads this for every process there is, and pathlib's file objects cost
    # several times as much as the read itself.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def read_stat(pid: int, proc: Path = PROC) -> ProcStat | None:
    try:
        return parse_stat(_read(f"{proc}/{pid}/stat", 4096).decode(errors="surrogateescape"))
    except (OSError, ValueError):
        return None


def read_environ(pid: int, proc: Path = PROC) -> dict[str, str] | None:
    """The environment a process was started with (what it passed to exec), or None if it cannot be read.

    A zombie's environment reads as empty, which is the same as unreadable here.
    """
    try:
        data = (proc / str(pid) / "environ").read_bytes()
    except OSError:
        return None
    return parse_environ(data) if data else None


def iter_stats(proc: Path = PROC) -> Iterator[ProcStat]:
    """Every process there is (threads are not listed in ``/proc`` itself), skipping those that end meanwhile."""
    try:
        entries = os.listdir(proc)  # noqa: PTH208 (plain names: a scan runs often, see _read)
    except OSError:
        return
    for name in entries:
        if name.isdigit():
            stat = read_stat(int(name), proc)
            if stat is not None:
                yield stat


@functools.cache
def boot_time(proc: Path = PROC) -> float:
    return parse_boot_time((proc / "stat").read_text())


def start_time_to_epoch(start_time: int, proc: Path = PROC) -> float:
    """A stat ``start_time`` (clock ticks after boot) as seconds since the epoch."""
    return boot_time(proc) + start_time / os.sysconf("SC_CLK_TCK")


def signal_exactly(stat: ProcStat, sig: int, *, same_session: bool = False) -> None:
    """Send ``sig`` to the process ``stat`` describes and to no other that has taken its pid since: the pidfd
    pins the process while its start time (and, with ``same_session``, its session) is checked again."""
    try:
        pidfd = os.pidfd_open(stat.pid)
    except ProcessLookupError:
        return
    try:
        now = read_stat(stat.pid)
        if now is not None and now.start_time == stat.start_time and (not same_session
                                                                     or now.session == stat.session):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, sig)
    finally:
        os.close(pidfd)

