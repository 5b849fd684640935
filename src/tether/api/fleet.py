"""The fleet API at `/v1/tether` (issue 15): who am I, the fleet listing, one environment, its
trace, disconnect, mode change, pods and teleports. README "Fleet API and roles"."""

from __future__ import annotations

import re
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, Request

from tether.api.auth import Caller, node_of
from tether.api.errors import AUTHENTICATED, ApiError, error_responses
from tether.api.responses import Json
from tether.api.schemas import MAX_COUNT, documented
from tether.clock import now_ms
from tether.livestate.base import LiveStateUnavailable
from tether.ops.fleet import LEGACY_MODES, PERMISSION_MODES, FleetError, ListRequest
from tether.ops.teleports import teleport_json
from tether.protocol.fleetstate import STATES, parse_states
from tether.protocol.roles import may_see_pods, may_trace
from tether.store.base import FleetFilter
from tether.store.fleet import SORTS

router = APIRouter(prefix="/v1/tether", tags=["fleet"], responses=error_responses(*AUTHENTICATED))

DEFAULT_LIMIT = 50
MAX_LIMIT = 200
MAX_QUERY_CHARS = 200
_NOT_FOUND = error_responses(404)
_CONNECTED = error_responses(404, 409)  # acts on the device: it must hold a socket
_STATE = "|".join(STATES)
_STATES_PATTERN = f"^({_STATE})(,({_STATE}))*$"
_MODE_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["mode"],
                "properties": {
                    "mode": {"type": "string", "enum": [*PERMISSION_MODES, *LEGACY_MODES]},
                    "agentId": {"type": "string", "minLength": 1},
                    "conversationId": {"type": "string", "minLength": 1},
                },
            }
        }
    },
}


def _count(low: int, high: int = MAX_COUNT) -> Any:
    return documented({"type": "integer", "minimum": low, "maximum": high})


def _int(name: str, text: str | None, default: int, low: int, high: int = MAX_COUNT) -> int:
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ApiError(400, f"INVALID_{name.upper()}", f"{name} must be an integer from {low} to {high}")
    return value


def _failed(exc: FleetError) -> ApiError:
    return ApiError(exc.status, exc.code, exc.message)


async def _body(request: Request) -> dict[str, Any]:
    try:
        value = orjson.loads(await request.body() or b"{}")
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "INVALID_JSON", f"request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ApiError(400, "INVALID_JSON", "request body must be a JSON object")
    return value


@router.get("/whoami")
async def whoami(request: Request, caller: Caller) -> Json:
    org, user = await node_of(request).store.principal_names(caller.org_id, caller.user_id)
    return Json(
        {
            "keyId": caller.key_id,
            "orgId": caller.org_id,
            "orgName": org,
            "userId": caller.user_id,
            "userName": user,
            "role": caller.role,
        }
    )


@router.get("/environments")
async def list_environments(
    request: Request,
    caller: Caller,
    limit: Annotated[
        str | None,
        Query(description=f"1-{MAX_LIMIT}, default {DEFAULT_LIMIT}", json_schema_extra=_count(1, MAX_LIMIT)),
    ] = None,
    offset: Annotated[
        str | None, Query(description="rows to skip, >= 0", json_schema_extra=_count(0))
    ] = None,
    sort: Annotated[
        str | None,
        Query(description=" | ".join(SORTS), json_schema_extra=documented({"enum": list(SORTS)})),
    ] = None,
    order: Annotated[
        str | None, Query(description="asc | desc", json_schema_extra=documented({"enum": ["asc", "desc"]}))
    ] = None,
    q: Annotated[
        str | None,
        Query(
            description="case-insensitive substring",
            json_schema_extra=documented({"type": "string", "maxLength": MAX_QUERY_CHARS}),
        ),
    ] = None,
    state: Annotated[
        str | None,
        Query(
            description="online,connecting,away,offline (any of)",
            json_schema_extra=documented({"type": "string", "pattern": _STATES_PATTERN}),
        ),
    ] = None,
    userId: Annotated[str | None, Query()] = None,
) -> Json:
    """One page of the organization's environments with their live state and the counts by state."""
    sort_by = "firstSeenAt" if sort is None else sort
    if sort_by not in SORTS:
        raise ApiError(400, "INVALID_SORT", f"sort must be one of {', '.join(SORTS)}")
    if order not in (None, "asc", "desc"):
        raise ApiError(400, "INVALID_ORDER", "order must be asc or desc")
    if q is not None and len(q) > MAX_QUERY_CHARS:
        raise ApiError(400, "INVALID_QUERY", f"q must be at most {MAX_QUERY_CHARS} characters")
    try:
        if state is not None and not re.fullmatch(_STATES_PATTERN, state):
            raise ValueError(f"state must be a comma-separated list of {', '.join(STATES)}")
        states = parse_states(state)
    except ValueError as exc:
        raise ApiError(400, "INVALID_STATE", str(exc)) from None
    req = ListRequest(
        filter=FleetFilter(caller.org_id, q or None, userId or None),
        states=states,
        sort=sort_by,
        desc=order == "desc",
        offset=_int("offset", offset, 0, 0),
        limit=_int("limit", limit, DEFAULT_LIMIT, 1, MAX_LIMIT),
    )
    return Json(await node_of(request).fleet.page(req))


