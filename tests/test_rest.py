"""The REST half of the Environments API through the real `letta-client` SDK (client-protocol §1, §4;
device-protocol §1), on the embedded SQLite and on the real PostgreSQL.

One router per backend serves the whole module; every test works in an organization of its own, so
tests cannot see each other's rows.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import letta_client
import pytest
from letta_client import Letta

from tests.conftest import Router, drop_pg_database, fresh_pg_database, start_router
from tests.wire import open_pair
from tether.clock import now_ms
from tether.store.sql import SqlStore

DEVICE_METADATA: dict[str, Any] = {
    "lettaCodeVersion": "0.32.18",
    "os": "linux",
    "nodeVersion": "v22.19.0",
    "environmentMessageProtocol": "v2-input",
    "supportsPairedListenerGenerations": True,
    "supported_commands": ["clear", "clear-messages", "doctor", "upgrade-letta-code"],
    "self_update": {"supported": True, "writable": True, "manual_command": "npm i -g @letta-ai/letta-code"},
}
ROW_KEYS = {
    "id",
    "connectionId",
    "connectionName",
    "deviceId",
    "listenerInstanceId",
    "organizationId",
    "userId",
    "apiKeyOwner",
    "podId",
    "connectedAt",
    "lastHeartbeat",
    "lastSeenAt",
    "firstSeenAt",
    "currentMode",
    "metadata",
}
NULLABLE_WHILE_OFFLINE = ("connectionId", "podId", "connectedAt", "lastHeartbeat")
AUTH_CACHE_SECONDS = 1.0
# One client for the module: a new httpx client costs an SSL context, more than the request itself.
HTTP = httpx.Client(timeout=30.0)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    workdir = tmp_path_factory.mktemp(f"rest-{request.param}")
    url = f"sqlite+aiosqlite:///{workdir / 'tether.db'}" if request.param == "sqlite" else fresh_pg_database()
    router = start_router(workdir, database_url=url, auth_cache_seconds=AUTH_CACHE_SECONDS)
    yield router
    router.stop()
    if request.param == "postgres":
        drop_pg_database(url)


async def _create_key(database_url: str, org: str, user: str) -> str:
    store = SqlStore(database_url)
    try:
        return await store.create_key(org, user, "test", now_ms())
    finally:
        await store.close()


@dataclass
class Tenant:
    """One organization's view of the router."""

    router: Router
    org: str
    key: str

    @property
    def base_url(self) -> str:
        return self.router.base_url

    def user_key(self, user: str) -> str:
        return asyncio.run(_create_key(self.router.env["TETHER_DATABASE_URL"], self.org, user))

    def sdk(self, key: str | None = None) -> Letta:
        return Letta(
            base_url=self.base_url,
            api_key=key or self.key,
            http_client=HTTP,
            _strict_response_validation=True,
        )

    def counted_sdk(self, key: str | None) -> tuple[Letta, list[httpx.Request]]:
        """An SDK client that records every HTTP request it makes (retries included)."""
        sent: list[httpx.Request] = []
        http = httpx.Client(event_hooks={"request": [sent.append]})
        client = Letta(
            base_url=self.base_url, api_key=key, http_client=http, _strict_response_validation=True
        )
        return client, sent

    def register(
        self,
        device_id: str,
        name: str = "work-laptop",
        instance: str | None = "server-1a2b3c4d5e6f7a8b",
        metadata: dict[str, Any] | None = None,
        key: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"deviceId": device_id}
        if instance is not None:
            body["listenerInstanceId"] = instance
        body["connectionName"] = name
        body["metadata"] = DEVICE_METADATA if metadata is None else metadata
        response = self.post_register(json.dumps(body).encode(), key=key, headers=headers)
        assert response.status_code == 200, response.text
        reply: dict[str, Any] = response.json()
        return reply

    def post_register(
        self, content: bytes, key: str | None = None, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        """POST /register with exactly the three headers `letta server` sends (device-protocol §1.1)."""
        sent = {
            "Authorization": f"Bearer {key or self.key}",
            "Content-Type": "application/json",
            "X-Letta-Source": "letta-code",
            **(headers or {}),
        }
        return HTTP.post(f"{self.base_url}/v1/environments/register", content=content, headers=sent)

    def get(self, path: str, key: str | None = None, **params: str) -> httpx.Response:
        return HTTP.get(
            f"{self.base_url}{path}", params=params, headers={"Authorization": f"Bearer {key or self.key}"}
        )

    def post(self, path: str, body: Any, key: str | None = None) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return HTTP.post(
            f"{self.base_url}{path}",
            content=content,
            headers={"Authorization": f"Bearer {key or self.key}", "Content-Type": "application/json"},
        )

    def rows(self, key: str | None = None, **params: str) -> list[dict[str, Any]]:
        response = self.get("/v1/environments", key=key, **params)
        assert response.status_code == 200, response.text
        connections: list[dict[str, Any]] = response.json()["connections"]
        return connections


@pytest.fixture
def tenant(backend: Router) -> Tenant:
    org = f"org-{uuid.uuid4().hex[:8]}"
    return Tenant(backend, org, asyncio.run(_create_key(backend.env["TETHER_DATABASE_URL"], org, "alice")))


@pytest.fixture
def other_tenant(backend: Router) -> Tenant:
    org = f"other-{uuid.uuid4().hex[:8]}"
    return Tenant(backend, org, asyncio.run(_create_key(backend.env["TETHER_DATABASE_URL"], org, "mallory")))


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """Every error is exactly `{"errorCode", "message"}` JSON, and tells the SDK not to retry."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert set(body) == {"errorCode", "message"}, body
    assert isinstance(body["errorCode"], str) and body["errorCode"].isupper()
    assert isinstance(body["message"], str) and body["message"]
    if code is not None:
        assert body["errorCode"] == code, body
    if status not in (408, 429, 503):
        assert response.headers["x-should-retry"] == "false"
    return body


def device_id() -> str:
    return str(uuid.uuid4())


# ---- list, register, retrieve ---------------------------------------------------------------


def test_a_new_organization_lists_no_environments(tenant: Tenant) -> None:
    page = tenant.sdk().environments.list()
    assert page.connections == [] and page.has_next_page is False
    assert tenant.get("/v1/environments").json() == {"connections": [], "hasNextPage": False}


def test_registration_as_the_device_sends_it_is_listed_and_retrieved_with_every_field_typed(
    tenant: Tenant,
) -> None:
    dev = device_id()
    before = now_ms()
    reply = tenant.register(dev, name="work-laptop")
    after = now_ms()

    assert set(reply) == {
        "connectionId",
        "wsUrl",
        "supportsSplitStatusChannels",
        "supportsPairedListenerGenerations",
    }
    assert reply["connectionId"].startswith("conn-")
    assert reply["wsUrl"] == f"{tenant.router.ws_base}/v1/environments/ws/{reply['connectionId']}"
    assert reply["supportsSplitStatusChannels"] is True and reply["supportsPairedListenerGenerations"] is True

    [row] = tenant.rows()
    assert set(row) == ROW_KEYS
    for key in NULLABLE_WHILE_OFFLINE:  # registered, never connected: offline, keys present as null
        assert key in row and row[key] is None
    assert row["id"].startswith("env-")
    assert row["deviceId"] == dev
    assert row["connectionName"] == "work-laptop"
    assert row["listenerInstanceId"] == "server-1a2b3c4d5e6f7a8b"
    assert isinstance(row["organizationId"], str) and row["organizationId"]
    assert isinstance(row["userId"], str) and row["userId"] == row["apiKeyOwner"]
    assert row["currentMode"] is None
    for key in ("firstSeenAt", "lastSeenAt"):
        assert type(row[key]) is int and before <= row[key] <= after
    # Verbatim: same keys, same values, same order, snake_case keys untouched.
    assert row["metadata"] == DEVICE_METADATA
    assert list(row["metadata"]) == list(DEVICE_METADATA)

    retrieved = tenant.get(f"/v1/environments/{dev}").json()
    assert retrieved == row

    sdk = tenant.sdk()
    [conn] = sdk.environments.list().connections
    assert conn.id == row["id"] and conn.device_id == dev and conn.connection_id is None
    assert conn.first_seen_at == row["firstSeenAt"] and conn.last_heartbeat is None
    assert conn.metadata is not None
    assert conn.metadata.letta_code_version == "0.32.18" and conn.metadata.os == "linux"
    assert getattr(conn.metadata, "environmentMessageProtocol") == "v2-input"  # noqa: B009
    assert getattr(conn.metadata, "supported_commands") == DEVICE_METADATA["supported_commands"]  # noqa: B009
    assert getattr(conn.metadata, "self_update") == DEVICE_METADATA["self_update"]  # noqa: B009
    assert getattr(conn, "listenerInstanceId") == "server-1a2b3c4d5e6f7a8b"  # noqa: B009
    one = sdk.environments.retrieve(dev)
    assert (
        one.id == row["id"] and one.organization_id == row["organizationId"] and one.user_id == row["userId"]
    )


def test_reregistering_a_slot_keeps_the_row_id_and_issues_a_fresh_lease(tenant: Tenant) -> None:
    dev = device_id()
    first = tenant.register(dev, name="old-name")
    [row1] = tenant.rows()
    second = tenant.register(dev, name="new-name", metadata={"lettaCodeVersion": "0.32.19", "os": "darwin"})
    [row2] = tenant.rows()

    assert row2["id"] == row1["id"]
    assert second["connectionId"].startswith("conn-") and second["connectionId"] != first["connectionId"]
    assert row2["firstSeenAt"] == row1["firstSeenAt"] and row2["lastSeenAt"] >= row1["lastSeenAt"]
    assert row2["connectionName"] == "new-name"
    assert row2["metadata"] == {"lettaCodeVersion": "0.32.19", "os": "darwin"}

    # The superseded lease is gone; the current one is known (and offline, never connected).
    message = {
        "messages": [{"role": "user", "content": "hi", "client_message_id": "m1"}],
        "agentId": "agent-1",
    }
    assert_error(tenant.post(f"/v1/environments/{first['connectionId']}/messages", message), 404)
    current = tenant.post(f"/v1/environments/{second['connectionId']}/messages", message)
    assert current.status_code == 200 and current.json()["success"] is False


def test_each_listener_slot_of_a_device_is_its_own_row(tenant: Tenant) -> None:
    dev = device_id()
    tenant.register(dev, instance="server-aaaaaaaaaaaaaaaa", name="server")
    tenant.register(dev, instance="listen-bbbbbbbbbbbbbbbb", name="listen")
    tenant.register(dev, instance=None, name="legacy")  # no instance id: the legacy per-device slot
    tenant.register(dev, instance=None, name="legacy-again")
    rows = tenant.rows()
    assert sorted(r["listenerInstanceId"] or "-" for r in rows) == [
        "-",
        "listen-bbbbbbbbbbbbbbbb",
        "server-aaaaaaaaaaaaaaaa",
    ]
    assert {r["connectionName"] for r in rows} == {"server", "listen", "legacy-again"}
    # Several slots share the deviceId: retrieve answers the most recently seen one (all are offline).
    assert tenant.get(f"/v1/environments/{dev}").json()["connectionName"] == "legacy-again"
    tenant.register(dev, instance="server-aaaaaaaaaaaaaaaa", name="server")
    assert tenant.sdk().environments.retrieve(dev).connection_name == "server"


def test_ws_url_is_built_from_the_request_host_and_scheme(tenant: Tenant) -> None:
    reply = tenant.register(device_id(), headers={"Host": "tether.example:9443"})
    assert reply["wsUrl"] == f"ws://tether.example:9443/v1/environments/ws/{reply['connectionId']}"
    # Behind a TLS-terminating proxy on this host (uvicorn trusts X-Forwarded-* from 127.0.0.1).
    reply = tenant.register(device_id(), headers={"Host": "tether.example", "X-Forwarded-Proto": "https"})
    assert reply["wsUrl"] == f"wss://tether.example/v1/environments/ws/{reply['connectionId']}"


# ---- paging and filters -----------------------------------------------------------------------


def test_paging_25_rows_by_10_visits_every_row_once_in_a_stable_order(tenant: Tenant) -> None:
    registered = [device_id() for _ in range(25)]
    for dev in registered:
        tenant.register(dev)
    sdk = tenant.sdk()

    seen: list[str] = []
    flags: list[bool] = []
    after: str | None = None
    while True:
        page = sdk.environments.list(limit="10", after=after) if after else sdk.environments.list(limit="10")
        assert len(page.connections) <= 10
        seen += [c.device_id for c in page.connections]
        flags.append(page.has_next_page)
        if len(flags) == 2:
            # A re-registration while paging must not move a row (stable order by first registration).
            tenant.register(registered[3])
            tenant.register(registered[24])
        if not page.has_next_page:
            break
        after = page.connections[-1].id
    assert flags == [True, True, False]
    assert len(seen) == 25 and set(seen) == set(registered)

    everything = tenant.rows(limit="100")
    assert len(everything) == 25
    assert everything == sorted(everything, key=lambda r: (r["firstSeenAt"], r["id"]))
    assert tenant.get("/v1/environments", limit="500").status_code == 200
    default_page = sdk.environments.list()
    assert len(default_page.connections) == 25 and default_page.has_next_page is False
    # The SDK sends non-string values as given (client-protocol §4.2).
    assert len(sdk.environments.list(limit=10).connections) == 10  # type: ignore[arg-type]


def test_online_only_keeps_connected_devices_and_drops_registered_ones_that_never_connected(
    tenant: Tenant,
) -> None:
    idle, live = device_id(), device_id()
    tenant.register(idle, name="idle")
    reply = tenant.register(live, name="live")

    async def connect_and_list() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        control, stream = await open_pair(reply["wsUrl"], tenant.key, live, "live")
        try:
            deadline = time.monotonic() + 10
            while True:
                online = await asyncio.to_thread(tenant.rows, onlineOnly="true")
                if online or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            everything = await asyncio.to_thread(tenant.rows, onlineOnly="false")
            default = await asyncio.to_thread(tenant.rows)
            return online, everything, default
        finally:
            await control.close()
            await stream.close()

    online, everything, default = asyncio.run(connect_and_list())
    assert [r["deviceId"] for r in online] == [live]
    assert online[0]["connectionId"] == reply["connectionId"]
    assert (
        isinstance(online[0]["lastHeartbeat"], int) and abs(online[0]["lastHeartbeat"] - now_ms()) < 120_000
    )
    assert {r["deviceId"] for r in everything} == {idle, live}
    assert {r["deviceId"] for r in default} == {idle, live}
    idle_row = next(r for r in everything if r["deviceId"] == idle)
    assert idle_row["connectionId"] is None and idle_row["lastHeartbeat"] is None

    sdk_online = tenant.sdk().environments.list(online_only="true")
    assert [c.device_id for c in sdk_online.connections] in ([], [live])  # the device may have closed by now
    assert_error(tenant.get("/v1/environments", onlineOnly="maybe"), 400)


def test_user_id_filter_returns_only_that_users_rows(tenant: Tenant, other_tenant: Tenant) -> None:
    bob_key = tenant.user_key("bob")
    alice_dev, bob_dev = device_id(), device_id()
    tenant.register(alice_dev)
    tenant.register(bob_dev, key=bob_key)
    other_tenant.register(device_id())
    rows = {r["deviceId"]: r for r in tenant.rows()}
    assert set(rows) == {alice_dev, bob_dev}
    alice_id, bob_id = rows[alice_dev]["userId"], rows[bob_dev]["userId"]
    assert alice_id != bob_id and rows[bob_dev]["apiKeyOwner"] == bob_id

    sdk = tenant.sdk()
    assert [c.device_id for c in sdk.environments.list(user_id=alice_id).connections] == [alice_dev]
    assert [c.device_id for c in sdk.environments.list(user_id=bob_id).connections] == [bob_dev]
    assert sdk.environments.list(user_id="user-nobody").connections == []
    # Keys of one organization see the organization's rows, whoever registered them.
    assert {r["deviceId"] for r in tenant.rows(key=bob_key)} == {alice_dev, bob_dev}
    other_user = other_tenant.rows()[0]["userId"]
    assert tenant.rows(userId=other_user) == []


def test_source_remote_lists_relay_rows_local_lists_none_and_anything_else_is_400(tenant: Tenant) -> None:
    dev = device_id()
    tenant.register(dev)
    sdk = tenant.sdk()
    assert [c.device_id for c in sdk.environments.list(source="remote").connections] == [dev]
    local = sdk.environments.list(source="local")
    assert local.connections == [] and local.has_next_page is False
    client, sent = tenant.counted_sdk(tenant.key)
    with pytest.raises(letta_client.BadRequestError):
        client.environments.list(source="bogus")  # type: ignore[arg-type]
    assert len(sent) == 1
    assert_error(tenant.get("/v1/environments", source="bogus"), 400, "INVALID_SOURCE")


@pytest.mark.parametrize("limit", ["abc", "0", "501", "-1", "1.5", "10abc"])
def test_a_bad_limit_is_a_400(tenant: Tenant, limit: str) -> None:
    assert_error(tenant.get("/v1/environments", limit=limit), 400, "INVALID_LIMIT")


def test_the_full_query_of_client_protocol_4_2_is_accepted_and_an_unknown_cursor_is_a_400(
    tenant: Tenant,
) -> None:
    assert_error(tenant.get("/v1/environments", after="env-9"), 400, "INVALID_CURSOR")
    tenant.register(device_id())
    [row] = tenant.rows()
    response = tenant.get(
        "/v1/environments",
        after=row["id"],
        limit="10",
        onlineOnly="true",
        source="remote",
        userId=row["userId"],
    )
    assert response.status_code == 200 and response.json() == {"connections": [], "hasNextPage": False}


# ---- retrieve ---------------------------------------------------------------------------------


def test_retrieve_decodes_a_percent_encoded_id_with_a_space_and_a_slash(tenant: Tenant) -> None:
    for dev in ("dev 1/x", "dev 1", "dev 1/x/y", "50%2Fx"):
        tenant.register(dev, name=f"name of {dev}")
    sdk = tenant.sdk()
    for dev in ("dev 1/x", "dev 1", "dev 1/x/y", "50%2Fx"):
        assert sdk.environments.retrieve(dev).connection_name == f"name of {dev}"
    assert tenant.get("/v1/environments/dev%201%2Fx").json()["deviceId"] == "dev 1/x"


def test_an_unknown_device_is_a_404_after_one_request(tenant: Tenant) -> None:
    client, sent = tenant.counted_sdk(tenant.key)
    with pytest.raises(letta_client.NotFoundError) as caught:
        client.environments.retrieve("no-such-device")
    assert len(sent) == 1
    assert caught.value.status_code == 404
    assert_error(tenant.get("/v1/environments/no-such-device"), 404, "ENVIRONMENT_NOT_FOUND")


# ---- authentication and organizations ---------------------------------------------------------


@pytest.mark.parametrize(
    "key", [None, "tk_0123456789abcdef_not-the-secret", "garbage", "tk_", "tk_zz_zz"], ids=str
)
def test_a_missing_or_unknown_key_is_a_401_after_exactly_one_request(
    tenant: Tenant, key: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LETTA_API_KEY", raising=False)
    client, sent = tenant.counted_sdk(key)
    with pytest.raises(letta_client.AuthenticationError):
        client.environments.list()
    assert len(sent) == 1
    assert ("authorization" in sent[0].headers) == (key is not None)

    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    for method, path in [
        ("GET", "/v1/environments"),
        ("GET", "/v1/environments/some-device"),
        ("POST", "/v1/environments/register"),
        ("POST", "/v1/environments/conn-x/messages"),
    ]:
        response = HTTP.request(method, f"{tenant.base_url}{path}", headers=headers, json={})
        body = assert_error(response, 401, "UNAUTHORIZED")
        assert "key" in body["message"].lower()
        assert response.headers["www-authenticate"].lower().startswith("bearer")


def test_a_revoked_key_stops_working_within_the_auth_cache_ttl(tenant: Tenant) -> None:
    key = tenant.user_key("carol")
    assert tenant.sdk(key).environments.list().connections == []
    key_id = key.split("_")[1]
    revoked = tenant.router.cli("keys", "revoke", key_id)
    assert key_id in revoked.stdout
    time.sleep(AUTH_CACHE_SECONDS + 0.3)
    client, sent = tenant.counted_sdk(key)
    with pytest.raises(letta_client.AuthenticationError):
        client.environments.list()
    assert len(sent) == 1
    assert tenant.sdk().environments.list().connections == []  # other keys of the organization still work


def test_organizations_are_isolated_everywhere(tenant: Tenant, other_tenant: Tenant) -> None:
    shared, private = "shared-device", device_id()
    mine = tenant.register(shared, name="mine")
    tenant.register(private)
    theirs = other_tenant.register(shared, name="theirs")

    my_rows = {r["deviceId"]: r for r in tenant.rows()}
    their_rows = {r["deviceId"]: r for r in other_tenant.rows()}
    assert set(my_rows) == {shared, private} and set(their_rows) == {shared}
    assert my_rows[shared]["id"] != their_rows[shared]["id"]
    assert my_rows[shared]["organizationId"] != their_rows[shared]["organizationId"]
    assert their_rows[shared]["connectionName"] == "theirs"

    their_sdk = other_tenant.sdk()
    with pytest.raises(letta_client.NotFoundError):
        their_sdk.environments.retrieve(private)
    assert their_sdk.environments.retrieve(shared).connection_name == "theirs"
    with pytest.raises(letta_client.NotFoundError):
        their_sdk.environments.send_message(
            mine["connectionId"],
            messages=[{"role": "user", "content": "hi", "client_message_id": "m1"}],
            agent_id="agent-1",
        )
    assert_error(other_tenant.get("/v1/environments", after=my_rows[private]["id"]), 400, "INVALID_CURSOR")
    assert other_tenant.rows(userId=my_rows[private]["userId"]) == []

    # Re-registering in one organization leaves the other's row alone.
    tenant.register(shared, name="mine-again")
    assert other_tenant.get(f"/v1/environments/{shared}").json() == their_rows[shared]
    sent = other_tenant.post(
        f"/v1/environments/{theirs['connectionId']}/messages",
        {"agentId": "a", "messages": [{"role": "user", "content": "x", "client_message_id": "c"}]},
    )
    assert sent.status_code == 200


# ---- malformed requests -----------------------------------------------------------------------

BAD_REGISTRATIONS: dict[str, bytes] = {
    "missing deviceId": b'{"connectionName":"x","metadata":{}}',
    "missing connectionName": b'{"deviceId":"d"}',
    "deviceId not a string": b'{"deviceId":5,"connectionName":"x"}',
    "empty deviceId": b'{"deviceId":"","connectionName":"x"}',
    "empty listenerInstanceId": b'{"deviceId":"d","listenerInstanceId":"","connectionName":"x"}',
    "connectionName not a string": b'{"deviceId":"d","connectionName":["x"]}',
    "metadata not an object": b'{"deviceId":"d","connectionName":"x","metadata":"linux"}',
    "metadata os not a string": b'{"deviceId":"d","connectionName":"x","metadata":{"os":5}}',
    "metadata too large": json.dumps(
        {"deviceId": "d", "connectionName": "x", "metadata": {"blob": "x" * (64 * 1024)}}
    ).encode(),
    "deviceId too long": json.dumps({"deviceId": "d" * 513, "connectionName": "x"}).encode(),
    "NUL in deviceId": b'{"deviceId":"a\\u0000b","connectionName":"x"}',
    "not JSON": b"deviceId=d&connectionName=x",
    "JSON array": b'[{"deviceId":"d","connectionName":"x"}]',
    "JSON string": b'"hello"',
    "NaN in metadata": b'{"deviceId":"d","connectionName":"x","metadata":{"n":NaN}}',
    "lone surrogate": b'{"deviceId":"d","connectionName":"x","metadata":{"s":"\\ud800"}}',
    "deeply nested": b'{"deviceId":"d","connectionName":"x","metadata":' + b"[" * 5000 + b"]" * 5000 + b"}",
    "empty body": b"",
}


@pytest.mark.parametrize("content", list(BAD_REGISTRATIONS.values()), ids=list(BAD_REGISTRATIONS))
def test_a_malformed_registration_is_a_400_and_stores_nothing(tenant: Tenant, content: bytes) -> None:
    assert_error(tenant.post_register(content), 400)
    assert tenant.rows() == []


def test_an_oversized_body_is_a_413_with_or_without_content_length(tenant: Tenant) -> None:
    huge = b'{"deviceId":"d","connectionName":"x","metadata":{"blob":"' + b"x" * (5 * 1024 * 1024) + b'"}}'
    assert_error(tenant.post_register(huge), 413, "PAYLOAD_TOO_LARGE")

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(huge), 64 * 1024):
            yield huge[i : i + 64 * 1024]

    chunked = HTTP.post(
        f"{tenant.base_url}/v1/environments/register",
        content=chunks(),
        headers={"Authorization": f"Bearer {tenant.key}", "Content-Type": "application/json"},
    )
    assert "content-length" not in chunked.request.headers
    assert_error(chunked, 413, "PAYLOAD_TOO_LARGE")
    assert tenant.rows() == []


USER = {"role": "user", "content": "hi", "client_message_id": "cm1", "otid": "o1"}
BAD_MESSAGES: dict[str, Any] = {
    "no agentId": {"messages": [USER]},
    "empty agentId": {"agentId": "", "messages": [USER]},
    "agentId not a string": {"agentId": 7, "messages": [USER]},
    "no messages": {"agentId": "agent-1"},
    "empty messages": {"agentId": "agent-1", "messages": []},
    "messages not a list": {"agentId": "agent-1", "messages": USER},
    "message not an object": {"agentId": "agent-1", "messages": ["hi"]},
    "user message without client_message_id": {
        "agentId": "agent-1",
        "messages": [{"role": "user", "content": "hi"}],
    },
    "content not text": {"agentId": "agent-1", "messages": [{**USER, "content": 42}]},
    "unknown role": {"agentId": "agent-1", "messages": [{**USER, "role": "system"}]},
    "approval without approvals": {"agentId": "agent-1", "messages": [{"type": "approval", "approvals": []}]},
    "conversationId not a string": {"agentId": "agent-1", "conversationId": 3, "messages": [USER]},
    "not JSON": b"agentId=agent-1",
    "NaN": b'{"agentId":"agent-1","messages":[{"type":"approval","approvals":[{"x":NaN}]}]}',
}


@pytest.mark.parametrize("body", list(BAD_MESSAGES.values()), ids=list(BAD_MESSAGES))
def test_a_malformed_message_is_a_400(tenant: Tenant, body: Any) -> None:
    reply = tenant.register(device_id())
    assert_error(tenant.post(f"/v1/environments/{reply['connectionId']}/messages", body), 400)


def test_send_message_to_an_unknown_connection_is_a_404_and_to_an_offline_one_a_200_false(
    tenant: Tenant,
) -> None:
    client, sent = tenant.counted_sdk(tenant.key)
    with pytest.raises(letta_client.NotFoundError):
        client.environments.send_message("conn-unknown", messages=[USER], agent_id="agent-1")  # type: ignore[list-item]
    assert len(sent) == 1
    assert_error(
        tenant.post("/v1/environments/conn-unknown/messages", {"agentId": "a", "messages": [USER]}),
        404,
        "CONNECTION_NOT_FOUND",
    )

    reply = tenant.register(device_id())
    sdk = tenant.sdk()
    outcome = sdk.environments.send_message(
        reply["connectionId"],
        messages=[USER],
        agent_id="agent-1",
        conversation_id="conv-1",  # type: ignore[list-item]
    )
    assert outcome.success is False and outcome.message
    approval = {
        "type": "approval",
        "approvals": [
            {"approve": True, "tool_call_id": "tc1", "type": "approval"},
            {"status": "success", "tool_call_id": "tc2", "tool_return": "ok", "type": "tool"},
        ],
    }
    outcome = sdk.environments.send_message(
        reply["connectionId"],
        messages=[approval],
        agent_id="agent-1",
        conversation_id=None,  # type: ignore[list-item]
    )
    assert outcome.success is False
    raw = tenant.post(
        f"/v1/environments/{reply['connectionId']}/messages", {"agentId": "a", "messages": [USER]}
    )
    assert raw.status_code == 200 and set(raw.json()) == {"success", "message"}


def test_other_mistakes_are_json_errors_too(tenant: Tenant) -> None:
    assert_error(tenant.get("/v1/nothing-here"), 404)
    assert_error(
        HTTP.delete(f"{tenant.base_url}/v1/environments", headers={"Authorization": f"Bearer {tenant.key}"}),
        405,
    )
    assert_error(tenant.get("/v1/environments/runtimes/agent-1/conv-1/teleports/tp-unknown"), 404)
    assert_error(
        tenant.post("/v1/environments/runtimes/agent-1/default/teleport", {"targetConnectionId": "conn-x"}),
        400,
    )
    assert_error(
        tenant.post("/v1/environments/runtimes/agent-1/conv-1/teleport", {"idempotencyKey": "k"}), 400
    )


# ---- documents and probes ---------------------------------------------------------------------


def test_openapi_names_and_types_the_environment_schemas(backend: Router) -> None:
    doc = HTTP.get(f"{backend.base_url}/openapi.json").json()
    schemas = doc["components"]["schemas"]
    for name in (
        "EnvironmentConnection",
        "EnvironmentList",
        "EnvironmentMetadata",
        "RegisterRequest",
        "RegisterResponse",
        "SendMessageRequest",
        "SendMessageResponse",
        "TeleportRequest",
        "TeleportResponse",
        "ErrorBody",
    ):
        assert name in schemas, name
    conn = schemas["EnvironmentConnection"]
    props = conn["properties"]
    assert set(props) == ROW_KEYS
    assert {"id", "connectionName", "deviceId", "organizationId", "firstSeenAt", "lastSeenAt"} <= set(
        conn["required"]
    )
    for key in ("firstSeenAt", "lastSeenAt"):
        assert props[key]["type"] == "integer"
    for key in ("connectedAt", "lastHeartbeat"):
        assert {"type": "integer"} in props[key]["anyOf"] and {"type": "null"} in props[key]["anyOf"]
    assert {"type": "null"} in props["connectionId"]["anyOf"]
    [mode] = [s for s in props["currentMode"]["anyOf"] if s.get("type") == "string"]
    assert mode["enum"] == ["default", "standard", "acceptEdits", "bypassPermissions", "unrestricted"]
    assert schemas["EnvironmentList"]["properties"]["hasNextPage"]["type"] == "boolean"
    assert set(schemas["ErrorBody"]["properties"]) == {"errorCode", "message"}

    listing = doc["paths"]["/v1/environments"]["get"]
    assert {p["name"] for p in listing["parameters"]} == {"after", "limit", "onlineOnly", "source", "userId"}
    assert "firstSeenAt" in listing["description"] and "500" in listing["description"]
    assert listing["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/EnvironmentList"
    )
    register = doc["paths"]["/v1/environments/register"]["post"]
    assert register["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/RegisterRequest"
    )
    for path in doc["paths"].values():
        for operation in path.values():
            assert "422" not in operation["responses"]  # validation failures are 400 ErrorBody
            for status, response in operation["responses"].items():
                if status.startswith("4"):
                    assert response["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")

    docs = HTTP.get(f"{backend.base_url}/docs")
    assert docs.status_code == 200 and "openapi.json" in docs.text
    assert HTTP.get(f"{backend.base_url}/healthz").json() == {"status": "ok"}
    ready = HTTP.get(f"{backend.base_url}/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_readyz_is_503_while_the_database_is_unreachable(tmp_path: Path, pg_url: str) -> None:
    router = start_router(tmp_path / "router", database_url=pg_url)
    try:
        assert HTTP.get(f"{router.base_url}/readyz").status_code == 200
        drop_pg_database(pg_url)
        ready = HTTP.get(f"{router.base_url}/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "not ready"
        assert "database" in ready.json()["detail"]
        assert HTTP.get(f"{router.base_url}/healthz").status_code == 200  # the process is still up
        # Requests that need the database say so, as a retryable 503, not a 500.
        listing = HTTP.get(f"{router.base_url}/v1/environments", headers=router.headers())
        assert_error(listing, 503, "DATABASE_UNAVAILABLE")
        assert listing.headers["x-should-retry"] == "true"
        assert router.alive()
    finally:
        router.stop()


@pytest.mark.parametrize(
    ("public_url", "expected"),
    [
        ("http://tether.internal:8283", "ws://tether.internal:8283"),
        ("https://tether.example.com/relay/", "wss://tether.example.com/relay"),
    ],
)
def test_ws_url_is_built_from_tether_public_url_when_set(
    tmp_path: Path, public_url: str, expected: str
) -> None:
    router = start_router(tmp_path / "router", public_url=public_url, create_key=False)
    try:
        key = asyncio.run(
            _create_key(f"sqlite+aiosqlite:///{router.data_dir / 'tether.db'}", "acme", "alice")
        )
        tenant = Tenant(router, "acme", key)
        reply = tenant.register(device_id(), headers={"Host": "ignored.example:1234"})
        assert reply["wsUrl"] == f"{expected}/v1/environments/ws/{reply['connectionId']}"
    finally:
        router.stop()
