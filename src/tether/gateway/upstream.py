"""The pooled HTTP client to the upstream Letta server, and what its failures mean to a client.

One `httpx.AsyncClient` per pod: keep-alive connections are reused across requests, bounded by
`TETHER_LETTA_MAX_CONNECTIONS`. Bodies are streamed in both directions; nothing here buffers one.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable
from dataclasses import dataclass
from typing import Any

import httpx

log = logging.getLogger("tether.gateway")
# httpx logs every request at INFO: a line per forwarded request would drown the router's own log.
logging.getLogger("httpx").setLevel(logging.WARNING)

Header = tuple[bytes, bytes]

# Methods a client may safely repeat: a failure after the request left may be retried only for these.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
HEALTH_PATH = "/v1/health/"
# Below the upstream's own keep-alive timeout (uvicorn's default is 5 s), so a pooled connection is
# dropped here before the server closes it under a request.
KEEPALIVE_EXPIRY_S = 4.0


@dataclass(frozen=True)
class UpstreamFailure(Exception):
    """The upstream could not answer: the JSON error a client gets instead, and whether to retry."""

    status: int
    code: str
    message: str
    retry: bool

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


def failure(exc: httpx.HTTPError, method: str, where: str) -> UpstreamFailure:
    """Map a transport error to the answer a client can act on.

    `x-should-retry: true` only when repeating cannot run a request twice: nothing reached the
    upstream (connect failed, no free connection), or the method is idempotent.
    """
    again = method in IDEMPOTENT
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return UpstreamFailure(
            502, "UPSTREAM_UNREACHABLE", f"cannot connect to the Letta server at {where}: {_why(exc)}", True
        )
    if isinstance(exc, httpx.PoolTimeout):
        return UpstreamFailure(
            503, "UPSTREAM_BUSY", "every connection to the Letta server is in use; retry shortly", True
        )
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamFailure(
            504, "UPSTREAM_TIMEOUT", f"the Letta server at {where} did not answer in time", again
        )
    return UpstreamFailure(
        502,
        "UPSTREAM_CONNECTION_LOST",
        f"the connection to the Letta server at {where} failed: {_why(exc)}",
        again,
    )


def _why(exc: BaseException) -> str:
    text = str(exc)
    return text if text else type(exc).__name__


class Upstream:
    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        max_connections: int,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._base = httpx.URL(self.base_url)
        self._prefix = self._base.raw_path.rstrip(b"/")
        timeout = httpx.Timeout(
            connect=connect_timeout_s, read=read_timeout_s, write=read_timeout_s, pool=connect_timeout_s
        )
        limits = httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=KEEPALIVE_EXPIRY_S,
        )
        self._client = httpx.AsyncClient(
            timeout=timeout,
            limits=limits,
            # One retry of a failed connect only (nothing was sent): a pooled socket the server just
            # closed, or a restart in progress.
            transport=httpx.AsyncHTTPTransport(limits=limits, retries=1),
            follow_redirects=False,
            trust_env=False,
        )

    def url(self, raw_path: bytes, query: bytes = b"") -> httpx.URL:
        target = self._prefix + raw_path
        if query:
            target += b"?" + query
        return self._base.copy_with(raw_path=target)

    async def open(
        self,
        method: str,
        raw_path: bytes,
        query: bytes,
        headers: list[Header],
        body: AsyncIterable[bytes] | None,
    ) -> httpx.Response:
        """Send the request and return once the response head arrived; the body is left to stream."""
        request = self._client.build_request(method, self.url(raw_path, query), headers=headers, content=body)
        try:
            return await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise failure(exc, method, self.base_url) from exc

    async def call(self, method: str, path: str, headers: dict[str, str], json: Any = None) -> httpx.Response:
        """A small request Tether makes itself (credential checks, provisioning), read whole."""
        try:
            return await self._client.request(method, self.url(path.encode()), headers=headers, json=json)
        except httpx.HTTPError as exc:
            raise failure(exc, method, self.base_url) from exc

    async def health(self, timeout_s: float) -> tuple[bool, str]:
        try:
            response = await self._client.get(self.url(HEALTH_PATH.encode()), timeout=timeout_s)
        except httpx.HTTPError as exc:
            return False, f"Letta server at {self.base_url} unreachable: {_why(exc)}"
        if response.status_code != 200:
            return False, f"Letta server at {self.base_url} answered {response.status_code} on {HEALTH_PATH}"
        return True, "ok"

    async def close(self) -> None:
        await self._client.aclose()
