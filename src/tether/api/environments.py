"""REST routes of the Environments API: register, list, retrieve, send a message, teleport."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import unquote_to_bytes

import orjson
from fastapi import APIRouter, Path, Query, Request, Response
from starlette.convertors import Convertor, register_url_convertor

from tether.api.auth import Caller, node_of
from tether.api.errors import AUTHENTICATED, ApiError, error_responses
from tether.api.responses import Json
from tether.api.schemas import (
    MAX_ID,
    NO_NUL,
    EnvironmentConnection,
    EnvironmentList,
    RegisterRequest,
    RegisterResponse,
    SendMessageRequest,
    SendMessageResponse,
    TeleportRequest,
    TeleportResponse,
    documented,
)
from tether.clock import now_ms
from tether.ops.teleports import TeleportError, teleport_json
from tether.store.base import UnknownCursor


class _Rest(Convertor[str]):
    """The rest of the path, line breaks included: Starlette's `path` stops at one (`.*`), so a
    deviceId registered with a newline could not be read back (its GET fell to DELETE's 405)."""

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("rest", _Rest())

router = APIRouter(
    prefix="/v1/environments", tags=["environments"], responses=error_responses(*AUTHENTICATED)
)

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
MAX_METADATA_BYTES = 64 * 1024
_NOT_FOUND = error_responses(404)


def _parse_limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_LIMIT
    try:
        value = int(text)
    except ValueError:
        raise ApiError(400, "INVALID_LIMIT", f"limit must be an integer from 1 to {MAX_LIMIT}") from None
    if not 1 <= value <= MAX_LIMIT:
        raise ApiError(400, "INVALID_LIMIT", f"limit must be an integer from 1 to {MAX_LIMIT}")
    return value


def _parse_bool(name: str, text: str | None) -> bool:
    if text is None:
        return False
    value = text.strip().lower()
    if value in ("true", "1"):
        return True
    if value in ("false", "0"):
        return False
    raise ApiError(400, f"INVALID_{name.upper()}", f"{name} must be true or false")


async def _json_object(request: Request) -> dict[str, Any]:
    """The body as orjson reads it, after FastAPI validated it with the more lenient stdlib parser.

    orjson refuses what JSON forbids but Python's json accepts (NaN, Infinity, lone surrogates), so
    whatever is stored or forwarded can be serialised again later.
    """
    try:
        value = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "INVALID_JSON", f"request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ApiError(400, "INVALID_JSON", "request body must be a JSON object")
    return value


def ws_base(request: Request) -> str:
    node = node_of(request)
    base = node.settings.public_url or str(request.base_url)
    base = base.rstrip("/")
    if base.startswith("https://"):
        return "wss://" + base[len("https://") :]
    if base.startswith("http://"):
        return "ws://" + base[len("http://") :]
    return base


@router.post("/register", response_model=RegisterResponse)
async def register(body: RegisterRequest, request: Request, caller: Caller) -> Json:
    """Register a device listener slot and lease it a connection (what `letta server` calls)."""
    node = node_of(request)
    raw = await _json_object(request)
    # Store what the device sent, not the model's re-serialisation: metadata is returned verbatim.
    payload = {
        k: raw[k] for k in ("deviceId", "listenerInstanceId", "connectionName") if raw.get(k) is not None
    }
    payload["metadata"] = raw.get("metadata") or {}
    _ = body
    if len(orjson.dumps(payload["metadata"])) > MAX_METADATA_BYTES:
        raise ApiError(
            400, "METADATA_TOO_LARGE", f"metadata must serialise to at most {MAX_METADATA_BYTES} bytes"
        )
    return Json(await node.environments.register(caller, payload, ws_base(request)))


@router.get("", response_model=EnvironmentList)
async def list_environments(
    request: Request,
    caller: Caller,
    after: Annotated[str | None, Query(description="Id of the last row of the previous page.")] = None,
    limit: Annotated[
        str | None,
        Query(
            description=f"Page size, 1-{MAX_LIMIT}; default {DEFAULT_LIMIT}.",
            json_schema_extra=documented({"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}),
        ),
    ] = None,
    onlineOnly: Annotated[
        str | None,
        Query(
            description="true: only online environments.",
            json_schema_extra=documented({"type": "boolean"}),
        ),
    ] = None,
    source: Annotated[
        str | None,
        Query(
            description="remote (relay-backed) or local.",
            json_schema_extra=documented({"type": "string", "enum": ["remote", "local"]}),
        ),
    ] = None,
    userId: Annotated[str | None, Query(description="Only rows of this user.")] = None,
) -> Json:
    """List the organization's environments.

    Ordering is stable: oldest first registration first (`firstSeenAt`, ties broken by `id`); a
    re-registration keeps a row's place. `after` is the `id` of the last row of the previous page; an id
    this organization cannot see is a 400. `limit` defaults to 50 and may be at most 500.
    `onlineOnly=true` keeps only rows whose device socket is open and pinged within 120 s.
    `source=remote` keeps every row (all are relay-backed); `source=local` is always empty.
    """
    page_size = _parse_limit(limit)
    online_only = _parse_bool("onlineOnly", onlineOnly)
    if source not in (None, "remote", "local"):
        raise ApiError(400, "INVALID_SOURCE", "source must be remote or local")
    if source == "local":
        # Every environment Tether knows is relay-backed; local (desktop) ones never reach it.
        return Json({"connections": [], "hasNextPage": False})
    node = node_of(request)
    try:
        rows, more = await node.environments.page(
            caller.org_id, page_size, after or None, userId, online_only
        )
    except UnknownCursor:
        raise ApiError(
            400, "INVALID_CURSOR", "after must be the id of an environment from a previous page"
        ) from None
    return Json({"connections": rows, "hasNextPage": more})


@router.post("/{connectionId}/messages", response_model=SendMessageResponse, responses=_NOT_FOUND)
async def send_message(
    body: SendMessageRequest,
    request: Request,
    caller: Caller,
    connectionId: Annotated[str, Path(min_length=1)],
) -> Json:
    """Hand messages to the device holding this lease. `success` means written to its socket."""
    node = node_of(request)
    row = await node.environments.in_org(caller, connectionId)
    if row is None:
        raise ApiError(404, "CONNECTION_NOT_FOUND", f"no connection {connectionId!r} in this organization")
    raw = await _json_object(request)  # forwarded untouched, not as re-serialised by the model
    forwarded: dict[str, Any] = {k: raw[k] for k in ("agentId", "conversationId", "messages") if k in raw}
    _ = body
    outcome = await node.sending.send_message(caller, row, forwarded)
    if outcome.duplicate:
        return Json({"success": True, "message": "Message already delivered"})
    if not outcome.delivered:
        return Json({"success": False, "message": outcome.reason})
    return Json({"success": True, "message": "Message sent"})


@router.post(
    "/runtimes/{agentId}/{conversationId}/teleport",
    response_model=TeleportResponse,
    status_code=202,
    responses=error_responses(404, 409),
)
async def teleport(
    body: TeleportRequest,
    request: Request,
    caller: Caller,
    agentId: Annotated[str, Path(min_length=1, max_length=MAX_ID, pattern=NO_NUL)],
    conversationId: Annotated[str, Path(min_length=1, max_length=MAX_ID, pattern=NO_NUL)],
) -> Json:
    """Move a conversation's runtime to another environment; poll `teleports/{id}` for the outcome."""
    await _json_object(request)
    if conversationId in ("default", "new"):
        raise ApiError(400, "INVALID_CONVERSATION", "teleport needs an explicit conversation id")
    node = node_of(request)
    try:
        row = await node.teleports.create(
            caller,
            agentId,
            conversationId,
            body.targetConnectionId,
            body.idempotencyKey,
            body.sourceConnectionId,
        )
    except TeleportError as exc:
        raise ApiError(exc.status, exc.code, exc.message) from None
    return Json(teleport_json(row, now_ms()), status_code=202)


@router.get(
    "/runtimes/{agentId}/{conversationId}/teleports/{teleportId}",
    response_model=TeleportResponse,
    responses=_NOT_FOUND,
)
async def get_teleport(
    request: Request,
    caller: Caller,
    agentId: str,
    conversationId: str,
    teleportId: str,
) -> Json:
    row = await node_of(request).store.get_teleport(caller.org_id, teleportId)
    if row is None or row.agent_id != agentId or row.conversation_id != conversationId:
        raise ApiError(404, "TELEPORT_NOT_FOUND", f"no teleport {teleportId!r} for this conversation")
    return Json(teleport_json(row, now_ms()))


@router.delete("/{environmentId}", status_code=204, responses=_NOT_FOUND)
async def delete_environment(
    request: Request,
    caller: Caller,
    environmentId: Annotated[str, Path(min_length=1, max_length=MAX_ID, description="The row's `id`.")],
) -> Response:
    """Delete an environment row by its `id`. A device still connected is closed with 1008 and
    re-registers, creating a fresh row."""
    if not await node_of(request).environments.delete(caller.org_id, environmentId):
        raise ApiError(404, "ENVIRONMENT_NOT_FOUND", f"no environment with id {environmentId!r}")
    return Response(status_code=204)


@router.get("/{deviceId:rest}", response_model=EnvironmentConnection, responses=_NOT_FOUND)
async def retrieve_environment(
    request: Request,
    caller: Caller,
    deviceId: Annotated[str, Path(min_length=1, description="The device's stable `deviceId`.")],
) -> Json:
    """One environment by its stable deviceId (the freshest listener slot when several share it)."""
    # The ASGI path is already percent-decoded, so `%2F` inside an id would read as a separator:
    # take the id from the raw path instead. Registered last, so it never shadows other routes.
    raw_path: bytes = request.scope.get("raw_path") or b""
    prefix = b"/v1/environments/"
    if raw_path.startswith(prefix):
        deviceId = unquote_to_bytes(raw_path[len(prefix) :]).decode("utf-8", "replace")
    row = await node_of(request).environments.get(caller.org_id, deviceId)
    if row is None:
        raise ApiError(404, "ENVIRONMENT_NOT_FOUND", f"no environment with deviceId {deviceId!r}")
    return Json(row)
