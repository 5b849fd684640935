"""The device and relay WebSockets (and, in gateway mode, the upstream's routes), served ahead of FastAPI.

A device holds two sockets for hours. Behind FastAPI each one keeps about twenty coroutine frames alive
(middleware, exception wrappers, router, exit stacks) and every frame it receives or sends passes
through them. Dispatching these two paths straight from the ASGI server runs the same handlers without
that stack; everything else (REST, health, lifespan) still goes to the FastAPI application.
"""

from __future__ import annotations

import re

from fastapi import FastAPI
from starlette.datastructures import State
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from tether.api import device_socket, gateway, relay_socket, startup
from tether.gateway.routes import served_here

_DEVICE = re.compile(r"/v1/environments/ws/([^/]+)")
_RELAY = re.compile(r"/v1/environments/([^/]+)/status/ws")


class SocketsFirst:
    def __init__(self, app: FastAPI, gateway: bool = False) -> None:
        self.app = app
        self.gateway = gateway  # gateway mode: what is not Tether's goes to the Letta server

    @property
    def state(self) -> State:
        """The application's state (the node), for the server's drain on shutdown."""
        return self.app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The start-up gate lives here, not in a middleware of its own: every request passes this one
        # dispatcher anyway, and a layer more would keep one more frame alive per device socket.
        waiting = startup.waiting(getattr(self.app.state, "node", None), scope)
        if waiting:
            await startup.refuse(scope, receive, send, waiting)
            return
        if scope["type"] == "websocket":
            path = scope["path"]
            device = _DEVICE.fullmatch(path)
            if device is not None:
                scope["app"] = self.app
                await device_socket.device_socket(WebSocket(scope, receive, send), device.group(1))
                return
            relay = _RELAY.fullmatch(path)
            if relay is not None:
                scope["app"] = self.app
                await relay_socket.relay_socket(WebSocket(scope, receive, send), relay.group(1))
                return
        elif scope["type"] == "http" and self.gateway and not served_here(scope["path"]):
            scope["app"] = self.app
            await gateway.forward(scope, receive, send)
            return
        await self.app(scope, receive, send)
