"""Faults under load, the fast subset of `python -m hardening --only faults`: a Redis restart under
two pods with devices on both, sends going through both, and /readyz watched throughout."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Router, start_router
from tests.services import RedisServer, Throwaway, Unavailable
from tether.device.client import Device

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

OUTAGE_SECONDS = 3.0
DEVICES_PER_POD = 2


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own: it is stopped mid-test, so no other test may share it."""
    services = Throwaway()
    try:
        yield services.redis()
    except Unavailable as exc:
        pytest.skip(f"no Redis of the test's own: {exc}")
    finally:
        services.close()


@pytest.fixture
def pods(tmp_path: Path, pg_url: str, private_redis: RedisServer) -> Iterator[list[Router]]:
    started: list[Router] = []
    try:
        for name in ("a", "b"):
            started.append(
                start_router(
                    tmp_path / name,
                    database_url=pg_url,
                    redis_url=private_redis.url,
                    pod_id=f"faults-{name}",
                    create_key=not started,
                )
            )
        for pod in started[1:]:
            pod.key = started[0].key
        yield started
    finally:
        for pod in started:
            pod.stop()


def _tags(device: Device) -> set[str]:
    tags = set()
    for frame in device.received:
        messages = frame.get("messages")
        if frame.get("type") == "message" and isinstance(messages, list) and messages:
            tags.add(str(messages[0].get("client_message_id")))
    return tags


async def _online(pod: Router) -> int:
    async with httpx.AsyncClient(headers=pod.headers(), timeout=5) as http:
        response = await http.get(f"{pod.base_url}/v1/environments", params={"onlineOnly": "true"})
    return len(response.json()["connections"]) if response.status_code == 200 else -1


async def test_redis_restart_loses_no_accepted_send_and_readyz_stays_honest(
    pods: list[Router], private_redis: RedisServer
) -> None:
    devices = [
        Device(pod.base_url, pod.key, f"fault-{pod.pod_id}-{i}", heartbeat_interval=5)
        for pod in pods
        for i in range(DEVICES_PER_POD)
    ]
    for device in devices:
        await device.start()
    await asyncio.gather(*(d.wait_ready(15) for d in devices))
    accepted: dict[str, Device] = {}
    statuses: list[int] = []
    # (began, ended, pod, status) for each /readyz; the outage is known once Redis is stopped.
    readiness: list[tuple[float, float, str, int]] = []
    stop = asyncio.Event()

    async def load() -> None:
        ids = itertools.count()
        async with httpx.AsyncClient(timeout=20) as http:
            while not stop.is_set():
                n = next(ids)
                pod, device = pods[n % len(pods)], devices[n % len(devices)]
                tag = f"t{n}"
                body = {
                    "agentId": "agent-faults",
                    "messages": [{"role": "user", "content": "hi", "client_message_id": tag}],
                }
                with contextlib.suppress(httpx.HTTPError):
                    response = await http.post(
                        f"{pod.base_url}/v1/environments/{device.connection_id}/messages",
                        json=body,
                        headers=pod.headers(),
                    )
                    statuses.append(response.status_code)
                    if response.status_code == 200 and response.json()["success"]:
                        accepted[tag] = device
                await asyncio.sleep(0.03)

    async def probe(pod: Router) -> None:
        async with httpx.AsyncClient(timeout=5) as http:
            while not stop.is_set():
                began = time.monotonic()
                try:
                    status = (await http.get(f"{pod.base_url}/readyz")).status_code
                except httpx.HTTPError:
                    status = 0
                readiness.append((began, time.monotonic(), pod.pod_id, status))
                await asyncio.sleep(0.05)

    workers = [asyncio.create_task(load()), *(asyncio.create_task(probe(p)) for p in pods)]
    try:
        await asyncio.sleep(1.0)
        assert len(accepted) > 5, f"sends do not flow before the fault: {sorted(set(statuses))}"
        await asyncio.to_thread(private_redis.stop)
        down_from = time.monotonic()
        await asyncio.sleep(OUTAGE_SECONDS)
        down_until = time.monotonic()
        await asyncio.to_thread(private_redis.start)
        before = len(accepted)
        deadline = time.monotonic() + 30
        while True:
            latest = {pod: status for _, _, pod, status in readiness[-2 * len(pods) :]}
            online = await asyncio.gather(*(_online(p) for p in pods))
            if (
                set(latest.values()) == {200}
                and online == [len(devices)] * len(pods)
                and len(accepted) > before + 5
            ):
                break
            assert time.monotonic() < deadline, (
                f"not recovered 30 s after Redis came back: readyz {latest}, online {online}, "
                f"{len(accepted) - before} sends accepted since"
            )
            await asyncio.sleep(0.2)
    finally:
        stop.set()
        await asyncio.gather(*workers)
    await asyncio.sleep(0.5)  # the last accepted frames reach their devices
    try:
        during = [(b, p, s) for b, e, p, s in readiness if b > down_from and e < down_until]
        green = [(p, round(b - down_from, 2)) for b, p, s in during if s == 200]
        assert not green, f"/readyz answered 200 while Redis was down: {green[:5]}"
        assert any(s == 503 for _, _, s in during), "no /readyz sample during the outage"
        lost = [tag for tag, device in accepted.items() if tag not in _tags(device)]
        assert not lost, f"{len(lost)} of {len(accepted)} accepted sends never reached their device"
        assert not [s for s in statuses if s >= 500 and s != 503], sorted(set(statuses))
        assert all(p.alive() for p in pods)
    finally:
        await asyncio.gather(*(d.stop() for d in devices))


async def test_rows_cleared_while_a_pod_was_cut_off_come_back_when_it_returns(
    pods: list[Router], private_redis: RedisServer, pg_url: str
) -> None:
    """A partition from Redis longer than the pod TTL: the other pods count the pod dead and clear its
    rows, while its devices stay connected to it. Once it is seen again it must write them back, or
    REST shows those devices offline for good. The partition's aftermath is set up directly: the
    pod's Redis key gone (as its TTL lapsed) and its rows cleared (as the other pod's sweep does)."""
    import redis.asyncio as aioredis
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine

    from tether.redisconn.keys import RedisKeys

    pod = pods[0]
    device = Device(pod.base_url, pod.key, "cut-off", heartbeat_interval=5)
    await device.start()
    try:
        await device.wait_ready(15)
        assert await _online(pod) == 1
        r = aioredis.from_url(private_redis.url)
        await r.delete(RedisKeys().pod(pod.pod_id))
        await r.aclose()
        engine = create_async_engine(pg_url)
        async with engine.begin() as conn:
            cleared = await conn.execute(
                sa.text("UPDATE environments SET pod_id = NULL, connected_at = NULL WHERE pod_id = :p"),
                {"p": pod.pod_id},
            )
        await engine.dispose()
        assert cleared.rowcount == 1
        assert await _online(pods[1]) == 0
        deadline = time.monotonic() + 15
        while await _online(pod) != 1:
            assert time.monotonic() < deadline, "the cleared row was never written back"
            await asyncio.sleep(0.25)
        assert await _online(pods[1]) == 1  # every pod reads the row, not only the one holding it
    finally:
        await device.stop()
