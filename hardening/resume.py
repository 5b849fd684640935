"""Row "resume": a client's pod is killed with SIGKILL mid-stream while the device keeps streaming;
the client resumes on the device's pod. Repeated, each time at a different point of the stream.

The device streams through the kill and on after it, so a resume owes the client three kinds of
frames: those its socket had sent and its pod had written (the socket's record), those the pod
numbered but died before writing, and those the device sent once the pod was gone (both from the
connection's event log, which the device's pod writes). Judged: frames lost (neither received nor
covered by a `resync_required`) and frames repeated, both 0; `resync_required` only in the round
whose gap exceeds the history bound (TETHER_HISTORY_FRAMES), where it is required, or when the pod
died within UNWRITTEN_SECONDS of the socket's first frame, before writing anything of it (no pod
knows that socket: counted apart); and the live feed after the resume goes on without gap or repeat.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from typing import Any

import httpx
from tests.conftest import Router
from tests.test_cluster import Cluster, Device, pod, wait_online
from websockets.asyncio.client import ClientConnection, connect

from hardening.cluster import Cluster as Services
from hardening.core import Row, Run

ROUNDS = 20  # at scale 1
FRAMES_PER_ROUND = 200  # before, through and after the kill
STREAM_RATE = 400  # frames per second the device sends
HISTORY_FRAMES = 1000  # TETHER_HISTORY_FRAMES's default, the bound the last round exceeds
LIVE_FRAMES = 5  # sent after the resume: the hand-over to the live feed
# A pod killed this soon after its socket's first frame may not have written any of the socket's
# history (TETHER_HISTORY_FLUSH_MS, 20 ms, plus the pipeline's round trip): no pod knows the socket,
# its resume answers `resync_required` (the documented exception, counted apart).
UNWRITTEN_SECONDS = 0.1
UNKNOWN_TOKEN = "unknown or expired resume token"


async def _frame(ws: ClientConnection, timeout: float = 10) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout))
    return frame


async def _stream(device: Device, count: int, label: str, sent: list[int]) -> None:
    for i in range(count):
        sent.append(await device.emit("stream_delta", delta={"text": f"{label} {i}"}))
        if i % 4 == 3:
            await asyncio.sleep(4 / STREAM_RATE)


async def _log_frames(http: httpx.AsyncClient, router: Router) -> int:
    """Frames B's resumes replayed from the event log so far (tether_resume_log_frames_total)."""
    text = (await http.get(f"{router.base_url}/metrics", timeout=10)).text
    for line in text.splitlines():
        if line.startswith("tether_resume_log_frames_total"):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


