"""Exclusive and shared locks on lock files in the shared state directory.

Writers take an exclusive lock through :class:`filelock.FileLock` (``flock(LOCK_EX)`` on Unix). Readers take a
shared lock with ``fcntl.flock(fd, LOCK_SH)`` on the *same* lock file. filelock has no shared mode of flock:
its ``ReadWriteLock`` keeps its state in SQLite, and SQLite documents its own locking as unreliable on NFS,
which is where this directory lives in production. flock's LOCK_SH and LOCK_EX on one inode interoperate with
filelock's LOCK_EX as any two flock callers do: any number of shared holders, or one exclusive holder. On NFS
the Linux client carries flock to the server as a whole-file byte-range lock (LOCK_SH as a read lock, LOCK_EX
as a write lock), so the locks hold across hosts. That needs the share mounted without ``local_lock=flock``
(or ``all``), which would keep flock locks local to each host.

flock locks belong to an open file description, and every acquisition here opens its own descriptor, so two
acquisitions in one process (two threads, two tasks) exclude each other as two processes do (the Linux NFS
client, too, makes the open file the owner of an emulated flock lock). The locks are
therefore not reentrant: taking a lock that the same flow already holds waits until the timeout. Descriptors are
opened non-inheritable (Python's default), so a workload that an agent starts while holding a lock does not
keep the lock alive after the agent releases it. A holder killed with ``kill -9`` loses its locks with its
descriptors; nothing is left to clean up.

Lock files are never deleted, and live in their own ``locks/`` tree so that removing a service's directory does
not remove its lock: deleting a lock file while someone waits on it would let the waiter lock the old inode and
a newcomer lock a new file at the same path, two holders at once.

A lock that cannot be had within its timeout raises :class:`~khutulun.errors.BusyError`: someone else is using
what the lock guards, and trying again later is the remedy (exit code 8, HTTP 409). Any other failure (the lock
file cannot be created, the filesystem has no flock) is a :class:`~khutulun.errors.StateError`.

Waiters poll (non-blocking attempts, with pauses) rather than block in the kernel, so that the timeout holds: a
blocking flock on a hung NFS server would not return. Polling alone is not fair: a writer that re-locks as soon
as it unlocks (a deploy writing one record after another) starves readers that poll, and overlapping readers
starve a writer. So every waiting lock passes a *gate* first, a second lock file beside it (``<name>.gate``):
a waiter holds the gate (shared for a reader, exclusive for a writer) while it waits for the lock itself, and
lets go of it once it has the lock. A writer waiting at the lock keeps new readers out at the gate, and a reader
waiting at the lock keeps the next writer out, so each side gets its turn. The gate is always taken before the
lock and never held inside a critical section, so it adds no way to deadlock.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import filelock

from khutulun.errors import BusyError
from khutulun.state.atomic import ensure_dir, os_error

__all__ = [
    "FIRST_POLL",
    "LAST_POLL",
    "exclusive_lock",
    "gate_file",
    "holds_exclusive",
    "shared_lock",
    "try_exclusive_lock",
]

FIRST_POLL = 0.002
LAST_POLL = 0.05
"""Seconds between two attempts at a contended lock: the first pause, and the longest."""

_LONGEST_WAIT = 1e9  # a finite stand-in for "forever"; see _timeout

_CONTENDED = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES})

# Exclusive locks that this process holds, by lock file: lets a writer check that its caller took the lock (a
# bug catcher; it cannot tell which of this process's flows holds it).
_held: dict[str, int] = {}
_held_guard = threading.Lock()


def _key(path: Path) -> str:
    return str(path.absolute())


def holds_exclusive(path: Path) -> bool:
    """True when some flow of this process holds the exclusive lock on ``path``."""
    with _held_guard:
        return _held.get(_key(path), 0) > 0


def _note_held(path: Path, delta: int) -> None:
    key = _key(path)
    with _held_guard:
        count = _held.get(key, 0) + delta
        if count > 0:
            _held[key] = count
        else:
            _held.pop(key, None)


def _timeout(seconds: float) -> float:
    # A negative or NaN timeout means one attempt; an infinite one, a wait longer than anything will run.
    if math.isnan(seconds) or seconds < 0:
        return 0.0
    return min(seconds, _LONGEST_WAIT)


def _file_lock(path: Path) -> filelock.FileLock:
    ensure_dir(path.parent)
    return filelock.FileLock(
        path,
        # The agent enters a lock in one worker thread (asyncio.to_thread) and may leave it in another.
        thread_local=False,
        # One instance per acquisition: a singleton would make a second, independent acquisition in this process
        # succeed as a reentrant one instead of waiting for the first to end.
        is_singleton=False,
        # A soft lock (a marker file) would not exclude the flock(LOCK_SH) readers; better to fail.
        fallback_to_soft=False,
        preserve_lock_file=True,
    )


class _Backoff:
    """The pauses between attempts at a contended lock, until a deadline.

    Short at first, since critical sections last milliseconds; longer as the wait goes on, since every attempt
    is a round trip to the server on NFS. The jitter keeps waiters from polling in step.
    """

    def __init__(self, what: str, path: Path, timeout: float) -> None:
        self.what = what
        self.path = path
        self.started = time.monotonic()
        self.deadline = self.started + _timeout(timeout)
        self.delay = FIRST_POLL

    def wait(self) -> None:
        """Sleep before the next attempt, or raise BusyError when the time is up."""
        now = time.monotonic()
        if now >= self.deadline:
            waited = now - self.started
            raise BusyError(f"gave up after waiting {waited:.1f} s for {self.what}: another agent or command holds "
                            f"it (lock file {str(self.path)!r})")
        time.sleep(min(self.delay * random.uniform(0.5, 1.5), self.deadline - now))
        self.delay = min(self.delay * 1.5, LAST_POLL)


def _try_file_lock(lock: filelock.FileLock, what: str, path: Path) -> bool:
    try:
        lock.acquire(blocking=False)
    except filelock.Timeout:
        return False
    except OSError as e:
        raise os_error(e, f"lock {what} with", path) from e
    return True


def _try_flock_shared(fd: int, what: str, path: Path) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in _CONTENDED:
            return False
        raise os_error(e, f"lock {what} with", path) from e
    return True


def gate_file(path: Path) -> Path:
    """The gate of the lock file ``path`` (see the module's documentation)."""
    return path.with_name(path.name + ".gate")


@contextmanager
def _gate(path: Path, what: str, backoff: _Backoff, *, shared: bool) -> Iterator[None]:
    gate = gate_file(path)
    if shared:
        fd = _open_lock_file(gate)
        try:
            while not _try_flock_shared(fd, what, gate):
                backoff.wait()
            yield
        finally:
            os.close(fd)
    else:
        lock = _file_lock(gate)
        while not _try_file_lock(lock, what, gate):
            backoff.wait()
        try:
            yield
        finally:
            _release(lock, what, gate)


@contextmanager
def exclusive_lock(path: Path, what: str, timeout: float) -> Iterator[None]:
    """Hold the exclusive lock on ``path``; ``what`` names what it guards, for the message of a timeout."""
    lock = _file_lock(path)
    backoff = _Backoff(what, path, timeout)
    try:
        with _gate(path, what, backoff, shared=False):
            while not _try_file_lock(lock, what, path):
                backoff.wait()
    except BaseException:
        if lock.is_locked:
            _release(lock, what, path)
        raise
    _note_held(path, 1)
    try:
        yield
    finally:
        _note_held(path, -1)
        _release(lock, what, path)


@contextmanager
def try_exclusive_lock(path: Path, what: str) -> Iterator[bool]:
    """Take the exclusive lock on ``path`` if nobody holds it; yield whether this caller got it.

    It skips the gate: a caller that does not wait needs no turn, and a reader passing the gate at that moment
    must not make it look taken.
    """
    lock = _file_lock(path)
    if not _try_file_lock(lock, what, path):
        yield False
        return
    _note_held(path, 1)
    try:
        yield True
    finally:
        _note_held(path, -1)
        _release(lock, what, path)


def _release(lock: filelock.FileLock, what: str, path: Path) -> None:
    try:
        lock.release()
    except OSError as e:
        raise os_error(e, f"unlock {what} with", path) from e


def _open_lock_file(path: Path) -> int:
    ensure_dir(path.parent)
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except PermissionError:
        pass  # a reader that may not write the lock file can still read-lock it
    except OSError as e:
        raise os_error(e, "open the lock file", path) from e
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise os_error(e, "open the lock file", path) from e


@contextmanager
def shared_lock(path: Path, what: str, timeout: float) -> Iterator[None]:
    """Hold a shared lock on ``path``: together with other readers, never with the writer."""
    fd = _open_lock_file(path)
    try:
        backoff = _Backoff(what, path, timeout)
        with _gate(path, what, backoff, shared=True):
            while not _try_flock_shared(fd, what, path):
                backoff.wait()
        yield
    finally:
        os.close(fd)  # the descriptor is the only one on its open file description: closing it drops the lock
