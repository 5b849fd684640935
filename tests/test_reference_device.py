"""The reference device against a real router: registration, relay, reconnects, replacement."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import Router
from tests.wire import env_row, wait_until
from tether.device.behaviour import Behaviour, DeviceSettings, Event, Reply, Scope
from tether.device.client import (
    REPLACED_REASON,
    CloseKind,
    Device,
    classify_close,
    listener_url,
    reconnect_delay,
    register_delay,
)

Frame = dict[str, Any]
SCOPE = {"agent_id": "agent-ref", "conversation_id": "default"}


@pytest.fixture
async def device(srv: Router) -> AsyncIterator[Device]:
    dev = _device(srv)
    await dev.start()
    await dev.wait_ready(10)
    yield dev
    await dev.stop()


def _device(srv: Router, name: str | None = None, **kwargs: Any) -> Device:
    kwargs.setdefault("heartbeat_interval", 0.5)
    kwargs.setdefault("backoff_base", 0.1)
    kwargs.setdefault("turn_delay", 0.0)
    return Device(srv.base_url, srv.key, name or f"ref-{uuid.uuid4().hex[:6]}", **kwargs)


class Watcher:
    """A client on the status socket of one scope, collecting what the relay delivers."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[Frame] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            frame = json.loads(message)
            if isinstance(frame.get("seq"), int):
                await self.ws.send(json.dumps({"type": "ack", "seq": frame["seq"]}))
            self.frames.append(frame)

    async def send(self, frame: Frame) -> None:
        await self.ws.send(json.dumps(frame))

    async def wait_for(self, predicate: Callable[[Frame], bool], within: float = 10.0) -> Frame:
        async with asyncio.timeout(within):
            while True:
                for frame in self.frames:
                    if predicate(frame):
                        return frame
                await asyncio.sleep(0.02)

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()


async def _watch(srv: Router, dev: Device, scope: dict[str, str] = SCOPE) -> Watcher:
    url = (
        f"{srv.ws_base}/v1/environments/{dev.connection_id}/status/ws"
        f"?agentId={scope['agent_id']}&conversationId={scope['conversation_id']}"
    )
    ws = await connect(url, additional_headers=srv.headers(), max_size=None, compression=None, proxy=None)
    return Watcher(ws)


def _input(request_id: str, text: str, client_message_id: str | None = None) -> Frame:
    message = {"role": "user", "content": text, "client_message_id": client_message_id or str(uuid.uuid4())}
    return {
        "type": "input",
        "request_id": request_id,
        "runtime": SCOPE,
        "payload": {"kind": "create_message", "messages": [message]},
    }


def test_backoff_schedules_match_the_cli() -> None:
    # The CLI's own test evidence (§1.3): 429 + Retry-After 3, random 0: 3 s; 502, random 0.5: 1.125 s.
    assert register_delay(1, 3.0, 0.0) == 3.0
    assert register_delay(1, None, 0.5) == 1.125
    assert register_delay(7, None, 0.0) == 30.0
    assert [reconnect_delay(n) for n in range(8)] == [0, 1, 2, 4, 8, 16, 30, 30]


def test_close_codes_and_socket_urls() -> None:
    assert classify_close("control", 1008, "expired") is CloseKind.REREGISTER
    assert classify_close("stream", 1008, "") is CloseKind.RECONNECT
    assert classify_close("stream", 1000, REPLACED_REASON) is CloseKind.REPLACED
    assert classify_close("control", 1000, "bye") is CloseKind.RECONNECT
    url = listener_url(
        "ws://h/v1/environments/ws/conn-1?deviceId=stale&keep=1",
        device_id="d-1",
        connection_name="my laptop",
        channel="stream",
        generation="g-1",
        attempt=3,
    )
    assert url == (
        "ws://h/v1/environments/ws/conn-1?keep=1&deviceId=d-1&connectionName=my+laptop"
        "&channel=stream&connectionGeneration=g-1&connectionAttempt=3"
    )


