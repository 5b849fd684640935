"""Gateway mode against a real Letta server 0.16.8: one base URL, one key, organizations kept apart.

The upstream is the real server (tests/letta_upstream.py); the only stand-in is its model provider.
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Router, start_router
from tests.fake_model import REPLY_PREFIX

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def gw(letta_upstream_secure: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    """Tether in front of a password-protected Letta server, with Tether keys (the default)."""
    r = start_router(
        tmp_path_factory.mktemp("gateway"),
        letta_url=letta_upstream_secure.url,
        letta_api_key=letta_upstream_secure.password,
    )
    yield r
    r.stop()


def agent_body(upstream: Any, name: str) -> dict[str, Any]:
    return {"name": name, "model": upstream.model, "agent_type": "letta_v1_agent"}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_the_sdk_creates_an_agent_and_reads_its_reply_through_tether(
    gw: Router, letta_upstream_secure: Any
) -> None:
    sdk = gw.sdk()  # strict response validation: the upstream's answers arrive intact
    agent = sdk.agents.create(name="gw-sdk", model=letta_upstream_secure.model, agent_type="letta_v1_agent")
    reply = sdk.agents.messages.create(
        agent.id, messages=[{"role": "user", "content": "hello through tether"}]
    )
    said = [m.content for m in reply.messages if m.message_type == "assistant_message"]
    assert said == [f"{REPLY_PREFIX}hello through tether"]
    listed = sdk.agents.messages.list(agent.id)
    assert f"{REPLY_PREFIX}hello through tether" in [
        getattr(m, "content", None) for m in listed.items if m.message_type == "assistant_message"
    ]
    # Tether's own routes still answer beside the forwarded ones, with the same key.
    assert sdk.environments.list().connections == []


def test_server_sent_events_arrive_as_the_upstream_emits_them(gw: Router, letta_upstream_secure: Any) -> None:
    upstream = letta_upstream_secure
    client = httpx.Client(base_url=gw.base_url, headers=gw.headers(), timeout=60)
    agent_id = client.post("/v1/agents/", json=agent_body(upstream, "gw-sse")).json()["id"]
    words = "one two three four five six"
    upstream.fake_model.chunk_delay_s = 0.25
    try:
        arrivals: list[tuple[float, str]] = []
        body = {"messages": [{"role": "user", "content": words}], "stream_tokens": True}
        with client.stream("POST", f"/v1/agents/{agent_id}/messages/stream", json=body) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            for line in stream.iter_lines():
                if line.startswith("data: ") and '"assistant_message"' in line:
                    arrivals.append((time.monotonic(), line))
    finally:
        upstream.fake_model.chunk_delay_s = 0.0
    # "Tether heard: one ... six": 8 words, each its own event, a quarter second apart at the source.
    assert len(arrivals) >= 8
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(arrivals)]
    assert sum(1 for g in gaps if g > 0.15) >= 6, gaps  # not buffered into one burst at the end


def test_organizations_stay_apart_upstream(gw: Router, letta_upstream_secure: Any) -> None:
    mine = httpx.Client(base_url=gw.base_url, headers=gw.headers(), timeout=60)
    agent = mine.post("/v1/agents/", json=agent_body(letta_upstream_secure, "gw-private")).json()
    other_key = gw.create_key("globex", "mallory")
    # Even naming the other organization's Letta user does not help: Tether sets the acting user.
    theirs = httpx.Client(
        base_url=gw.base_url,
        headers={**gw.headers(other_key), "user_id": agent["created_by_id"]},
        timeout=60,
    )
    assert agent["id"] not in [a["id"] for a in theirs.get("/v1/agents/").json()]
    assert theirs.get(f"/v1/agents/{agent['id']}").status_code == 404
    assert agent["id"] in [a["id"] for a in mine.get("/v1/agents/").json()]
    # A second user of the same organization shares its agents (one Letta organization per Tether one).
    colleague = httpx.Client(
        base_url=gw.base_url, headers=gw.headers(gw.create_key("acme", "carol")), timeout=60
    )
    assert colleague.get(f"/v1/agents/{agent['id']}").status_code == 200
    # The upstream's admin API (every organization it holds) is not reachable with Tether keys.
    refused = mine.get("/v1/admin/users/")
    assert refused.status_code == 403 and refused.json()["errorCode"] == "FORBIDDEN"


def test_missing_bad_and_revoked_keys_are_refused_before_the_upstream(gw: Router) -> None:
    agents = f"{gw.base_url}/v1/agents/"
    missing = httpx.get(agents)
    assert missing.status_code == 401 and missing.json()["errorCode"] == "UNAUTHORIZED"
    assert missing.headers["x-should-retry"] == "false"
    assert httpx.get(agents, headers={"Authorization": "Bearer not-a-key"}).status_code == 401
    key = gw.create_key("acme", "dave")
    assert httpx.get(agents, headers=gw.headers(key)).status_code == 200
    key_id = key.split("_")[1]
    gw.cli("keys", "revoke", key_id)
    deadline = time.monotonic() + 15  # TETHER_AUTH_CACHE_SECONDS
    while httpx.get(agents, headers=gw.headers(key)).status_code == 200:
        assert time.monotonic() < deadline, "a revoked key kept working"
        time.sleep(0.5)
    assert httpx.get(agents, headers=gw.headers(key)).status_code == 401
    # The upstream's own password is not a Tether key.
    assert httpx.get(agents, headers={"Authorization": "Bearer upstream-password"}).status_code == 401


def test_upstream_keys_mode_accepts_exactly_what_the_upstream_accepts(
    letta_upstream_secure: Any, tmp_path: Path
) -> None:
    upstream = letta_upstream_secure
    r = start_router(tmp_path, letta_url=upstream.url, auth="upstream", create_key=False)
    try:
        good = {"Authorization": f"Bearer {upstream.password}"}
        assert httpx.get(f"{r.base_url}/v1/agents/", headers=good, timeout=30).status_code == 200
        wrong = httpx.get(f"{r.base_url}/v1/agents/", headers={"Authorization": "Bearer wrong"}, timeout=30)
        assert wrong.status_code == 401 and wrong.json()["errorCode"] == "UNAUTHORIZED"
        # The same credential drives Tether's own API: a device registers with it.
        registered = httpx.post(
            f"{r.base_url}/v1/environments/register",
            headers=good,
            json={"deviceId": "dev-up", "connectionName": "upstream-keyed"},
            timeout=30,
        )
        assert registered.status_code == 200, registered.text
        listed = httpx.get(f"{r.base_url}/v1/environments", headers=good, timeout=30).json()
        assert [c["connectionName"] for c in listed["connections"]] == ["upstream-keyed"]
        refused = httpx.get(
            f"{r.base_url}/v1/environments", headers={"Authorization": "Bearer wrong"}, timeout=30
        )
        assert refused.status_code == 401
    finally:
        r.stop()


def test_each_upstream_credential_is_an_organization_of_its_own(letta_upstream: Any, tmp_path: Path) -> None:
    # This upstream has no password: it accepts every credential, and Tether keeps them apart.
    r = start_router(tmp_path, letta_url=letta_upstream.url, auth="upstream", create_key=False)
    try:
        for name in ("first", "second"):
            httpx.post(
                f"{r.base_url}/v1/environments/register",
                headers={"Authorization": f"Bearer cred-{name}"},
                json={"deviceId": f"dev-{name}", "connectionName": name},
                timeout=30,
            ).raise_for_status()
        for name in ("first", "second"):
            rows = httpx.get(
                f"{r.base_url}/v1/environments", headers={"Authorization": f"Bearer cred-{name}"}, timeout=30
            ).json()["connections"]
            assert [c["connectionName"] for c in rows] == [name]
        assert httpx.get(f"{r.base_url}/v1/environments", timeout=30).status_code == 401
    finally:
        r.stop()


def test_an_unreachable_upstream_is_a_quick_retryable_502_and_tether_keeps_serving(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    r = start_router(tmp_path, letta_url=dead, wait_path="/healthz")
    try:
        started = time.monotonic()
        answer = httpx.post(f"{r.base_url}/v1/agents/", headers=r.headers(), json={}, timeout=30)
        assert time.monotonic() - started < 5
        assert answer.status_code == 502 and answer.json()["errorCode"] == "UPSTREAM_UNREACHABLE"
        assert answer.headers["x-should-retry"] == "true"  # nothing reached the upstream
        ready = httpx.get(f"{r.base_url}/readyz", timeout=10)
        assert ready.status_code == 503 and "unreachable" in ready.json()["detail"]
        assert httpx.get(f"{r.base_url}/v1/environments", headers=r.headers(), timeout=10).status_code == 200
    finally:
        r.stop()


def test_a_slow_upstream_is_a_504_that_does_not_invite_a_repeat(
    letta_upstream_secure: Any, tmp_path: Path
) -> None:
    upstream = letta_upstream_secure
    r = start_router(
        tmp_path, letta_url=upstream.url, letta_api_key=upstream.password, letta_read_timeout_seconds=1
    )
    try:
        client = httpx.Client(base_url=r.base_url, headers=r.headers(), timeout=60)
        agent_id = client.post("/v1/agents/", json=agent_body(upstream, "gw-slow")).json()["id"]
        upstream.fake_model.delay_s = 3.0
        try:
            started = time.monotonic()
            slow = client.post(
                f"/v1/agents/{agent_id}/messages", json={"messages": [{"role": "user", "content": "hi"}]}
            )
            took = time.monotonic() - started
        finally:
            upstream.fake_model.delay_s = 0.0
        assert slow.status_code == 504 and slow.json()["errorCode"] == "UPSTREAM_TIMEOUT"
        assert slow.headers["x-should-retry"] == "false"  # a POST that may have run: no automatic repeat
        assert 0.9 < took < 2.5
        assert client.get("/v1/agents/").status_code == 200  # the pool is fine afterwards
    finally:
        r.stop()


def test_large_bodies_stream_through_in_bounded_memory_and_the_limit_holds(
    letta_upstream_secure: Any, tmp_path: Path
) -> None:
    upstream = letta_upstream_secure
    limit = 96 * 1024 * 1024
    r = start_router(
        tmp_path, letta_url=upstream.url, letta_api_key=upstream.password, letta_max_body_bytes=limit
    )
    try:
        client = httpx.Client(base_url=r.base_url, headers=r.headers(), timeout=120)
        client.get("/v1/agents/").raise_for_status()  # provisioning done, pools warm
        before = rss_kib(r.proc.pid)
        chunk = b"x" * (1024 * 1024)

        def body(megabytes: int) -> Iterator[bytes]:
            yield b'{"name": "'
            for _ in range(megabytes):
                yield chunk
            yield b'"}'

        # 80 MiB to the upstream, which answers what it thinks of such a name; Tether only passes it on.
        answer = client.post("/v1/agents/", content=body(80), headers={"content-type": "application/json"})
        assert answer.status_code < 500, answer.text[:500]
        grew = rss_kib(r.proc.pid) - before
        assert grew < 32 * 1024, f"router RSS grew {grew} KiB while forwarding 80 MiB"
        over = client.post("/v1/agents/", content=body(100), headers={"content-type": "application/json"})
        assert over.status_code == 413 and over.json()["errorCode"] == "PAYLOAD_TOO_LARGE"
    finally:
        r.stop()


def test_readyz_covers_the_upstream(gw: Router) -> None:
    ready = httpx.get(f"{gw.base_url}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text


def test_the_gateway_is_off_without_a_letta_url(srv: Router) -> None:
    answer = httpx.get(f"{srv.base_url}/v1/agents/", headers=srv.headers())
    assert answer.status_code == 404 and answer.json()["errorCode"] == "NOT_FOUND"
