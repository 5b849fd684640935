"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter, Request

from tether.api.auth import node_of
from tether.api.responses import Json
from tether.api.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Json:
    """The process is up."""
    return Json({"status": "ok"})


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "This pod cannot take traffic yet (or any more)."}},
)
async def readyz(request: Request) -> Json:
    """The database (and Redis, in cluster mode) answer: this pod can take traffic."""
    node = node_of(request)
    ok, detail = await node.ready()
    body = {"status": "ready" if ok else "not ready", "detail": detail, "waiting": node.waiting_for}
    return Json(body, status_code=200 if ok else 503)
