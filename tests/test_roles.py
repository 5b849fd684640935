"""Key roles (issue 15): stored and listed per key, and enforced on every REST write and socket."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.conftest import Router, start_router
from tests.wire import RawDevice, closed_with, device_url, open_socket, register


def role_key(srv: Router, role: str, org: str = "acme", user: str = "alice") -> str:
    out = srv.cli("keys", "create", "--org", org, "--user", user, "--role", role)
    assert f"created {role} key" in out.stdout
    return out.stdout.strip().splitlines()[-1]


def call(srv: Router, key: str, method: str, path: str, body: object = None) -> httpx.Response:
    return httpx.request(method, f"{srv.base_url}{path}", headers=srv.headers(key), json=body, timeout=10)


@pytest.fixture
def roles_router(tmp_path: Path, database_url: str) -> Iterator[Router]:
    r = start_router(tmp_path / "router", database_url=database_url)
    yield r
    r.stop()


async def test_roles_matrix_on_each_backend(roles_router: Router) -> None:
    srv = roles_router
    admin, member, readonly = (role_key(srv, r) for r in ("admin", "member", "readonly"))
    other_user = role_key(srv, "member", user="bob")
    listed = srv.cli("keys", "list").stdout
    assert "ROLE" in listed.splitlines()[0]
    assert {"admin", "member", "readonly"} <= set(listed.split())
    bad = srv.cli("keys", "create", "--org", "acme", "--user", "x", "--role", "root", check=False)
    assert bad.returncode != 0 and "invalid choice" in bad.stderr
    for key, role in ((admin, "admin"), (member, "member"), (readonly, "readonly"), (srv.key, "member")):
        assert call(srv, key, "GET", "/v1/tether/whoami").json()["role"] == role

    device = await RawDevice.connect(srv.base_url, other_user, name="bobs-laptop")
    try:
        row = call(srv, readonly, "GET", f"/v1/tether/environments?q={device.device_id}").json()["items"][0]
        env = row["id"]
        conn = device.connection_id
        message = {"agentId": "a", "messages": [{"role": "user", "content": "x", "client_message_id": "c"}]}
        writes = [
            ("POST", "/v1/environments/register", {"deviceId": "d", "connectionName": "n"}),
            ("POST", f"/v1/environments/{conn}/messages", message),
            ("POST", "/v1/environments/runtimes/a/c/teleport", {"targetConnectionId": conn}),
            ("POST", f"/v1/tether/environments/{env}/disconnect", None),
            ("POST", f"/v1/tether/environments/{env}/mode", {"mode": "strict"}),
            ("DELETE", f"/v1/environments/{env}", None),
        ]
        for method, path, body in writes:
            r = call(srv, readonly, method, path, body)
            assert r.status_code == 403 and r.json()["errorCode"] == "FORBIDDEN", (path, r.text)
        # Reads all work for readonly; the trace of another user's device is refused to members.
        for path in ("/v1/environments", f"/v1/tether/environments/{env}", "/v1/tether/teleports"):
            assert call(srv, readonly, "GET", path).status_code == 200, path
        assert call(srv, readonly, "GET", f"/v1/tether/environments/{env}/trace").status_code == 403
        assert call(srv, member, "GET", f"/v1/tether/environments/{env}/trace").status_code == 403
        assert call(srv, other_user, "GET", f"/v1/tether/environments/{env}/trace").json()["tracing"] is True
        assert call(srv, admin, "GET", f"/v1/tether/environments/{env}/trace").json()["tracing"] is True
        for key in (readonly, member):
            assert call(srv, key, "GET", "/v1/tether/pods").status_code == 403
        assert call(srv, admin, "GET", "/v1/tether/pods").status_code == 200
        # A member and an admin act on any device of their organization.
        assert (
            call(
                srv, member, "POST", f"/v1/tether/environments/{env}/mode", {"mode": "acceptEdits"}
            ).status_code
            == 202
        )
        assert (
            call(
                srv, admin, "POST", "/v1/environments/register", {"deviceId": "adm", "connectionName": "a"}
            ).status_code
            == 200
        )

        # readonly keys: a device socket is refused with 1008, relay commands answer an error frame.
        reg = await register(srv.base_url, member, name="ro-socket")
        ws = await open_socket(device_url(reg["wsUrl"], reg["deviceId"], "ro-socket"), readonly)
        code, reason = await closed_with(ws)
        assert code == 1008 and reason and "readonly" in reason
        relay_url = f"{srv.ws_base}/v1/environments/{conn}/status/ws?agentId=a&conversationId=default"
        async with connect(relay_url, additional_headers=srv.headers(readonly)) as relay:
            await relay.send(
                json.dumps(
                    {
                        "type": "sync",
                        "request_id": "r1",
                        "runtime": {"agent_id": "a", "conversation_id": "default"},
                    }
                )
            )
            while True:
                frame = json.loads(await relay.recv())
                if frame.get("request_id") == "r1":
                    break
            assert frame["type"] == "error" and frame["code"] == "forbidden"
    finally:
        await device.close()

    # Nothing crosses organizations, whatever the role.
    stranger = role_key(srv, "admin", org=f"org-{uuid.uuid4().hex[:6]}")
    assert call(srv, stranger, "GET", "/v1/tether/environments").json()["total"] == 0
    assert call(srv, stranger, "GET", f"/v1/tether/environments/{env}").status_code == 404
    assert call(srv, stranger, "GET", f"/v1/tether/environments/{env}/trace").status_code == 404
    assert call(srv, stranger, "POST", f"/v1/tether/environments/{env}/disconnect").status_code == 404
    assert call(srv, stranger, "DELETE", f"/v1/environments/{env}").status_code == 404
