"""What crosses the gateway in each direction: HTTP's hop-by-hop rules and the forwarding headers.

Pure functions over ASGI-style header lists (lower-case byte names), so they are tested without a
socket. RFC 9110 §7.6.1: the hop-by-hop headers, and any header a `Connection` header names, belong to
one connection and are never forwarded.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

Header = tuple[bytes, bytes]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Recomputed for the upstream connection (httpx sets Host from the upstream URL and Content-Length
# from the body it streams); the client's value describes the hop to Tether.
_REQUEST_REBUILT = frozenset({b"host", b"content-length"})
# Credentials and identity Tether decides, in Tether-keys mode: a client must not choose the
# upstream credential or the upstream user (`user_id` selects the acting user on a Letta server).
IDENTITY = frozenset({b"authorization", b"x-bare-password", b"user_id", b"cookie"})
_FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"})


def _named_by_connection(headers: Iterable[Header]) -> set[bytes]:
    named: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            named.update(token.strip().lower() for token in value.split(b",") if token.strip())
    return named


def end_to_end(headers: list[Header], also_drop: frozenset[bytes] = frozenset()) -> list[Header]:
    """The headers that travel on to the next hop."""
    drop = HOP_BY_HOP | also_drop | _named_by_connection(headers)
    return [(n, v) for n, v in headers if n not in drop]


@dataclass(frozen=True, slots=True)
class Hop:
    """The client's side of one request, as the ASGI server reports it.

    uvicorn already replaced the peer's address and scheme with a trusted proxy's X-Forwarded-For and
    -Proto (`FORWARDED_ALLOW_IPS`, loopback by default), so these are the real client's.
    """

    client_ip: str | None
    scheme: str  # "http" or "https": what the client used to reach Tether
    host: bytes | None  # the client's Host header


def request_headers(headers: list[Header], hop: Hop, identity: list[Header] | None) -> list[Header]:
    """Headers for the upstream request.

    `identity` None passes the client's credentials through (upstream-keys mode); a list replaces
    them (Tether-keys mode: the upstream credential and acting user). Forwarding headers the client
    sent are replaced by what Tether saw, so a client cannot claim another address.
    """
    drop = _REQUEST_REBUILT | _FORWARDED | (IDENTITY if identity is not None else frozenset())
    out = end_to_end(headers, drop)
    if hop.client_ip is not None:
        out.append((b"x-forwarded-for", hop.client_ip.encode()))
    out.append((b"x-forwarded-proto", hop.scheme.encode()))
    if hop.host:
        out.append((b"x-forwarded-host", hop.host))
    if identity:
        out.extend(identity)
    return out


def response_headers(headers: Iterable[Header]) -> list[Header]:
    """Upstream response headers for the client; the ASGI server frames the body itself."""
    return end_to_end(list(headers))
