"""Malformed input at real device and relay sockets, next to a live session (issue 16, row 2, fast).

A handful of the hardening row's raw cases (hardening/socket_fuzz.py) against one router: each bad
socket ends as documented (dropped or answered and still usable; or closed with 1009, 1007, 1002),
while a reference device streams bursts to a relay client on the same router that must get every
frame in order. The full row adds hundreds of mutations, floods and the RSS bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from urllib.parse import urlencode

import httpx
from bench.servers import rss_kib
from hardening import wire
from hardening.socket_fuzz import BYSTANDER_SCOPE, MAX_FRAME_BYTES, OPEN, Bystander, attack, cases

from tests.conftest import Router
from tether.device.client import Device
from tether.protocol import closes

ROUTER_SETTINGS = {"max_frame_bytes": MAX_FRAME_BYTES}

PICKED = (
    "malformed JSON (text)",
    "random binary messages",
    "a ping in 1-byte fragments",
    "interleaved control frame inside a fragmented message",
    "message of MAX_FRAME_BYTES + 20",
    "invalid UTF-8 in a text frame",
    "invalid UTF-8 split across fragments",
    "continuation with no message started",
    "control frame over 125 bytes",
    "reserved opcode 0x3",
    "reserved bits set",
    "unmasked client frame",
)


def test_the_picked_cases_cover_every_documented_close() -> None:
    picked = [c for c in cases(random.Random(16), 0.05) if c.name in PICKED]
    assert len(picked) == len(PICKED)
    assert {c.expect for c in picked} == {
        OPEN,
        closes.MESSAGE_TOO_BIG,
        closes.INVALID_UTF8,
        closes.PROTOCOL_ERROR,
    }


async def test_bad_sockets_close_as_documented_and_the_bystander_session_loses_nothing(
    srv: Router,
) -> None:
    device = Device(srv.base_url, srv.key, f"bystander-{uuid.uuid4().hex[:6]}", heartbeat_interval=1.0)
    await device.start()
    try:
        await device.wait_ready(10)
        connection_id = device.connection_id
        assert connection_id is not None
        scope = {"agentId": BYSTANDER_SCOPE["agent_id"], "conversationId": BYSTANDER_SCOPE["conversation_id"]}
        bystander = Bystander(
            f"{srv.ws_base}/v1/environments/{connection_id}/status/ws?{urlencode(scope)}", srv.key
        )
        watching = asyncio.create_task(bystander.run())
        picked = [c for c in cases(random.Random(16), 0.05) if c.name in PICKED]
        outcomes: dict[str, str | None] = {}
        for n, (target, case) in enumerate((t, c) for t in ("device", "relay") for c in picked):
            outcomes[f"{target}: {case.name}"], _ = await attack(
                srv, srv.proc.pid, target, connection_id, n, case, []
            )
        bystander.stop.set()
        await asyncio.wait_for(watching, 30)
    finally:
        with contextlib.suppress(Exception):
            await device.stop()
    assert {k: v for k, v in outcomes.items() if v is not None} == {}
    assert srv.alive()
    assert bystander.problems == []
    assert bystander.bursts >= 1 and bystander.frames > bystander.bursts
    log = srv.log()
    assert "Traceback" not in log and " ERROR " not in log and "ERROR:" not in log


async def test_websocket_pings_that_are_never_read_push_back_instead_of_growing_the_router(
    srv: Router,
) -> None:
    """Each ping is answered with a pong of its size; a peer that never reads them must meet TCP's
    back-pressure (the router stops reading) rather than have the router buffer every pong."""
    registration = await _register(srv)
    sock = await wire.RawSocket.open(
        f"{srv.ws_base}/v1/environments/ws/{registration}", {"Authorization": f"Bearer {srv.key}"}
    )
    assert sock.status == 101
    try:
        block = b"".join(wire.frame(wire.PING, b"f" * 125) for _ in range(2000))  # ~256 KiB
        before = rss_kib(srv.proc.pid)
        sending = asyncio.create_task(_send_blocks(sock, block, 128))  # 32 MiB of pings
        await asyncio.wait({sending}, timeout=5)
        grown_mib = (rss_kib(srv.proc.pid) - before) / 1024
        assert grown_mib < 12, f"the router took the pings in and grew {grown_mib:.0f} MiB"
        draining = asyncio.create_task(_discard_all(sock))
        await sending  # once the pongs are read, the router reads the rest
        draining.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await draining
        await sock.send(wire.frame(wire.TEXT, b'{"type":"ping"}'))
        assert await sock.until(b'"pong"', 30), "the socket is still usable"
    finally:
        sock.abort()


async def _register(srv: Router) -> str:
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {srv.key}"}) as http:
        r = await http.post(
            f"{srv.base_url}/v1/environments/register",
            json={"deviceId": f"pinger-{uuid.uuid4().hex[:6]}", "connectionName": "pinger", "metadata": {}},
        )
    r.raise_for_status()
    return str(r.json()["connectionId"])


async def _send_blocks(sock: wire.RawSocket, block: bytes, n: int) -> None:
    for _ in range(n):
        await sock.send(block)


async def _discard_all(sock: wire.RawSocket) -> None:
    with contextlib.suppress(TimeoutError):
        while await sock.receive(60) is not None:
            pass
