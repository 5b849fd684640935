"""A lean device for the relay figures: the reference device's wire, at a fraction of its cost.

The reference device builds every frame as the real CLI does (a fresh envelope, a uuid, a timestamp)
and spends about 70 µs of CPU per `stream_delta`: on this two-core machine it, not the router, would
set the throughput. This device sends the same frames, byte for byte the same shape and size, from a
template: register over REST, open the paired control and stream sockets (or the baseline's single
socket), answer `app_server_info` and `bench_stream`, ping every 30 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tether.device.client import listener_url, post_json

MAX_SIZE = 32 * 1024 * 1024
YIELD_EVERY = 64
DELTA = (
    '{{"type":"stream_delta","delta":{{"type":"message","message_type":"assistant_message",'
    '"id":"message-{run}-{index}","date":"{date}","run_id":"{run}","content":"{content}"}},'
    '"runtime":{runtime},"event_seq":{seq},"emitted_at":"{date}","idempotency_key":"stream_delta:{seq}:{run}"}}'
)


def _iso_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class FastDevice:
    def __init__(self, base_url: str, api_key: str, name: str) -> None:
        self.base_url = base_url
        self.api_key = api_key
        self.name = name
        self.device_id = str(uuid.uuid4())
        self.connection_id = ""
        self.control: ClientConnection | None = None
        self.stream: ClientConnection | None = None
        self.event_seq = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        body = orjson.dumps(
            {
                "deviceId": self.device_id,
                "connectionName": self.name,
                "metadata": {"lettaCodeVersion": "0.32.18", "os": "linux", "nodeVersion": "v22.19.0"},
            }
        )
        status, _, data = await post_json(
            f"{self.base_url}/v1/environments/register",
            {"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"},
            body,
            time_limit=30,
        )
        if status != 200:
            raise RuntimeError(f"registration failed: HTTP {status} {data[:200]!r}")
        reg = orjson.loads(data)
        self.connection_id = reg["connectionId"]
        if reg.get("supportsSplitStatusChannels") and reg.get("supportsPairedListenerGenerations"):
            generation = str(uuid.uuid4())
            for channel in ("control", "stream"):
                url = listener_url(
                    reg["wsUrl"],
                    device_id=self.device_id,
                    connection_name=self.name,
                    channel=channel,
                    generation=generation,
                    attempt=1,
                )
                ws = await self._open(url)
                ready = orjson.loads(await ws.recv())
                if ready.get("type") != "listener_ready":
                    raise RuntimeError(f"expected listener_ready, got {ready}")
                setattr(self, channel, ws)
        else:
            self.control = await self._open(
                listener_url(reg["wsUrl"], device_id=self.device_id, connection_name=self.name)
            )
        for opened in (self.control, self.stream):
            if opened is not None:
                self._spawn(self._read(opened))
        self._spawn(self._heartbeat())

    async def _open(self, url: str) -> ClientConnection:
        return await connect(
            url,
            additional_headers={"Authorization": f"Bearer {self.api_key}"},
            compression=None,
            max_size=MAX_SIZE,
            ping_interval=None,
        )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                frame = orjson.loads(await ws.recv(decode=False))
                if ws is not self.control or not isinstance(frame, dict):
                    continue
                kind = frame.get("type")
                if kind == "app_server_info":
                    await self.control.send(_app_server_info_response(frame.get("request_id")))
                elif kind == "bench_stream":
                    self._spawn(self._bench_stream(frame))

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(30)
            for ws in (self.control, self.stream):
                if ws is not None:
                    with contextlib.suppress(ConnectionClosed):
                        await ws.send('{"type":"ping"}')

    async def _bench_stream(self, frame: dict[str, Any]) -> None:
        assert self.control is not None
        out = self.stream or self.control
        count, size = int(frame["count"]), int(frame.get("size", 64))
        runtime = orjson.dumps(frame["runtime"]).decode()
        run, date, content = f"run-{uuid.uuid4()}", _iso_now(), "x" * size
        with contextlib.suppress(ConnectionClosed):
            for index in range(count):
                self.event_seq += 1
                text = DELTA.format(
                    run=run, index=index, date=date, content=content, runtime=runtime, seq=self.event_seq
                )
                await out.send(text)
                if index % YIELD_EVERY == YIELD_EVERY - 1:
                    await asyncio.sleep(0)
            response = {
                "type": "bench_stream_response",
                "request_id": frame.get("request_id"),
                "runtime": frame["runtime"],
                "success": True,
                "count": count,
            }
            await self.control.send(orjson.dumps(response).decode())

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for ws in (self.control, self.stream):
            if ws is not None:
                with contextlib.suppress(Exception):
                    await ws.close()


def _app_server_info_response(request_id: object) -> str:
    """What the reference device answers (behaviour.py), so both sides carry the same bytes."""
    return orjson.dumps(
        {
            "type": "app_server_info_response",
            "request_id": request_id,
            "success": True,
            "backend": "api",
            "letta_code_version": "0.32.18",
            "protocol_version": 1,
            "capabilities": {
                "agent_management": True,
                "conversation_management": True,
                "memory_management": True,
                "runtime_start": True,
                "split_channels": False,
            },
        }
    ).decode()
