"""B8: one gossip port, one agent, and a clear message when it is taken.

swim-protocol binds its UDP and TCP sockets with ``SO_REUSEPORT``, so a second agent started on the same
``host:port`` binds too, and the kernel then shares the datagrams out between the two: both half-work, and
nothing says why. Our transport (:class:`khutulun.cluster._swim.GossipTransport`) binds without it, so a second
bind fails; before that, :class:`PortClaim`

* takes an abstract unix socket named after the port (``@khutulun-gossip:7946``). Abstract sockets belong to
  the network namespace, which is exactly the scope of a port, and vanish with the process that holds them,
  so two agents racing for one port cannot both get it, and a crashed agent leaves nothing to clean up;
* binds the UDP and the TCP port itself and lets them go, to say which of them is taken, by whom (another
  agent or another process), or that the address is not this host's;
* picks a free port (the same one for UDP and TCP) when asked for port 0.
"""

from __future__ import annotations

import errno
import socket

from khutulun.errors import ConflictError, InvalidInputError, KhutulunError

__all__ = ["PortClaim"]


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _probe(host: str, port: int, kind: socket.SocketKind) -> int:
    """Bind (host, port) without SO_REUSEPORT and return the port bound; the socket is closed again."""
    with socket.socket(_family(host), kind) as probe:
        if kind == socket.SOCK_STREAM:
            # As asyncio's create_server does: a port whose connections linger in TIME_WAIT is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        bound: int = probe.getsockname()[1]
        return bound


class PortClaim:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._lock: socket.socket | None = None

    def acquire(self) -> int:
        """Claim the port (a free one when it is 0) and return it; raises ConflictError when it is taken."""
        if self._lock is not None:
            return self.port
        for _ in range(20):
            port = self.port or self._free_port()
            lock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                lock.bind(f"\0khutulun-gossip:{port}")
            except OSError as e:
                lock.close()
                if e.errno != errno.EADDRINUSE:
                    raise KhutulunError(f"cannot claim the gossip port {port}: {e.strerror}") from e
                if self.port == 0:
                    continue  # another agent chose the same free port a moment ago: choose again
                raise ConflictError(f"another Khutulun agent already gossips on port {port} of this host") from None
            try:
                self._check(port)
            except BaseException:
                lock.close()
                raise
            self._lock, self.port = lock, port
            return port
        raise ConflictError(f"found no free gossip port on {self.host}")

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _free_port(self) -> int:
        for _ in range(50):
            port = self._bind_error(0, socket.SOCK_DGRAM)
            try:
                _probe(self.host, port, socket.SOCK_STREAM)
            except OSError:
                continue
            return port
        raise ConflictError(f"found no free gossip port on {self.host}")

    def _check(self, port: int) -> None:
        self._bind_error(port, socket.SOCK_DGRAM)
        self._bind_error(port, socket.SOCK_STREAM)

    def _bind_error(self, port: int, kind: socket.SocketKind) -> int:
        where = f"{self.host}:{port}"
        proto = "UDP" if kind == socket.SOCK_DGRAM else "TCP"
        try:
            return _probe(self.host, port, kind)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConflictError(f"the gossip address {where} ({proto}) is already in use by another "
                                    "process") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise InvalidInputError(f"the gossip address {where} is not an address of this host") from None
            if e.errno == errno.EACCES:
                raise InvalidInputError(f"binding the gossip address {where} is not permitted (a port below "
                                        "1024 needs privileges)") from None
            raise InvalidInputError(f"cannot bind the gossip address {where} ({proto}): {e.strerror}") from None
        except (socket.gaierror, UnicodeError) as e:
            raise InvalidInputError(f"the gossip address {where} is not valid: {e}") from None
