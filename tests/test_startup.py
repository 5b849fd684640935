"""A pod started while Redis or the database is unreachable listens at once, says what it waits for,
refuses work retryably, and becomes ready by itself once the service is back (issue 16, row 6)."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import SERVICES, Router, skip_or_fail, start_router
from tests.services import PostgresServer, RedisServer, Unavailable
from tests.wire import device_url, register

READY_WITHIN_SECONDS = 20  # after the service is back: its retry back-off is at most 2 s


def _private_redis(root: Path) -> RedisServer:
    try:
        return RedisServer(root)  # a port of its own, nothing listening on it until start()
    except Unavailable as exc:
        skip_or_fail(str(exc))


def _private_postgres() -> PostgresServer:
    # Inside the suite's services folder: PostgreSQL runs as another user, who must reach its data.
    root = Path(tempfile.mkdtemp(prefix="startup-", dir=SERVICES.throwaway.root))
    root.chmod(0o711)
    try:
        return PostgresServer(root)
    except Unavailable as exc:
        skip_or_fail(str(exc))


def _wait_ready(router: Router, within: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < within:
        if httpx.get(f"{router.base_url}/readyz", timeout=2).status_code == 200:
            return time.monotonic() - started
        time.sleep(0.1)
    pytest.fail(f"not ready {within} s after the service came back:\n{router.log()}")


def _assert_refuses_work(router: Router, waiting: str) -> None:
    ready = httpx.get(f"{router.base_url}/readyz", timeout=2)
    assert ready.status_code == 503, ready.text
    assert waiting in ready.json()["waiting"], ready.json()
    assert waiting in ready.json()["detail"]
    body = {"deviceId": "d-start", "connectionName": "box"}
    refused = httpx.post(f"{router.base_url}/v1/environments/register", json=body, timeout=2)
    assert refused.status_code == 503, refused.text
    assert refused.headers["x-should-retry"] == "true"
    assert int(refused.headers["retry-after"]) >= 1
    assert set(refused.json()) == {"errorCode", "message"}
    assert waiting in refused.json()["message"]
    listed = httpx.get(f"{router.base_url}/v1/environments", timeout=2)
    assert listed.status_code == 503

    async def device_socket_close() -> tuple[int | None, str | None]:
        url = device_url(f"{router.ws_base}/v1/environments/ws/conn-x", "d-start", "box", channel="control")
        async with connect(url) as ws:
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            return ws.close_code, ws.close_reason

    code, reason = asyncio.run(device_socket_close())
    # 1013 "try again later": devices reconnect after any close but 1008 and the 1000 "Replaced" one.
    assert code == 1013, (code, reason)
    assert reason is not None and waiting in reason


def test_a_pod_started_before_redis_listens_refuses_work_and_becomes_ready(tmp_path: Path) -> None:
    redis = _private_redis(tmp_path)
    started = time.monotonic()
    router = start_router(
        tmp_path / "pod",
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'tether.db'}",
        redis_url=redis.url,
        wait_path="/healthz",
        create_key=False,
    )
    try:
        assert time.monotonic() - started < 15  # listening, without Redis
        assert httpx.get(f"{router.base_url}/healthz", timeout=2).status_code == 200
        _assert_refuses_work(router, "redis")
        redis.start()
        _wait_ready(router, READY_WITHIN_SECONDS)
        key = router.create_key("acme", "alice")
        registered = asyncio.run(register(router.base_url, key))
        assert registered["connectionId"]
        assert "waiting for Redis" in router.log()  # it said what it was waiting for
    finally:
        router.stop()
        redis.stop()


def test_a_pod_started_before_the_database_listens_refuses_work_and_becomes_ready(tmp_path: Path) -> None:
    postgres = _private_postgres()
    url = postgres.admin_url.replace("postgresql:", "postgresql+asyncpg:")
    router = start_router(tmp_path / "pod", database_url=url, wait_path="/healthz", create_key=False)
    try:
        assert httpx.get(f"{router.base_url}/healthz", timeout=2).status_code == 200
        _assert_refuses_work(router, "database")
        postgres.start()
        _wait_ready(router, READY_WITHIN_SECONDS + 30)  # initdb runs first
        key = router.create_key("acme", "alice")
        registered = asyncio.run(register(router.base_url, key))
        assert registered["connectionId"]
    finally:
        router.stop()
        postgres.stop()
