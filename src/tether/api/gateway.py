"""The gateway's edge: a request for the agent API, authenticated here and streamed to the upstream.

Served ahead of FastAPI (like the sockets, api/fastpath.py): a streamed response passes each chunk
from the upstream to the client as it arrives, with nothing between but this loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import httpx
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from tether.api.auth import require_principal
from tether.api.errors import ApiError, error_response
from tether.gateway import headers as hop
from tether.gateway.routes import upstream_admin
from tether.gateway.upstream import UpstreamFailure
from tether.node import Node

log = logging.getLogger("tether.gateway")


class _TooLarge(Exception):
    pass


async def forward(scope: Scope, receive: Receive, send: Send) -> None:
    node: Node | None = getattr(scope["app"].state, "node", None)
    if node is None or node.gateway is None:
        await _error(scope, receive, send, 503, "NOT_READY", "the router is starting; retry shortly", True)
        return
    gateway = node.gateway
    try:
        principal = await require_principal(Request(scope))
        if gateway.tether_keys and upstream_admin(scope["path"]):
            raise ApiError(
                403, "FORBIDDEN", "the Letta server's admin API is not reachable through Tether keys"
            )
        identity = await gateway.actors.identity(principal) if gateway.actors is not None else None
    except ApiError as exc:
        await error_response(exc.status, exc.code, exc.message, exc.headers)(scope, receive, send)
        return
    except UpstreamFailure as exc:
        await _error(scope, receive, send, exc.status, exc.code, exc.message, exc.retry)
        return
    raw = list(scope["headers"])
    host = next((v for n, v in raw if n == b"host"), None)
    client = scope.get("client")
    outgoing = hop.request_headers(
        raw, hop.Hop(client[0] if client else None, scope.get("scheme", "http"), host), identity
    )
    body = _body(receive, gateway.max_body_bytes) if _has_body(raw) else None
    method = scope["method"]
    try:
        response = await gateway.upstream.open(
            method,
            scope.get("raw_path") or scope["path"].encode(),
            scope.get("query_string", b""),
            outgoing,
            body,
        )
    except UpstreamFailure as exc:
        log.warning("%s %s: %s", method, scope["path"], exc)
        await _error(scope, receive, send, exc.status, exc.code, exc.message, exc.retry)
        return
    except _TooLarge:
        await _error(
            scope,
            receive,
            send,
            413,
            "PAYLOAD_TOO_LARGE",
            f"request body exceeds {gateway.max_body_bytes} bytes",
            False,
        )
        return
    try:
        await _relay(response, receive, send)
    finally:
        await response.aclose()


def _has_body(raw: list[tuple[bytes, bytes]]) -> bool:
    for name, value in raw:
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            return value.strip() not in (b"", b"0")
    return False


async def _body(receive: Receive, limit: int) -> AsyncIterator[bytes]:
    seen = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _TooLarge() if seen > limit else ConnectionAbortedError("client went away mid-request")
        chunk = message.get("body", b"")
        seen += len(chunk)
        if seen > limit:
            raise _TooLarge()
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _relay(response: httpx.Response, receive: Receive, send: Send) -> None:
    """The upstream's response to the client, chunk by chunk; stops when the client goes away.

    The ASGI server ignores writes to a client that left, so without watching for the disconnect a
    Server-Sent Events stream would keep the upstream generating for no one.
    """
    await send(
        {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": hop.response_headers(response.headers.raw),
        }
    )

    async def pump() -> None:
        async for chunk in response.aiter_raw():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def gone() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    pumping = asyncio.ensure_future(pump())
    watching = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (pumping, watching):
            task.cancel()
        # Both finished before the caller closes the upstream response under them.
        pumped, _ = await asyncio.gather(pumping, watching, return_exceptions=True)
    if isinstance(pumped, httpx.HTTPError):
        # The head is out: the only honest signal left is an incomplete body.
        log.warning("upstream response cut short: %r", pumped)
        raise ConnectionAbortedError("upstream response cut short") from pumped
    if isinstance(pumped, Exception):
        raise pumped


async def _error(
    scope: Scope, receive: Receive, send: Send, status: int, code: str, message: str, retry: bool
) -> None:
    response = error_response(status, code, message, {"x-should-retry": "true" if retry else "false"})
    await response(scope, receive, send)
