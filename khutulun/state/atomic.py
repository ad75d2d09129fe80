"""Atomic, durable writes of whole files, and reads that tell a missing record from a broken one.

A record is replaced by writing a temporary file beside it, fsyncing it, renaming it over the record and
fsyncing the directory. rename(2) within one directory is atomic on local filesystems and on NFS (the server
does it in one operation), so a reader, or a writer killed with ``kill -9`` at any moment, sees the old record
or the new one and never a mix. What a killed writer can leave behind is its temporary file, which
:func:`sweep_tmp` removes once it is old enough not to belong to a writer that is still running.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
import time
from pathlib import Path
from typing import Any

from khutulun.errors import InternalError, StateError

__all__ = [
    "TMP_SUFFIX",
    "dumps",
    "ensure_dir",
    "fsync_dir",
    "is_tmp_name",
    "os_error",
    "read_bytes",
    "read_json",
    "sweep_tmp",
    "tmp_name",
    "write_atomic",
    "write_json_atomic",
]

TMP_SUFFIX = ".tmp"


def os_error(error: OSError, action: str, path: Path | str) -> StateError:
    """A StateError that says what could not be done to which path, and why, in the OS's words."""
    reason = error.strerror or str(error)
    return StateError(f"cannot {action} {str(path)!r}: {reason}")


def is_tmp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def tmp_name(target: str) -> str:
    # The pid and a random token make the name unique per writer, also across hosts that share the directory
    # (two hosts can have the same pid); O_EXCL below turns the remaining chance of a clash into an error.
    return f".{target}.{os.getpid()}.{secrets.token_hex(6)}{TMP_SUFFIX}"


def fsync_dir(directory: Path) -> None:
    """Make the entries of ``directory`` (a rename, a new file) durable."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise os_error(e, "open the directory", directory) from e
    try:
        os.fsync(fd)
    except OSError as e:
        # Some filesystems cannot fsync a directory; their renames are as durable as they get.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise os_error(e, "sync the directory", directory) from e
    finally:
        os.close(fd)


def ensure_dir(directory: Path) -> None:
    """Create ``directory`` and its missing parents, each made durable in its own parent."""
    if directory.is_dir():
        return
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            pass  # another writer made it first
        except OSError as e:
            raise os_error(e, "create the directory", path) from e
        fsync_dir(path.parent)
    if not directory.is_dir():
        raise StateError(f"cannot create the directory {str(directory)!r}: a file of that name is in the way")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so that every reader sees either the old content or all of the new one.

    Not ``durable``: without the two fsyncs, for what a crash may lose (after one, the file may be empty).
    """
    directory = path.parent
    tmp = directory / tmp_name(path.name)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise os_error(e, "write", path) from e
    try:
        try:
            _write_all(fd, data)
            if durable:
                os.fsync(fd)  # before the rename: otherwise a crash can leave the new name on empty blocks
        finally:
            os.close(fd)
        tmp.rename(path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise os_error(e, "write", path) from e
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        fsync_dir(directory)


def dumps(obj: Any, path: Path | str = "") -> bytes:
    try:
        text = json.dumps(obj, indent=1, sort_keys=False, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise InternalError(f"cannot encode the record for {str(path)!r} as JSON: {e}") from e
    return (text + "\n").encode()


def write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, dumps(obj, path))


def read_bytes(path: Path) -> bytes | None:
    """The content of ``path``, or None if there is no such file."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise os_error(e, "read", path) from e


def read_json(path: Path) -> Any | None:
    """The JSON in ``path``; None when there is no such file, StateError when it holds no valid JSON."""
    data = read_bytes(path)
    if data is None:
        return None
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateError(f"the record {str(path)!r} is not valid JSON: {e}") from e


def sweep_tmp(directory: Path, older_than: float, *, now: float | None = None) -> int:
    """Remove the temporary files in ``directory`` that are older than ``older_than`` seconds; answer how many.

    Only a writer killed mid-write leaves one behind; a live writer renames its own within moments, so the age
    keeps the sweep from pulling a file out from under it. On NFS the age comes from the server's clock, so
    ``older_than`` should stay well above any clock skew between hosts.
    """
    cutoff = (time.time() if now is None else now) - older_than
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    except OSError as e:
        raise os_error(e, "list", directory) from e
    for entry in entries:
        if not is_tmp_name(entry.name):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(info.st_mode) or info.st_mtime > cutoff:
                continue
            Path(entry.path).unlink()
            removed += 1
        except FileNotFoundError:
            continue  # swept by someone else, or renamed by its writer after all
        except OSError as e:
            raise os_error(e, "remove", entry.path) from e
    return removed
