"""Several router pods on one PostgreSQL and one Redis: a device on one pod, its clients on others.

Pods are real `tether serve` processes; the devices are raw WebSocket clients speaking
device-protocol §2 and §4.6 (split sockets with paired generations), so each test controls exactly
when a device reconnects and where to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import (
    SERVICES,
    Router,
    drop_pg_database,
    fresh_pg_database,
    restartable_redis,
    start_router,
    suite_redis_url,
)
from tests.services import RedisServer
from tether.livestate.redis import LIVE_PODS_CACHE_SECONDS

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

POD_TTL = 4.0
# A killed pod's devices read offline within this (the documented bound: pod TTL + pods cache).
OFFLINE_BOUND = POD_TTL + LIVE_PODS_CACHE_SECONDS
DRAIN_SECONDS = 4.0
OUTAGE_SECONDS = 2.0  # how long Redis stays down in the restart test
POD_SETTINGS: dict[str, Any] = {
    "pod_ttl_seconds": POD_TTL,
    "heartbeat_flush_seconds": 1,
    "send_timeout_seconds": 5,
    "shutdown_drain_seconds": DRAIN_SECONDS,
}


async def eventually(check: Callable[[], Awaitable[bool]], within: float, what: str) -> float:
    """Poll until `check` holds; returns how long it took."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > within:
            pytest.fail(f"not within {within}s: {what}")
        await asyncio.sleep(0.1)
    return time.monotonic() - start


class Cluster:
    def __init__(self, workdir: Path, database_url: str, redis_url: str) -> None:
        self.workdir = workdir
        self.database_url = database_url
        self.redis_url = redis_url
        self.run = uuid.uuid4().hex[:6]  # pod ids unique to this run: other tests share the Redis
        self.key = ""
        self.pods: list[Router] = []

    def start(self, *names: str) -> list[Router]:
        """Start pods; the first pod of the cluster starts alone (it migrates the database)."""
        started: list[Router] = []
        if not self.pods:
            first = start_router(
                self.workdir / names[0],
                database_url=self.database_url,
                redis_url=self.redis_url,
                pod_id=f"{names[0]}-{self.run}",
                **POD_SETTINGS,
            )
            self.key = first.key
            self.pods.append(first)
            started.append(first)
            names = names[1:]
        with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
            others = list(pool.map(self._start_one, names))
        self.pods.extend(others)
        return started + others

    def _start_one(self, name: str) -> Router:
        pod = start_router(
            self.workdir / name,
            database_url=self.database_url,
            redis_url=self.redis_url,
            pod_id=f"{name}-{self.run}",
            create_key=False,
            **POD_SETTINGS,
        )
        pod.key = self.key
        return pod

    def stop_all(self) -> None:
        for pod in self.pods:
            pod.stop(signal.SIGKILL)


def start_cluster(workdir: Path, redis_url: str) -> Iterator[Cluster]:
    database_url = fresh_pg_database()
    c = Cluster(workdir, database_url, redis_url)
    try:
        c.start("a", "b", "c")
        yield c
    finally:
        c.stop_all()
        drop_pg_database(database_url)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from start_cluster(tmp_path_factory.mktemp("cluster"), suite_redis_url())


@pytest.fixture
def restartable(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Cluster, RedisServer]]:
    """A cluster on a Redis the suite started, which the test may stop: the module's cluster when it
    runs on one, else (TETHER_TEST_REDIS points at the user's own Redis) a cluster of its own."""
    redis = restartable_redis()
    if SERVICES.redis_setting is None:  # every Redis test runs on this one, the module's cluster too
        yield request.getfixturevalue("cluster"), redis
        return
    for c in start_cluster(tmp_path_factory.mktemp("restartable"), redis.url):
        yield c, redis


def pod(cluster: Cluster, name: str) -> Router:
    return next(p for p in cluster.pods if p.pod_id == f"{name}-{cluster.run}")


