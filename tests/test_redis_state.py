"""The Redis live state and bus against the real Redis on 127.0.0.1:6379, two "pods" in one process.

Each test uses its own key prefix and deletes only its own keys: other tests share the server.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from redis.asyncio import Redis

from tether.bus.redis import RedisBus
from tether.clock import now_ms
from tether.config import Settings
from tether.livestate.redis import FLUSH_INTERVAL_SECONDS, LIVE_PODS_CACHE_SECONDS, RedisLiveState
from tether.protocol.events import DeviceEvent, DeviceState
from tether.protocol.frames import decode
from tether.redisconn.cancel import stop_tasks

pytestmark = pytest.mark.redis


async def eventually(check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within}s: {what}")
        await asyncio.sleep(0.05)


@dataclass
class Devices:
    """This pod's side of the bus for the tests: a few fake device sockets (a BusHandler)."""

    connected: set[str] = field(default_factory=set)
    written: list[tuple[str, str]] = field(default_factory=list)
    closed: list[tuple[str, int, str]] = field(default_factory=list)
    events: list[tuple[str, DeviceEvent]] = field(default_factory=list)
    # Whether a socket takes a write in the same turn of the loop (else the bus awaits the write).
    at_once: bool = True

    def write_to_device_now(self, connection_id: str, text: str) -> bool:
        return self.at_once and self._write(connection_id, text)

    async def write_to_device(self, connection_id: str, text: str) -> bool:
        await asyncio.sleep(0)  # a socket that had to wait for its turn
        return self._write(connection_id, text)

    def _write(self, connection_id: str, text: str) -> bool:
        if connection_id not in self.connected:
            return False
        self.written.append((connection_id, text))
        return True

    def on_device_event(self, connection_id: str, event: DeviceEvent) -> None:
        self.events.append((connection_id, event))

    async def close_device(self, connection_id: str, code: int, reason: str) -> bool:
        if connection_id not in self.connected:
            return False
        self.connected.discard(connection_id)
        self.closed.append((connection_id, code, reason))
        return True


@dataclass
class Pod:
    live: RedisLiveState
    bus: RedisBus
    devices: Devices


class Cluster:
    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.prefix = f"tether-test-{uuid.uuid4().hex[:8]}:"
        self.pods: list[Pod] = []

    async def pod(self, name: str, **settings: Any) -> Pod:
        config = Settings(redis_url=self.redis_url, pod_id=name, **settings)
        live = RedisLiveState(config, prefix=self.prefix)
        bus = RedisBus(config, prefix=self.prefix)
        devices = Devices()
        bus.bind(devices)
        await live.start()
        await bus.start()
        pod = Pod(live, bus, devices)
        self.pods.append(pod)
        return pod

    async def stop(self, pod: Pod) -> None:
        if pod in self.pods:
            self.pods.remove(pod)
            await pod.bus.close()
            await pod.live.close()

    async def close(self) -> None:
        for pod in list(self.pods):
            await self.stop(pod)
        client = Redis.from_url(self.redis_url)
        try:
            keys = [k async for k in client.scan_iter(match=f"{self.prefix}*", count=1000)]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


@pytest.fixture
async def cluster(redis_url: str) -> AsyncIterator[Cluster]:
    c = Cluster(redis_url)
    try:
        yield c
    finally:
        await c.close()


# ---- live state -------------------------------------------------------------------------------


async def test_lease_on_one_pod_is_seen_with_fresh_heartbeats_on_another(cluster: Cluster) -> None:
    a = await cluster.pod("a")
    b = await cluster.pod("b")
    t0 = now_ms()
    await a.live.device_connected("conn-1", "a", t0)

    seen = await b.live.lookup(["conn-1", "conn-unknown"])
    assert set(seen) == {"conn-1"}
    assert seen["conn-1"].pod_id == "a"
    assert seen["conn-1"].connected_at == t0

    a.live.heartbeat("conn-1", t0 + 5000)
    assert a.live.take_dirty() == {"conn-1": t0 + 5000}
    assert a.live.take_dirty() == {}

    async def heartbeat_visible() -> bool:
        return (await b.live.lookup(["conn-1"]))["conn-1"].last_heartbeat == t0 + 5000

    await eventually(heartbeat_visible, FLUSH_INTERVAL_SECONDS + 2, "A's heartbeat visible on B")
    assert await b.live.live_pods() >= {"a", "b"}


