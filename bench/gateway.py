"""Gateway SSE pass-through: the delay Tether adds to each Server-Sent Event of a real Letta server.

The upstream is the real Letta server 0.16.8 (tests/letta_upstream.py) on its stand-in model, which
streams one word per chunk `CHUNK_DELAY_S` apart and records when it wrote each. The same streamed
turn (`POST /v1/agents/{id}/messages/stream`, `stream_tokens`) is read directly from the Letta server
and through Tether, in alternating rounds; an event's latency is its arrival at the client minus the
moment the model wrote its word (one clock: the model runs in this process). The target compares the
two p50s: Tether may add at most 1 ms.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx

from bench.core import Figure, Run, percentile
from bench.servers import Server, start_tether

CHUNK_DELAY_S = 0.005
WORDS = 80
TARGET_ADDED_US = 1000.0


def _not_measured(run: Run, why: str) -> None:
    run.add(
        Figure(
            "gateway_sse_added_p50",
            "gateway: delay added per SSE event, p50",
            "µs",
            "≤ direct p50 + 1 ms",
            note=f"not measured: {why}"[:400],
        )
    )


def _turn(base_url: str, headers: dict[str, str], agent_id: str, upstream: Any, tag: str) -> list[float]:
    """One streamed turn; per content event, arrival minus the model's write of that word (µs)."""
    model = upstream.fake_model
    model.emitted.clear()
    words = " ".join(f"{tag}{i}" for i in range(WORDS))
    body = {"messages": [{"role": "user", "content": words}], "stream_tokens": True}
    arrivals: list[tuple[str, float]] = []
    with httpx.stream(
        "POST", f"{base_url}/v1/agents/{agent_id}/messages/stream", json=body, headers=headers, timeout=120
    ) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("message_type") == "assistant_message" and event.get("content"):
                arrivals.append((str(event["content"]), time.monotonic()))
    emitted = list(model.emitted)
    latencies: list[float] = []
    # The model's pieces and the server's events are the same words in the same order.
    for (text, arrived), (piece, written) in zip(arrivals, emitted, strict=False):
        if text.strip() == piece.strip():
            latencies.append((arrived - written) * 1e6)
    return latencies


async def measure(run: Run) -> None:
    try:
        from tests.letta_upstream import LettaServer, LettaServerUnavailable
    except ImportError as exc:
        _not_measured(run, f"tests/letta_upstream.py not importable: {exc!r}")
        return
    run.say("gateway: a real Letta server 0.16.8, streamed turns read directly and through Tether")
    upstream = LettaServer(password="bench-upstream")
    tether: Server | None = None
    try:
        try:
            await asyncio.to_thread(upstream.start)
        except LettaServerUnavailable as exc:
            _not_measured(run, f"the Letta server did not start: {str(exc).splitlines()[0]}")
            return
        tether = await start_tether(
            run.workdir / "gateway", "gateway", letta_url=upstream.url, letta_api_key=upstream.password or ""
        )
        direct_headers = upstream.headers()
        via_headers = {"Authorization": f"Bearer {tether.key}"}
        direct_agent = await asyncio.to_thread(upstream.create_agent, "bench-direct")
        async with httpx.AsyncClient(timeout=60) as client:
            created = await client.post(
                f"{tether.base_url}/v1/agents/",
                json={"name": "bench-via", "model": upstream.model, "agent_type": "letta_v1_agent"},
                headers=via_headers,
            )
        via_agent = created.json()["id"]
        upstream.fake_model.chunk_delay_s = CHUNK_DELAY_S
        direct: list[float] = []
        via: list[float] = []
        rounds = run.scaled(8, 2)
        for i in range(rounds):
            direct += await asyncio.to_thread(
                _turn, upstream.url, direct_headers, direct_agent, upstream, f"d{i}w"
            )
            via += await asyncio.to_thread(_turn, tether.base_url, via_headers, via_agent, upstream, f"v{i}w")
        if not direct or not via:
            _not_measured(run, f"no events matched (direct {len(direct)}, through Tether {len(via)})")
            return
        d50, v50 = percentile(direct, 50), percentile(via, 50)
        added = v50 - d50
        figure = Figure(
            "gateway_sse_added_p50",
            "gateway: delay added per SSE event, p50",
            "µs",
            "≤ direct p50 + 1 ms",
            value=v50,
            baseline=d50,
            ratio=v50 / d50 if d50 else None,
            note=f"{len(via)} events through Tether, {len(direct)} direct, {rounds} alternating rounds of "
            f"{WORDS}-word turns ({CHUNK_DELAY_S * 1000:.0f} ms between words at the model); model write "
            f"to client arrival: direct p50 {d50:.0f} µs p99 {percentile(direct, 99):.0f} µs, through "
            f"Tether p50 {v50:.0f} µs p99 {percentile(via, 99):.0f} µs; added p50 {added:.0f} µs",
            detail={
                "direct": {f"p{q}": percentile(direct, q) for q in (50, 90, 99)},
                "via_tether": {f"p{q}": percentile(via, q) for q in (50, 90, 99)},
                "added_p50_us": added,
            },
        )
        figure.passed = added <= TARGET_ADDED_US
        if not figure.passed:
            figure.miss = f"{added:.0f} µs added at p50 (allowed {TARGET_ADDED_US:.0f} µs)"
        run.add(figure)
        run.sections["gateway_problems"] = tether.problems()[:20]
    finally:
        upstream.fake_model.chunk_delay_s = 0.0
        if tether is not None:
            tether.stop()
        await asyncio.to_thread(upstream.stop)
