"""A load-generator process: reference devices and relay clients, driven over stdin/stdout.

The harness runs several of these (`python -m bench.agent`), so that thousands of devices spread over
processes and source addresses, and so that no client shares an event loop with the router or with
the device it measures. Each request is one JSON line `{"id": n, "cmd": ..., ...}` on stdin; each
answer one JSON line `{"id": n, "ok": true, "result": ...}` on stdout. Requests run concurrently.

Clients read frames as bytes and recognise them by substring (`"stream_delta"`, a request id) rather
than parsing JSON, so that the client side stays cheap next to the relay it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import socket
import sys
import time
import traceback
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

import tether.device.client as device_client
from bench.fastdevice import FastDevice
from tether.cli import tune_gc
from tether.config import Settings
from tether.device.client import Device

MAX_SIZE = 32 * 1024 * 1024
log = logging.getLogger("bench.agent")
IP_BIND_ADDRESS_NO_PORT = 24  # Linux <netinet/in.h>; not exported by the socket module


def bind_source_address(ip: str) -> None:
    """Open every device socket of this process from `ip` (one of 127.0.0.x).

    One source address has about 28,000 ephemeral ports towards one router port; 8,000 devices with two
    sockets each, plus a reconnect storm's worth of fresh ones, need more. The reference device has no
    hook for a source address, and websockets hands extra keyword arguments to `create_connection`, so
    the module's `connect` is replaced for this process only.

    The socket is bound with IP_BIND_ADDRESS_NO_PORT: a plain bind to port 0 makes the kernel pick the
    port by scanning the address's bound sockets, which during a reconnect storm took half of each
    generator's CPU (py-spy); with the option the port is picked at connect time, as without a bind.
    """

    async def connect_from(uri: str, **kwargs: Any) -> ClientConnection:
        parts = urllib.parse.urlsplit(uri)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((ip, 0))
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (parts.hostname, parts.port or 80))
        except BaseException:
            sock.close()
            raise
        return await connect(uri, sock=sock, **kwargs)

    device_client.connect = connect_from  # type: ignore[assignment,attr-defined]


class RelayClient:
    """One client: a relay pair on Tether (control + stream) or one socket on the baseline."""

    def __init__(self, sockets: list[ClientConnection]) -> None:
        self.sockets = sockets
        self.command = sockets[0]
        self.marker: bytes | None = None
        self.answered: asyncio.Future[int] | None = None
        self.target = 0
        self.counts = [0] * len(sockets)
        self.done_at: list[int | None] = [None] * len(sockets)
        self.all_done = asyncio.Event()
        self.closed: list[str] = []
        self.readers = [asyncio.create_task(self._read(i, ws)) for i, ws in enumerate(sockets)]

    async def _read(self, index: int, ws: ClientConnection) -> None:
        try:
            while True:
                data = await ws.recv(decode=False)
                assert isinstance(data, bytes)
                if self.target and b'"stream_delta"' in data:
                    self.counts[index] += 1
                    if self.counts[index] == self.target:
                        self.done_at[index] = time.perf_counter_ns()
                        if all(t is not None for t in self.done_at):
                            self.all_done.set()
                    continue
                if (
                    index == 0
                    and self.marker is not None
                    and self.answered is not None
                    and not self.answered.done()
                    and self.marker in data
                ):
                    self.answered.set_result(time.perf_counter_ns())
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else None
            self.closed.append(f"socket {index} closed: {code} {exc.rcvd.reason if exc.rcvd else ''}")
            self.all_done.set()
            if self.answered is not None and not self.answered.done():
                self.answered.set_exception(exc)

    async def round_trips(self, n: int, gap_ms: float, prefix: str) -> list[float]:
        """`n` app_server_info commands, one at a time, `gap_ms` apart; each round trip in microseconds."""
        samples: list[float] = []
        loop = asyncio.get_running_loop()
        for i in range(n):
            request_id = f"{prefix}-{i}"
            self.marker = f'"request_id":"{request_id}"'.encode()
            self.answered = loop.create_future()
            text = f'{{"type":"app_server_info","request_id":"{request_id}"}}'
            started = time.perf_counter_ns()
            await self.command.send(text)
            finished = await asyncio.wait_for(self.answered, 10)
            samples.append((finished - started) / 1000)
            if gap_ms:
                await asyncio.sleep(gap_ms / 1000)
        self.marker = None
        return samples

    async def stream(self, count: int, size: int, runtime: dict[str, str], timeout: float) -> dict[str, Any]:
        """Ask the device for `count` stream_delta frames; time until every socket has all of them."""
        self.target = count
        self.counts = [0] * len(self.sockets)
        self.done_at = [None] * len(self.sockets)
        self.all_done.clear()
        command = orjson.dumps(
            {
                "type": "bench_stream",
                "request_id": f"stream-{time.monotonic_ns()}",
                "runtime": runtime,
                "count": count,
                "size": size,
            }
        ).decode()
        started = time.perf_counter_ns()
        await self.command.send(command)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.all_done.wait(), timeout)
        self.target = 0
        finished = [t for t in self.done_at if t is not None]
        complete = len(finished) == len(self.sockets)
        return {
            "complete": complete,
            "seconds": (max(finished) - started) / 1e9 if complete else None,
            "per_socket_seconds": [None if t is None else (t - started) / 1e9 for t in self.done_at],
            "received": list(self.counts),
            "closed": list(self.closed),
        }

    async def close(self) -> None:
        for ws in self.sockets:
            await ws.close()
        for task in self.readers:
            task.cancel()


class Agent:
    def __init__(self) -> None:
        self.groups: dict[str, list[Device]] = {}
        self.clients: dict[str, RelayClient] = {}
        self.before: dict[str, list[tuple[int, int, int]]] = {}
        self.fast: dict[str, FastDevice] = {}
        self.closes_before: dict[str, list[int]] = {}

    # ---- devices ------------------------------------------------------------------------------------

    async def devices(
        self,
        group: str,
        base_url: str,
        key: str,
        count: int,
        heartbeat: float = 30.0,
        announce_status: bool = True,
        batch: int = 50,
        ready_timeout: float = 60.0,
    ) -> dict[str, Any]:
        """Start `count` reference devices, `batch` at a time, each batch ready before the next."""
        devices = self.groups.setdefault(group, [])
        started = time.monotonic()
        failed: list[str] = []
        for first in range(0, count, batch):
            fresh = [
                Device(
                    base_url,
                    key,
                    f"{group}-{os.getpid()}-{len(devices) + i}",
                    heartbeat_interval=heartbeat,
                    announce_status=announce_status,
                    record=False,
                    ready_timeout=ready_timeout,
                )
                for i in range(min(batch, count - first))
            ]
            devices.extend(fresh)
            for device in fresh:
                await device.start()
            outcomes = await asyncio.gather(
                *(device.wait_ready(ready_timeout) for device in fresh), return_exceptions=True
            )
            failed.extend(f"{d.name}: {o!r}" for d, o in zip(fresh, outcomes, strict=True) if o is not None)
        # Out of the collector's reach while they live (see main); `stop` hands them back. Collected
        # first, so that what an earlier group left is not frozen with them.
        gc.collect()
        gc.freeze()
        return {
            "ready": sum(1 for d in devices if d.ready.is_set()),
            "seconds": time.monotonic() - started,
            "failed": len(failed),
            "failures": failed[:5],
        }

    async def fast_device(self, group: str, base_url: str, key: str) -> str:
        """Start the lean device (bench.fastdevice) and return its connection id."""
        device = FastDevice(base_url, key, f"{group}-{os.getpid()}")
        await device.start()
        self.fast[group] = device
        return device.connection_id

    async def connection_ids(self, group: str) -> list[str | None]:
        return [d.connection_id for d in self.groups.get(group, [])]

    async def sever(self, group: str) -> float:
        """Drop every device's sockets without a close frame, as a network failure would."""
        devices = self.groups[group]
        self.before[group] = [(d.connects, d.connect_attempts, d.registrations) for d in devices]
        self.closes_before[group] = [len(d.closed_codes) for d in devices]
        at = time.monotonic()
        for device in devices:
            device.sever()
        return at

    async def await_reconnect(self, group: str, timeout: float) -> dict[str, Any]:
        """Wait until every device of the group is ready on a new connection since `sever`."""
        devices = self.groups[group]
        before = self.before[group]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Only the devices not back yet are looked at again: polling all of them every 20 ms was 3 %
        # of a generator's CPU during a storm, on the same two cores as the router.
        pending = [(d, connects) for d, (connects, _, _) in zip(devices, before, strict=True)]
        while True:
            pending = [(d, n) for d, n in pending if not (d.connects > n and d.ready.is_set())]
            if not pending or loop.time() > deadline:
                break
            await asyncio.sleep(0.02)
        at = time.monotonic()
        # Counted again over all of them: one that came back and was dropped since is not back.
        back = sum(
            1
            for d, (connects, _, _) in zip(devices, before, strict=True)
            if d.connects > connects and d.ready.is_set()
        )
        retries = sum(
            d.connect_attempts - attempts - 1 for d, (_, attempts, _) in zip(devices, before, strict=True)
        )
        registrations = sum(d.registrations - regs for d, (_, _, regs) in zip(devices, before, strict=True))
        stopped = [f"{d.name}: {d.error}" for d in devices if d.task is not None and d.task.done()]
        # Why sockets closed after the sever: 1006 is the sever itself; anything else is the router's.
        closes = Counter(
            f"{code} {reason}".strip()
            for d, n in zip(devices, self.closes_before[group], strict=True)
            for code, reason in d.closed_codes[n:]
        )
        return {
            "at": at,
            "back": back,
            "total": len(devices),
            "extra_attempts": retries,
            "re_registrations": registrations,
            "stopped": len(stopped),
            "stopped_examples": stopped[:5],
            "closes": dict(closes.most_common(8)),
        }

    async def ready_count(self, group: str) -> int:
        return sum(1 for d in self.groups.get(group, []) if d.ready.is_set())

    async def stop(self, group: str) -> None:
        devices = self.groups.pop(group, [])
        await asyncio.gather(*(d.stop(timeout=5) for d in devices))
        gc.unfreeze()

    # ---- clients ------------------------------------------------------------------------------------

    async def client_open(self, name: str, urls: list[str], key: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        sockets = [
            await connect(
                url, additional_headers=headers, compression=None, max_size=MAX_SIZE, ping_interval=None
            )
            for url in urls
        ]
        self.clients[name] = RelayClient(sockets)

    async def round_trips(self, name: str, n: int, gap_ms: float = 0.0) -> list[float]:
        return await self.clients[name].round_trips(n, gap_ms, f"rt{time.monotonic_ns()}")

    async def stream(
        self, name: str, count: int, size: int, runtime: dict[str, str], timeout: float = 60.0
    ) -> dict[str, Any]:
        return await self.clients[name].stream(count, size, runtime, timeout)

    async def client_close(self, name: str) -> None:
        client = self.clients.pop(name, None)
        if client is not None:
            await client.close()

    # ---- this process -------------------------------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        from bench.servers import cpu_seconds, rss_kib

        return {"rss_kib": rss_kib(os.getpid()), "cpu_seconds": cpu_seconds(os.getpid())}


async def serve(agent: Agent) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout.buffer
    tasks: set[asyncio.Task[None]] = set()

    def reply(message: dict[str, Any]) -> None:
        out.write(orjson.dumps(message) + b"\n")
        out.flush()

    async def run(request: dict[str, Any]) -> None:
        handler: Callable[..., Awaitable[Any]] = getattr(agent, request.pop("cmd"))
        request_id = request.pop("id")
        try:
            result = await handler(**request)
        except Exception as exc:
            reply({"id": request_id, "ok": False, "error": f"{exc!r}\n{traceback.format_exc()}"})
            return
        reply({"id": request_id, "ok": True, "result": result})

    while line := await reader.readline():
        task = asyncio.create_task(run(orjson.loads(line)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    for group in list(agent.groups):
        await agent.stop(group)
    for device in agent.fast.values():
        await device.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.agent")
    parser.add_argument("--source-ip", help="open device sockets from this address (127.0.0.x)")
    args = parser.parse_args()
    logging.basicConfig(
        level=os.environ.get("BENCH_AGENT_LOG", "WARNING"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.source_ip:
        bind_source_address(args.source_ip)
    # A generator holds thousands of devices on the same two cores as the router it measures. With
    # Python's default collector, a reconnect storm's allocations set off full collections that rescan
    # them all: 58 % of a generator's CPU in a storm (py-spy --native), CPU the router then lacked.
    # The router's own thresholds, and the devices frozen once ready, took the four generators' storm
    # CPU from 12.5 s to 8.3 s and the storm from 10.6 s to 8.3-9.4 s.
    tune_gc(Settings().gc_thresholds)
    uvloop.run(serve(Agent()))


if __name__ == "__main__":
    main()
