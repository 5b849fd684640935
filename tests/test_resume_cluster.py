"""Resume across pods (issue 16, row 7): the client's pod is killed mid-stream while the device
keeps streaming, and the client resumes on the survivor with `?resume=&resumeFrom=`.

It gets every frame it missed, exactly once, numbered on: those its socket had sent (from the
record the killed pod wrote, README "Resume"), those the killed pod numbered but never wrote, and
those the device sent once that pod was gone (both from the connection's event log, which the
device's pod writes). `resync_required` only when the gap exceeds the history bounds.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import Router, drop_pg_database, fresh_pg_database, suite_redis_url
from tests.test_cluster import Cluster, Device, pod, wait_online

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

FLUSHED_WITHIN_SECONDS = 1.0  # far above TETHER_HISTORY_FLUSH_MS (20 ms)
HISTORY_FRAMES = 1000  # TETHER_HISTORY_FRAMES's default: what the event log keeps per connection


async def _frame(ws: ClientConnection) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 10))
    return frame


SCOPE = "agentId=agent-1&conversationId=default"  # the conversation `Device.emit` runs in


async def _stream(device: Device, count: int, label: str, mixed: bool = False) -> list[int]:
    """Device events; with `mixed`, every third goes to another conversation. The numbers of those
    in the default conversation (a socket scoped to it gets only these)."""
    sent = []
    for i in range(count):
        if mixed and i % 3 == 2:
            other = {"agent_id": "agent-1", "conversation_id": "other"}
            await device.emit("stream_delta", delta={"text": f"{label} {i}"}, runtime=other)
        else:
            sent.append(await device.emit("stream_delta", delta={"text": f"{label} {i}"}))
        if i % 10 == 9:
            await asyncio.sleep(0.01)  # a steady stream, not one burst
    return sent


async def _killed_mid_stream(
    cluster: Cluster, after_kill: int, scoped: bool = False, third_pod: bool = False
) -> tuple[Router, Device, str, list[dict[str, Any]], list[int]]:
    """Device on B (or, with `third_pod`, on C), client on A reading 15 frames; A is SIGKILLed
    while the device streams on, and the device sends `after_kill` more once A is gone. The pod to
    resume on (B), what the client saw and all it was due."""
    await asyncio.to_thread(cluster.start, "a", "b", *(["c"] if third_pod else []))
    a, b = pod(cluster, "a"), pod(cluster, "b")
    home = pod(cluster, "c") if third_pod else b
    device = Device(cluster.key)
    await device.register(home)
    await device.connect(home)
    await wait_online(a, device, home)
    path = f"/v1/environments/{device.connection_id}/status/ws"
    url = f"{a.ws_base}{path}?{SCOPE}" if scoped else f"{a.ws_base}{path}"
    relay = await connect(url, additional_headers=a.headers(), max_size=None)
    assert relay.response is not None
    socket_id = relay.response.headers["x-tether-socket-id"]
    await asyncio.sleep(0.5)  # A's watch has reached B (the first frames must cross pods)
    sent = await _stream(device, 40, "part", scoped)
    seen = [await _frame(relay) for _ in range(15)]  # the client reads 15, then its pod dies
    assert [f["device_event_seq" if scoped else "event_seq"] for f in seen] == sent[:15]
    await asyncio.sleep(FLUSHED_WITHIN_SECONDS)
    streaming = asyncio.create_task(_stream(device, 60, "during", scoped))
    await asyncio.sleep(0.05)  # mid-stream: A numbers frames it will never write
    await asyncio.to_thread(a.stop, signal.SIGKILL)
    sent += await streaming
    await relay.close()
    sent += await _stream(device, after_kill, "after", scoped)
    return b, device, socket_id, seen, sent


# The unscoped case with the device on the surviving pod itself runs 20 times in `make hardening`'s
# resume row; these add what it does not: a scope (in `make test`), the device on a third pod (slow).
@pytest.mark.parametrize(
    ("scoped", "third_pod"),
    [(True, False), pytest.param(False, True, marks=pytest.mark.slow)],
    ids=["scoped", "device-on-a-third-pod"],
)
async def test_a_client_whose_pod_is_killed_mid_stream_gets_every_missed_frame_once(
    scoped: bool, third_pod: bool, tmp_path: Path
) -> None:
    database_url = await asyncio.to_thread(fresh_pg_database)
    cluster = Cluster(tmp_path, database_url, suite_redis_url())
    device: Device | None = None
    key = "device_event_seq" if scoped else "event_seq"  # a scoped feed renumbers event_seq
    try:
        b, device, socket_id, seen, sent = await _killed_mid_stream(cluster, 50, scoped, third_pod)
        last = seen[-1]["seq"]
        path = f"/v1/environments/{device.connection_id}/status/ws"
        query = f"?resume={socket_id}&resumeFrom={last}{'&' + SCOPE if scoped else ''}"
        async with connect(
            f"{b.ws_base}{path}{query}", additional_headers=b.headers(), max_size=None
        ) as again:
            missed = len(sent) - 15
            replay = [await _frame(again) for _ in range(missed)]
            live_sent = await _stream(device, 6, "live", scoped)
            live = [await _frame(again) for _ in range(len(live_sent))]

        # Every frame the client missed, in order, numbered on from what it had read: the record's,
        # the killed pod's unwritten tail, and what the device sent after it died.
        assert [f.get("type") for f in replay] == ["stream_delta"] * missed, replay
        assert [f[key] for f in replay] == sent[15:]
        assert [f["seq"] for f in replay] == list(range(last + 1, last + 1 + missed))
        # Then the live feed, without a gap or a repeat at the hand-over.
        assert [f[key] for f in live] == live_sent
        assert [f["seq"] for f in live] == list(range(last + 1 + missed, last + 1 + missed + len(live)))
        everything = [*seen, *replay, *live]
        assert [f[key] for f in everything] == [*sent, *live_sent]  # none lost, none repeated
        if scoped:  # the scope's own numbering goes on across the resume, without a hole
            assert [f["event_seq"] for f in everything] == list(range(1, len(everything) + 1))
    finally:
        if device is not None:
            await device.close()
        await asyncio.to_thread(cluster.stop_all)
        await asyncio.to_thread(drop_pg_database, database_url)


async def test_a_gap_beyond_the_history_bound_is_announced_then_live(tmp_path: Path) -> None:
    database_url = await asyncio.to_thread(fresh_pg_database)
    cluster = Cluster(tmp_path, database_url, suite_redis_url())
    device: Device | None = None
    try:
        # The device sends far more than the event log keeps once the client's pod is gone.
        b, device, socket_id, seen, sent = await _killed_mid_stream(cluster, 3 * HISTORY_FRAMES)
        last = seen[-1]["seq"]
        path = f"/v1/environments/{device.connection_id}/status/ws"
        query = f"?resume={socket_id}&resumeFrom={last}"
        async with connect(
            f"{b.ws_base}{path}{query}", additional_headers=b.headers(), max_size=None
        ) as again:
            frames = []
            while (frame := await _frame(again))["type"] != "resync_required":
                frames.append(frame)
            resync = frame
            live_sent = await _stream(device, 5, "live")
            live = [await _frame(again) for _ in range(5)]
        # What the record held comes back exactly, then the announcement, then the live feed.
        assert [f["event_seq"] for f in frames] == sent[15 : 15 + len(frames)]
        assert len(frames) < len(sent) - 15
        assert resync["seq"] == last + len(frames) + 1
        assert [f["event_seq"] for f in live] == live_sent
        assert [f["seq"] for f in live] == list(range(resync["seq"] + 1, resync["seq"] + 6))
    finally:
        if device is not None:
            await device.close()
        await asyncio.to_thread(cluster.stop_all)
        await asyncio.to_thread(drop_pg_database, database_url)


async def test_a_resume_token_of_another_key_is_not_resumed_on_another_pod(tmp_path: Path) -> None:
    database_url = await asyncio.to_thread(fresh_pg_database)
    cluster = Cluster(tmp_path, database_url, suite_redis_url())
    device: Device | None = None
    try:
        await asyncio.to_thread(cluster.start, "a", "b")
        a, b = pod(cluster, "a"), pod(cluster, "b")
        device = Device(cluster.key)
        await device.register(b)
        await device.connect(b)
        await wait_online(a, device, b)
        path = f"/v1/environments/{device.connection_id}/status/ws"
        async with connect(f"{a.ws_base}{path}", additional_headers=a.headers(), max_size=None) as relay:
            assert relay.response is not None
            socket_id = relay.response.headers["x-tether-socket-id"]
            await asyncio.sleep(0.5)
            await device.emit("stream_delta", delta={"text": "secret"})
            await _frame(relay)
            await asyncio.sleep(FLUSHED_WITHIN_SECONDS)
        other = await asyncio.to_thread(b.create_key, "acme", "mallory")  # same organization, another key
        query = f"?resume={socket_id}&resumeFrom=0"
        headers = {"Authorization": f"Bearer {other}"}
        async with connect(f"{b.ws_base}{path}{query}", additional_headers=headers, max_size=None) as again:
            first = await _frame(again)
        assert first["type"] == "resync_required" and "secret" not in json.dumps(first)
    finally:
        if device is not None:
            await device.close()
        await asyncio.to_thread(cluster.stop_all)
        await asyncio.to_thread(drop_pg_database, database_url)
