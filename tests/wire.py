"""Raw wire helpers for socket tests: a device or client driven frame by frame.

These speak the protocol directly (no reference device), so a test can send exactly the frame
or open exactly the socket a checklist item talks about.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

MAX_SIZE = 32 * 1024 * 1024


async def register(
    base_url: str,
    key: str,
    device_id: str | None = None,
    name: str = "test-device",
    instance: str | None = "server-0000000000000000",
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "deviceId": device_id or str(uuid.uuid4()),
        "connectionName": name,
        "metadata": metadata
        or {
            "lettaCodeVersion": "0.32.18",
            "os": "linux",
            "nodeVersion": "v22.19.0",
            "environmentMessageProtocol": "v2-input",
            "supportsPairedListenerGenerations": True,
            "supported_commands": ["clear", "doctor"],
            "self_update": {"supported": False, "writable": False, "manual_command": "npm i -g x"},
        },
    }
    if instance is not None:
        body["listenerInstanceId"] = instance
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{base_url}/v1/environments/register",
            json=body,
            headers={"Authorization": f"Bearer {key}", "X-Letta-Source": "letta-code"},
        )
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    result["deviceId"] = body["deviceId"]
    return result


def device_url(ws_url: str, device_id: str, name: str, **params: Any) -> str:
    query = {"deviceId": device_id, "connectionName": name, **{k: str(v) for k, v in params.items()}}
    return f"{ws_url}?{urlencode(query)}"


async def open_socket(url: str, key: str | None, **kwargs: Any) -> ClientConnection:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return await connect(url, additional_headers=headers, max_size=MAX_SIZE, compression=None, **kwargs)


async def recv(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    data = await asyncio.wait_for(ws.recv(), timeout)
    frame: dict[str, Any] = json.loads(data)
    return frame


async def recv_type(ws: ClientConnection, kind: str, timeout: float = 5.0) -> dict[str, Any]:
    """The next frame of a type, skipping others (snapshots a real device would also send)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        left = deadline - asyncio.get_running_loop().time()
        frame = await recv(ws, max(0.01, left))
        if frame.get("type") == kind:
            return frame


async def closed_with(ws: ClientConnection, timeout: float = 5.0) -> tuple[int | None, str | None]:
    """Wait for the server to close the socket; returns (code, reason)."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    except ConnectionClosed as exc:
        return (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (None, None)
    return None, None


async def silent(ws: ClientConnection, seconds: float) -> bool:
    """True if nothing arrives within `seconds`."""
    try:
        await asyncio.wait_for(ws.recv(), seconds)
    except TimeoutError:
        return True
    return False


@dataclass
class RawDevice:
    """A device's paired control + stream sockets, opened as device-protocol §2.3 describes."""

    connection_id: str
    ws_url: str
    device_id: str
    name: str
    control: ClientConnection
    stream: ClientConnection
    event_seq: int = 0

    @classmethod
    async def connect(
        cls, base_url: str, key: str, name: str = "raw-device", device_id: str | None = None, attempt: int = 1
    ) -> RawDevice:
        reg = await register(base_url, key, device_id=device_id, name=name)
        return await cls.attach(reg, key, name, attempt)

    @classmethod
    async def attach(cls, reg: dict[str, Any], key: str, name: str, attempt: int = 1) -> RawDevice:
        control, stream = await open_pair(reg["wsUrl"], key, reg["deviceId"], name, attempt)
        return cls(reg["connectionId"], reg["wsUrl"], reg["deviceId"], name, control, stream)

    async def emit(self, kind: str, runtime: dict[str, str] | None, **fields: Any) -> dict[str, Any]:
        """An enveloped event, on the socket a split-mode device would use (§3.3)."""
        self.event_seq += 1
        frame = {
            "type": kind,
            **fields,
            "runtime": runtime,
            "event_seq": self.event_seq,
            "emitted_at": "2026-11-23T12:00:00.000Z",
            "idempotency_key": f"{kind}:{self.event_seq}:{uuid.uuid4()}",
        }
        stream_class = kind in {"stream_delta", "update_device_status", "update_loop_status", "update_queue"}
        await (self.stream if stream_class else self.control).send(json.dumps(frame))
        return frame

    async def close(self) -> None:
        for ws in (self.control, self.stream):
            await ws.close()


async def open_pair(
    ws_url: str, key: str, device_id: str, name: str, attempt: int = 1, generation: str | None = None
) -> tuple[ClientConnection, ClientConnection]:
    generation = generation or str(uuid.uuid4())
    params = {"connectionGeneration": generation, "connectionAttempt": attempt}
    control = await open_socket(device_url(ws_url, device_id, name, channel="control", **params), key)
    ready = await recv(control)
    assert ready == {
        "type": "listener_ready",
        "connection_generation": generation,
        "connection_attempt": attempt,
    }
    stream = await open_socket(device_url(ws_url, device_id, name, channel="stream", **params), key)
    ready = await recv(stream)
    assert ready == {
        "type": "listener_ready",
        "connection_generation": generation,
        "connection_attempt": attempt,
    }
    return control, stream


async def env_row(base_url: str, key: str, device_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as http:
        response = await http.get(
            f"{base_url}/v1/environments/{device_id}", headers={"Authorization": f"Bearer {key}"}
        )
    response.raise_for_status()
    row: dict[str, Any] = response.json()
    return row


async def wait_until(predicate: Any, timeout: float = 5.0, interval: float = 0.05) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)
