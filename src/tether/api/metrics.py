"""`GET /metrics`: the router's counters and gauges in the Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import PlainTextResponse

from tether.api.auth import node_of
from tether.metrics import exposition

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> PlainTextResponse:
    """Counters since start and current gauges for this pod (no secrets, no per-tenant data)."""
    node = node_of(request)
    return PlainTextResponse(
        exposition(node.counters, node.gauges(), node.pod_id), media_type="text/plain; version=0.0.4"
    )
