"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter, Request

from tether.api.auth import node_of
from tether.api.responses import Json

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> Json:
    """The process is up."""
    return Json({"status": "ok"})


@router.get("/readyz")
async def readyz(request: Request) -> Json:
    """The database (and Redis, in cluster mode) answer: this pod can take traffic."""
    ok, detail = await node_of(request).ready()
    return Json({"status": "ready" if ok else "not ready", "detail": detail}, status_code=200 if ok else 503)
