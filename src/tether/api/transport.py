"""Starlette WebSockets as the hub's `Transport`."""

from __future__ import annotations

import struct
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState
from websockets.protocol import State

_FIN_TEXT = 0x81  # FIN bit + text opcode
# What a socket's scope keeps once accepted (`release_handshake`).
_SCOPE_KEPT = ("type", "path", "client", "server", "app")


def _text_header(length: int) -> bytes:
    """The header of a server's (unmasked) final text frame carrying `length` bytes."""
    if length < 126:
        return bytes((_FIN_TEXT, length))
    if length < 1 << 16:
        return struct.pack("!BBH", _FIN_TEXT, 126, length)
    return struct.pack("!BBQ", _FIN_TEXT, 127, length)


class WsTransport:
    """One socket's writes. `send_many` coalesces a burst into one write to the kernel.

    Through ASGI every message is its own `transport.write`, one system call each: under a stream of
    deltas that call is a third of the router's CPU (py-spy). On uvicorn's sans-I/O protocol, the one
    `tether serve` runs, the frames of a burst are framed by that same protocol object and written at
    once; anywhere else each goes through ASGI as before.
    """

    __slots__ = ("_protocol", "ws")

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        owner: Any = getattr(ws._send, "__self__", None)
        self._protocol = owner if isinstance(owner, WebSocketsSansIOProtocol) else None

    def release_handshake(self) -> None:
        """Drop what only the upgrade needed, once the socket is accepted and its headers read.

        uvicorn keeps the upgrade's request and response objects, and Starlette the scope's header
        list, for the socket's whole life: about 30 of the 90 objects a held socket keeps, each one
        rescanned by every full garbage collection (at 8,000 devices, seconds of a reconnect storm).
        """
        protocol = self._protocol
        if protocol is not None and protocol.handshake_complete:
            request = protocol.request
            if request is not None:
                # websockets' parser keeps the request object until the socket closes (a local of
                # its generator); its headers need not stay with it.
                request.headers.clear()
                request.path = ""  # with its query string, about 270 bytes
            protocol.request = None  # type: ignore[assignment]
            protocol.response = None  # type: ignore[assignment]
        # The scope, shared by uvicorn, Starlette and the suspended ASGI frames, keeps only what a
        # held socket still reads: its path and client for logs, the app for its state. The rest (a
        # copy of the lifespan state, headers, query string, raw path, extensions: about 1 KiB per
        # socket) was read at the upgrade. Cleared in place: every holder shares this one dict.
        scope = self.ws.scope
        kept = {key: scope[key] for key in _SCOPE_KEPT if key in scope}
        scope.clear()
        scope.update(kept)
        for cached in ("_headers", "_query_params"):
            self.ws.__dict__.pop(cached, None)

    async def send(self, text: str) -> None:
        await self.ws.send({"type": "websocket.send", "text": text})

    def send_now(self, texts: list[str]) -> bool:
        """Write frames in one write without awaiting, when the socket takes them at once; False
        otherwise (nothing written: the caller then awaits `send_many`). Saves the ASGI round of
        coroutines and a task switch on every pong and every relayed answer."""
        protocol = self._protocol
        if protocol is None or not protocol.writable.is_set() or not self._open(protocol):
            return False
        try:
            self._write(protocol, texts)
        except InvalidState:
            return False
        return True

    async def send_many(self, texts: list[str]) -> None:
        protocol = self._protocol
        if protocol is None or len(texts) == 1:
            for text in texts:
                await self.send(text)
            return
        await protocol.writable.wait()  # the kernel's buffer is full: wait, as uvicorn's send does
        if not self._open(protocol):
            raise WebSocketDisconnect(1006)
        try:
            self._write(protocol, texts)
        except InvalidState:
            raise WebSocketDisconnect(1006) from None

    def _open(self, protocol: WebSocketsSansIOProtocol) -> bool:
        """The checks uvicorn and Starlette make before a send."""
        return (
            not protocol.disconnected
            and not protocol.close_sent
            and self.ws.application_state is WebSocketState.CONNECTED
        )

    @staticmethod
    def _write(protocol: WebSocketsSansIOProtocol, texts: list[str]) -> None:
        conn = protocol.conn
        if conn.extensions or conn.state is not State.OPEN:
            # An extension (compression) transforms frames, and a closing socket must refuse the
            # write: websockets' own framing handles both.
            for text in texts:
                conn.send_text(text.encode())
            protocol.transport.write(b"".join(conn.data_to_send()))
            return
        # Unfragmented, unmasked text frames (RFC 6455 §5.2), framed here: websockets builds a Frame
        # object per message for the same bytes, about a tenth of the router's CPU under a stream.
        # Whatever websockets queued itself (a pong to a protocol ping) goes out first.
        chunks = conn.data_to_send()
        for text in texts:
            data = text.encode()
            chunks.append(_text_header(len(data)))
            chunks.append(data)
        protocol.transport.write(b"".join(chunks))

    async def close(self, code: int, reason: str) -> None:
        await self.ws.close(code, reason)
