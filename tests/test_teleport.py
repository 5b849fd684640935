"""Teleport between two devices (device-protocol §6.2, client-protocol checklist 41)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.conftest import Router
from tests.wire import RawDevice, recv_type
from tether.device.client import Device

AGENT = "agent-tp"


@pytest.fixture
async def devices(srv: Router) -> AsyncIterator[tuple[Device, Device]]:
    source = Device(srv.base_url, srv.key, f"source-{uuid.uuid4().hex[:6]}", turn_delay=0.01)
    target = Device(srv.base_url, srv.key, f"target-{uuid.uuid4().hex[:6]}", turn_delay=0.01)
    for device in (source, target):
        await device.start()
        await device.wait_ready()
    yield source, target
    for device in (source, target):
        await device.stop()


async def post_teleport(srv: Router, conversation: str, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(
            f"{srv.base_url}/v1/environments/runtimes/{AGENT}/{conversation}/teleport",
            headers=srv.headers(),
            json=body,
        )


async def teleport_status(srv: Router, conversation: str, teleport_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as http:
        response = await http.get(
            f"{srv.base_url}/v1/environments/runtimes/{AGENT}/{conversation}/teleports/{teleport_id}",
            headers=srv.headers(),
        )
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


async def wait_status(srv: Router, conversation: str, teleport_id: str, status: str) -> dict[str, Any]:
    for _ in range(100):
        body = await teleport_status(srv, conversation, teleport_id)
        if body["status"] == status:
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"teleport never reached {status}: {body}")


async def run_turn(srv: Router, device: Device, conversation: str) -> None:
    """A turn on the source, so the router learns where the conversation runs."""
    assert device.connection_id is not None
    sent = srv.sdk().environments.send_message(
        device.connection_id,
        messages=[{"role": "user", "content": "work", "client_message_id": uuid.uuid4().hex}],
        agent_id=AGENT,
        conversation_id=conversation,
    )
    assert sent.success
    await device.wait_for(lambda f: f.get("type") == "message", timeout=5)
    await asyncio.sleep(0.3)


async def test_teleport_moves_a_conversation_and_reports_completed(
    srv: Router, devices: tuple[Device, Device]
) -> None:
    source, target = devices
    conversation = f"conv-{uuid.uuid4().hex[:6]}"
    await run_turn(srv, source, conversation)
    key = str(uuid.uuid4())
    response = await post_teleport(
        srv, conversation, {"targetConnectionId": target.connection_id, "idempotencyKey": key}
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] in ("waiting_for_source", "starting_destination", "completed")
    assert body["sourceConnectionId"] == source.connection_id
    assert body["targetDeviceId"] and body["targetConnectionName"] == target.name
    assert isinstance(body["createdAt"], int) and isinstance(body["updatedAt"], int)
    done = await wait_status(srv, conversation, body["id"], "completed")
    assert done["error"] is None
    request = await source.wait_for(lambda f: f.get("type") == "teleport_request", timeout=5)
    assert request["target"]["connection_id"] == target.connection_id
    start = await target.wait_for(lambda f: f.get("type") == "runtime_start", timeout=5)
    assert start["teleport_id"] == body["id"] and start["conversation_id"] == conversation
    cont = await target.wait_for(
        lambda f: f.get("type") == "input" and f["payload"]["kind"] == "teleport_continue", timeout=5
    )
    assert cont["payload"]["teleport_id"] == body["id"]
    # The same idempotency key returns the same teleport and starts nothing new.
    again = await post_teleport(
        srv, conversation, {"targetConnectionId": target.connection_id, "idempotencyKey": key}
    )
    assert again.status_code == 202 and again.json()["id"] == body["id"]
    assert sum(1 for f in source.received if f.get("type") == "teleport_request") == 1


async def test_a_destination_that_fails_makes_the_source_resume(
    srv: Router, devices: tuple[Device, Device]
) -> None:
    source, _ = devices
    conversation = f"conv-{uuid.uuid4().hex[:6]}"
    await run_turn(srv, source, conversation)
    refusing = await RawDevice.connect(srv.base_url, srv.key, name="refusing-target")
    response = await post_teleport(srv, conversation, {"targetConnectionId": refusing.connection_id})
    assert response.status_code == 202
    teleport_id = response.json()["id"]
    start = await recv_type(refusing.control, "runtime_start")
    await refusing.control.send(
        json.dumps(
            {
                "type": "runtime_start_response",
                "request_id": start["request_id"],
                "success": False,
                "error": "no",
            }
        )
    )
    failed = await wait_status(srv, conversation, teleport_id, "failed")
    assert "no" in failed["error"]
    notice = await source.wait_for(lambda f: f.get("type") == "teleport_failed", timeout=5)
    assert notice["teleport_id"] == teleport_id
    await refusing.close()


async def test_teleport_errors_are_json_and_never_500(srv: Router, devices: tuple[Device, Device]) -> None:
    source, target = devices
    cases = [
        ("default", {"targetConnectionId": target.connection_id}, 400),
        ("conv-unknown-runtime", {"targetConnectionId": target.connection_id}, 404),
        ("conv-x", {"targetConnectionId": "conn-nope"}, 409),
        ("conv-x", {}, 400),
    ]
    for conversation, body, status in cases:
        response = await post_teleport(srv, conversation, body)
        assert response.status_code == status, (conversation, body, response.text)
        assert set(response.json()) == {"errorCode", "message"}
    conversation = f"conv-{uuid.uuid4().hex[:6]}"
    await run_turn(srv, source, conversation)
    same = await post_teleport(srv, conversation, {"targetConnectionId": source.connection_id})
    assert same.status_code == 409 and same.json()["errorCode"] == "INVALID_TARGET"
    async with httpx.AsyncClient() as http:
        missing = await http.get(
            f"{srv.base_url}/v1/environments/runtimes/{AGENT}/c/teleports/teleport-nope",
            headers=srv.headers(),
        )
    assert missing.status_code == 404 and missing.json()["errorCode"] == "TELEPORT_NOT_FOUND"
