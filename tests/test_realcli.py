"""The real Letta Code CLI (`@letta-ai/letta-code@0.32.18`, `letta server --debug`) as the device.

These are the judge: if the published CLI does not work unchanged against Tether, nothing else counts.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Router, service_missing, start_router
from tests.realcli import CONNECTED, REGISTERED, CliUnavailableError, LettaCli, ensure_cli
from tests.wire import open_socket, recv_type

pytestmark = pytest.mark.realcli


@pytest.fixture(scope="module")
def letta_js() -> Path:
    try:
        return ensure_cli()
    except CliUnavailableError as exc:
        service_missing(f"the Letta Code CLI ({exc})")
        raise


@pytest.fixture
async def cli(letta_js: Path) -> AsyncIterator[LettaCli]:
    process = LettaCli(letta_js)
    yield process
    await process.stop()


def online(srv: Router, name: str) -> Any:
    rows = srv.sdk().environments.list(online_only=True).connections
    return next((row for row in rows if row.connection_name == name), None)


async def wait_row(srv: Router, name: str, want_online: bool, timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = srv.sdk().environments.list().connections
        row = next((r for r in rows if r.connection_name == name), None)
        if row is not None and (row.connection_id is not None) == want_online:
            return row
        await asyncio.sleep(0.2)
    raise AssertionError(f"{name} did not become {'online' if want_online else 'offline'} in {timeout}s")


async def test_cli_registers_stays_connected_receives_messages_and_goes_offline(
    srv: Router, cli: LettaCli
) -> None:
    await cli.start(srv.base_url, srv.key, "cli-main")
    await cli.wait_for_line(REGISTERED)
    await cli.wait_for_line(CONNECTED)
    row = await wait_row(srv, "cli-main", want_online=True)
    assert row.connection_id.startswith("conn-")
    assert row.metadata.letta_code_version == "0.32.18"
    assert getattr(row.metadata, "environmentMessageProtocol") == "v2-input"  # noqa: B009

    sent = srv.sdk().environments.send_message(
        row.connection_id,
        messages=[
            {"role": "user", "content": "hello from tether", "client_message_id": "cm-cli-1", "otid": "o-1"}
        ],
        agent_id="agent-cli",
        conversation_id="conv-cli",
    )
    assert sent.success is True
    # The CLI logs the forwarded frame once turned into a v2 `input` (environmentMessageProtocol v2-input).
    line = await cli.wait_for_line(r'← recv  \{"type":"input".*cm-cli-1', timeout=10)
    frame = json.loads(line.split("← recv  ", 1)[1])
    assert frame["runtime"] == {"agent_id": "agent-cli", "conversation_id": "conv-cli"}
    message = frame["payload"]["messages"][0]
    assert message["content"] == "hello from tether" and message["otid"] == "o-1"

    # Two heartbeat rounds (30 s apart) answered, on one connection, with no reconnect loop.
    first_beat = row.last_heartbeat
    await cli.wait_for_line(r'← recv \(lifecycle\)  \{"type":"pong"\}', timeout=40)
    await asyncio.sleep(31)
    assert cli.count(r'\{"type":"pong"\}') >= 2
    assert cli.count(CONNECTED) == 1 and cli.count(r"Reconnecting") == 0
    row = await wait_row(srv, "cli-main", want_online=True)
    assert row.last_heartbeat > first_beat

    stopped = time.monotonic()
    await cli.stop()
    await wait_row(srv, "cli-main", want_online=False, timeout=10)
    assert time.monotonic() - stopped < 10


async def test_a_newer_registration_of_the_slot_makes_the_cli_exit(srv: Router, cli: LettaCli) -> None:
    await cli.start(srv.base_url, srv.key, "cli-replaced")
    await cli.wait_for_line(CONNECTED)
    row = await wait_row(srv, "cli-replaced", want_online=True)
    instance = "server-" + hashlib.sha256(b"cli-replaced").hexdigest()[:16]
    assert getattr(row, "listenerInstanceId") == instance  # noqa: B009
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{srv.base_url}/v1/environments/register",
            headers=srv.headers(),
            json={
                "deviceId": row.device_id,
                "listenerInstanceId": instance,
                "connectionName": "cli-replaced",
            },
        )
    assert response.status_code == 200
    assert await cli.wait_exit(timeout=15) == 1
    assert cli.count(r"Replaced by new connection") >= 1


async def test_a_relay_client_syncs_the_cli_and_gets_its_state(srv: Router, cli: LettaCli) -> None:
    await cli.start(srv.base_url, srv.key, "cli-relay")
    await cli.wait_for_line(CONNECTED)
    row = await wait_row(srv, "cli-relay", want_online=True)
    scope = "agentId=agent-relay&conversationId=default"
    base = f"{srv.ws_base}/v1/environments/{row.connection_id}/status/ws?{scope}"
    control = await open_socket(base + "&channel=control", srv.key)
    stream = await open_socket(base + "&channel=stream", srv.key)
    await control.send(
        json.dumps(
            {
                "type": "sync",
                "request_id": "sync-relay-1",
                "runtime": {"agent_id": "agent-relay", "conversation_id": "default"},
                "recover_approvals": False,
                "force_device_status": True,
            }
        )
    )
    response = await recv_type(control, "sync_response", timeout=20)
    assert response["request_id"] == "sync-relay-1" and isinstance(response["seq"], int)
    status = await recv_type(stream, "update_device_status", timeout=20)
    assert status["runtime"]["agent_id"] == "agent-relay" and isinstance(status["event_seq"], int)
    assert (await recv_type(stream, "sync_response", timeout=20))["request_id"] == "sync-relay-1"
    await control.close()
    await stream.close()


async def test_the_cli_on_one_pod_is_driven_from_another(
    tmp_path: Path, letta_js: Path, pg_url: str, redis_url: str
) -> None:
    pod_a = start_router(tmp_path / "a", database_url=pg_url, redis_url=redis_url, pod_id="cli-pod-a")
    pod_b = start_router(
        tmp_path / "b", database_url=pg_url, redis_url=redis_url, pod_id="cli-pod-b", create_key=False
    )
    pod_b.key = pod_a.key
    cli = LettaCli(letta_js)
    try:
        await cli.start(pod_a.base_url, pod_a.key, "cli-cluster")
        await cli.wait_for_line(CONNECTED)
        row = await wait_row(pod_b, "cli-cluster", want_online=True)
        assert row.pod_id == "cli-pod-a"
        sent = pod_b.sdk().environments.send_message(
            row.connection_id,
            messages=[{"role": "user", "content": "across pods", "client_message_id": "cm-pods"}],
            agent_id="agent-pods",
        )
        assert sent.success is True
        await cli.wait_for_line(r'← recv  \{"type":"input".*cm-pods', timeout=10)
        control = await open_socket(
            f"{pod_b.ws_base}/v1/environments/{row.connection_id}/status/ws", pod_b.key
        )
        await control.send(
            json.dumps(
                {
                    "type": "sync",
                    "request_id": "sync-pods",
                    "runtime": {"agent_id": "agent-pods", "conversation_id": "default"},
                    "force_device_status": True,
                }
            )
        )
        assert (await recv_type(control, "sync_response", timeout=20))["request_id"] == "sync-pods"
        await control.close()
        await cli.stop()
        await wait_row(pod_b, "cli-cluster", want_online=False, timeout=20)
    finally:
        await cli.stop()
        pod_a.stop()
        pod_b.stop()


async def test_the_cli_re_registers_after_a_1008(srv: Router, cli: LettaCli) -> None:
    await cli.start(srv.base_url, srv.key, "cli-1008")
    await cli.wait_for_line(CONNECTED)
    first = await wait_row(srv, "cli-1008", want_online=True)
    async with httpx.AsyncClient() as http:
        deleted = await http.delete(f"{srv.base_url}/v1/environments/{first.id}", headers=srv.headers())
    assert deleted.status_code == 204
    # The router closes the live socket with 1008: the CLI registers again and reconnects.
    mark = len(cli.lines)
    await cli.wait_for_line(r"re-registering", timeout=15, since=mark)
    await cli.wait_for_line(CONNECTED, timeout=15, since=mark)
    second = await wait_row(srv, "cli-1008", want_online=True)
    assert second.id != first.id and second.connection_id != first.connection_id
    assert second.device_id == first.device_id
    assert cli.returncode is None