async def test_leases_of_a_pod_that_is_not_alive_read_as_absent(cluster: Cluster) -> None:
    b = await cluster.pod("b")
    # A lease written by a pod that never refreshed its liveness (it died right after).
    await b.live.device_connected("conn-ghost", "ghost-pod", now_ms())
    assert await b.live.lookup(["conn-ghost"]) == {}


async def test_a_gracefully_stopped_pod_withdraws_its_leases(cluster: Cluster) -> None:
    a = await cluster.pod("a")
    b = await cluster.pod("b")
    await a.live.device_connected("conn-1", "a", now_ms())
    assert "conn-1" in await b.live.lookup(["conn-1"])
    await cluster.stop(a)
    assert await b.live.lookup(["conn-1"]) == {}


async def test_a_killed_pod_reads_dead_within_its_ttl(cluster: Cluster) -> None:
    a = await cluster.pod("a", pod_ttl_seconds=1.5)
    b = await cluster.pod("b", pod_ttl_seconds=1.5)
    await a.live.device_connected("conn-1", "a", now_ms())
    assert "a" in await b.live.live_pods()
    # A stops refreshing without withdrawing anything, as after kill -9 (the full kill is in
    # test_cluster; here only the live state's refresh loop stops).
    assert a.live._task is not None
    await stop_tasks([a.live._task])
    died = time.monotonic()

    async def gone() -> bool:
        return await b.live.lookup(["conn-1"]) == {} and "a" not in await b.live.live_pods()

    await eventually(gone, 1.5 + LIVE_PODS_CACHE_SECONDS + 2, "A's lease absent on B")
    assert time.monotonic() - died >= 0.5  # it was alive until its key expired, not dropped at once


async def test_the_old_owner_cannot_erase_or_overwrite_a_lease_that_moved(cluster: Cluster) -> None:
    a = await cluster.pod("a")
    b = await cluster.pod("b")
    t0 = now_ms()
    await a.live.device_connected("conn-1", "a", t0)
    await b.live.device_connected("conn-1", "b", t0 + 10)  # the device reconnected through B
    a.live.heartbeat("conn-1", t0 + 99_000)  # A's half-open socket still pings
    await a.live.device_disconnected("conn-1", "a")
    await asyncio.sleep(FLUSH_INTERVAL_SECONDS + 0.5)
    seen = (await a.live.lookup(["conn-1"]))["conn-1"]
    assert seen.pod_id == "b"
    assert seen.last_heartbeat == t0 + 10


async def test_claims_are_exclusive_across_pods_until_released(cluster: Cluster) -> None:
    a = await cluster.pod("a")
    b = await cluster.pod("b")
    assert await a.live.claim("msg:conn-1:m1")
    assert not await b.live.claim("msg:conn-1:m1")
    assert not await a.live.claim("msg:conn-1:m1")
    await a.live.release("msg:conn-1:m1")
    assert await b.live.claim("msg:conn-1:m1")


async def test_a_claim_reads_pending_on_every_pod_until_its_claimant_confirms_it(cluster: Cluster) -> None:
    a = await cluster.pod("a")
    b = await cluster.pod("b")
    assert await b.live.claim_state("msg:conn-1:m2") is None
    assert await a.live.claim("msg:conn-1:m2")
    assert await b.live.claim_state("msg:conn-1:m2") is False  # a retry on B waits for A's outcome
    await a.live.confirm("msg:conn-1:m2")
    assert await b.live.claim_state("msg:conn-1:m2") is True
    assert not await b.live.claim("msg:conn-1:m2")
    await a.live.confirm("msg:conn-1:never-claimed")  # confirming creates no claim
    assert await b.live.claim_state("msg:conn-1:never-claimed") is None


async def test_runtime_location_noted_on_one_pod_is_found_on_another(cluster: Cluster) -> None:
    a = await cluster.pod("a")
    b = await cluster.pod("b")
    a.live.note_runtime("org", "agent-1", "default", "conn-7")
    assert await a.live.runtime_location("org", "agent-1", "default") == "conn-7"

    async def visible() -> bool:
        return await b.live.runtime_location("org", "agent-1", "default") == "conn-7"

    await eventually(visible, FLUSH_INTERVAL_SECONDS + 2, "runtime note visible on B")
    assert await b.live.runtime_location("org", "agent-2", "default") is None