class Device:
    """A device process as the router sees it: registration, a control+stream pair, reconnects."""

    def __init__(self, key: str, name: str | None = None) -> None:
        self.key = key
        self.device_id = f"dev-{uuid.uuid4().hex[:10]}"
        self.name = name or self.device_id
        self.connection_id = ""
        self.attempt = 0
        self.event_seq = 0
        self.commands: list[dict[str, Any]] = []  # frames the router sent on control
        self.closes: list[tuple[float, int | None]] = []  # (monotonic time, code) of control closes
        self.control: ClientConnection | None = None
        self.stream: ClientConnection | None = None
        self._readers: list[asyncio.Task[None]] = []
        self.on_close: Callable[[int | None], Awaitable[None]] | None = None

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    async def register(self, pod: Router) -> str:
        body = {
            "deviceId": self.device_id,
            "listenerInstanceId": f"server-{self.device_id}",
            "connectionName": self.name,
            "metadata": {
                "lettaCodeVersion": "0.32.18",
                "os": "linux",
                "environmentMessageProtocol": "v2-input",
            },
        }
        async with httpx.AsyncClient() as http:
            response = await http.post(
                f"{pod.base_url}/v1/environments/register", json=body, headers=self.auth
            )
        assert response.status_code == 200, response.text
        self.connection_id = response.json()["connectionId"]
        return self.connection_id

    async def connect(self, pod: Router) -> None:
        """Open the pair on `pod` (device-protocol §4.6): control, its listener_ready, then stream."""
        self.attempt += 1
        generation = str(uuid.uuid4())
        control = await self._open(pod, "control", generation)
        stream = await self._open(pod, "stream", generation)
        self.control, self.stream = control, stream
        self._readers = [
            asyncio.get_running_loop().create_task(self._read_control(control)),
            asyncio.get_running_loop().create_task(self._drain(stream)),
        ]

    async def _open(self, pod: Router, channel: str, generation: str) -> ClientConnection:
        query = urlencode({
            "deviceId": self.device_id, "connectionName": self.name, "channel": channel,
            "connectionGeneration": generation, "connectionAttempt": self.attempt,
        })  # fmt: skip
        url = f"{pod.ws_base}/v1/environments/ws/{self.connection_id}?{query}"
        ws = await connect(url, additional_headers=self.auth, max_size=None, ping_interval=None)
        ready = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert ready == {
            "type": "listener_ready",
            "connection_generation": generation,
            "connection_attempt": self.attempt,
        }, ready
        return ws

    async def _read_control(self, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                frame = json.loads(message)
                if frame.get("type") not in ("pong", "listener_ready"):
                    self.commands.append(frame)
        except ConnectionClosed:
            pass
        self.closes.append((time.monotonic(), ws.close_code))
        if self.on_close is not None and ws is self.control:
            await self.on_close(ws.close_code)

    async def _drain(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for _ in ws:
                pass

    async def ping(self) -> None:
        assert self.control is not None
        await self.control.send('{"type":"ping"}')

    async def emit(self, kind: str, **fields: Any) -> int:
        """An enveloped event on the stream socket (device-protocol §3.3)."""
        assert self.stream is not None
        self.event_seq += 1
        frame = {
            "type": kind,
            "event_seq": self.event_seq,
            "runtime": {"agent_id": "agent-1", "conversation_id": "default"},
            "idempotency_key": f"{kind}:{self.event_seq}:{uuid.uuid4()}",
            **fields,
        }
        await self.stream.send(json.dumps(frame))
        return self.event_seq

    async def reply(self, frame: dict[str, Any]) -> None:
        assert self.control is not None
        await self.control.send(json.dumps(frame))

    def messages(self) -> list[str]:
        """client_message_ids of the `message` frames delivered to this device, in order."""
        return [
            m["client_message_id"] for c in self.commands if c.get("type") == "message" for m in c["messages"]
        ]

    async def close(self) -> None:
        self.on_close = None
        for ws in (self.control, self.stream):
            if ws is not None:
                await ws.close()
        for task in self._readers:
            task.cancel()


async def rest(pod: Router, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as http:
        return await http.request(method, f"{pod.base_url}{path}", headers=pod.headers(), **kwargs)


async def row_of(pod: Router, device: Device) -> dict[str, Any]:
    response = await rest(pod, "GET", "/v1/environments", params={"limit": 500})
    assert response.status_code == 200, response.text
    return next(r for r in response.json()["connections"] if r["deviceId"] == device.device_id)


def message_body(client_message_id: str) -> dict[str, Any]:
    return {
        "agentId": "agent-1",
        "conversationId": "default",
        "messages": [{"role": "user", "content": "hello", "client_message_id": client_message_id}],
    }


async def online_on(pod: Router, device: Device, owner: Router) -> bool:
    row = await row_of(pod, device)
    return bool(row["connectionId"] == device.connection_id and row["podId"] == owner.pod_id)


async def wait_online(pod: Router, device: Device, owner: Router, within: float = 10) -> None:
    """The device's pair is ready once listener_ready went out; the lease is published just after."""
    what = f"{device.name} online on {owner.pod_id}, seen from {pod.pod_id}"
    await eventually(lambda: online_on(pod, device, owner), within, what)


# ---- a device on A, a client on B --------------------------------------------------------------


async def test_device_on_one_pod_is_listed_retrieved_and_messaged_from_another(cluster: Cluster) -> None:
    a, b = pod(cluster, "a"), pod(cluster, "b")
    device = Device(cluster.key)
    await device.register(a)
    await device.connect(a)
    try:
        await wait_online(b, device, a)
        online = await rest(b, "GET", "/v1/environments", params={"onlineOnly": "true", "limit": 500})
        assert device.connection_id in [r["connectionId"] for r in online.json()["connections"]]
        # The SDK validates the row strictly.
        retrieved = await asyncio.to_thread(b.sdk().environments.retrieve, device.device_id)
        assert retrieved.connection_id == device.connection_id
        assert retrieved.pod_id == a.pod_id

        sent = await rest(
            b, "POST", f"/v1/environments/{device.connection_id}/messages", json=message_body("m-1")
        )
        assert sent.status_code == 200
        assert sent.json() == {"success": True, "message": "Message sent"}
        # success means written: the frame is already on its way to the device.
        await eventually(lambda: _now(device.messages() == ["m-1"]), 5, "the device got the message")
        again = await rest(
            b, "POST", f"/v1/environments/{device.connection_id}/messages", json=message_body("m-1")
        )
        assert again.json()["success"] is True
        await asyncio.sleep(0.5)
        assert device.messages() == ["m-1"]  # delivered once
    finally:
        await device.close()


async def test_relay_socket_on_another_pod_carries_frames_both_ways(cluster: Cluster) -> None:
    a, b = pod(cluster, "a"), pod(cluster, "b")
    device = Device(cluster.key)
    await device.register(a)
    await device.connect(a)
    await wait_online(b, device, a)
    relay_url = f"{b.ws_base}/v1/environments/{device.connection_id}/status/ws?channel=control"
    try:
        async with connect(relay_url, additional_headers=b.headers(), max_size=None) as relay:
            command = {"type": "runtime_start", "request_id": "req-1",
                       "runtime": {"agent_id": "agent-1", "conversation_id": "default"}}  # fmt: skip
            await relay.send(json.dumps(command))
            await eventually(
                lambda: _now(command in device.commands), 5, "the command reached the device on A"
            )

            await device.reply({"type": "runtime_start_response", "request_id": "req-1", "success": True})
            seqs = [await device.emit("stream_delta", delta={"text": f"part {i}"}) for i in range(20)]
            received = [json.loads(await asyncio.wait_for(relay.recv(), 10)) for _ in range(21)]
            assert received[0]["type"] == "runtime_start_response"
            assert received[0]["request_id"] == "req-1"
            assert [f["event_seq"] for f in received[1:]] == seqs
            assert [f["seq"] for f in received] == list(range(received[0]["seq"], received[0]["seq"] + 21))
    finally:
        await device.close()


async def test_a_lease_replaced_through_another_pod_is_refused_where_its_device_dropped(
    cluster: Cluster,
) -> None:
    """Pod A still remembers the dropped device (grace window) and would let it back in from memory;
    the registration on pod B must reach it through live state."""
    a, b = pod(cluster, "a"), pod(cluster, "b")
    device = Device(cluster.key)
    old = await device.register(a)
    await device.connect(a)
    await wait_online(b, device, a)
    await device.close()
    assert await device.register(b) != old
    query = urlencode({"deviceId": device.device_id, "connectionName": device.name, "channel": "control",
                       "connectionGeneration": str(uuid.uuid4()), "connectionAttempt": 2})  # fmt: skip
    url = f"{a.ws_base}/v1/environments/ws/{old}?{query}"
    async with connect(url, additional_headers=device.auth, ping_interval=None) as stale:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(stale.recv(), 10)
        assert stale.close_code == 1008


async def test_relay_commands_follow_a_device_that_moves_to_another_pod(cluster: Cluster) -> None:
    """The client's pod remembers where the device was; after the move its commands still arrive."""
    a, b, c = pod(cluster, "a"), pod(cluster, "b"), pod(cluster, "c")
    device = Device(cluster.key)
    await device.register(a)
    await device.connect(a)
    await wait_online(b, device, a)
    relay_url = f"{b.ws_base}/v1/environments/{device.connection_id}/status/ws"

    async def command_arrives(relay: ClientConnection, request_id: str) -> None:
        command = {"type": "abort_message", "request_id": request_id,
                   "runtime": {"agent_id": "agent-1", "conversation_id": "default"}}  # fmt: skip
        await relay.send(json.dumps(command))
        await eventually(lambda: _now(command in device.commands), 5, f"{request_id} reached the device")

    try:
        async with connect(relay_url, additional_headers=b.headers(), max_size=None) as relay:
            await command_arrives(relay, "before-the-move")
            await device.close()
            await device.connect(c)
            await wait_online(b, device, c)
            await command_arrives(relay, "after-the-move")
            await command_arrives(relay, "and-again")
    finally:
        await device.close()


# ---- a pod dies --------------------------------------------------------------------------------


async def test_killed_pod_devices_go_offline_in_bound_and_reconnect_elsewhere(cluster: Cluster) -> None:
    b, c = pod(cluster, "b"), pod(cluster, "c")
    (victim,) = await asyncio.to_thread(cluster.start, "k")
    stays_away, comes_back = Device(cluster.key), Device(cluster.key)
    for device in (stays_away, comes_back):
        await device.register(victim)
        await device.connect(victim)
    try:
        await wait_online(b, stays_away, victim)
        await wait_online(b, comes_back, victim)
        await asyncio.to_thread(victim.stop, signal.SIGKILL)
        killed = time.monotonic()
        # Like `letta server`: the first reconnect after a ready socket is immediate, same lease.
        await eventually(lambda: _now(len(comes_back.closes) == 1), 10, "the device saw its socket drop")
        await comes_back.connect(c)

        async def offline() -> bool:
            row = await row_of(b, stays_away)
            return row["connectionId"] is None and row["podId"] is None

        await eventually(
            offline, OFFLINE_BOUND + 2 - (time.monotonic() - killed), "killed pod's device offline"
        )
        await wait_online(b, comes_back, c)
        sent = await rest(
            b, "POST", f"/v1/environments/{comes_back.connection_id}/messages", json=message_body("after")
        )
        assert sent.json()["success"] is True
        assert await _settles(lambda: comes_back.messages() == ["after"])
        refused = await rest(
            b, "POST", f"/v1/environments/{stays_away.connection_id}/messages", json=message_body("x")
        )
        assert refused.json() == {"success": False, "message": "Environment is offline"}
    finally:
        await stays_away.close()
        await comes_back.close()


# ---- SIGTERM drain -----------------------------------------------------------------------------


async def test_sigterm_drains_devices_over_the_window_and_they_reconnect_elsewhere(cluster: Cluster) -> None:
    a, b = pod(cluster, "a"), pod(cluster, "b")
    (draining,) = await asyncio.to_thread(cluster.start, "d")
    devices = [Device(cluster.key) for _ in range(12)]
    targets = [(a, b)[i % 2] for i in range(len(devices))]

    async def join(device: Device, target: Router) -> None:
        await device.register(draining)
        await device.connect(draining)

        async def reconnect(code: int | None) -> None:
            await device.connect(target)  # like `letta server`: at once, same lease, via the balancer

        device.on_close = reconnect
        await wait_online(a, device, draining)

    await asyncio.gather(*(join(d, t) for d, t in zip(devices, targets, strict=True)))
    try:
        signalled = time.monotonic()
        await asyncio.to_thread(draining.stop, signal.SIGTERM, DRAIN_SECONDS + 15)
        # uvicorn re-raises the signal once shut down: a clean SIGTERM exit reads as -15.
        assert draining.proc.returncode in (0, -signal.SIGTERM), draining.log()[-3000:]
        await eventually(lambda: _now(all(d.closes for d in devices)), 5, "every device was closed")
        assert [d.closes[0][1] for d in devices] == [1012] * len(devices)
        times = sorted(d.closes[0][0] - signalled for d in devices)
        # Spread over the window with jitter, not all at once (that is a reconnect storm). Twelve closes
        # at random instants of the window span less than 40% of it with probability 3e-4.
        assert times[-1] - times[0] >= DRAIN_SECONDS * 0.4, times
        assert times[-1] <= DRAIN_SECONDS + 2, times
        await asyncio.gather(*(wait_online(b, d, t) for d, t in zip(devices, targets, strict=True)))
    finally:
        for device in devices:
            await device.close()


# ---- Redis restarts ----------------------------------------------------------------------------


async def test_redis_restart_under_load_recovers_without_losing_accepted_messages(
    restartable: tuple[Cluster, RedisServer],
) -> None:
    cluster, redis = restartable
    a, b, c = pod(cluster, "a"), pod(cluster, "b"), pod(cluster, "c")
    device = Device(cluster.key)
    await device.register(a)
    await device.connect(a)
    await wait_online(b, device, a)
    accepted: list[str] = []
    statuses: list[int] = []
    readiness: list[int] = []
    stop = asyncio.Event()

    async def load() -> None:
        i = 0
        async with httpx.AsyncClient(timeout=30, headers=b.headers()) as http:
            while not stop.is_set():
                i += 1
                mid = f"load-{i}"
                path = f"{b.base_url}/v1/environments/{device.connection_id}/messages"
                with contextlib.suppress(httpx.HTTPError):
                    response = await http.post(path, json=message_body(mid))
                    statuses.append(response.status_code)
                    if response.status_code == 200 and response.json()["success"]:
                        accepted.append(mid)
                await asyncio.sleep(0.02)

    async def probe() -> None:
        async with httpx.AsyncClient(timeout=5) as http:
            while not stop.is_set():
                with contextlib.suppress(httpx.HTTPError):
                    readiness.append((await http.get(f"{b.base_url}/readyz")).status_code)
                await asyncio.sleep(0.1)

    relay_url = f"{b.ws_base}/v1/environments/{device.connection_id}/status/ws"
    relay = await connect(relay_url, additional_headers=b.headers(), max_size=None)
    workers = [asyncio.get_running_loop().create_task(w()) for w in (load, probe)]
    try:
        await eventually(lambda: _now(len(accepted) >= 5), 10, "messages flow before the restart")
        try:
            await asyncio.to_thread(redis.stop)
            await asyncio.sleep(OUTAGE_SECONDS)
        finally:
            await asyncio.to_thread(redis.start)
        before = len(accepted)

        async def all_ready() -> bool:
            async with httpx.AsyncClient(timeout=5) as http:
                codes = [(await http.get(f"{p.base_url}/readyz")).status_code for p in (a, b, c)]
            return codes == [200, 200, 200]

        await eventually(all_ready, 30, "every pod ready again")
        await eventually(lambda: _now(len(accepted) >= before + 5), 30, "messages flow again")
        # The relay socket opened before the restart gets the device's frames again.
        got: list[dict[str, Any]] = []

        async def relay_flows() -> bool:
            await device.emit("update_loop_status", status="idle")
            with contextlib.suppress(TimeoutError):
                got.append(json.loads(await asyncio.wait_for(relay.recv(), 0.5)))
            return any(f.get("type") == "update_loop_status" for f in got)

        await eventually(relay_flows, 30, "relay socket receives device frames again")
    finally:
        stop.set()
        for worker in workers:
            await worker
        await relay.close()
        await device.close()
    assert 503 in readiness, "readiness never reported the outage"
    assert all(p.alive() for p in (a, b, c)), "a pod crashed"
    await asyncio.sleep(0.5)
    delivered = device.messages()
    assert [m for m in accepted if m not in delivered] == [], "accepted messages were lost"
    # Each message was posted once: a second copy would be an inbox entry carried out twice.
    assert len(delivered) == len(set(delivered)), "a message was delivered twice"
    assert not [s for s in statuses if s >= 500 and s != 503], f"unexpected statuses: {sorted(set(statuses))}"


async def _now(value: bool) -> bool:
    return value


async def _settles(check: Callable[[], bool], within: float = 5) -> bool:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True
