"""The gossip secret: required, and read from a file nobody else can read.

swim-protocol signs every packet with HMAC-SHA256 and unpickles what verifies, so whoever holds the secret can
run code in every agent. Without a secret it would silently use the machine's MAC address; here there is no
default: the file must exist, be a regular file owned by root or by the agent's user, give no access to group
or others, and hold at least 16 bytes.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from khutulun.errors import InvalidInputError

__all__ = ["MIN_SECRET_BYTES", "read_secret"]

MIN_SECRET_BYTES = 16
_HOW = "make one with: head -c 32 /dev/urandom | base64 > FILE && chmod 600 FILE"


def read_secret(path: Path) -> bytes:
    """The secret in ``path``, without its trailing newline."""
    try:
        # The checks are made on the open file, so that it cannot be swapped between the check and the read.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise InvalidInputError(f"cannot read the gossip secret file {str(path)!r}: {e.strerror}; {_HOW}") from e
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidInputError(f"the gossip secret file {str(path)!r} is not a regular file")
        if info.st_uid not in (0, os.geteuid()):
            raise InvalidInputError(f"the gossip secret file {str(path)!r} belongs to uid {info.st_uid}: it must "
                                    f"belong to root or to the agent's user (uid {os.geteuid()})")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise InvalidInputError(f"the gossip secret file {str(path)!r} can be accessed by its group or others "
                                    f"(mode {mode:04o}): chmod 600 {path}")
        with os.fdopen(os.dup(fd), "rb") as file:
            secret = file.read(65537).rstrip(b"\r\n")
    finally:
        os.close(fd)
    if len(secret) < MIN_SECRET_BYTES:
        raise InvalidInputError(f"the gossip secret in {str(path)!r} has {len(secret)} bytes, fewer than "
                                f"{MIN_SECRET_BYTES}; {_HOW}")
    if len(secret) > 65536:
        raise InvalidInputError(f"the gossip secret file {str(path)!r} is larger than 64 KiB: is it the right file?")
    return secret
