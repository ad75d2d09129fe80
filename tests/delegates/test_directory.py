"""The directory delegate against real directories."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from khutulun.delegates import Delegate, DelegateContext
from khutulun.delegates.directory import DirectoryDelegate
from khutulun.errors import DelegateError
from khutulun.resources import LiveState, Resource

MakeResource = Callable[..., Resource]
Cleanup = Callable[[Delegate, Resource | None], None]


def directory(path: Path | None = None, *, temporary: bool = False,
              files: dict[str, str] | None = None) -> dict[str, Any]:
    return {"path": str(path) if path else None, "temporary": temporary, "files": files or {}}


@pytest.fixture
def delegate(context: DelegateContext) -> DirectoryDelegate:
    return DirectoryDelegate(context)


@pytest.fixture
def make(make_resource: MakeResource) -> MakeResource:
    def made(spec: dict[str, Any], **kwargs: Any) -> Resource:
        return make_resource(spec, delegate="directory", **kwargs)
    return made


def sidecar(context: DelegateContext, node: str = "web") -> Path:
    return context.data_dir / "markers" / "test" / "svc" / f"{node}.0.json"


def listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


async def test_a_default_directory_is_made_under_the_data_directory(
        delegate: DirectoryDelegate, context: DelegateContext, make: MakeResource) -> None:
    resource = make(directory(files={"conf/app.ini": "[app]\nport = 8080\n"}))
    live = await delegate.apply(resource, None)
    path = context.data_dir / "directories" / "test" / "svc" / "web.0"
    assert (live.state, live.spec_hash, live.attributes, live.healthy) == (LiveState.READY, resource.spec_hash,
                                                                           {"path": str(path),
                                                                            "digest": resource.spec_hash}, True)
    assert (path / "conf" / "app.ini").read_text() == "[app]\nport = 8080\n"
    assert json.loads(sidecar(context).read_text()) == {
        "id": "test/svc/web/0", "path": str(path), "spec_hash": resource.spec_hash, "created": True,
        "host": context.host, "temporary": False, "files": ["conf/app.ini"]}


async def test_a_users_directory_gets_only_the_declared_files(
        delegate: DirectoryDelegate, context: DelegateContext, make: MakeResource, tmp_path: Path) -> None:
    path = tmp_path / "site"
    path.mkdir()
    (path / "index.html").write_text("mine")
    resource = make(directory(path, files={"robots.txt": "User-agent: *\n"}))
    await delegate.apply(resource, None)
    assert listing(path) == ["index.html", "robots.txt"]  # no marker in it: the marker is a sidecar
    assert json.loads(sidecar(context).read_text())["created"] is False
    await delegate.delete(resource, None)
    assert listing(path) == ["index.html", "robots.txt"]  # persistent: kept
    assert not sidecar(context).exists()


async def test_apply_writes_files_only_when_they_differ_and_atomically(
        delegate: DirectoryDelegate, make: MakeResource, tmp_path: Path) -> None:
    path = tmp_path / "d"
    resource = make(directory(path, files={"a.txt": "one", "b.txt": "bee"}))
    live = await delegate.apply(resource, None)
    before = {name: (path / name).stat() for name in ("a.txt", "b.txt")}
    (path / "b.txt").chmod(0o600)

    again = await delegate.apply(resource, live)
    assert again.handle == live.handle
    assert (path / "a.txt").stat().st_mtime_ns == before["a.txt"].st_mtime_ns  # untouched

    changed = make(directory(path, files={"a.txt": "two", "b.txt": "bee", "c/d.txt": "dee"}))
    await delegate.apply(changed, again)
    after = (path / "a.txt").stat()
    assert (path / "a.txt").read_text() == "two"
    assert after.st_ino != before["a.txt"].st_ino  # a new file renamed over the old one, never half written
    assert (path / "b.txt").stat().st_ino == before["b.txt"].st_ino
    assert (path / "b.txt").stat().st_mode & 0o777 == 0o600
    assert listing(path) == ["a.txt", "b.txt", "c", "c/d.txt"]  # and no temporary files left

    dropped = make(directory(path, files={"c/d.txt": "dee"}))
    await delegate.apply(dropped, None)
    assert listing(path) == ["c", "c/d.txt"]  # files the spec no longer declares are removed


async def test_apply_puts_back_a_managed_file_edited_by_hand(
        delegate: DirectoryDelegate, make: MakeResource, tmp_path: Path) -> None:
    resource = make(directory(tmp_path / "d", files={"a.txt": "one"}))
    live = await delegate.apply(resource, None)
    (tmp_path / "d" / "a.txt").write_text("edited")
    await delegate.apply(resource, live)
    assert (tmp_path / "d" / "a.txt").read_text() == "one"


@pytest.mark.parametrize("name", ["../escape.txt", "/etc/escape.txt", "a/../../escape.txt", "", ".", "dir/"])
async def test_files_outside_the_directory_are_refused(
        delegate: DirectoryDelegate, make: MakeResource, tmp_path: Path, name: str) -> None:
    resource = make(directory(tmp_path / "d", files={name: "x"}))
    with pytest.raises(DelegateError, match=f"'files' entry {name!r}"):
        await delegate.apply(resource, None)
    assert not (tmp_path / "escape.txt").exists()
    assert not (tmp_path / "d").exists()  # refused before anything was made


async def test_a_symbolic_link_out_of_the_directory_is_refused(
        delegate: DirectoryDelegate, make: MakeResource, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "d" / "link").symlink_to(tmp_path / "outside")
    resource = make(directory(tmp_path / "d", files={"link/x.txt": "x"}))
    with pytest.raises(DelegateError, match=r"the file 'link/x.txt' of test/svc/web/0 would be written outside"):
        await delegate.apply(resource, None)
    assert listing(tmp_path / "outside") == []


async def test_a_bad_spec_is_refused_with_every_problem_named(delegate: DirectoryDelegate,
                                                              make: MakeResource) -> None:
    resource = make({"path": "relative", "temporary": "yes", "files": {"a": 1}, "mode": 7})
    with pytest.raises(DelegateError) as raised:
        await delegate.apply(resource, None)
    assert raised.value.message == (
        "the directory spec of test/svc/web/0 is not valid: unknown keys ['mode'] (known: ['copies', 'files', "
        "'path', 'temporary']); 'path' must be an absolute path or null, not 'relative'; 'temporary' must be true or "
        "false, not 'yes'; 'files' entry 'a' must be text, not 1")


async def test_a_path_that_is_a_file_is_refused(delegate: DirectoryDelegate, make: MakeResource,
                                                tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(DelegateError, match="exists and is not a directory"):
        await delegate.apply(make(directory(tmp_path / "f")), None)


async def test_inspect(delegate: DirectoryDelegate, context: DelegateContext, make: MakeResource,
                       tmp_path: Path) -> None:
    resource = make(directory(tmp_path / "d"))
    assert await delegate.inspect(resource) is None
    await delegate.apply(resource, None)
    live = await DirectoryDelegate(context).inspect(resource)  # a restarted agent: from the sidecar
    assert live is not None
    assert (live.state, live.spec_hash, live.attributes) == (LiveState.READY, resource.spec_hash,
                                                             {"path": str(tmp_path / "d"),
                                                              "digest": resource.spec_hash})
    (tmp_path / "d").rmdir()
    assert await delegate.inspect(resource) is None


@pytest.mark.parametrize(("temporary", "purge", "removed"), [(False, False, False), (False, True, True),
                                                             (True, False, True), (True, True, True)])
async def test_delete_removes_what_is_temporary_or_purged(
        delegate: DirectoryDelegate, context: DelegateContext, make: MakeResource, tmp_path: Path,
        temporary: bool, purge: bool, removed: bool) -> None:
    resource = make(directory(tmp_path / "d", temporary=temporary, files={"x/y": "z"}))
    live = await delegate.apply(resource, None)
    await delegate.delete(resource, live, purge=purge)
    assert (tmp_path / "d").exists() is not removed
    assert not sidecar(context).exists()
    assert await delegate.inspect(resource) is None
    await delegate.delete(resource, live, purge=purge)  # again: fine


async def test_a_temporary_directory_that_moves_leaves_nothing_behind(
        delegate: DirectoryDelegate, make: MakeResource, tmp_path: Path) -> None:
    live = await delegate.apply(make(directory(tmp_path / "one", temporary=True)), None)
    await delegate.apply(make(directory(tmp_path / "two", temporary=True)), live)
    assert not (tmp_path / "one").exists()
    assert (tmp_path / "two").is_dir()


async def test_delete_never_removes_the_system_the_home_or_its_own_data(
        delegate: DirectoryDelegate, context: DelegateContext, make: MakeResource, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    context.data_dir.mkdir()
    for path in (Path("/"), Path("/usr"), home, context.data_dir.parent, context.data_dir):
        resource = make({"path": str(path), "temporary": True, "files": {}})
        message = f"will not remove the directory of test/svc/web/0, '{path}': "
        with pytest.raises(DelegateError, match=re.escape(message)):
            await delegate.delete(resource, None, purge=True)
        assert path.is_dir()


async def test_delete_removes_a_symbolic_link_not_what_it_points_to(
        delegate: DirectoryDelegate, make: MakeResource, tmp_path: Path) -> None:
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "keep").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    resource = make(directory(tmp_path / "link", temporary=True))
    await delegate.apply(resource, None)
    await delegate.delete(resource, None)
    assert not (tmp_path / "link").exists()
    assert (tmp_path / "target" / "keep").exists()


async def test_list_shows_this_hosts_sidecars(delegate: DirectoryDelegate, context: DelegateContext,
                                              make: MakeResource, tmp_path: Path) -> None:
    one = make(directory(tmp_path / "one"), node="one")
    two = make(directory(tmp_path / "two"), node="two")
    await delegate.apply(one, None)
    await delegate.apply(two, None)
    (tmp_path / "two").rmdir()
    (context.data_dir / "markers" / "test" / "svc" / "stray.json").write_text("{not json")
    other = DirectoryDelegate(replace(context, host="another-host"))
    await other.apply(make(directory(tmp_path / "three"), node="three"), None)  # same data directory, other host

    listed = dict(await delegate.list())
    assert sorted(str(rid) for rid in listed) == ["test/svc/one/0", "test/svc/two/0"]
    assert listed[one.id].state is LiveState.READY
    assert (listed[two.id].state, listed[two.id].healthy) == (LiveState.FAILED, False)
    assert "is missing" in listed[two.id].message
    assert [str(rid) for rid, _ in await other.list()] == ["test/svc/three/0"]


async def test_odd_node_names_make_safe_paths(delegate: DirectoryDelegate, context: DelegateContext,
                                              make: MakeResource) -> None:
    resource = make(directory(), node="../web/a b")
    live = await delegate.apply(resource, None)
    assert live.attributes["path"] == str(context.data_dir / "directories" / "test" / "svc" / "..%2Fweb%2Fa%20b.0")
    assert [rid for rid, _ in await delegate.list()] == [resource.id]



async def test_removing_a_temporary_default_directory_leaves_no_empty_levels(
        delegate: DirectoryDelegate, context: DelegateContext, make: MakeResource) -> None:
    resource = make(directory(temporary=True))
    await delegate.apply(resource, None)
    await delegate.delete(resource, await delegate.inspect(resource))
    assert not (context.data_dir / "directories" / "test").exists()


async def test_copies_are_copied_in_and_change_the_digest(delegate: DirectoryDelegate, make: MakeResource,
                                                         tmp_path: Path) -> None:
    source = tmp_path / "artifact.bin"
    source.write_bytes(b"\x00\x01 seed")
    spec = {**directory(tmp_path / "d", files={"a.conf": "x=1\n"}), "copies": {"data/seed.bin": str(source)}}
    first = await delegate.apply(make(spec), None)
    assert (tmp_path / "d" / "data" / "seed.bin").read_bytes() == b"\x00\x01 seed"
    other = tmp_path / "artifact2.bin"
    other.write_bytes(b"new")
    changed = make({**spec, "copies": {"data/seed.bin": str(other)}})
    second = await delegate.apply(changed, first)
    assert (tmp_path / "d" / "data" / "seed.bin").read_bytes() == b"new"
    assert first.attributes["digest"] != second.attributes["digest"] == changed.spec_hash
    dropped = make(directory(tmp_path / "d", files={"a.conf": "x=1\n"}))
    await delegate.apply(dropped, second)
    assert not (tmp_path / "d" / "data" / "seed.bin").exists()
