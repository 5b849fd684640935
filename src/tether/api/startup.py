"""While the pod's start-up still waits for the database or Redis, work is refused retryably.

The pod listens at once (Node.start connects in the background), so probes and documentation answer
while every device and client request meets a retryable refusal: REST 503 with `Retry-After` and
`x-should-retry: true` (the devices' registration retries 5xx and honours `Retry-After`), a WebSocket
accepted and closed with 1013 "try again later" (a device reconnects after any close but 1008 and
the 1000 "Replaced" one; a relay client after anything but 1000/1001).
"""

from __future__ import annotations

from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from tether.api.errors import error_response
from tether.node import Node
from tether.protocol import closes

# Served while starting: what needs neither the database nor Redis.
OPEN_PATHS = frozenset({"/", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/redoc"})
OPEN_PREFIXES = ("/docs/", "/ui")
# What a refused device or client is told to wait before trying again (seconds).
RETRY_AFTER_SECONDS = 1


def waiting(node: Node | None, scope: Scope) -> list[str]:
    """What a request must wait for before this pod serves it; empty once the pod is connected."""
    if node is not None and node.connected:
        return []  # the common case, checked first: one attribute read per request
    if scope["type"] not in ("http", "websocket") or _open(scope["path"]):
        return []
    return node.waiting_for if node is not None else ["start-up"]


def _open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


async def refuse(scope: Scope, receive: Receive, send: Send, waiting: list[str]) -> None:
    what = " and ".join(waiting)
    message = f"this pod is starting: waiting for {what}; retry shortly"
    if scope["type"] == "websocket":
        ws = WebSocket(scope, receive, send)
        await ws.accept()
        await ws.close(closes.TRY_AGAIN_LATER, f"starting: waiting for {what}"[:123])  # 123: RFC 6455
        return
    # The codes the routes answer when the same service goes away later (api/errors.py).
    code = "DATABASE_UNAVAILABLE" if "database" in what else "LIVE_STATE_UNAVAILABLE"
    response = error_response(503, code, message, {"Retry-After": str(RETRY_AFTER_SECONDS)})
    await response(scope, receive, send)
