"""The router's listening sockets: several queues on one port, and a taken port still refused."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Router, start_router
from tests.test_cli import run_tether
from tether.config import Settings
from tether.listen import MAX_LISTEN_SOCKETS, bind_listeners, kernel_queue_cap, sockets_needed

LINUX_ONLY = pytest.mark.skipif(
    kernel_queue_cap() is None, reason="SO_REUSEPORT spreads connects over sockets on Linux only"
)


@pytest.mark.parametrize(
    ("backlog", "cap", "requested", "expected"),
    [
        (16_384, 4_096, 0, 4),  # Linux's default somaxconn: four queues hold the default backlog
        (16_384, 16_384, 0, 1),  # an operator who raised somaxconn needs one
        (2_048, 4_096, 0, 1),
        (16_384, 4_000, 0, 5),  # rounded up: four would hold 16,000
        (16_384, 128, 0, MAX_LISTEN_SOCKETS),  # older kernels' 128 would ask for 128 sockets
        (16_384, None, 0, 1),  # not Linux: SO_REUSEPORT would not spread connects
        (16_384, 4_096, 2, 2),  # TETHER_LISTEN_SOCKETS wins
        (16_384, None, 3, 3),
    ],
)
def test_sockets_needed(backlog: int, cap: int | None, requested: int, expected: int) -> None:
    assert sockets_needed(backlog, cap, requested) == expected


@pytest.fixture
def listeners() -> Iterator[list[socket.socket]]:
    sockets = bind_listeners("127.0.0.1", 0, 4)
    try:
        for sock in sockets:
            sock.listen(512)
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


@LINUX_ONLY
def test_connects_spread_over_every_socket_of_the_port(listeners: list[socket.socket]) -> None:
    port = listeners[0].getsockname()[1]
    assert {s.getsockname() for s in listeners} == {("127.0.0.1", port)}
    assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in listeners)
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
    try:
        accepted = []
        for sock in listeners:
            sock.setblocking(False)
            count = 0
            while True:
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    break
                conn.close()
                count += 1
            accepted.append(count)
        # Every connect waited in one of the queues; each queue took a share (200 connects all hashed
        # to one of four sockets would be a 4**-199 chance).
        assert sum(accepted) == 200
        assert all(count > 0 for count in accepted), accepted
    finally:
        for client in clients:
            client.close()


def test_a_listened_port_is_refused(listeners: list[socket.socket]) -> None:
    port = listeners[0].getsockname()[1]
    for count in (1, 4):
        with pytest.raises(OSError):
            bind_listeners("127.0.0.1", port, count)


def test_several_sockets_without_reuse_port_are_refused_as_an_os_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(socket, "SO_REUSEPORT", raising=False)
    with pytest.raises(OSError, match="TETHER_LISTEN_SOCKETS to 1"):
        bind_listeners("127.0.0.1", 0, 2)
    (sock,) = bind_listeners("127.0.0.1", 0, 1)  # one socket needs no SO_REUSEPORT
    sock.close()


def test_one_socket_binds_without_reuse_port() -> None:
    (sock,) = bind_listeners("127.0.0.1", 0, 1)
    try:
        assert not sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
    finally:
        sock.close()


@LINUX_ONLY
def test_a_second_router_on_the_same_port_is_refused(tmp_path: Path, router: Router) -> None:
    port = router.base_url.rsplit(":", 1)[1]
    second = run_tether(
        "serve", TETHER_PORT=port, TETHER_DATA_DIR=str(tmp_path / "second"), TETHER_BOOTSTRAP_KEY="false"
    )
    assert second.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in second.stderr and "in use" in second.stderr
    assert "Traceback" not in second.stderr
    # The first router still has the port to itself.
    for _ in range(20):
        assert httpx.get(f"{router.base_url}/readyz", timeout=5).status_code == 200


@LINUX_ONLY
@pytest.mark.parametrize("asked", [None, 3])
def test_router_listens_on_the_sockets_it_needs(tmp_path: Path, asked: int | None) -> None:
    settings = {"listen_sockets": asked} if asked else {}
    router = start_router(tmp_path, **settings)
    try:
        for _ in range(20):
            assert httpx.get(f"{router.base_url}/readyz", timeout=5).status_code == 200
        expected = asked or sockets_needed(Settings().listen_backlog, kernel_queue_cap(), 0)
        assert _listening_sockets(router.proc.pid) == expected
    finally:
        router.stop()


def _listening_sockets(pid: int) -> int:
    """TCP sockets of `pid` in LISTEN state (0A in /proc/net/tcp)."""
    inodes = {
        link.split("[", 1)[1].rstrip("]")
        for fd in Path(f"/proc/{pid}/fd").iterdir()
        if (link := _readlink(fd)).startswith("socket:[")
    }
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for row in rows if (f := row.split())[3] == "0A" and f[9] in inodes)


def _readlink(path: Path) -> str:
    try:
        return str(path.readlink())
    except OSError:
        return ""
