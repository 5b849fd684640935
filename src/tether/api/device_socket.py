"""The device edge: the WebSocket behind `wsUrl` (device-protocol §2)."""

from __future__ import annotations

import logging
from urllib.parse import parse_qsl

from fastapi import APIRouter, WebSocket

from tether.api.auth import bearer
from tether.api.transport import WsTransport
from tether.gateway.upstream import UpstreamFailure
from tether.node import Node
from tether.ops.leases import DeviceSession, LeaseRefused
from tether.protocol import closes
from tether.protocol.frames import FrameError, decode
from tether.protocol.pairing import Channel, Hello
from tether.sockets import DeviceSocket

log = logging.getLogger("tether.device_socket")
router = APIRouter()

PING = '{"type":"ping"}'


def _hello(params: dict[str, str]) -> Hello | None:
    channel = {"control": Channel.CONTROL, "stream": Channel.STREAM, None: Channel.SINGLE}.get(
        params.get("channel")
    )
    if channel is None:
        return None
    generation = params.get("connectionGeneration") or None
    attempt_text = params.get("connectionAttempt")
    attempt = None
    if attempt_text is not None:
        try:
            attempt = int(attempt_text)
        except ValueError:
            return None
        if attempt < 1:
            return None
    if (generation is None) != (attempt is None):
        return None
    return Hello(channel, generation, attempt)


async def _receive(ws: WebSocket, session: DeviceSession) -> int | None:
    """Take and handle one message; once the socket is gone, its close code. A function of its own so that
    nothing of a frame outlives its handling: the socket's loop then waits (for hours, between
    pings) holding no frame; the last status frame was about 3 KiB of every idle device's memory."""
    message = await ws.receive()
    if message["type"] == "websocket.disconnect":
        return int(message.get("code", 1005))
    data = message.get("text")
    if data is None:
        data = message.get("bytes")
    if data is None or session.sock.closed:
        return None
    if data == PING:
        # Most of a device's traffic: answered without parsing (devices send exactly this).
        await session.ping()
        return None
    try:
        frame = decode(data)
    except FrameError as exc:
        dropped = session.malformed()
        if dropped <= 3 or dropped % 100 == 0:
            log.warning(
                "dropped malformed frame #%d (device %s): %s", dropped, session.link.connection_id, exc
            )
        return None
    await session.receive(frame)
    return None


@router.websocket("/v1/environments/ws/{connection_id}")
async def device_socket(ws: WebSocket, connection_id: str) -> None:
    node: Node = ws.app.state.node
    secret = bearer(ws.headers)
    try:
        principal = await node.auth.resolve(secret) if secret else None
    except UpstreamFailure as exc:
        await ws.accept()  # upstream-keys mode, the Letta server unreachable: not the key's fault
        await ws.close(closes.TRY_AGAIN_LATER, exc.message[:120])
        return
    await ws.accept()
    # Refusals complete the upgrade and then close: only a close code makes the device act
    # (1008 -> re-register); a refused upgrade would just be retried for five minutes.
    if node.draining:
        await ws.close(closes.DRAIN, "router pod shutting down")
        return
    # Parsed straight from the scope: Starlette's QueryParams (a multi-dict built per socket) was
    # 3 % of the router's CPU in a reconnect storm. Same rules: blanks kept, the last value wins.
    hello = _hello(dict(parse_qsl(ws.scope["query_string"].decode("latin-1"), keep_blank_values=True)))
    if hello is None:
        await ws.close(closes.BAD_HELLO, "invalid channel, connectionGeneration or connectionAttempt")
        return
    try:
        link = await node.leases.open(principal, connection_id, hello)
    except LeaseRefused as refused:
        await ws.close(closes.LEASE_UNKNOWN, refused.reason)
        return
    transport = WsTransport(ws)
    transport.release_handshake()
    session = node.leases.session(link, DeviceSocket(transport, node.settings.device_queue_frames))
    await session.opened(hello)
    code: int | None = None
    try:
        while (code := await _receive(ws, session)) is None:
            pass
    finally:
        await session.closed(code)
