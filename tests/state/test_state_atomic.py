from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from khutulun.errors import InternalError, StateError
from khutulun.state.atomic import ensure_dir, is_tmp_name, read_json, sweep_tmp, write_atomic, write_json_atomic

CHILD = Path(__file__).with_name("state_child.py")


def test_write_and_read_json(tmp_path: Path) -> None:
    path = tmp_path / "record.json"
    write_json_atomic(path, {"name": "web", "ünïcode": "✓", "list": [1, 2]})
    text = path.read_text()
    assert text.endswith("}\n")
    assert "✓" in text  # ensure_ascii=False
    assert read_json(path) == {"name": "web", "ünïcode": "✓", "list": [1, 2]}
    write_json_atomic(path, [3])
    assert read_json(path) == [3]
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]  # no temporary file stays


def test_missing_record_reads_as_none(tmp_path: Path) -> None:
    assert read_json(tmp_path / "nothing.json") is None


def test_invalid_record_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"name": "we')
    with pytest.raises(StateError, match=r"broken\.json") as info:
        read_json(path)
    assert "not valid JSON" in str(info.value)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(StateError, match=r"broken\.json"):
        read_json(path)


def test_os_errors_become_state_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StateError, match="cannot write") as info:
        write_atomic(blocker / "record.json", b"{}")
    assert str(blocker) in str(info.value)
    with pytest.raises(StateError, match="cannot read"):
        read_json(tmp_path)  # a directory
    with pytest.raises(StateError, match="a file of that name is in the way"):
        ensure_dir(blocker)


def test_a_record_that_is_not_json_data_is_a_bug(tmp_path: Path) -> None:
    with pytest.raises(InternalError, match=r"record\.json"):
        write_json_atomic(tmp_path / "record.json", {"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_ensure_dir_creates_parents(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c"
    ensure_dir(target)
    ensure_dir(target)
    assert target.is_dir()


def test_sweep_removes_only_old_temporary_files(tmp_path: Path) -> None:
    old = tmp_path / ".record.json.123.abc.tmp"
    new = tmp_path / ".record.json.456.def.tmp"
    keep = [tmp_path / "record.json", tmp_path / "notes.tmp", tmp_path / ".hidden"]
    for path in [old, new, *keep]:
        path.write_text("x")
    (tmp_path / ".dir.tmp").mkdir()  # never a writer's file: left alone
    past = time.time() - 3600
    os.utime(old, (past, past))
    assert sweep_tmp(tmp_path, older_than=600) == 1
    assert not old.exists()
    assert new.exists()
    assert all(p.exists() for p in keep)
    assert sweep_tmp(tmp_path, older_than=0, now=time.time() + 1) == 1
    assert not new.exists()
    assert sweep_tmp(tmp_path / "missing", older_than=0) == 0


def _expected_blob(i: int) -> str:
    # What state_child.payload(i) writes.
    return hashlib.sha256(str(i).encode()).hexdigest() * (1 + i % 300)


def test_kill_9_never_leaves_a_torn_record(tmp_path: Path) -> None:
    """A writer killed at random moments leaves one of the versions it wrote, whole, and nothing but temp files."""
    path = tmp_path / "record.json"
    write_json_atomic(path, {"i": -1, "blob": ""})
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    seen: set[int] = set()
    for attempt in range(30):
        first = attempt * 1_000_000
        child = subprocess.Popen([sys.executable, str(CHILD), "rewrite", str(path), str(first)],
                                 stdout=subprocess.PIPE)
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == b"ready\n"
            time.sleep(rng.uniform(0.0, 0.03))
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
            if child.stdout is not None:
                child.stdout.close()
        data = json.loads(path.read_bytes())  # never raises: the record is whole
        assert isinstance(data, dict), f"seed {seed}"
        i = data["i"]
        assert data["blob"] == ("" if i == -1 else _expected_blob(i)), f"seed {seed}: torn record at attempt {attempt}"
        seen.add(i)
    assert len(seen) > 1, "the writer never got to write: the test proved nothing"
    leftovers = [p for p in tmp_path.iterdir() if p.name != "record.json"]
    assert all(is_tmp_name(p.name) for p in leftovers)
    assert sweep_tmp(tmp_path, older_than=0, now=time.time() + 1) == len(leftovers)
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]
