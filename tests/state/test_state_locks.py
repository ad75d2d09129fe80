from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from khutulun.errors import BusyError
from khutulun.state.locks import exclusive_lock, gate_file, holds_exclusive, shared_lock, try_exclusive_lock

CHILD = Path(__file__).with_name("state_child.py")


class Holder:
    """A child process that takes a lock, says whether it got it, and keeps it until told to let go."""

    def __init__(self, mode: str, path: Path, timeout: float = 0.3) -> None:
        self.process = subprocess.Popen([sys.executable, str(CHILD), "lock", mode, str(path), str(timeout)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.process.stdout is not None
        self.answer = self.process.stdout.readline().decode().strip()

    def release(self) -> int:
        assert self.process.stdin is not None
        if self.process.poll() is None:
            self.process.stdin.write(b"\n")
            self.process.stdin.flush()
        code = self.process.wait(timeout=10)
        self.close()
        return code

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self.close()

    def close(self) -> None:
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


@contextmanager
def holding(mode: str, path: Path) -> Iterator[Holder]:
    holder = Holder(mode, path)
    try:
        yield holder
    finally:
        if holder.process.poll() is None:
            holder.kill()
        holder.close()


def test_readers_share_and_exclude_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "locks" / "service.lock"
    with holding("shared", path) as first, holding("shared", path) as second:
        assert (first.answer, second.answer) == ("locked", "locked")
        with shared_lock(path, "the test lock", timeout=0.5):  # a third reader, in this process
            pass
        with pytest.raises(BusyError) as info, exclusive_lock(path, "the lock of service default/web", timeout=0.2):
            pytest.fail("a writer got in with readers")
        message = str(info.value)
        assert "the lock of service default/web" in message
        assert "waiting 0.2 s" in message
        assert str(path) in message
        with holding("exclusive", path) as writer:  # nor a writer in another process
            assert writer.answer == "busy"
        with holding("try", path) as trier:
            assert trier.answer == "busy"
        assert first.release() == 0
        # One reader left is enough to keep the writer out.
        with pytest.raises(BusyError), exclusive_lock(path, "the test lock", timeout=0.1):
            pass
        assert second.release() == 0
    with exclusive_lock(path, "the test lock", timeout=0.5):
        assert holds_exclusive(path)
    assert not holds_exclusive(path)
    assert path.exists()  # lock files are never removed
    assert gate_file(path).exists()


def test_the_writer_excludes_everyone(tmp_path: Path) -> None:
    path = tmp_path / "service.lock"
    with holding("exclusive", path) as writer:
        assert writer.answer == "locked"
        with pytest.raises(BusyError), shared_lock(path, "the test lock", timeout=0.2):
            pass
        with pytest.raises(BusyError), exclusive_lock(path, "the test lock", timeout=0.2):
            pass
        with try_exclusive_lock(path, "the test lock") as held:
            assert held is False
        with holding("shared", path) as reader:
            assert reader.answer == "busy"
        assert writer.release() == 0
    with shared_lock(path, "the test lock", timeout=0.5):
        pass


def test_a_waiter_gets_the_lock_once_it_is_released(tmp_path: Path) -> None:
    path = tmp_path / "service.lock"
    writer = Holder("exclusive", path)
    assert writer.answer == "locked"
    timer = threading.Timer(0.3, writer.release)
    timer.start()
    started = time.monotonic()
    try:
        with shared_lock(path, "the test lock", timeout=10):
            waited = time.monotonic() - started
    finally:
        timer.join()
    assert 0.25 < waited < 5


def test_a_holder_killed_with_sigkill_leaves_no_lock(tmp_path: Path) -> None:
    path = tmp_path / "service.lock"
    for mode in ("exclusive", "shared"):
        holder = Holder(mode, path)
        assert holder.answer == "locked"
        holder.kill()
        with exclusive_lock(path, "the test lock", timeout=0.5):
            pass


def test_two_acquisitions_in_one_process_exclude_each_other(tmp_path: Path) -> None:
    """Each acquisition has its own descriptor, so threads (and the agent's tasks) exclude each other."""
    path = tmp_path / "service.lock"
    held = threading.Event()
    done = threading.Event()

    def hold() -> None:
        with exclusive_lock(path, "the test lock", timeout=1):
            held.set()
            done.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert held.wait(10)
        with pytest.raises(BusyError), exclusive_lock(path, "the test lock", timeout=0.1):
            pass
        with pytest.raises(BusyError), shared_lock(path, "the test lock", timeout=0.1):
            pass
        with try_exclusive_lock(path, "the test lock") as got:
            assert got is False
    finally:
        done.set()
        thread.join()
    with try_exclusive_lock(path, "the test lock") as got:
        assert got is True
        with try_exclusive_lock(path, "the test lock") as again:
            assert again is False  # not reentrant


def test_a_lock_may_be_released_by_another_thread(tmp_path: Path) -> None:
    """The agent enters a lock in one asyncio.to_thread call and may leave it in another."""
    path = tmp_path / "service.lock"
    manager = exclusive_lock(path, "the test lock", timeout=1)
    entered = threading.Thread(target=manager.__enter__)
    entered.start()
    entered.join()
    assert holds_exclusive(path)
    left = threading.Thread(target=manager.__exit__, args=(None, None, None))
    left.start()
    left.join()
    assert not holds_exclusive(path)
    with try_exclusive_lock(path, "the test lock") as got:
        assert got is True


def test_a_zero_timeout_is_one_attempt(tmp_path: Path) -> None:
    path = tmp_path / "service.lock"
    with exclusive_lock(path, "the test lock", timeout=0):
        started = time.monotonic()
        with pytest.raises(BusyError), shared_lock(path, "the test lock", timeout=0):
            pass
        assert time.monotonic() - started < 0.5


@contextmanager
def looping(mode: str, path: Path, count: int) -> Iterator[None]:
    """``count`` children that take the lock in ``mode`` over and over."""
    children = [subprocess.Popen([sys.executable, str(CHILD), "loop", mode, str(path)], stdout=subprocess.PIPE)
                for _ in range(count)]
    try:
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline() == b"ready\n"
        time.sleep(0.05)
        yield
    finally:
        for child in children:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
            if child.stdout is not None:
                child.stdout.close()


def test_readers_that_keep_reading_do_not_starve_a_writer(tmp_path: Path) -> None:
    """Without the gate, three readers in a loop kept a polling writer out for a whole minute."""
    path = tmp_path / "service.lock"
    with looping("shared", path, 3):
        for _ in range(10):
            with exclusive_lock(path, "the test lock", timeout=5):
                time.sleep(0.002)


def test_a_writer_that_keeps_writing_does_not_starve_readers(tmp_path: Path) -> None:
    path = tmp_path / "service.lock"
    with looping("exclusive", path, 2):
        for _ in range(10):
            with shared_lock(path, "the test lock", timeout=5):
                time.sleep(0.002)
