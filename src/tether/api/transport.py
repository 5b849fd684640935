"""Starlette WebSockets as the hub's `Transport`."""

from __future__ import annotations

from starlette.websockets import WebSocket


class WsTransport:
    __slots__ = ("ws",)

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws

    async def send(self, text: str) -> None:
        await self.ws.send({"type": "websocket.send", "text": text})

    async def close(self, code: int, reason: str) -> None:
        await self.ws.close(code, reason)
