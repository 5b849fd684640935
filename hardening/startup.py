"""Row "cold_start": a pod started while Redis is down listens at once and becomes ready by itself.

Figures: time from `tether serve` to /healthz 200 (listening) with Redis down; that /readyz is 503
naming redis and a registration 503 retryable meanwhile; time from Redis answering again to /readyz 200.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
from tests.conftest import start_router
from tests.services import RedisServer, Throwaway

from hardening.core import Row, Run

ROUNDS = 5  # at scale 1
LISTEN_BOUND_SECONDS = 5.0
READY_BOUND_SECONDS = 5.0  # after Redis answers (the waits back off to at most 1-2 s)


async def measure(run: Run) -> None:
    row = Row("cold_start", "Cold start while Redis is down")
    rounds = run.scaled(ROUNDS, 1)
    row.faults = f"Redis not running when the pod starts ({rounds} times), started later"
    row.bound = (
        f"listening within {LISTEN_BOUND_SECONDS:.0f} s; ready within {READY_BOUND_SECONDS:.0f} s of Redis"
    )
    throwaway = Throwaway()
    listen: list[float] = []
    ready: list[float] = []
    refused = 0
    try:
        for n in range(rounds):
            redis = RedisServer(throwaway.root)
            throwaway.servers.append(redis)
            workdir = run.workdir / f"cold-{n}"
            started = time.monotonic()
            router = await asyncio.to_thread(
                start_router, workdir, database_url=f"sqlite+aiosqlite:///{workdir / 't.db'}",
                redis_url=redis.url, wait_path="/healthz", create_key=False,
            )  # fmt: skip
            listen.append(time.monotonic() - started)
            try:
                async with httpx.AsyncClient(base_url=router.base_url, timeout=2) as http:
                    readyz = await http.get("/readyz")
                    register = await http.post("/v1/environments/register", json={"deviceId": "d"})
                    if readyz.status_code != 503 or "redis" not in readyz.json().get("waiting", []):
                        row.fail(f"round {n}: /readyz answered {readyz.status_code} {readyz.text}")
                    if register.status_code == 503 and register.headers.get("x-should-retry") == "true":
                        refused += 1
                    else:
                        row.fail(f"round {n}: register answered {register.status_code} while starting")
                    await asyncio.to_thread(redis.start)
                    back = time.monotonic()
                    while (await http.get("/readyz")).status_code != 200:
                        if time.monotonic() - back > 30:
                            row.fail(f"round {n}: not ready 30 s after Redis answered")
                            break
                        await asyncio.sleep(0.05)
                    ready.append(time.monotonic() - back)
            finally:
                await asyncio.to_thread(router.stop)
                redis.stop()
    finally:
        throwaway.close()
    row.inputs = {"cold starts": rounds, "registrations refused retryably": refused}
    row.lost = (
        f"listening after {statistics.median(listen):.2f} s (median; max {max(listen):.2f}), ready "
        f"{statistics.median(ready):.2f} s after Redis (median; max {max(ready):.2f})"
    )
    row.detail = {"listen_s": listen, "ready_s": ready}
    if max(listen) > LISTEN_BOUND_SECONDS:
        row.fail(f"listening took {max(listen):.2f} s")
    if ready and max(ready) > READY_BOUND_SECONDS:
        row.fail(f"ready {max(ready):.2f} s after Redis answered")
    run.add(row.judge())