def test_behaviour_queues_dedupes_and_runs_a_turn_without_sockets() -> None:
    behaviour = Behaviour(DeviceSettings(name="pure", cwd="/w"), turn_delay=0.0)
    scope = Scope("agent-ref", "default")
    first = behaviour.handle(_input("r-1", "one two", "cm-1"))
    assert first.subscribe == scope and first.job is not None
    assert [o.frame["disposition"] for o in first.outputs if isinstance(o, Reply)] == ["started"]
    queued = behaviour.handle(_input("r-2", "three", "cm-2"))
    assert [o.frame.get("disposition") for o in queued.outputs if isinstance(o, Reply)] == ["queued"]
    again = behaviour.handle(_input("r-3", "three", "cm-2"))
    assert again.job is None and [o.frame["disposition"] for o in again.outputs if isinstance(o, Reply)] == [
        "queued"
    ]
    frames = [step.frame for step in first.job if isinstance(step, Event)]
    finished = [f for f in frames if f["type"] == "turn_finished"]
    assert len(finished) == 2  # the queued input ran after the first, in the same job
    text = "".join(f["delta"].get("content", "") for f in frames if f["type"] == "stream_delta")
    assert text == "Echo from pure: one twoEcho from pure: three"


async def test_registers_connects_paired_and_fills_the_row(srv: Router, device: Device) -> None:
    assert device.split and device.paired
    assert device.connection_id is not None and device.connection_id.startswith("conn-")
    row = await wait_until(lambda: _row_with(srv, device, "gitBranch"))
    assert row["connectionId"] == device.connection_id
    assert row["currentMode"] == "unrestricted"
    assert row["metadata"]["workingDirectory"] == os.getcwd()
    assert row["metadata"]["environmentMessageProtocol"] == "v2-input"
    # The router answers the device's pings on control; the pong watchdog never fires.
    pong = await device.wait_for(lambda f: f["type"] == "pong", timeout=5)
    assert pong["_channel"] == "control"
    await asyncio.sleep(2.5)
    assert device.connects == 1 and device.closed_codes == []


async def test_a_client_drives_a_turn_through_the_relay(srv: Router, device: Device) -> None:
    watcher = await _watch(srv, device)
    try:
        await watcher.send(_input("req-1", "hello there"))
        accepted = await watcher.wait_for(lambda f: f.get("type") == "input_accepted")
        assert accepted["request_id"] == "req-1" and accepted["accepted"] is True
        await watcher.wait_for(lambda f: f.get("type") == "turn_finished")
        events = [f for f in watcher.frames if "event_seq" in f]
        assert [f["event_seq"] for f in events] == sorted(f["event_seq"] for f in events)
        text = "".join(
            f["delta"]["content"]
            for f in events
            if f["type"] == "stream_delta" and f["delta"].get("message_type") == "assistant_message"
        )
        assert text == f"Echo from {device.name}: hello there"
        assert any(f["type"] == "update_loop_status" for f in events)
    finally:
        await watcher.close()


async def test_send_message_is_converted_and_run(srv: Router, device: Device) -> None:
    watcher = await _watch(srv, device)
    try:
        async with httpx.AsyncClient() as http:
            response = await http.post(
                f"{srv.base_url}/v1/environments/{device.connection_id}/messages",
                headers=srv.headers(),
                json={
                    "agentId": SCOPE["agent_id"],
                    "conversationId": SCOPE["conversation_id"],
                    "messages": [{"role": "user", "content": "via rest", "client_message_id": "cm-rest"}],
                },
            )
        assert response.status_code == 200 and response.json()["success"] is True
        await device.wait_for(lambda f: f["type"] in ("message", "input"))
        finished = await watcher.wait_for(lambda f: f.get("type") == "turn_finished")
        assert finished["stop_reason"] == "end_turn"
    finally:
        await watcher.close()


