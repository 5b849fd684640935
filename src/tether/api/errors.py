"""REST errors: always JSON `{"errorCode", "message"}` with the right status, never a bare 500."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import iter_route_contexts
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from tether.api.responses import Json
from tether.api.schemas import ErrorBody, merge_identical_paths
from tether.gateway.upstream import UpstreamFailure
from tether.livestate.base import LiveStateUnavailable

log = logging.getLogger("tether.api")

# Statuses a client may retry; every other error tells the Python SDK not to (x-should-retry).
_RETRYABLE = {408, 429, 503}


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


# What each error status means on this API. Every status a route can answer is documented with the
# ErrorBody model (OpenAPI); a router names the ones all its routes share, a route adds its own.
ERROR_STATUSES = {
    400: "Malformed request: invalid JSON, or a field or parameter outside its documented range.",
    401: "Missing, malformed, unknown or revoked API key.",
    403: "The key's role may not do this (a readonly key acting, a member asking for the cluster).",
    404: "No such resource in the caller's organization.",
    409: "The resource is not in a state that allows this.",
    413: "Request body larger than TETHER_MAX_BODY_BYTES.",
    503: "The database or Redis is unreachable: retry (x-should-retry: true).",
}
# What any route behind an API key may answer, whatever it does.
AUTHENTICATED = (400, 401, 403, 413, 503)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a router or a route: each status an `ErrorBody` with what it means here."""
    return {s: {"model": ErrorBody, "description": ERROR_STATUSES[s]} for s in statuses}


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> Json:
    all_headers = {"x-should-retry": "true" if status in _RETRYABLE else "false", **(headers or {})}
    return Json({"errorCode": code, "message": message}, status_code=status, headers=all_headers)


_HTTP_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
}


def _validation_message(exc: RequestValidationError) -> tuple[str, str]:
    errors = exc.errors()
    if any(err.get("type") == "json_invalid" for err in errors):
        detail = next(
            (err.get("ctx", {}).get("error") for err in errors if err.get("type") == "json_invalid"), None
        )
        return "INVALID_JSON", f"request body is not valid JSON{f': {detail}' if detail else ''}"
    if any(tuple(err.get("loc", ())) == ("body",) and isinstance(err.get("input"), bytes) for err in errors):
        # FastAPI leaves a body it did not parse as bytes: no JSON content type.
        return "INVALID_JSON", "request body must be a JSON object sent with Content-Type: application/json"
    problems = []
    for err in errors[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        problems.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
    return "VALIDATION_ERROR", "; ".join(problems) or "invalid request"


def database_unavailable(exc: BaseException) -> bool:
    """Whether `exc` means the database cannot be reached (not that a query was wrong)."""
    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, OSError)):
        return True
    # A failure to connect carries no statement; a lost connection is flagged as invalidated.
    return isinstance(exc, sa_exc.DBAPIError) and (exc.connection_invalidated or exc.statement is None)


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> Json:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Json:
        code, message = _validation_message(exc)
        return error_response(400, code, message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Json:
        code = _HTTP_CODES.get(exc.status_code, "HTTP_ERROR")
        headers = exc.headers
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": _allowed(app, request.url.path)}
        return error_response(exc.status_code, code, str(exc.detail), headers)

    async def _storage(request: Request, exc: Exception) -> Json:
        if request.scope["type"] != "http":
            raise exc  # sockets handle their own failures; an HTTP answer cannot go out on one
        if database_unavailable(exc):
            log.warning("database unavailable on %s %s: %r", request.method, request.url.path, exc)
            return error_response(503, "DATABASE_UNAVAILABLE", "the database is unreachable; retry shortly")
        return await _unexpected(request, exc)

    async def _live_state(request: Request, exc: Exception) -> Json:
        if request.scope["type"] != "http":
            raise exc  # sockets handle their own failures; an HTTP answer cannot go out on one
        # Raised before anything reached a device, so the client may safely retry.
        log.warning("live state unavailable on %s %s: %r", request.method, request.url.path, exc)
        return error_response(503, "LIVE_STATE_UNAVAILABLE", "Redis is unreachable; retry shortly")

    async def _upstream(request: Request, exc: Exception) -> Json:
        assert isinstance(exc, UpstreamFailure)
        if request.scope["type"] != "http":
            raise exc
        # Upstream-keys mode: the Letta server could not say whether the key is good.
        retry = {"x-should-retry": "true" if exc.retry else "false"}
        return error_response(exc.status, exc.code, exc.message, retry)

    # Handled here rather than by the catch-all below, which Starlette re-raises after answering.
    app.add_exception_handler(UpstreamFailure, _upstream)
    app.add_exception_handler(sa_exc.SQLAlchemyError, _storage)
    app.add_exception_handler(OSError, _storage)
    app.add_exception_handler(LiveStateUnavailable, _live_state)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Json:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "INTERNAL_ERROR", "internal error; see the router log")

    _document_errors_as_json(app)


def _allowed(app: FastAPI, path: str) -> str:
    """The methods served at `path`, as OpenAPI matches a URL: by the routes with the most literal
    segments (`/v1/environments/register` is not also the catch-all `/v1/environments/{deviceId}`),
    all of them, not only the first as Starlette's 405 says (`DELETE` and `GET /v1/environments/{id}`)."""
    best, methods = -1, set()
    for route in iter_route_contexts(app.routes):
        regex, served = getattr(route, "path_regex", None), route.methods
        if not served or regex is None or not regex.match(path):
            continue
        literal = sum(1 for part in str(route.path).split("/") if part and "{" not in part)
        if literal > best:
            best, methods = literal, set(served)
        elif literal == best:
            methods |= served
    return ", ".join(sorted(methods))


def _document_errors_as_json(app: FastAPI) -> None:
    """Every validation failure is a 400 `ErrorBody`: drop FastAPI's generated 422 from the schema
    (and serve one path item per URL shape, see merge_identical_paths)."""
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        schema["paths"] = merge_identical_paths(schema.get("paths", {}))
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        components = schema.get("components", {}).get("schemas", {})
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