async def test_state_lost_by_redis_is_republished_by_its_owner(cluster: Cluster) -> None:
    a = await cluster.pod("a", pod_ttl_seconds=1.5)
    b = await cluster.pod("b", pod_ttl_seconds=1.5)
    t0 = now_ms()
    await a.live.device_connected("conn-1", "a", t0)
    # What a Redis restart without persistence does to this cluster's keys.
    client = Redis.from_url(cluster.redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{cluster.prefix}*")]
        await client.delete(*keys)
    finally:
        await client.aclose()
    assert a.live.healthy

    async def back() -> bool:
        seen = await b.live.lookup(["conn-1"])
        return "conn-1" in seen and seen["conn-1"].connected_at == t0

    await eventually(back, 1.5 + 3, "A re-published its lease")


# ---- bus --------------------------------------------------------------------------------------


# Whether the device's socket takes a frame in the same turn of the loop or the write has to wait.
either_socket = pytest.mark.parametrize("at_once", [True, False], ids=["socket-takes-it", "socket-busy"])


async def pods_a_and_b_with_a_device_on_a(cluster: Cluster, at_once: bool) -> tuple[Pod, Pod]:
    a = await cluster.pod("a")
    b = await cluster.pod("b")
    a.devices.at_once = at_once
    a.devices.connected.add("conn-1")
    return a, b


@either_socket
async def test_a_command_sent_from_another_pod_is_written_once_and_acknowledged(
    cluster: Cluster, at_once: bool
) -> None:
    a, b = await pods_a_and_b_with_a_device_on_a(cluster, at_once)
    assert b.bus.healthy

    assert await b.bus.send_to_device("conn-1", "a", '{"type":"message","n":1}')
    assert await b.bus.send_to_device("conn-1", "a", '{"type":"message","n":2}')
    assert a.devices.written == [
        ("conn-1", '{"type":"message","n":1}'),
        ("conn-1", '{"type":"message","n":2}'),
    ]
    assert not await b.bus.send_to_device("conn-absent", "a", "{}")
    assert b.devices.written == []


@either_socket
async def test_commands_keep_their_order_and_concurrent_ones_arrive_once(
    cluster: Cluster, at_once: bool
) -> None:
    a, b = await pods_a_and_b_with_a_device_on_a(cluster, at_once)
    # A relay socket sends its commands one after the other: they arrive in that order.
    texts = [f'{{"type":"message","n":{i}}}' for i in range(100)]
    for text in texts:
        assert await b.bus.send_to_device("conn-1", "a", text)
    assert [t for _, t in a.devices.written] == texts
    # Many callers at once (REST sends from several clients): each is written exactly once.
    a.devices.written.clear()
    burst = [f'{{"type":"message","burst":{i}}}' for i in range(300)]
    results = await asyncio.gather(*(b.bus.send_to_device("conn-1", "a", t) for t in burst))
    assert all(results)
    assert sorted(t for _, t in a.devices.written) == sorted(burst)


async def test_a_command_to_a_pod_that_is_not_alive_is_not_delivered(cluster: Cluster) -> None:
    b = await cluster.pod("b", send_timeout_seconds=30)
    assert not await b.bus.send_to_device("conn-1", "no-such-pod", "{}")


async def test_closing_a_device_on_another_pod(cluster: Cluster) -> None:
    a = await cluster.pod("a")
    b = await cluster.pod("b")
    a.devices.connected.add("conn-1")
    assert await b.bus.close_device("conn-1", "a", 1000, "Replaced by new connection")
    assert a.devices.closed == [("conn-1", 1000, "Replaced by new connection")]
    assert not await b.bus.close_device("conn-1", "a", 1000, "again")


async def test_watching_pod_receives_device_events_in_order(cluster: Cluster) -> None:
    a = await cluster.pod("a")
    b = await cluster.pod("b")
    await a.live.device_connected("conn-1", "a", now_ms())
    await b.bus.watch("conn-1")
    frames = [decode(f'{{"type":"stream_delta","event_seq":{i},"delta":"x{i}"}}') for i in range(1, 51)]
    a.bus.publish("conn-1", DeviceEvent(state=DeviceState.ONLINE))
    for frame in frames:
        a.bus.publish("conn-1", DeviceEvent(frame=frame))
    a.bus.publish("conn-1", DeviceEvent(frame=decode('{"type":"x"}'), gap_before=True))

    async def all_arrived() -> bool:
        return len(b.devices.events) == 52

    await eventually(all_arrived, 5, "B received A's events")
    events = [e for _, e in b.devices.events]
    assert events[0].state is DeviceState.ONLINE
    assert [e.frame.text for e in events[1:51] if e.frame] == [f.text for f in frames]
    assert not any(e.gap_before for e in events[:51])
    assert events[51].gap_before
    assert a.devices.events == []  # the publisher's own watchers are served by its hub, not the bus


async def test_each_pod_gets_the_events_of_every_device_it_watches_but_not_its_own(cluster: Cluster) -> None:
    a = await cluster.pod("a")
    b = await cluster.pod("b")
    c = await cluster.pod("c")
    for pod in (a, b):
        await pod.bus.watch("conn-on-a")
        await pod.bus.watch("conn-on-c")
    await b.bus.watch("conn-unwatched-later")
    await b.bus.unwatch("conn-unwatched-later")
    a.bus.publish("conn-on-a", DeviceEvent(frame=decode('{"type":"from-a"}')))
    c.bus.publish("conn-on-c", DeviceEvent(frame=decode('{"type":"from-c"}')))
    c.bus.publish("conn-unwatched-later", DeviceEvent(frame=decode('{"type":"nobody"}')))

    def types(pod: Pod) -> list[tuple[str, str]]:
        return sorted((cid, e.frame.type) for cid, e in pod.devices.events if e.frame is not None)

    await eventually(lambda: _true(len(b.devices.events) == 2 and len(a.devices.events) == 1), 5, "events")
    await asyncio.sleep(0.3)  # nothing more arrives
    assert types(b) == [("conn-on-a", "from-a"), ("conn-on-c", "from-c")]
    assert types(a) == [("conn-on-c", "from-c")]  # its own event went to its hub only
    assert c.devices.events == []


async def test_events_are_not_written_for_connections_no_other_pod_watches(cluster: Cluster) -> None:
    a = await cluster.pod("a")
    await a.bus.watch("conn-1")  # watched only by the pod that publishes
    a.bus.publish("conn-1", DeviceEvent(frame=decode('{"type":"x"}')))
    a.bus.publish("conn-2", DeviceEvent(frame=decode('{"type":"x"}')))
    await asyncio.sleep(0.5)
    client = Redis.from_url(cluster.redis_url)
    try:
        assert await client.exists(a.bus.keys.pod_events("a")) == 0
        assert [key async for key in client.scan_iter(f"{cluster.prefix}*events*")] == []
    finally:
        await client.aclose()


async def test_unwatched_connections_stop_delivering(cluster: Cluster) -> None:
    a = await cluster.pod("a")
    b = await cluster.pod("b")
    await b.bus.watch("conn-1")
    a.bus.publish("conn-1", DeviceEvent(frame=decode('{"type":"one"}')))
    await eventually(lambda: _true(len(b.devices.events) == 1), 5, "first event")
    await b.bus.unwatch("conn-1")
    a.bus.publish("conn-1", DeviceEvent(frame=decode('{"type":"two"}')))
    await asyncio.sleep(0.5)
    assert len(b.devices.events) == 1


async def test_a_command_from_a_new_watcher_gets_its_answer_despite_the_watchers_cache(
    cluster: Cluster,
) -> None:
    a = await cluster.pod("a")
    b = await cluster.pod("b")
    a.devices.connected.add("conn-1")
    await a.live.device_connected("conn-1", "a", now_ms())
    # A just published with nobody watching, so it remembers "no watchers" for a while.
    a.bus.publish("conn-1", DeviceEvent(frame=decode('{"type":"before"}')))
    await asyncio.sleep(0.1)
    await b.bus.watch("conn-1")
    assert await b.bus.send_to_device("conn-1", "a", '{"type":"runtime_start","request_id":"r1"}')
    a.bus.publish("conn-1", DeviceEvent(frame=decode('{"type":"runtime_start_response","request_id":"r1"}')))
    await eventually(lambda: _true(len(b.devices.events) == 1), 5, "the answer reached B")
    frame = b.devices.events[0][1].frame
    assert frame is not None and frame.type == "runtime_start_response"


async def _true(value: bool) -> bool:
    return value