async def measure(run: Run) -> None:
    row = Row("resume", "Resume across pods (client's pod killed mid-stream, device streaming on)")
    rounds = run.scaled(ROUNDS, 2)
    row.load = f"a device streaming {STREAM_RATE} frames/s to a relay client on another pod"
    row.faults = (
        f"kill -9 of the client's pod, {rounds} times, at a random point of a {FRAMES_PER_ROUND}-frame"
        f" stream that goes on after the kill; a last round sends {3 * HISTORY_FRAMES} frames after it"
    )
    row.bound = (
        "0 frames lost, 0 repeated, seq contiguous; resync_required only when the gap exceeds"
        f" TETHER_HISTORY_FRAMES ({HISTORY_FRAMES})"
    )
    services = Services()
    database_url = await services.database_url()
    cluster = Cluster(run.workdir / "resume", database_url, services.redis_url())
    checked = lost = repeated = resyncs = unneeded_resyncs = 0
    from_record = from_log = 0
    reasons: list[str] = []  # of every resync_required within the bound
    never_written = 0  # resumes of a socket whose pod died before writing any of its history
    first_at = 0.0
    device: Device | None = None
    started = time.monotonic()
    try:
        await asyncio.to_thread(cluster.start, "b")
        b = pod(cluster, "b")
        device = Device(cluster.key)
        await device.register(b)
        await device.connect(b)
        async with httpx.AsyncClient() as http:
            for n in range(rounds + 1):
                beyond_bound = n == rounds
                await device.ping()  # the run outlasts the offline window (TETHER_OFFLINE_AFTER_SECONDS)
                (a,) = await asyncio.to_thread(cluster.start, f"a{n}")
                await wait_online(a, device, b)
                path = f"/v1/environments/{device.connection_id}/status/ws"
                relay = await connect(f"{a.ws_base}{path}", additional_headers=a.headers(), max_size=None)
                assert relay.response is not None
                socket_id = relay.response.headers["x-tether-socket-id"]
                await asyncio.sleep(0.5)  # the watch reached the device's pod
                kill_after = random.randint(1, FRAMES_PER_ROUND // 2)
                seen: list[dict[str, Any]] = []
                sent: list[int] = []
                streaming = asyncio.create_task(_stream(device, FRAMES_PER_ROUND, f"r{n}", sent))
                while len(seen) < kill_after:
                    seen.append(await _frame(relay))
                    first_at = first_at if len(seen) > 1 else time.monotonic()
                # The client stops reading and its pod dies while the device streams on: the pod
                # numbers and writes some frames, numbers some it never writes, and the rest it never sees.
                await asyncio.sleep(random.uniform(0, 0.1))
                early = time.monotonic() - first_at < UNWRITTEN_SECONDS
                await asyncio.to_thread(a.stop, signal.SIGKILL)
                await relay.close()
                await streaming
                if beyond_bound:
                    await _stream(device, 3 * HISTORY_FRAMES, f"r{n} after", sent)
                before = await _log_frames(http, b)
                last = seen[-1]["seq"]
                url = f"{b.ws_base}{path}?resume={socket_id}&resumeFrom={last}"
                got: list[dict[str, Any]] = []
                resynced = unwritten = False
                async with connect(url, additional_headers=b.headers(), max_size=None) as again:
                    while len(seen) + len(got) < len(sent):
                        frame = await _frame(again)
                        if frame.get("type") == "resync_required":
                            resynced = True
                            unwritten = early and frame.get("reason") == UNKNOWN_TOKEN
                            if not beyond_bound and not unwritten:
                                reasons.append(f"round {n}, after {kill_after}: {frame.get('reason')}")
                            break
                        got.append(frame)
                    live_sent: list[int] = []
                    await _stream(device, LIVE_FRAMES, f"r{n} live", live_sent)
                    live = [await _frame(again) for _ in range(LIVE_FRAMES)]
                logged = await _log_frames(http, b) - before
                numbers = [f["event_seq"] for f in [*seen, *got]]
                checked += len(numbers) + len(live)
                repeated += len(numbers) - len(set(numbers))
                if resynced:
                    resyncs += 1
                    if unwritten:
                        never_written += 1
                    elif not beyond_bound:
                        unneeded_resyncs += 1
                    # What came before the announcement must still be exact, with no hole.
                    if numbers != sent[: len(numbers)]:
                        lost += sum(1 for x in sent[: len(numbers)] if x not in set(numbers))
                else:
                    lost += len(set(sent) - set(numbers))
                    if beyond_bound:
                        row.fail("the round beyond the bound got no resync_required")
                if [f["event_seq"] for f in live] != live_sent:
                    lost += len(set(live_sent) - {f["event_seq"] for f in live})
                    row.fail(f"round {n}: the live feed after the resume was not exact")
                seqs = [f["seq"] for f in [*seen, *got]]
                if seqs != list(range(seqs[0], seqs[0] + len(seqs))):
                    row.fail(f"round {n}: seq not contiguous across the resume")
                from_log += logged
                from_record += len(got) - logged
                cluster.pods.remove(a)
    finally:
        if device is not None:
            await device.close()
        await asyncio.to_thread(cluster.stop_all)
        services.close()
    row.inputs = {
        "rounds": rounds + 1,
        "frames checked": checked,
        "replayed from the socket's record": from_record,
        "replayed from the event log": from_log,
    }
    row.lost = (
        f"{lost} frames lost, {repeated} repeated, {resyncs} resync_required"
        f" ({never_written} after a pod killed before writing anything of the socket, allowed;"
        f" {unneeded_resyncs} other within the bound)"
    )
    row.detail = {
        "lost": lost,
        "repeated": repeated,
        "resync_required": resyncs,
        "resync_within_bound": unneeded_resyncs,
        "checked": checked,
        "from_record": from_record,
        "from_log": from_log,
        "resyncs_within_bound": reasons,
        "resync_never_written": never_written,
    }
    row.seconds = time.monotonic() - started
    if lost:
        row.fail(f"{lost} frames lost")
    if repeated:
        row.fail(f"{repeated} frames repeated")
    if unneeded_resyncs:
        row.fail(f"{unneeded_resyncs} resync_required within the history bound: {'; '.join(reasons)}")
    run.add(row.judge())
