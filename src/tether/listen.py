"""The router's listening sockets: enough of them that a reconnect storm fits in the kernel's queues.

Linux keeps at most `net.core.somaxconn` connections (4,096 by default since 5.4) waiting in one
socket's accept queue, whatever backlog the server asks for. When every device reconnects at once, the
connects beyond the queue are dropped and the device's kernel retries each 1 s, 3 s, 7 s, 15 s later:
on an 8,000-device storm about 25,000 drops, and a storm that took 8.4-9.7 s took 16.3 s when the
retries fell badly. Several sockets bound to the same port with SO_REUSEPORT each get a queue of their
own, and the kernel spreads connects over them; the one event loop serves them all.

SO_REUSEPORT lets any process of the same user join the port. So that a second router started on the
same port fails as it always did instead of silently taking half the connections, the port is first
bound without it, which fails when anything listens there.
"""

from __future__ import annotations

import math
import socket
import sys
from pathlib import Path

SOMAXCONN = Path("/proc/sys/net/core/somaxconn")
# A queue of 128 (older kernels) would ask for 128 sockets; a few are enough to matter.
MAX_LISTEN_SOCKETS = 8


def kernel_queue_cap() -> int | None:
    """net.core.somaxconn on Linux; None elsewhere (where SO_REUSEPORT does not spread connects)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return int(SOMAXCONN.read_text())
    except (OSError, ValueError):
        return None


def sockets_needed(backlog: int, queue_cap: int | None, requested: int) -> int:
    """How many listening sockets hold `backlog` waiting connects: `requested` when it is set (> 0)."""
    if requested > 0:
        return requested
    if queue_cap is None or queue_cap <= 0:
        return 1
    return max(1, min(MAX_LISTEN_SOCKETS, math.ceil(backlog / queue_cap)))


def open_listeners(host: str, port: int, backlog: int, requested: int = 0) -> list[socket.socket]:
    """The listening sockets for `TETHER_HOST`, `TETHER_PORT`, `TETHER_LISTEN_BACKLOG` and
    `TETHER_LISTEN_SOCKETS` (`requested`, 0 for as many as the backlog needs)."""
    return bind_listeners(host, port, sockets_needed(backlog, kernel_queue_cap(), requested))


def bind_listeners(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` sockets bound to each address of `host` on one port (not yet listening).

    Addresses are resolved as asyncio's `create_server` does, so the router binds what it bound when
    uvicorn bound it; port 0 picks one port for all of them. Raises OSError when the port is taken.
    """
    infos = socket.getaddrinfo(
        host or None, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    addresses = list(dict.fromkeys((family, address) for family, _, _, _, address in infos))
    sockets: list[socket.socket] = []
    try:
        for family, address in addresses:
            if count > 1 and port != 0:
                # Refuses a port already listened on, as a plain bind would.
                _bind(family, (address[0], port, *address[2:]), reuse_port=False).close()
            for _ in range(count):
                sock = _bind(family, (address[0], port, *address[2:]), reuse_port=count > 1)
                sockets.append(sock)
                port = sock.getsockname()[1]
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _bind(family: int, address: tuple[object, ...], *, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            option = getattr(socket, "SO_REUSEPORT", None)
            if option is None:  # an explicit TETHER_LISTEN_SOCKETS above 1 where the system has none
                raise OSError("this system has no SO_REUSEPORT: set TETHER_LISTEN_SOCKETS to 1")
            sock.setsockopt(socket.SOL_SOCKET, option, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock
