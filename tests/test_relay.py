"""The client relay: client-protocol §2 and checklist items 21-36."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidStatus

from tests.conftest import Router, start_router
from tests.wire import (
    RawDevice,
    closed_with,
    open_pair,
    open_socket,
    recv,
    recv_type,
    silent,
)

RT1 = {"agent_id": "agent-1", "conversation_id": "conv-1"}
RT2 = {"agent_id": "agent-1", "conversation_id": "conv-2"}


ROUTER_SETTINGS = {"reconnect_grace_seconds": 2}


def relay_url(srv: Router, connection_id: str, **params: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"{srv.ws_base}/v1/environments/{connection_id}/status/ws" + (f"?{query}" if query else "")


async def client_pair(
    srv: Router, dev: RawDevice, runtime: dict[str, str] | None = RT1, key: str | None = None
) -> tuple[ClientConnection, ClientConnection]:
    scope = {"agentId": runtime["agent_id"], "conversationId": runtime["conversation_id"]} if runtime else {}
    control = await open_socket(relay_url(srv, dev.connection_id, channel="control", **scope), key or srv.key)
    stream = await open_socket(relay_url(srv, dev.connection_id, channel="stream", **scope), key or srv.key)
    return control, stream


async def device_next(dev: RawDevice, kind: str) -> dict[str, Any]:
    return await recv_type(dev.control, kind)


def without_seq(frame: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in frame.items() if k != "seq"}


async def test_auth_by_header_or_query_token_and_refusals_before_upgrade(srv: Router) -> None:
    dev = await RawDevice.connect(srv.base_url, srv.key)
    ws = await open_socket(relay_url(srv, dev.connection_id), srv.key)
    await ws.close()
    ws = await open_socket(relay_url(srv, dev.connection_id, token=srv.key), None)
    await ws.close()
    for url, key, status in [
        (relay_url(srv, dev.connection_id), None, 401),
        (relay_url(srv, dev.connection_id), "tk_bad_bad", 401),
        (relay_url(srv, "conn-unknown"), srv.key, 404),
        (relay_url(srv, dev.connection_id), srv.create_key("elsewhere", "eve"), 404),
    ]:
        with pytest.raises(InvalidStatus) as refused:
            await open_socket(url, key)
        assert refused.value.response.status_code == status
        assert set(json.loads(refused.value.response.body or b"{}")) == {"errorCode", "message"}
    await dev.close()


async def test_ping_pong_ack_and_verbatim_forwarding_from_either_socket(srv: Router) -> None:
    dev = await RawDevice.connect(srv.base_url, srv.key)
    control, stream = await client_pair(srv, dev)
    await device_next(dev, "sync")  # the router subscribes the device to the pair's scope
    for ws in (control, stream):
        await ws.send('{"type":"ping"}')
        assert await recv(ws, timeout=1) == {"type": "pong"}
        await ws.send('{"type":"ack","seq":1}')
    command = (
        '{"type":"abort_message","request_id":"r-1",'
        '"runtime":{"agent_id":"agent-1","conversation_id":"conv-1"}}'
    )
    await stream.send(command)
    assert await dev.control.recv() == command  # byte for byte; ping and ack never reached the device
    await control.send(command.replace("r-1", "r-2"))
    assert await dev.control.recv() == command.replace("r-1", "r-2")
    assert await silent(control, 0.2) and await silent(stream, 0.01)
    await dev.close()


async def test_events_reach_both_sockets_with_independent_seq_and_stream_delta_on_stream(srv: Router) -> None:
    dev = await RawDevice.connect(srv.base_url, srv.key)
    control, stream = await client_pair(srv, dev)
    await device_next(dev, "sync")
    sent = [
        await dev.emit("stream_delta", RT1, delta={"message_type": "assistant_message", "content": f"c{i}"})
        for i in range(5)
    ]
    sent.append(await dev.emit("turn_finished", RT1, turn_id="t1", stop_reason="end_turn"))
    got_control = [await recv(control) for _ in sent]
    got_stream = [await recv(stream) for _ in sent]
    assert [f["seq"] for f in got_control] == list(range(got_control[0]["seq"], got_control[0]["seq"] + 6))
    assert [f["seq"] for f in got_stream] == list(range(got_stream[0]["seq"], got_stream[0]["seq"] + 6))
    for a, b, original in zip(got_control, got_stream, sent, strict=True):
        assert without_seq(a) == without_seq(b)
        assert a["idempotency_key"] == original["idempotency_key"]
        assert a["emitted_at"] == original["emitted_at"] and a["runtime"] == original["runtime"]
    assert [f["type"] for f in got_stream].count("stream_delta") == 5
    await dev.close()


async def test_frames_of_every_length_arrive_intact_on_both_sockets(srv: Router) -> None:
    dev = await RawDevice.connect(srv.base_url, srv.key)
    control, stream = await client_pair(srv, dev)
    await device_next(dev, "sync")
    # One of each WebSocket length encoding (7-bit, 16-bit, 64-bit) and multi-byte UTF-8.
    for content in ["", "é✓" * 20, "x" * 300, "y" * 70_000]:
        delta = {"message_type": "assistant_message", "content": content}
        sent = await dev.emit("stream_delta", RT1, delta=delta)
        for sock in (control, stream):
            got = await recv(sock)
            assert got["delta"] == delta and got["idempotency_key"] == sent["idempotency_key"]
    await dev.close()


async def test_responses_go_to_the_pair_that_asked(srv: Router) -> None:
    dev = await RawDevice.connect(srv.base_url, srv.key)
    a_control, a_stream = await client_pair(srv, dev)
    b_control, b_stream = await client_pair(srv, dev)
    await device_next(dev, "sync")
    await a_control.send(json.dumps({"type": "runtime_start", "request_id": "a-req", "agent_id": "agent-1"}))
    await device_next(dev, "runtime_start")
    await dev.control.send(
        json.dumps({"type": "runtime_start_response", "request_id": "a-req", "success": True})
    )
    assert (await recv(a_control))["request_id"] == "a-req"
    assert (await recv(a_stream))["request_id"] == "a-req"
    assert await silent(b_control, 0.3) and await silent(b_stream, 0.01)
    await dev.close()


async def test_two_pairs_and_closing_one_leaves_the_other_and_the_device(srv: Router) -> None:
    dev = await RawDevice.connect(srv.base_url, srv.key)
    a = await client_pair(srv, dev)
    b = await client_pair(srv, dev)
    await device_next(dev, "sync")
    await dev.emit("update_loop_status", RT1, loop_status={"status": "WAITING_ON_INPUT"})
    for ws in (*a, *b):
        assert (await recv(ws))["type"] == "update_loop_status"
    for ws in a:
        await ws.close()
    await dev.emit("turn_finished", RT1, turn_id="t", stop_reason="end_turn")
    for ws in b:
        assert (await recv(ws))["type"] == "turn_finished"
    await dev.control.send('{"type":"ping"}')
    assert await recv(dev.control) == {"type": "pong"}
    await dev.close()


async def test_scoped_feed_has_no_false_gaps_but_real_losses_show(srv: Router) -> None:
    dev = await RawDevice.connect(srv.base_url, srv.key)
    _, one_stream = await client_pair(srv, dev, RT1)
    everything = await open_socket(relay_url(srv, dev.connection_id), srv.key)
    await device_next(dev, "sync")
    for i in range(6):
        await dev.emit("update_loop_status", RT1 if i % 2 == 0 else RT2, loop_status={"status": "X"})
    scoped = [await recv(one_stream) for _ in range(3)]
    assert all(f["runtime"] == RT1 for f in scoped)
    numbers = [f["event_seq"] for f in scoped]
    assert numbers == list(range(numbers[0], numbers[0] + 3))  # no holes from conversation 2
    assert [f["device_event_seq"] for f in scoped] == [1, 3, 5]
    unscoped = [await recv(everything) for _ in range(6)]
    assert [f["event_seq"] for f in unscoped] == [1, 2, 3, 4, 5, 6]  # the device's own numbers
    # A real loss: the device skips numbers 7-8 (frames lost during an outage).
    dev.event_seq += 2
    await dev.emit("update_loop_status", RT1, loop_status={"status": "Y"})
    after = await recv(one_stream, timeout=3)
    assert after["event_seq"] == numbers[-1] + 2  # exactly one hole: the client resyncs
    await dev.close()


async def test_split_socket_events_are_put_back_in_event_seq_order(srv: Router) -> None:
    dev = await RawDevice.connect(srv.base_url, srv.key)
    everything = await open_socket(relay_url(srv, dev.connection_id), srv.key)
    await asyncio.sleep(0.1)
    # The device numbers 1 (stream_delta, stream socket) and 2 (turn_finished, control socket);
    # 2 overtakes 1 on the wire.
    first = {"type": "stream_delta", "runtime": RT1, "event_seq": 1, "idempotency_key": "k1", "delta": {}}
    second = {"type": "turn_finished", "runtime": RT1, "event_seq": 2, "idempotency_key": "k2"}
    await dev.control.send(json.dumps(second))
    await asyncio.sleep(0.01)
    await dev.stream.send(json.dumps(first))
    got = [await recv(everything), await recv(everything)]
    assert [f["event_seq"] for f in got] == [1, 2]
    await dev.close()


async def test_combined_socket_without_params_gets_everything_and_can_command(srv: Router) -> None:
    dev = await RawDevice.connect(srv.base_url, srv.key)
    ws = await open_socket(relay_url(srv, dev.connection_id), srv.key)
    await asyncio.sleep(0.1)
    await dev.emit("stream_delta", RT2, delta={"message_type": "assistant_message"})
    await dev.control.send(json.dumps({"type": "crons_updated", "timestamp": 1}))
    assert (await recv(ws))["type"] == "stream_delta"
    assert (await recv(ws))["type"] == "crons_updated"
    await ws.send('{"type":"app_server_info","request_id":"i-1"}')
    assert json.loads(await dev.control.recv())["request_id"] == "i-1"
    await dev.close()


async def test_device_reconnect_within_grace_keeps_clients_and_offline_closes_them(srv: Router) -> None:
    dev = await RawDevice.connect(srv.base_url, srv.key)
    control, stream = await client_pair(srv, dev)
    await device_next(dev, "sync")
    await dev.close()
    await asyncio.sleep(0.2)
    # While away, commands are refused at once with an error carrying their request_id.
    await control.send(json.dumps({"type": "input", "request_id": "in-9", "runtime": RT1, "payload": {}}))
    error = await recv_type(control, "error")
    assert error["request_id"] == "in-9" and error["success"] is False and error["error"]
    dev.control, dev.stream = await open_pair(dev.ws_url, srv.key, dev.device_id, dev.name, attempt=2)
    await device_next(dev, "sync")  # re-subscribed after the reconnect
    assert await silent(dev.control, 0.3)  # the refused command was not delivered late
    await dev.emit("turn_finished", RT1, turn_id="t", stop_reason="end_turn")
    assert (await recv_type(stream, "turn_finished"))["event_seq"] >= 1
    # Now the device leaves for good: after the grace window the relay closes both sockets.
    await dev.close()
    for ws in (control, stream):
        code, reason = await closed_with(ws, timeout=5)
        assert code == 1001 and "offline" in (reason or "")


async def test_closing_control_leaves_the_stream_socket_working(srv: Router) -> None:
    dev = await RawDevice.connect(srv.base_url, srv.key)
    control, stream = await client_pair(srv, dev)
    await device_next(dev, "sync")
    await control.close()
    await stream.send(
        '{"type":"sync","request_id":"s-2","runtime":{"agent_id":"agent-1","conversation_id":"conv-1"}}'
    )
    assert json.loads(await dev.control.recv())["request_id"] == "s-2"
    await dev.close()


async def test_a_client_that_cannot_keep_up_is_closed_instead_of_growing(tmp_path: Path) -> None:
    r = start_router(tmp_path / "r", client_queue_frames=64, client_queue_bytes=1024 * 1024)
    try:
        dev = await RawDevice.connect(r.base_url, r.key)
        slow = await open_socket(relay_url(r, dev.connection_id), r.key, max_queue=1)
        healthy = await open_socket(relay_url(r, dev.connection_id), r.key)
        await asyncio.sleep(0.1)
        blob = "x" * 65536
        # The healthy client reads everything as it comes; the slow one never reads.
        for _ in range(50):
            for _ in range(8):
                await dev.emit("stream_delta", RT1, delta={"content": blob})
            for _ in range(8):
                await recv(healthy, timeout=10)
        code, _ = await closed_with(slow, timeout=10)
        assert code == 4008
        await dev.close()
    finally:
        r.stop()


async def test_resume_replays_what_a_dropped_client_missed(srv: Router) -> None:
    dev = await RawDevice.connect(srv.base_url, srv.key)
    ws = await open_socket(relay_url(srv, dev.connection_id), srv.key)
    socket_id = ws.response.headers["x-tether-socket-id"]
    await asyncio.sleep(0.1)
    await dev.emit("update_loop_status", RT1, loop_status={"n": 1})
    seen = await recv(ws)
    ws.transport.abort()  # an abnormal drop, as on a network failure
    await asyncio.sleep(0.2)
    missed = [await dev.emit("update_loop_status", RT1, loop_status={"n": n}) for n in (2, 3)]
    back = await open_socket(
        relay_url(srv, dev.connection_id, resume=socket_id, resumeFrom=str(seen["seq"])), srv.key
    )
    assert back.response.headers["x-tether-socket-id"] == socket_id
    replay = [await recv(back), await recv(back)]
    assert [f["idempotency_key"] for f in replay] == [m["idempotency_key"] for m in missed]
    assert [f["seq"] for f in replay] == [seen["seq"] + 1, seen["seq"] + 2]
    await dev.emit("update_loop_status", RT1, loop_status={"n": 4})
    assert (await recv(back))["seq"] == seen["seq"] + 3
    # An unknown resume token gets a clear resync answer, then a live feed.
    fresh = await open_socket(
        relay_url(srv, dev.connection_id, resume=uuid.uuid4().hex, resumeFrom="5"), srv.key
    )
    assert (await recv(fresh))["type"] == "resync_required"
    await dev.close()


async def test_malformed_client_frames_get_an_error_and_break_nothing(srv: Router) -> None:
    dev = await RawDevice.connect(srv.base_url, srv.key)
    ws = await open_socket(relay_url(srv, dev.connection_id), srv.key)
    other = await open_socket(relay_url(srv, dev.connection_id), srv.key)
    await ws.send("{oops")
    assert (await recv(ws))["type"] == "error"
    await ws.send('{"type":"ping"}')
    assert await recv(ws) == {"type": "pong"}
    await other.send('{"type":"ping"}')
    assert await recv(other) == {"type": "pong"}
    await dev.close()


async def test_a_client_that_never_acks_still_gets_every_frame(srv: Router) -> None:
    dev = await RawDevice.connect(srv.base_url, srv.key)
    ws = await open_socket(relay_url(srv, dev.connection_id), srv.key)
    await asyncio.sleep(0.1)
    total = 10_000

    async def produce() -> None:
        for _ in range(total):
            await dev.emit("stream_delta", RT1, delta={"content": "."})

    producer = asyncio.create_task(produce())
    seqs = [(await recv(ws, timeout=20))["seq"] for _ in range(total)]
    await producer
    assert seqs == list(range(seqs[0], seqs[0] + total))
    await dev.close()


async def test_a_client_that_joins_while_the_device_is_away_is_subscribed_on_its_return(srv: Router) -> None:
    dev = await RawDevice.connect(srv.base_url, srv.key)
    await dev.close()
    await asyncio.sleep(0.2)
    control, _ = await client_pair(srv, dev)  # accepted: the device is within its grace window
    dev.control, dev.stream = await open_pair(dev.ws_url, srv.key, dev.device_id, dev.name, attempt=2)
    sync = await device_next(dev, "sync")
    assert sync["runtime"] == RT1
    await dev.emit("turn_finished", RT1, turn_id="t", stop_reason="end_turn")
    assert (await recv_type(control, "turn_finished"))["runtime"] == RT1
    await dev.close()


async def test_client_request_ids_are_never_mistaken_for_the_routers_own(srv: Router) -> None:
    dev = await RawDevice.connect(srv.base_url, srv.key)
    ws = await open_socket(relay_url(srv, dev.connection_id), srv.key)
    await ws.send('{"type":"app_server_info","request_id":"tether-sub-mine"}')
    assert json.loads(await dev.control.recv())["request_id"] == "tether-sub-mine"
    await dev.control.send(
        '{"type":"app_server_info_response","request_id":"tether-sub-mine","success":true}'
    )
    assert (await recv(ws))["request_id"] == "tether-sub-mine"
    await dev.close()