async def test_change_device_state_reaches_the_row(srv: Router, device: Device) -> None:
    watcher = await _watch(srv, device)
    try:
        state = {"mode": "acceptEdits", "cwd": "/srv/project"}
        await watcher.send({"type": "change_device_state", "runtime": SCOPE, "payload": state})

        async def changed() -> dict[str, Any] | None:
            row = await env_row(srv.base_url, srv.key, device.device_id)
            return row if row.get("currentMode") == "acceptEdits" else None

        row = await wait_until(changed)
        assert row["metadata"]["workingDirectory"] == "/srv/project"
    finally:
        await watcher.close()


async def test_a_dropped_connection_resumes_the_lease_and_event_seq(srv: Router, device: Device) -> None:
    watcher = await _watch(srv, device)
    try:
        await watcher.send({"type": "sync", "request_id": "sync-1", "runtime": SCOPE})
        await watcher.wait_for(lambda f: f.get("type") == "sync_response")
        lease, seq_before, sent_before = device.connection_id, device.event_seq, len(device.sent)
        device.sever()
        await wait_until(_async(lambda: device.connects == 2 and device.ready.is_set()), timeout=10)
        assert device.connection_id == lease and device.registrations == 1
        assert device.closed_codes[-1][0] == 1006
        # Subscriptions survive, so the device re-announces the scope's status with a continuing event_seq.
        replayed = [f for f in device.sent[sent_before:] if f.get("runtime") == SCOPE and "event_seq" in f]
        assert {f["type"] for f in replayed} >= {"update_device_status", "update_loop_status"}
        assert min(f["event_seq"] for f in replayed) > seq_before
        await watcher.send(_input("req-after", "still here"))
        await watcher.wait_for(lambda f: f.get("type") == "input_accepted" and f["request_id"] == "req-after")
    finally:
        await watcher.close()


async def test_a_newer_registration_of_the_slot_replaces_the_device(srv: Router) -> None:
    name, device_id = f"twin-{uuid.uuid4().hex[:6]}", str(uuid.uuid4())
    first = _device(srv, name, device_id=device_id)
    second = _device(srv, name, device_id=device_id)
    await first.start()
    await first.wait_ready(10)
    await second.start()
    try:
        await second.wait_ready(10)
        assert first.task is not None
        assert await asyncio.wait_for(first.task, 10) == 1
        assert first.replaced and (1000, REPLACED_REASON) in first.closed_codes
        assert second.ready.is_set() and not second.replaced
    finally:
        await second.stop()
        await first.stop()


async def test_bench_stream_delivers_every_frame(srv: Router) -> None:
    dev = _device(srv, record=False)
    await dev.start()
    await dev.wait_ready(10)
    watcher = await _watch(srv, dev)
    try:
        await watcher.send(
            {"type": "bench_stream", "request_id": "b-1", "runtime": SCOPE, "count": 300, "size": 64}
        )
        await watcher.wait_for(lambda f: f.get("type") == "bench_stream_response", within=20)

        def deltas() -> int:
            return sum(1 for f in watcher.frames if f.get("type") == "stream_delta")

        await wait_until(_async(lambda: deltas() == 300), timeout=20)
        assert dev.received == [] and dev.sent == []
    finally:
        await watcher.close()
        await dev.stop()


async def test_many_devices_share_one_loop(srv: Router) -> None:
    devices = [_device(srv, record=False, announce_status=False) for _ in range(50)]
    for dev in devices:
        await dev.start()
    try:
        await asyncio.gather(*(dev.wait_ready(20) for dev in devices))
        assert len({dev.connection_id for dev in devices}) == 50
    finally:
        await asyncio.gather(*(dev.stop() for dev in devices))
    assert all(dev.task is not None and dev.task.result() == 0 for dev in devices)


def _async(check: Callable[[], bool]) -> Callable[[], Any]:
    async def probe() -> bool:
        return check()

    return probe


async def _row_with(srv: Router, dev: Device, metadata_key: str) -> dict[str, Any] | None:
    row = await env_row(srv.base_url, srv.key, dev.device_id)
    return row if row["connectionId"] and metadata_key in (row.get("metadata") or {}) else None
