"""The device edge: the WebSocket behind `wsUrl` (device-protocol §2)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, WebSocket

from tether.api.auth import bearer
from tether.api.transport import WsTransport
from tether.hub import DeviceSocket
from tether.node import CLOSE_DRAIN, CLOSE_LEASE_UNKNOWN, LeaseRefused, Node
from tether.protocol.frames import FrameError, decode
from tether.protocol.pairing import Channel, Hello

log = logging.getLogger("tether.device_socket")
router = APIRouter()

CLOSE_BAD_HELLO = 4400
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


@router.websocket("/v1/environments/ws/{connection_id}")
async def device_socket(ws: WebSocket, connection_id: str) -> None:
    node: Node = ws.app.state.node
    secret = bearer(ws.headers)
    principal = await node.auth.resolve(secret) if secret else None
    await ws.accept()
    # Refusals complete the upgrade and then close: only a close code makes the device act
    # (1008 -> re-register); a refused upgrade would just be retried for five minutes.
    if node.draining:
        await ws.close(CLOSE_DRAIN, "router pod shutting down")
        return
    hello = _hello(dict(ws.query_params))
    if hello is None:
        await ws.close(CLOSE_BAD_HELLO, "invalid channel, connectionGeneration or connectionAttempt")
        return
    try:
        link = await node.open_lease(principal, connection_id, hello)
    except LeaseRefused as refused:
        await ws.close(CLOSE_LEASE_UNKNOWN, refused.reason)
        return
    transport = WsTransport(ws)
    transport.release_handshake()
    sock = DeviceSocket(transport, node.settings.device_queue_frames)
    await node.device_opened(link, sock, hello)
    malformed = 0
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            data = message.get("text")
            if data is None:
                data = message.get("bytes")
            if data is None or sock.closed:
                continue
            if data == PING:
                # Most of a device's traffic: answered without parsing (devices send exactly this).
                await node.device_ping(link, sock)
                continue
            try:
                frame = decode(data)
            except FrameError as exc:
                malformed += 1
                node.counters.device_malformed_frames += 1
                if malformed <= 3 or malformed % 100 == 0:
                    log.warning(
                        "dropped malformed frame #%d from device %s: %s", malformed, connection_id, exc
                    )
                continue
            await node.device_frame(link, sock, frame)
    finally:
        await node.device_closed(link, sock)
