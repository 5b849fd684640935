"""`GET /metrics` in the Prometheus text format, the REST timing middleware, and the database hook.

The values are recorded in plain Python where they happen (tether/metrics.py); at scrape time a
`prometheus_client` collector turns them, and the gauges read from the hub, into metric families, and
the library writes the exposition (format and label escaping are its job).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterable, Iterator
from dataclasses import fields
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import event
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tether import __version__
from tether.api.auth import node_of
from tether.bus.redis import RedisBus
from tether.livestate.redis import RedisLiveState
from tether.metrics import COUNTER_HELP, REQUEST_BUCKETS, Histogram, Histograms
from tether.node import Node
from tether.store.sql import SqlStore

router = APIRouter(tags=["health"])

# The route label of a request no route matched (any path: one label, not one per path tried).
UNMATCHED = "unmatched"


def install(app: FastAPI) -> None:
    """`/metrics`, and the middleware timing every REST request (outermost, so errors are timed too)."""
    requests = Histograms(REQUEST_BUCKETS)
    app.state.request_durations = requests
    app.include_router(router)
    app.add_middleware(RequestDurations, histograms=requests)


def instrument(node: Node) -> None:
    """Count the node's database errors where SQLAlchemy sees each one (connects and statements)."""
    if isinstance(node.store, SqlStore):
        counters = node.counters

        def failed(_: Any) -> None:
            counters.database_errors += 1

        event.listen(node.store.engine.sync_engine, "handle_error", failed)


class RequestDurations:
    """A pure ASGI middleware: the duration of each HTTP request by method, route template, status."""

    def __init__(self, app: ASGIApp, histograms: Histograms) -> None:
        self.app = app
        self.histograms = histograms

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app fails before answering

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED
            self.histograms.of((scope["method"], template, str(status))).observe(
                time.perf_counter() - started
            )


@router.get(
    "/metrics",
    include_in_schema=True,
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request) -> Response:
    """Counters since start, current gauges and histograms for this pod (no secrets, no per-tenant data)."""
    node = node_of(request)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node, request.app.state.request_durations))
    registry.register(ProcessCollector(registry=None))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


class NodeCollector(Collector):
    """The node's values as metric families, every one labelled with the pod."""

    def __init__(self, node: Node, requests: Histograms) -> None:
        self.node = node
        self.requests = requests

    def collect(self) -> Iterable[Metric]:
        node, pod = self.node, self.node.pod_id
        counters = node.counters
        info = GaugeMetricFamily(
            "tether_build_info",
            "The running build: Tether and Python versions.",
            labels=["pod", "version", "python"],
        )
        info.add_metric([pod, __version__, platform.python_version()], 1)
        yield info
        for f in fields(counters):
            help_text = COUNTER_HELP.get(f.name)
            if help_text is not None:
                yield _counter(f"tether_{f.name}", help_text, pod, getattr(counters, f.name))
        yield from self._outcomes(pod)
        disconnects = CounterMetricFamily(
            "tether_device_disconnects",
            "Device sockets closed, by WebSocket close code (either side's).",
            labels=["pod", "code"],
        )
        for code, n in sorted(counters.device_disconnects.counts.items()):
            disconnects.add_metric([pod, code], n)
        yield disconnects
        yield _histogram(
            "tether_frame_latency_seconds",
            "Device frame hand-off to a relay socket until written to it (one observation per write).",
            ["pod"],
            [([pod], counters.frame_latency)],
        )
        yield _histogram(
            "tether_http_request_duration_seconds",
            "REST request duration by method, route template and status.",
            ["pod", "method", "route", "status"],
            [([pod, *labels], h) for labels, h in sorted(self.requests.by_labels.items())],
        )
        yield _counter(
            "tether_redis_errors",
            "Redis calls that failed (live state and the bus's readers).",
            pod,
            self._redis(),
        )
        if isinstance(node.bus, RedisBus):
            yield _histogram(
                "tether_bus_lag_seconds",
                "Device event publish (owning pod) to read (watching pod), by wall clock.",
                ["pod"],
                [([pod], node.bus.lag)],
            )
        yield from self._gauges(pod)

    def _outcomes(self, pod: str) -> Iterator[Metric]:
        c = self.node.counters
        registered = c.registrations - c.registrations_failed
        reg = CounterMetricFamily(
            "tether_registration_outcomes", "Device registrations by outcome.", labels=["pod", "outcome"]
        )
        reg.add_metric([pod, "new_lease"], registered - c.registrations_replacing)
        reg.add_metric([pod, "replaced_lease"], c.registrations_replacing)
        reg.add_metric([pod, "failed"], c.registrations_failed)
        yield reg
        sends = CounterMetricFamily(
            "tether_sends",
            "Frames to devices by origin (REST message, relay command) and outcome.",
            labels=["pod", "origin", "outcome"],
        )
        sends.add_metric([pod, "message", "delivered"], c.messages_delivered)
        sends.add_metric([pod, "message", "offline"], c.messages_offline)
        sends.add_metric([pod, "message", "deduplicated"], c.messages_deduplicated)
        sends.add_metric([pod, "command", "delivered"], c.relay_commands)
        sends.add_metric([pod, "command", "refused"], c.relay_commands_refused)
        yield sends
        resumes = CounterMetricFamily(
            "tether_relay_resumes",
            "Relay socket resume attempts: hit (replayed), history_gone (resync_required), miss (unknown).",
            labels=["pod", "outcome"],
        )
        resumes.add_metric([pod, "hit"], c.resume_hits)
        resumes.add_metric([pod, "history_gone"], c.resume_history_gone)
        resumes.add_metric([pod, "miss"], c.resume_misses)
        yield resumes

    def _redis(self) -> int:
        node = self.node
        failures = 0
        if isinstance(node.live, RedisLiveState):
            failures += node.live.health.failures
        if isinstance(node.bus, RedisBus):
            failures += node.bus.redis_failures
        return failures

    def _gauges(self, pod: str) -> Iterator[Metric]:
        node = self.node
        for name, (help_text, value) in node.gauges().items():
            yield _gauge(f"tether_{name}", help_text, pod, value)
        states = dict.fromkeys(("online", "connecting", "away"), 0)
        device_sockets = 0
        for link in node.hub.links():
            held = len(link.lease.sockets())
            device_sockets += held
            states["online" if link.ready else "connecting" if held else "away"] += 1
        devices = GaugeMetricFamily(
            "tether_devices",
            "Device leases on this pod by state: online (ready pair), connecting (a socket, not ready), "
            "away (no socket, within the grace window).",
            labels=["pod", "state"],
        )
        for state, n in states.items():
            devices.add_metric([pod, state], n)
        yield devices
        watches = node.hub.watches()
        sockets = GaugeMetricFamily(
            "tether_sockets", "Sockets open on this pod by kind.", labels=["pod", "kind"]
        )
        sockets.add_metric([pod, "device"], device_sockets)
        sockets.add_metric([pod, "relay"], sum(len(w.sockets) for w in watches))
        sockets.add_metric([pod, "relay_detached"], sum(len(w.detached) for w in watches))
        yield sockets


def _counter(name: str, help_text: str, pod: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, help_text, labels=["pod"])
    family.add_metric([pod], value)
    return family


def _gauge(name: str, help_text: str, pod: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help_text, labels=["pod"])
    family.add_metric([pod], value)
    return family


def _histogram(
    name: str, help_text: str, labels: list[str], series: list[tuple[list[str], Histogram]]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, help_text, labels=labels)
    for values, h in series:
        family.add_metric(values, h.cumulative(), h.sum)
    return family
