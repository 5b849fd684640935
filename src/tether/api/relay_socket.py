"""The client edge: `/v1/environments/{connectionId}/status/ws` (client-protocol §2)."""

from __future__ import annotations

import logging
import uuid

from fastapi import APIRouter, WebSocket

from tether.api.auth import bearer
from tether.api.errors import error_response
from tether.api.transport import WsTransport
from tether.gateway.upstream import UpstreamFailure
from tether.node import Node
from tether.protocol.feeds import Scope
from tether.protocol.frames import FrameError, decode

log = logging.getLogger("tether.relay_socket")
router = APIRouter()

SOCKET_ID_HEADER = b"x-tether-socket-id"


def _resume_point(socket_id: str | None, after: str | None) -> tuple[str, int] | None:
    """`?resume=<socket id>&resumeFrom=<last seq seen>`: the socket (from X-Tether-Socket-Id) to resume."""
    if not socket_id:
        return None
    try:
        return socket_id, max(0, int(after or "0"))
    except ValueError:
        return socket_id, 0


@router.websocket("/v1/environments/{connection_id}/status/ws")
async def relay_socket(ws: WebSocket, connection_id: str) -> None:
    node: Node = ws.app.state.node
    params = ws.query_params
    secret = bearer(ws.headers, params)
    try:
        principal = await node.auth.resolve(secret) if secret else None
    except UpstreamFailure as exc:
        retry = {"x-should-retry": "true" if exc.retry else "false"}
        await ws.send_denial_response(error_response(exc.status, exc.code, exc.message, retry))
        return
    if principal is None:
        await ws.send_denial_response(error_response(401, "UNAUTHORIZED", "missing or invalid API key"))
        return
    if await node.environments.in_org(principal, connection_id) is None:
        await ws.send_denial_response(
            error_response(
                404, "CONNECTION_NOT_FOUND", f"no connection {connection_id!r} in this organization"
            )
        )
        return
    relays = node.relays
    if not await relays.reachable(connection_id):
        await ws.send_denial_response(
            error_response(503, "ENVIRONMENT_OFFLINE", "the environment is offline")
        )
        return
    scope = Scope(params.get("agentId") or None, params.get("conversationId") or None)
    channel = params.get("channel") or None
    resume = _resume_point(params.get("resume"), params.get("resumeFrom"))
    if resume is not None and relays.can_resume(connection_id, resume[0], principal.key_id):
        socket_id = resume[0]
    else:
        socket_id = uuid.uuid4().hex
    # Join the feed before the upgrade completes, so nothing sent after the client sees the socket
    # open is missed; writes start once the socket is accepted.
    transport = WsTransport(ws)
    session = await relays.open(principal, connection_id, transport, scope, channel, resume, socket_id)
    close_code = 1006
    try:
        await ws.accept(headers=[(SOCKET_ID_HEADER, socket_id.encode())])
        transport.release_handshake()
        session.start()
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                close_code = int(message.get("code") or 1006)
                break
            data = message.get("text")
            if data is None:
                data = message.get("bytes")
            if data is None:
                continue
            try:
                frame = decode(data)
            except FrameError as exc:
                session.malformed(str(exc))
                continue
            await session.receive(frame)
    finally:
        await session.closed(close_code)
