"""Resume across pods (issue 16, row 7): the client's pod is killed mid-stream, the device's pod
survives, and the client resumes on the survivor with `?resume=&resumeFrom=`.

What the killed pod had written of the socket's history (README "Resume"; TETHER_HISTORY_FLUSH_MS)
comes back exactly, with the original `seq`, none repeated; then `resync_required`, because no pod
numbered the frames the device sent once the client's pod was gone: announced, never a silent gap.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import drop_pg_database, fresh_pg_database, suite_redis_url
from tests.test_cluster import Cluster, Device, pod, wait_online

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

FLUSHED_WITHIN_SECONDS = 1.0  # far above TETHER_HISTORY_FLUSH_MS (20 ms)


async def _frame(ws: ClientConnection) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 10))
    return frame


async def test_a_client_whose_pod_is_killed_resumes_on_the_device_pod(tmp_path: Path) -> None:
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
        relay = await connect(f"{a.ws_base}{path}", additional_headers=a.headers(), max_size=None)
        assert relay.response is not None
        socket_id = relay.response.headers["x-tether-socket-id"]
        await asyncio.sleep(0.5)  # A's watch has reached B (the first frames must cross pods)

        sent = [await device.emit("stream_delta", delta={"text": f"part {i}"}) for i in range(40)]
        seen = [await _frame(relay) for _ in range(15)]  # the client reads 15 of 40, then its pod dies
        assert [f["event_seq"] for f in seen] == sent[:15]
        await asyncio.sleep(FLUSHED_WITHIN_SECONDS)
        await asyncio.to_thread(a.stop, signal.SIGKILL)
        await relay.close()

        last = seen[-1]["seq"]
        query = f"?resume={socket_id}&resumeFrom={last}"
        async with connect(
            f"{b.ws_base}{path}{query}", additional_headers=b.headers(), max_size=None
        ) as again:
            replay = [await _frame(again) for _ in range(25)]
            resync = await _frame(again)
            after = [await device.emit("stream_delta", delta={"text": f"late {i}"}) for i in range(5)]
            live = [await _frame(again) for _ in range(5)]

        # Exactly the frames the client missed, with their original seq, in order.
        assert [f["event_seq"] for f in replay] == sent[15:]
        assert [f["seq"] for f in replay] == list(range(last + 1, last + 26))
        # Then the announcement of what no pod could record, then the live feed, numbered on.
        assert resync["type"] == "resync_required", resync
        assert resync["seq"] == last + 26
        assert [f["event_seq"] for f in live] == after
        assert [f["seq"] for f in live] == list(range(last + 27, last + 32))
        everything = [f["event_seq"] for f in [*seen, *replay, *live]]
        assert len(everything) == len(set(everything))  # none repeated
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
