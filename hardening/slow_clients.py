"""Slow and flooding clients: relay clients that never read, next to a device streaming fast.

A reference device streams `bench_stream` bursts to a few well-behaved clients on one pod (every frame
checked: `seq` +1, each burst complete and in order, its device-to-client latency from the delta's
own timestamp). Then 1,000 relay clients open their control+stream pair on the same scope, over raw
sockets whose receive buffer is 4 KiB (SO_RCVBUF before the connect, so TCP really pushes back), and
do not read: most never, a few only once the router counted their close.
Judged: every slow socket is closed with 4008 (`SLOW_CONSUMER`) within a bound, the late readers read it,
and the never-reading ones are dropped within the router's close timeout (their fds freed); the pod's
RSS stays within the bound its configuration gives (per-socket queue, history and write buffer, times
the sockets, plus the baseline); the fast clients get every frame in order, their p99 latency compared with
the same clients' before the slow ones came.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import urlencode

import httpx
import orjson
from bench.servers import rss_kib
from websockets.asyncio.client import connect

from hardening import wire
from hardening.cluster import Server, pod, reference_device
from hardening.core import Row, Run
from tether.api.wsprotocol import CLOSE_TIMEOUT_S
from tether.protocol import closes
from tether.sockets import WRITE_BATCH_FRAMES

SCOPE = {"agent_id": "agent-stream", "conversation_id": "conv-stream"}
QUEUE_FRAMES = 256  # the pod's TETHER_CLIENT_QUEUE_FRAMES here (default 4096): 1,000 pairs stay cheap
HISTORY_FRAMES = 256  # TETHER_HISTORY_FRAMES (default 1000)
SLOW_RCVBUF = 4096
FAST_CLIENTS = 4
BURST = 20
DELTA_SIZE = 64
BURST_INTERVAL_S = 0.01  # a burst starts at most this often: up to 2,000 deltas/s to every client
WRITE_BUFFER_HIGH = 64 * 1024  # uvloop's default high-water mark: past it a socket is not written to
SOCKET_OVERHEAD_KIB = 64  # an open relay socket's own objects, generously (bench: ~34 KiB per device)
CLOSE_BOUND_S = 60.0  # every slow socket closed within this of the last one opening
OPEN_CONCURRENCY = 32
# The pod is saturated while it fans the stream out to slow sockets not yet closed: an upgrade waits.
OPEN_TIMEOUT_S = 60.0
# One slow socket in this many reads late: opened first, it starts reading once the router counted
# its 4008 and must read it within the close timeout. The others never read: the router drops them
# CLOSE_TIMEOUT_S after their close (their fds freed), unsent bytes and all.
LATE_SHARE = 20
LATE_MAX = 20  # at most: the first of them must still be open when the router counted the last
FD_SLACK = 32  # the pod's open files once the slow sockets are gone, over its count before them
# While the slow sockets open and fill, each costs the pod an upgrade and a few hundred frames
# framed and written before its 4008: the fast clients' p99 then stays within this factor of before.
DURING_FACTOR = 30


def _raise_fd_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        soft = min(wanted, hard) if hard != resource.RLIM_INFINITY else wanted
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


@dataclass
class Fast:
    """A well-behaved relay client: reads everything, checks order, notes each delta's latency."""

    url: str
    key: str
    driver: bool  # this one asks for the bursts
    frames: int = 0
    largest: int = 0  # the longest frame text seen
    deltas: int = 0
    bursts: int = 0
    problems: list[str] = field(default_factory=list)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (received at, ms)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        async with connect(self.url, additional_headers=headers, max_size=None, open_timeout=20) as ws:
            self.ready.set()
            seq = 0
            run_id, index = "", 0
            request_id = ""
            responded = True
            next_burst = 0.0
            while True:
                if self.driver and responded and (run_id == "" or index >= BURST):
                    if self.stop.is_set():
                        return
                    # Paced, not back to back: latency then shows the router's delay, not a queue.
                    await asyncio.sleep(max(0.0, next_burst - time.monotonic()))
                    next_burst = time.monotonic() + BURST_INTERVAL_S
                    request_id = f"burst-{uuid.uuid4().hex[:8]}"
                    command = {"type": "bench_stream", "request_id": request_id, "runtime": SCOPE,
                               "count": BURST, "size": DELTA_SIZE}  # fmt: skip
                    await ws.send(orjson.dumps(command).decode())
                    responded = False
                try:
                    text = await asyncio.wait_for(ws.recv(), 1.0 if not self.driver else 30.0)
                except TimeoutError:
                    if self.driver:
                        self.problems.append(f"nothing for 30 s after delta {index} of {run_id}")
                        return
                    if self.stop.is_set():
                        return
                    continue
                now = time.time()
                frame = orjson.loads(text)
                self.frames += 1
                self.largest = max(self.largest, len(text))
                if frame.get("seq") != seq + 1:
                    self.problems.append(f"seq {frame.get('seq')} after {seq}")
                seq = frame.get("seq", seq)
                kind = frame.get("type")
                if kind == "stream_delta":
                    delta = frame["delta"]
                    run, got = delta["id"][len("message-") :].rsplit("-", 1)
                    if run != run_id:
                        if run_id and index != BURST:
                            self.problems.append(f"burst {run_id}: {index} of {BURST} deltas")
                        run_id, index = run, 0
                        self.bursts += 1
                    if int(got) != index:
                        self.problems.append(f"burst {run_id}: delta {got} where {index} was due")
                    index = int(got) + 1
                    self.deltas += 1
                    sent = datetime.fromisoformat(delta["date"].replace("Z", "+00:00")).timestamp()
                    self.latencies.append((now, (now - sent) * 1000))
                elif kind == "bench_stream_response" and frame.get("request_id") == request_id:
                    responded = True
                elif kind in ("resync_required", "error"):
                    self.problems.append(f"{kind}: {text[:200]!r}")


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _p99_between(fast: list[Fast], start: float, end: float) -> tuple[float, float, int]:
    values = [ms for f in fast for at, ms in f.latencies if start <= at < end]
    return _percentile(values, 50), _percentile(values, 99), len(values)


