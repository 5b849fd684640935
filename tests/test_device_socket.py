"""The device edge, frame by frame: device-protocol §2-§4 and its router checklist."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import httpx
import pytest

from tests.conftest import Router, start_router
from tests.wire import (
    RawDevice,
    closed_with,
    device_url,
    env_row,
    open_pair,
    open_socket,
    recv,
    recv_type,
    register,
    silent,
    wait_until,
)

ROUTER_SETTINGS = {"offline_after_seconds": 3, "reconnect_grace_seconds": 1, "heartbeat_flush_seconds": 60}


async def test_paired_split_sockets_get_listener_ready_and_the_row_turns_online(srv: Router) -> None:
    reg = await register(srv.base_url, srv.key, name="laptop")
    assert reg["supportsSplitStatusChannels"] is True and reg["supportsPairedListenerGenerations"] is True
    generation = str(uuid.uuid4())
    params = {"connectionGeneration": generation, "connectionAttempt": 3}
    control = await open_socket(
        device_url(reg["wsUrl"], reg["deviceId"], "laptop", channel="control", **params), srv.key
    )
    assert await recv(control) == {
        "type": "listener_ready",
        "connection_generation": generation,
        "connection_attempt": 3,
    }
    stream = await open_socket(
        device_url(reg["wsUrl"], reg["deviceId"], "laptop", channel="stream", **params), srv.key
    )
    assert (await recv(stream))["connection_generation"] == generation
    row = await wait_until(
        lambda: _online_row(srv, reg["deviceId"]),
    )
    assert row["connectionId"] == reg["connectionId"]
    assert row["podId"] == srv.pod_id
    assert isinstance(row["connectedAt"], int) and isinstance(row["lastHeartbeat"], int)
    # Nothing but listener_ready is ever sent on the stream socket.
    assert await silent(stream, 0.3)
    await control.close()
    await stream.close()


@pytest.mark.parametrize(
    "params",
    [
        {"channel": "sideways"},
        {"channel": "control", "connectionGeneration": "g1"},  # a generation without its attempt
        {"channel": "control", "connectionAttempt": 1},  # an attempt without its generation
        {"channel": "control", "connectionGeneration": "g1", "connectionAttempt": 0},
        {"channel": "control", "connectionGeneration": "g1", "connectionAttempt": "two"},
    ],
)
async def test_a_socket_with_an_invalid_hello_is_closed_with_4400(
    srv: Router, params: dict[str, object]
) -> None:
    reg = await register(srv.base_url, srv.key, name="laptop")
    ws = await open_socket(device_url(reg["wsUrl"], reg["deviceId"], "laptop", **params), srv.key)
    code, _ = await closed_with(ws)
    assert code == 4400


async def test_hello_parameters_are_read_percent_decoded(srv: Router) -> None:
    reg = await register(srv.base_url, srv.key, name="laptop")
    generation = "gen/1 + é"  # urlencode turns these into %2F, + and %C3%A9
    params = {"channel": "control", "connectionGeneration": generation, "connectionAttempt": 2}
    url = device_url(reg["wsUrl"], reg["deviceId"], "laptop", **params)
    control = await open_socket(url, srv.key)
    assert await recv(control) == {
        "type": "listener_ready",
        "connection_generation": generation,
        "connection_attempt": 2,
    }
    await control.close()


async def _online_row(srv: Router, device_id: str) -> dict[str, object] | None:
    row = await env_row(srv.base_url, srv.key, device_id)
    return row if row["connectionId"] else None


async def test_ping_gets_pong_on_the_same_socket_and_refreshes_heartbeat_without_waiting_for_a_flush(
    srv: Router,
) -> None:
    dev = await RawDevice.connect(srv.base_url, srv.key)
    before = (await wait_until(lambda: _online_row(srv, dev.device_id)))["lastHeartbeat"]
    await asyncio.sleep(0.05)
    await dev.control.send('{"type":"ping"}')
    assert await recv(dev.control) == {"type": "pong"}
    await dev.stream.send('{"type":"ping"}')
    assert await recv(dev.stream) == {"type": "pong"}
    after = (await env_row(srv.base_url, srv.key, dev.device_id))["lastHeartbeat"]
    assert isinstance(before, int) and isinstance(after, int) and after > before
    await dev.close()


async def test_stream_with_a_wrong_generation_is_refused_without_a_terminal_code(srv: Router) -> None:
    reg = await register(srv.base_url, srv.key)
    good = {"connectionGeneration": str(uuid.uuid4()), "connectionAttempt": 1}
    control = await open_socket(
        device_url(reg["wsUrl"], reg["deviceId"], "d", channel="control", **good), srv.key
    )
    await recv(control)
    wrong = {"connectionGeneration": str(uuid.uuid4()), "connectionAttempt": 1}
    stream = await open_socket(
        device_url(reg["wsUrl"], reg["deviceId"], "d", channel="stream", **wrong), srv.key
    )
    code, reason = await closed_with(stream)
    assert code not in (1008, 1000) and code is not None
    assert "generation" in (reason or "")
    # The stale stream never became current: the row is not online through it.
    assert (await env_row(srv.base_url, srv.key, reg["deviceId"]))["connectionId"] is None
    await control.close()


async def test_newer_attempt_supersedes_and_a_late_older_attempt_is_refused(srv: Router) -> None:
    reg = await register(srv.base_url, srv.key)
    old_control, old_stream = await open_pair(reg["wsUrl"], srv.key, reg["deviceId"], "d", attempt=1)
    new_control, new_stream = await open_pair(reg["wsUrl"], srv.key, reg["deviceId"], "d", attempt=2)
    for ws in (old_control, old_stream):
        code, _ = await closed_with(ws)
        assert code is not None and code not in (1008, 1000)
    late = await open_socket(
        device_url(
            reg["wsUrl"],
            reg["deviceId"],
            "d",
            channel="control",
            connectionGeneration=uuid.uuid4(),
            connectionAttempt=1,
        ),
        srv.key,
    )
    code, _ = await closed_with(late)
    assert code is not None and code not in (1008, 1000)
    await new_control.send('{"type":"ping"}')
    assert await recv(new_control) == {"type": "pong"}
    assert (await env_row(srv.base_url, srv.key, reg["deviceId"]))["connectionId"] == reg["connectionId"]
    await new_control.close()
    await new_stream.close()


@pytest.mark.parametrize("case", ["unknown", "bad-key", "other-org"])
async def test_unknown_lease_or_key_is_upgraded_then_closed_1008(srv: Router, case: str) -> None:
    reg = await register(srv.base_url, srv.key)
    url, key = reg["wsUrl"], srv.key
    if case == "unknown":
        url = url.rsplit("/", 1)[0] + "/conn-doesnotexist"
    elif case == "bad-key":
        key = "tk_nope_nope"
    else:
        key = srv.create_key("other-org", "mallory")
    ws = await open_socket(device_url(url, reg["deviceId"], "d", channel="control"), key)
    code, _ = await closed_with(ws)
    assert code == 1008


async def test_single_socket_mode_is_ready_at_once(srv: Router) -> None:
    reg = await register(srv.base_url, srv.key)
    ws = await open_socket(device_url(reg["wsUrl"], reg["deviceId"], "d"), srv.key)
    await ws.send('{"type":"ping"}')
    assert await recv(ws) == {"type": "pong"}
    assert (await wait_until(lambda: _online_row(srv, reg["deviceId"])))["connectionId"] == reg[
        "connectionId"
    ]
    await ws.close()


async def test_a_newer_registration_of_the_slot_replaces_the_connected_device(srv: Router) -> None:
    device_id = str(uuid.uuid4())
    first = await RawDevice.connect(srv.base_url, srv.key, device_id=device_id)
    second = await register(srv.base_url, srv.key, device_id=device_id)
    assert second["connectionId"] != first.connection_id
    for ws in (first.control, first.stream):
        code, reason = await closed_with(ws)
        assert (code, reason) == (1000, "Replaced by new connection")
    # The old lease is gone for good: reconnecting with it gets 1008 and the device re-registers.
    ws = await open_socket(device_url(first.ws_url, device_id, "d", channel="control"), srv.key)
    assert (await closed_with(ws))[0] == 1008


async def test_a_lease_replaced_while_its_device_was_away_is_refused(srv: Router) -> None:
    """The router still holds the dropped device's link (grace window); a newer registration of the
    slot must still win over it."""
    device_id = str(uuid.uuid4())
    first = await RawDevice.connect(srv.base_url, srv.key, device_id=device_id)
    await first.close()
    second = await register(srv.base_url, srv.key, device_id=device_id)
    assert second["connectionId"] != first.connection_id
    ws = await open_socket(device_url(first.ws_url, device_id, "d", channel="control"), srv.key)
    assert (await closed_with(ws))[0] == 1008


async def test_socket_close_turns_the_row_offline_and_a_reconnect_keeps_the_lease(srv: Router) -> None:
    dev = await RawDevice.connect(srv.base_url, srv.key)
    await wait_until(lambda: _online_row(srv, dev.device_id))
    await dev.close()
    row = await wait_until(lambda: _offline_row(srv, dev.device_id))
    assert row["connectedAt"] is None and row["podId"] is None
    assert row["id"] and row["firstSeenAt"] and row["lastSeenAt"]
    control, stream = await open_pair(dev.ws_url, srv.key, dev.device_id, dev.name, attempt=2)
    row = await wait_until(lambda: _online_row(srv, dev.device_id))
    assert row["connectionId"] == dev.connection_id
    await control.close()
    await stream.close()


async def _offline_row(srv: Router, device_id: str) -> dict[str, object] | None:
    row = await env_row(srv.base_url, srv.key, device_id)
    return row if row["connectionId"] is None else None


async def test_a_silent_device_goes_offline_and_its_socket_is_dropped(srv: Router) -> None:
    dev = await RawDevice.connect(srv.base_url, srv.key)
    await wait_until(lambda: _online_row(srv, dev.device_id))
    # The router's silence limit is 3 s here (120 s in production).
    code, _ = await closed_with(dev.control, timeout=8)
    assert code is not None and code not in (1008, 1000)
    assert (await env_row(srv.base_url, srv.key, dev.device_id))["connectionId"] is None


async def test_update_device_status_updates_the_row(srv: Router) -> None:
    dev = await RawDevice.connect(srv.base_url, srv.key)
    runtime = {"agent_id": "agent-1", "conversation_id": "default"}
    status = {
        "current_permission_mode": "acceptEdits",
        "current_working_directory": "/home/u/project",
        "git_context": {"branch": "feature/x", "recent_branches": []},
    }
    await dev.emit("update_device_status", runtime, device_status=status)
    row = await wait_until(lambda: _row_where(srv, dev.device_id, "currentMode", "acceptEdits"))
    assert row["metadata"]["workingDirectory"] == "/home/u/project"
    assert row["metadata"]["gitBranch"] == "feature/x"
    assert row["metadata"]["lettaCodeVersion"] == "0.32.18"
    # `strict` is not in the REST enum: it must never leak into currentMode.
    await dev.emit(
        "update_device_status", runtime, device_status={**status, "current_permission_mode": "strict"}
    )
    row = await wait_until(lambda: _row_where(srv, dev.device_id, "currentMode", None))
    assert row["metadata"]["permissionMode"] == "strict"
    srv.sdk().environments.retrieve(dev.device_id)  # parses under strict validation
    # Back to the first status: equal to one written before, but not to the last one, so written.
    await dev.emit("update_device_status", runtime, device_status=status)
    row = await wait_until(lambda: _row_where(srv, dev.device_id, "currentMode", "acceptEdits"))
    assert "permissionMode" not in row["metadata"] or row["metadata"]["permissionMode"] == "acceptEdits"
    await dev.close()


async def _row_where(srv: Router, device_id: str, key: str, value: object) -> dict[str, object] | None:
    row = await env_row(srv.base_url, srv.key, device_id)
    return row if row.get(key) == value else None


async def test_frames_of_16_mib_are_accepted(srv: Router) -> None:
    dev = await RawDevice.connect(srv.base_url, srv.key)
    big = {
        "type": "read_file_response",
        "request_id": "r1",
        "success": True,
        "content": "A" * (16 * 1024 * 1024),
    }
    await dev.control.send(json.dumps(big))
    await dev.control.send('{"type":"ping"}')
    assert await recv(dev.control, timeout=20) == {"type": "pong"}
    await dev.close()


async def test_malformed_and_unknown_frames_are_dropped_without_closing_anything(srv: Router) -> None:
    bystander = await RawDevice.connect(srv.base_url, srv.key)
    dev = await RawDevice.connect(srv.base_url, srv.key)
    for junk in [
        "not json",
        "[1,2]",
        '{"no":"type"}',
        '{"type": 5}',
        b"\xff\xfe",
        '{"type":"from_the_future"}',
    ]:
        await dev.control.send(junk)
    await dev.control.send('{"type":"ping"}')
    assert await recv(dev.control) == {"type": "pong"}
    await bystander.control.send('{"type":"ping"}')
    assert await recv(bystander.control) == {"type": "pong"}
    await dev.close()
    await bystander.close()


async def test_send_message_delivers_the_body_verbatim_once(srv: Router) -> None:
    dev = await RawDevice.connect(srv.base_url, srv.key)
    sdk = srv.sdk()
    message = {"client_message_id": "cm-1", "content": "hi", "role": "user", "otid": "o-1"}
    result = sdk.environments.send_message(
        dev.connection_id, messages=[message], agent_id="agent-1", conversation_id="conv-1"
    )
    assert result.success is True
    frame = await recv_type(dev.control, "message")
    assert frame == {
        "type": "message",
        "agentId": "agent-1",
        "conversationId": "conv-1",
        "messages": [message],
    }
    # A retry of the same client_message_id within the window is not delivered again.
    again = sdk.environments.send_message(dev.connection_id, messages=[message], agent_id="agent-1")
    assert again.success is True
    assert await silent(dev.control, 0.5)
    approval = {
        "type": "approval",
        "approvals": [
            {"approve": True, "tool_call_id": "tc1", "type": "approval"},
            {"status": "success", "tool_call_id": "tc2", "tool_return": "ok", "type": "tool"},
        ],
    }
    sdk.environments.send_message(
        dev.connection_id, messages=[approval], agent_id="agent-1", conversation_id=None
    )
    frame = await recv_type(dev.control, "message")
    assert frame["messages"] == [approval] and frame["conversationId"] is None
    await dev.close()


async def test_send_message_to_an_offline_device_is_not_queued(srv: Router) -> None:
    dev = await RawDevice.connect(srv.base_url, srv.key)
    lease = dev.connection_id
    await dev.close()
    await wait_until(lambda: _offline_row(srv, dev.device_id))
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{srv.base_url}/v1/environments/{lease}/messages",
            headers=srv.headers(),
            json={
                "agentId": "a",
                "messages": [{"role": "user", "content": "x", "client_message_id": "late"}],
            },
        )
    assert response.status_code == 200 and response.json()["success"] is False
    control, stream = await open_pair(dev.ws_url, srv.key, dev.device_id, dev.name, attempt=2)
    assert await silent(control, 0.5)
    await control.close()
    await stream.close()


async def test_expired_lease_gets_1008(tmp_path: Path) -> None:
    r = start_router(tmp_path / "r", lease_ttl_seconds=1)
    try:
        reg = await register(r.base_url, r.key)
        await asyncio.sleep(1.5)
        ws = await open_socket(device_url(reg["wsUrl"], reg["deviceId"], "d", channel="control"), r.key)
        assert (await closed_with(ws))[0] == 1008
    finally:
        r.stop()


async def test_metrics_count_what_happened(srv: Router) -> None:
    dev = await RawDevice.connect(srv.base_url, srv.key)
    await dev.control.send("not json")
    await dev.control.send('{"type":"ping"}')
    await recv(dev.control)
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{srv.base_url}/metrics")).text
    values = {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("tether_")
    }
    assert values["tether_device_malformed_frames_total"] >= 1
    assert values["tether_device_heartbeats_total"] >= 1
    assert values["tether_devices_ready"] >= 1
    assert values["tether_registrations_total"] >= 1
    await dev.close()


async def test_deleting_an_environment_closes_its_device_with_1008(srv: Router) -> None:
    dev = await RawDevice.connect(srv.base_url, srv.key)
    row = await wait_until(lambda: _online_row(srv, dev.device_id))
    other = srv.create_key("other-org-delete", "bob")
    async with httpx.AsyncClient() as http:
        url = f"{srv.base_url}/v1/environments/{row['id']}"
        assert (await http.delete(url, headers=srv.headers(other))).status_code == 404
        assert (await http.delete(url, headers=srv.headers())).status_code == 204
        assert (await closed_with(dev.control))[0] == 1008
        assert (await http.delete(url, headers=srv.headers())).json()["errorCode"] == "ENVIRONMENT_NOT_FOUND"
        gone = await http.get(f"{srv.base_url}/v1/environments/{dev.device_id}", headers=srv.headers())
    assert gone.status_code == 404


async def test_quick_reconnects_leave_the_row_online(srv: Router) -> None:
    dev = await RawDevice.connect(srv.base_url, srv.key)
    for attempt in range(2, 22):
        await dev.close()
        dev.control, dev.stream = await open_pair(
            dev.ws_url, srv.key, dev.device_id, dev.name, attempt=attempt
        )
    await asyncio.sleep(0.5)  # every overlapping presence write has landed by now
    row = await env_row(srv.base_url, srv.key, dev.device_id)
    assert row["connectionId"] == dev.connection_id and row["podId"] == srv.pod_id
    listed = srv.sdk().environments.list(online_only=True).connections
    assert dev.device_id in {r.device_id for r in listed}
    await dev.close()