@router.get("/environments/{environmentId}", responses=_NOT_FOUND)
async def get_environment(request: Request, caller: Caller, environmentId: str) -> Json:
    """One environment: its row with state, metadata and its connection history (newest first)."""
    try:
        return Json(await node_of(request).fleet.detail(caller.org_id, environmentId))
    except FleetError as exc:
        raise _failed(exc) from None
    except LiveStateUnavailable as exc:
        raise ApiError(503, "LIVE_STATE_UNAVAILABLE", str(exc)) from None


@router.get("/environments/{environmentId}/trace", responses=_NOT_FOUND)
async def trace(
    request: Request,
    caller: Caller,
    environmentId: str,
    after: Annotated[str | None, Query(json_schema_extra=_count(0))] = None,
    contents: Annotated[str | None, Query(json_schema_extra=documented({"enum": ["true", "false"]}))] = None,
) -> Json:
    """The frames through this environment since `after`; each poll keeps tracing armed for 30 s."""
    if contents not in (None, "true", "false"):
        raise ApiError(400, "INVALID_CONTENTS", "contents must be true or false")
    seq = _int("after", after, 0, 0)
    fleet = node_of(request).fleet
    try:
        row = await fleet.row(caller.org_id, environmentId)
    except FleetError as exc:
        raise _failed(exc) from None
    if not may_trace(caller.role, caller.user_id, row.user_id):
        raise ApiError(403, "FORBIDDEN", "only an admin, or the member whose user registered it, traces it")
    return Json(fleet.trace(row, seq, contents == "true"))


@router.post("/environments/{environmentId}/disconnect", status_code=202, responses=_CONNECTED)
async def disconnect(request: Request, caller: Caller, environmentId: str) -> Json:
    """Close the device's sockets with a transient code: it reconnects to the same lease."""
    fleet = node_of(request).fleet
    try:
        await fleet.disconnect(await fleet.row(caller.org_id, environmentId))
    except FleetError as exc:
        raise _failed(exc) from None
    return Json({"disconnected": True}, status_code=202)


@router.post(
    "/environments/{environmentId}/mode",
    status_code=202,
    responses=_CONNECTED,
    openapi_extra={"requestBody": _MODE_BODY},
)
async def change_mode(request: Request, caller: Caller, environmentId: str) -> Json:
    """Send the device `change_device_state` with the permission mode (and the scope, if given)."""
    body = await _body(request)
    fleet = node_of(request).fleet
    try:
        await fleet.change_mode(await fleet.row(caller.org_id, environmentId), body)
    except FleetError as exc:
        raise _failed(exc) from None
    return Json({"mode": body["mode"], "sent": True}, status_code=202)


@router.get("/pods")
async def pods(request: Request, caller: Caller) -> Json:
    """Every live pod of the cluster with its figures (admin keys only)."""
    if not may_see_pods(caller.role):
        raise ApiError(403, "FORBIDDEN", "only an admin key sees the cluster")
    return Json({"pods": await node_of(request).fleet.pods()})


@router.get("/teleports")
async def teleports(
    request: Request,
    caller: Caller,
    limit: Annotated[str | None, Query(json_schema_extra=_count(1, MAX_LIMIT))] = None,
) -> Json:
    """The organization's recent teleports, newest first."""
    n = _int("limit", limit, DEFAULT_LIMIT, 1, MAX_LIMIT)
    rows = await node_of(request).store.list_teleports(caller.org_id, n)
    now = now_ms()
    return Json({"items": [teleport_json(r, now) for r in rows]})
