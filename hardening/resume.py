"""Row "resume": a client's pod is killed with SIGKILL while a device streams to it; the client
resumes on the device's pod. Repeated, each time after a different share of the stream.

Judged: frames lost in silence (a hole in `event_seq` between what the client saw before the kill
and what the resume replayed, with no `resync_required` in between) and frames repeated: both 0.
The frames the device sends once the client's pod is gone cannot be numbered by any pod for that
socket: they are announced by `resync_required` (counted, not lost).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import signal
import time
from typing import Any

from tests.test_cluster import Cluster, Device, pod, wait_online
from websockets.asyncio.client import ClientConnection, connect

from hardening.cluster import Cluster as Services
from hardening.core import Row, Run

ROUNDS = 20  # at scale 1
FRAMES_PER_ROUND = 200
STREAM_RATE = 400  # frames per second the device sends
STALL_MAX_SECONDS = 0.3  # the client stops reading for up to this long before its pod is killed


async def _frame(ws: ClientConnection, timeout: float = 10) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout))
    return frame


async def _stream(device: Device, round_no: int) -> None:
    for i in range(FRAMES_PER_ROUND):
        await device.emit("stream_delta", delta={"text": f"r{round_no} part {i}"})
        await asyncio.sleep(1 / STREAM_RATE)


async def measure(run: Run) -> None:
    row = Row("resume", "Resume across pods (client's pod killed mid-stream)")
    rounds = run.scaled(ROUNDS, 2)
    row.load = f"a device streaming {STREAM_RATE} frames/s to a relay client on another pod"
    row.faults = (
        f"kill -9 of the client's pod, {rounds} times, at a random point of a {FRAMES_PER_ROUND}-frame burst"
    )
    row.bound = "0 frames lost without resync_required; 0 repeated"
    services = Services()
    database_url = await services.database_url()
    cluster = Cluster(run.workdir / "resume", database_url, services.redis_url())
    checked = lost = repeated = resyncs = replayed = 0
    device: Device | None = None
    started = time.monotonic()
    try:
        await asyncio.to_thread(cluster.start, "b")
        b = pod(cluster, "b")
        device = Device(cluster.key)
        await device.register(b)
        await device.connect(b)
        for n in range(rounds):
            await device.ping()  # the run outlasts the offline window (TETHER_OFFLINE_AFTER_SECONDS)
            (a,) = await asyncio.to_thread(cluster.start, f"a{n}")
            await wait_online(a, device, b)
            path = f"/v1/environments/{device.connection_id}/status/ws"
            relay = await connect(f"{a.ws_base}{path}", additional_headers=a.headers(), max_size=None)
            assert relay.response is not None
            socket_id = relay.response.headers["x-tether-socket-id"]
            await asyncio.sleep(0.5)  # the watch reached the device's pod
            kill_after = random.randint(1, FRAMES_PER_ROUND - 1)
            seen: list[dict[str, Any]] = []

            streaming = asyncio.create_task(_stream(device, n))
            while len(seen) < kill_after:
                seen.append(await _frame(relay))
            # The client stops reading (a stall, a network blip) while its pod goes on numbering and
            # writing: those frames are what the resume must replay.
            await asyncio.sleep(random.uniform(0, STALL_MAX_SECONDS))
            await asyncio.to_thread(a.stop, signal.SIGKILL)
            await relay.close()
            await streaming
            last = seen[-1]["seq"]
            url = f"{b.ws_base}{path}?resume={socket_id}&resumeFrom={last}"
            got: list[dict[str, Any]] = []
            async with connect(url, additional_headers=b.headers(), max_size=None) as again:
                while True:
                    frame = await _frame(again)
                    if frame.get("type") == "resync_required":
                        resyncs += 1
                        break
                    got.append(frame)
            numbers = [f["event_seq"] for f in [*seen, *got]]
            checked += len(numbers)
            replayed += len(got)
            repeated += len(numbers) - len(set(numbers))
            lost += sum(max(0, b2 - b1 - 1) for b1, b2 in itertools.pairwise(numbers))
            seqs = [f["seq"] for f in [*seen, *got]]
            if seqs != list(range(seqs[0], seqs[0] + len(seqs))):
                row.fail(f"round {n}: seq not contiguous across the resume")
            cluster.pods.remove(a)
    finally:
        if device is not None:
            await device.close()
        await asyncio.to_thread(cluster.stop_all)
        services.close()
    row.inputs = {"rounds": rounds, "frames checked": checked, "frames replayed": replayed}
    row.lost = f"{lost} frames lost in silence, {repeated} repeated, {resyncs} resync_required"
    row.detail = {"lost": lost, "repeated": repeated, "resync_required": resyncs, "checked": checked}
    row.seconds = time.monotonic() - started
    if lost:
        row.fail(f"{lost} frames lost without resync_required")
    if repeated:
        row.fail(f"{repeated} frames repeated")
    run.add(row.judge())