async def _slow_closes(http: httpx.AsyncClient, server: Server) -> int:
    r = await http.get(f"{server.base_url}/metrics", timeout=10)
    for line in r.text.splitlines():
        if line.startswith("tether_relay_slow_consumer_closes_total"):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


async def measure(run: Run) -> None:
    pairs = run.scaled(1000, 10)
    sockets = 2 * pairs
    fd_limit = _raise_fd_limit(2 * sockets + 1024)  # the pod inherits it: both ends of every socket here
    phase_s = max(5.0, 20.0 * run.scale)
    row = Row(
        "slow_clients",
        "Slow and flooding clients",
        load=f"a reference device streaming {BURST}-delta bursts to {FAST_CLIENTS} well-behaved relay "
        "clients on one pod",
        faults=f"{pairs:,} relay clients (control+stream: {sockets:,} sockets, SO_RCVBUF {SLOW_RCVBUF} B) "
        f"that do not read ({min(LATE_MAX, sockets // LATE_SHARE)} read once closed, the rest never); pod "
        f"TETHER_CLIENT_QUEUE_FRAMES={QUEUE_FRAMES}, "
        f"TETHER_HISTORY_FRAMES={HISTORY_FRAMES}",
        bound=f"every slow socket closed with {closes.SLOW_CONSUMER} within {CLOSE_BOUND_S:.0f} s (read by "
        "those reading once closed); the never-reading ones dropped (fds freed) "
        f"{CLOSE_TIMEOUT_S:.0f} s (the close timeout) after their close; RSS ≤ "
        "baseline + sockets x (queue + history + write buffer + socket); fast clients: every frame in "
        "order, p99 latency after the slow sockets closed ≤ 2x the same clients' before (+2 ms), while "
        f"they open and fill ≤ {DURING_FACTOR}x before",
    )
    row.inputs = {"slow relay sockets": sockets, "fast relay clients": FAST_CLIENTS}
    started = time.monotonic()
    settings = {"client_queue_frames": str(QUEUE_FRAMES), "history_frames": str(HISTORY_FRAMES)}
    async with pod(run.workdir, "slow-pod", settings=settings) as server:
        device, connection_id = await reference_device(run.workdir, server, server.key, "streamer")
        base = f"{server.ws_base}/v1/environments/{connection_id}/status/ws?"
        scope = {"agentId": SCOPE["agent_id"], "conversationId": SCOPE["conversation_id"]}
        slow: list[wire.RawSocket] = []
        try:
            fast = [Fast(base + urlencode(scope), server.key, driver=i == 0) for i in range(FAST_CLIENTS)]
            tasks = [asyncio.create_task(f.run()) for f in fast[1:]]
            await asyncio.gather(*(f.ready.wait() for f in fast[1:]))
            tasks.append(asyncio.create_task(fast[0].run()))
            rss_samples: list[int] = []
            sampling = True

            async def sample() -> None:
                while sampling:
                    rss_samples.append(rss_kib(server.pid))
                    await asyncio.sleep(0.25)

            sampler = asyncio.create_task(sample())
            t_base = time.time()
            await asyncio.sleep(phase_s)
            rss_before = server.rss_kib()
            t_slow = time.time()
            async with httpx.AsyncClient() as http:
                closes_before = await _slow_closes(http, server)
            fds_before = _open_fds(server.pid)
            late_n = max(2, min(LATE_MAX, sockets // LATE_SHARE))
            run.say(f"  opening {sockets:,} slow relay sockets ({late_n} to read late; fd limit {fd_limit})")
            gate = asyncio.Semaphore(OPEN_CONCURRENCY)
            refused: list[str] = []

            async def open_slow(i: int, into: list[wire.RawSocket]) -> None:
                channel = "control" if i % 2 == 0 else "stream"
                async with gate:
                    try:
                        sock = await wire.RawSocket.open(
                            base + urlencode({**scope, "channel": channel}),
                            {"Authorization": f"Bearer {server.key}"},
                            rcvbuf=SLOW_RCVBUF,
                            timeout=OPEN_TIMEOUT_S,
                        )
                    except (TimeoutError, OSError) as exc:
                        refused.append(f"slow socket {i}: {exc!r}")
                        return
                if sock.status != 101:
                    refused.append(f"slow socket {i}: upgrade answered {sock.status}")
                    sock.abort()
                    return
                into.append(sock)

            async def closed_by_router_within(wanted: int, since: float) -> tuple[int, float | None]:
                counted = 0
                async with httpx.AsyncClient() as http:
                    while time.monotonic() - since < CLOSE_BOUND_S * 2:
                        counted = await _slow_closes(http, server) - closes_before
                        if counted >= wanted:
                            return counted, time.monotonic() - since
                        await asyncio.sleep(0.25)
                return counted, None

            # The late readers first: once the router counted their 4008s, they read to their close
            # frame, within the close timeout.
            late_socks: list[wire.RawSocket] = []
            await asyncio.gather(*(open_slow(i, late_socks) for i in range(late_n)))
            _, late_closed_s = await closed_by_router_within(len(late_socks), time.monotonic())
            late_codes: dict[int | None, int] = {}

            async def read_late(sock: wire.RawSocket) -> None:
                code = await sock.close_code(CLOSE_TIMEOUT_S)
                late_codes[code] = late_codes.get(code, 0) + 1

            await asyncio.gather(*(read_late(sock) for sock in late_socks))
            slow.extend(late_socks)
            never: list[wire.RawSocket] = []
            await asyncio.gather(*(open_slow(i, never) for i in range(late_n, sockets)))
            slow.extend(never)
            opened_at = time.monotonic()
            t_opened = time.time()
            run.say(f"  {len(slow):,} slow sockets open in {t_opened - t_slow:.1f} s; waiting for 4008s")
            closed_by_router, all_closed_s = await closed_by_router_within(len(slow), opened_at)
            # The never-reading ones: dropped by the router CLOSE_TIMEOUT_S after their 4008.
            fds_closed = _open_fds(server.pid)
            freed_s: float | None = None
            while time.monotonic() - opened_at < (all_closed_s or CLOSE_BOUND_S) + CLOSE_TIMEOUT_S + 15:
                if _open_fds(server.pid) <= fds_before + FD_SLACK:
                    freed_s = time.monotonic() - opened_at
                    break
                await asyncio.sleep(0.25)
            fds_freed = _open_fds(server.pid)
            run.say(f"  never-reading sockets freed at {freed_s or float('nan'):.1f} s ({fds_freed} pod fds)")
            t_closed = time.time()
            rss_closed = server.rss_kib()
            await asyncio.sleep(phase_s)  # the fast clients go on with the closed slow sockets still there
            t_after = time.time()
            fast[0].stop.set()
            for f in fast:
                f.stop.set()
            for task in tasks:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(task, 60)
            codes = late_codes
            sampling = False
            await sampler
            rss_drained = server.rss_kib()
            peak = max(rss_samples or [0])

            # ---- judge ----
            frame_bytes = max(f.largest for f in fast)
            frame_kib = (frame_bytes + 64) / 1024  # a str object's header on top of its text
            per_socket_kib = (
                QUEUE_FRAMES * frame_kib
                + HISTORY_FRAMES * frame_kib
                + WRITE_BUFFER_HIGH / 1024
                + WRITE_BATCH_FRAMES * frame_kib
                + SOCKET_OVERHEAD_KIB
            )
            bound_kib = int(rss_before + sockets * per_socket_kib)
            late = sum(late_codes.values())
            total = len(slow)
            if refused:
                row.fail(f"{len(refused)} slow sockets refused: {refused[0]}")
            if server.proc.poll() is not None:
                row.fail(f"the pod exited with {server.proc.returncode}")
            if all_closed_s is None:
                row.fail(f"only {closed_by_router} of {total} slow sockets closed by the router")
            elif all_closed_s > CLOSE_BOUND_S:
                row.fail(
                    f"the last slow socket closed {all_closed_s:.1f} s after opening (bound {CLOSE_BOUND_S})"
                )
            if closed_by_router != total:
                row.fail(f"the router counted {closed_by_router} slow-consumer closes, {total} slow sockets")
            wrong = {c: n for c, n in codes.items() if c != closes.SLOW_CONSUMER}
            if wrong:
                row.fail(f"late-reading slow sockets closed with other codes: {wrong}")
            if freed_s is None:
                row.fail(
                    f"the pod still had {fds_freed} open files ({fds_before} before the slow sockets) "
                    f"{CLOSE_TIMEOUT_S + 15:.0f} s after the last 4008"
                )
            if peak > bound_kib:
                row.fail(f"RSS peak {peak // 1024} MiB over the bound {bound_kib // 1024} MiB")
            base50, base99, n_base = _p99_between(fast, t_base + 1, t_slow)
            during50, during99, n_during = _p99_between(fast, t_slow, t_closed)
            after50, after99, n_after = _p99_between(fast, t_closed, t_after)
            if after99 > 2 * base99 + 2:
                row.fail(f"fast clients' p99 {after99:.0f} ms after the slow sockets, {base99:.0f} ms before")
            if during99 > DURING_FACTOR * base99:
                row.fail(
                    f"fast clients' p99 {during99:.0f} ms while the slow sockets filled, over "
                    f"{DURING_FACTOR}x the {base99:.1f} ms before"
                )
            driver = fast[0]
            for f in fast:
                for problem in f.problems[:5]:
                    row.fail(f"fast client: {problem}")
                if f is not driver and f.deltas != driver.deltas:
                    row.fail(f"a fast client got {f.deltas} deltas, the driver {driver.deltas}")
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    row.fail(f"fast client failed: {task.exception()!r}")
            errors = server.problems()
            for line in errors[:10]:
                row.fail(f"pod log: {line}")
            row.lost = (
                f"{sum(len(f.problems) for f in fast)} fast-client frames out of order or missing of "
                f"{sum(f.frames for f in fast):,}; {sum(wrong.values())} of {late:,} late-reading slow "
                f"sockets not closed with {closes.SLOW_CONSUMER}; never-reading ones still open: "
                f"{max(0, fds_freed - fds_before - FD_SLACK):,}"
            )
            row.note = (
                f"slow sockets all closed {all_closed_s or float('nan'):.1f} s after the last opened, the "
                f"never-reading half freed by {freed_s or float('nan'):.1f} s (pod fds {fds_before} before, "
                f"{fds_closed} at the last 4008, {fds_freed} then); RSS "
                f"{rss_before // 1024} MiB before, peak {peak // 1024} MiB (bound {bound_kib // 1024} MiB: "
                f"{per_socket_kib:.0f} KiB per socket), {rss_closed // 1024} MiB once closed, "
                f"{rss_drained // 1024} MiB once drained; fast p99 {base99:.0f} ms before, "
                f"{during99:.0f} ms while the slow sockets filled, {after99:.0f} ms after"
            )
            row.detail = {
                "pairs": pairs,
                "sockets": sockets,
                "close_codes": {str(k): v for k, v in codes.items()},
                "closed_by_router": closed_by_router,
                "late_readers": late,
                "late_closed_s": late_closed_s,
                "never_reading": len(never),
                "freed_s": freed_s,
                "fds": {"before": fds_before, "closed": fds_closed, "freed": fds_freed},
                "all_closed_s": all_closed_s,
                "open_s": t_opened - t_slow,
                "rss_kib": {"before": rss_before, "peak": peak, "closed": rss_closed, "drained": rss_drained,
                            "bound": bound_kib, "per_socket_bound": per_socket_kib},
                "latency_ms": {"before": {"p50": base50, "p99": base99, "n": n_base},
                               "during": {"p50": during50, "p99": during99, "n": n_during},
                               "after": {"p50": after50, "p99": after99, "n": n_after}},
                "fast_deltas": [f.deltas for f in fast],
                "fast_bursts": driver.bursts,
                "pod_log_problems": errors[:20],
            }  # fmt: skip
        finally:
            for sock in slow:
                sock.abort()
            device.stop()
    row.seconds = time.monotonic() - started
    run.add(row.judge())
