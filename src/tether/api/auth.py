"""Bearer-key authentication for REST routes and socket upgrades."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tether.api.errors import ApiError
from tether.node import Node
from tether.protocol.roles import may_act
from tether.store.base import Principal


def bearer(headers: Mapping[str, str], query: Mapping[str, str] | None = None) -> str | None:
    """The key from `Authorization: Bearer`, else from `?token=` (browsers); the header wins."""
    value = headers.get("authorization")
    if value:
        scheme, _, token = value.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    if query is not None:
        from_query = query.get("token")
        if from_query:
            return from_query
    return None


_READS = frozenset({"GET", "HEAD", "OPTIONS"})
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="tether"'}


def node_of(request: Request) -> Node:
    node: Node = request.app.state.node
    return node


async def require_principal(request: Request) -> Principal:
    secret = bearer(request.headers)
    if secret is None:
        raise ApiError(401, "UNAUTHORIZED", "missing API key: send Authorization: Bearer <key>", _CHALLENGE)
    principal = await node_of(request).auth.resolve(secret)
    if principal is None:
        raise ApiError(401, "UNAUTHORIZED", "invalid or revoked API key", _CHALLENGE)
    if request.method not in _READS and not may_act(principal.role):
        # The one role check of every REST write (and of writes forwarded in gateway mode).
        raise ApiError(403, "FORBIDDEN", f"a {principal.role} key may look but not act")
    return principal


# Declares the scheme in OpenAPI (clients and fuzzers then know every route below needs a key); the
# key itself is read by require_principal, which the gateway calls without FastAPI.
_SCHEME = HTTPBearer(auto_error=False, description="A Tether API key (`tether keys create`).")


async def _caller(
    request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Security(_SCHEME)]
) -> Principal:
    principal = await require_principal(request)
    # After the key, like every other validation error. The routes read one value per parameter;
    # taking the last one silently would accept what the schema calls invalid (a list for a number).
    query = request.query_params
    if len(query) != len(query.multi_items()):
        repeated = sorted({k for k, _ in query.multi_items() if len(query.getlist(k)) > 1})
        raise ApiError(400, "REPEATED_PARAMETER", f"give each query parameter once: {', '.join(repeated)}")
    return principal


# The principal of a REST route behind an API key, its query parameters each given once.
Caller = Annotated[Principal, Depends(_caller)]
