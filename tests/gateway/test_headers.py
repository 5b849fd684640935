"""What the gateway forwards in each direction, and which paths it keeps: pure functions, no sockets."""

from __future__ import annotations

import httpx
import pytest

from tether.gateway.headers import Hop, request_headers, response_headers
from tether.gateway.routes import served_here, upstream_admin
from tether.gateway.upstream import Upstream, failure

HOP = Hop(client_ip="203.0.113.7", scheme="https", host=b"tether.example.com")


def names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [n for n, _ in headers]


def test_hop_by_hop_headers_and_those_connection_names_stay_behind() -> None:
    sent = [
        (b"connection", b"keep-alive, x-private-hop"),
        (b"keep-alive", b"timeout=5"),
        (b"x-private-hop", b"1"),
        (b"te", b"trailers"),
        (b"transfer-encoding", b"chunked"),
        (b"upgrade", b"h2c"),
        (b"proxy-authorization", b"Basic abc"),
        (b"host", b"tether.example.com"),
        (b"content-length", b"12"),
        (b"accept", b"text/event-stream"),
        (b"x-letta-source", b"letta-code"),
    ]
    out = request_headers(sent, HOP, identity=None)
    assert (b"accept", b"text/event-stream") in out and (b"x-letta-source", b"letta-code") in out
    for gone in (
        b"connection",
        b"keep-alive",
        b"x-private-hop",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"host",
        b"content-length",
    ):
        assert gone not in names(out), gone


def test_forwarding_headers_are_what_tether_saw_not_what_the_client_claims() -> None:
    sent = [(b"x-forwarded-for", b"10.0.0.1"), (b"x-forwarded-host", b"evil"), (b"forwarded", b"for=1.2.3.4")]
    out = request_headers(sent, HOP, identity=None)
    assert dict(out)[b"x-forwarded-for"] == b"203.0.113.7"
    assert dict(out)[b"x-forwarded-proto"] == b"https"
    assert dict(out)[b"x-forwarded-host"] == b"tether.example.com"
    assert b"forwarded" not in names(out) and names(out).count(b"x-forwarded-for") == 1


def test_tether_keys_mode_replaces_every_client_credential_and_the_acting_user() -> None:
    sent = [
        (b"authorization", b"Bearer tk_mine"),
        (b"x-bare-password", b"password guess"),
        (b"user_id", b"user-00000000-0000-4000-8000-000000000000"),
        (b"cookie", b"session=1"),
    ]
    identity = [(b"authorization", b"Bearer upstream-pw"), (b"user_id", b"user-mine")]
    out = request_headers(sent, HOP, identity=identity)
    assert [
        (n, v) for n, v in out if n in (b"authorization", b"user_id", b"x-bare-password", b"cookie")
    ] == identity


def test_upstream_keys_mode_passes_the_credential_through() -> None:
    out = request_headers([(b"authorization", b"Bearer letta-key")], HOP, identity=None)
    assert (b"authorization", b"Bearer letta-key") in out


def test_response_keeps_end_to_end_headers_and_drops_framing() -> None:
    got = response_headers(
        [
            (b"content-type", b"text/event-stream"),
            (b"transfer-encoding", b"chunked"),
            (b"connection", b"close"),
            (b"content-encoding", b"gzip"),
            (b"x-request-id", b"r1"),
        ]
    )
    assert names(got) == [b"content-type", b"content-encoding", b"x-request-id"]


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/docs",
        "/docs/oauth2-redirect",
        "/v1/environments",
        "/v1/environments/register",
        "/v1/environments/ws/conn-1",
        "/ui",
        "/ui/app.js",
        "/v1/tether/pods",
    ],
)
def test_tethers_own_paths_stay_here(path: str) -> None:
    assert served_here(path)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/agents/",
        "/v1/agents/agent-1/messages/stream",
        "/v1/health/",
        "/v1/models/",
        "/v1/environmentsx",
        "/v1/conversations/c/messages",
        "/uix",
        "/v1/tetherx",
    ],
)
def test_everything_else_goes_upstream(path: str) -> None:
    assert not served_here(path)


def test_the_upstream_admin_api_is_recognised_with_or_without_a_slash() -> None:
    assert upstream_admin("/v1/admin/users/") and upstream_admin("/v1/admin") and upstream_admin("/v1/admin/")
    assert not upstream_admin("/v1/administrators") and not upstream_admin("/v1/agents/")


def test_a_path_prefix_on_the_upstream_url_is_kept_and_the_raw_path_untouched() -> None:
    up = Upstream(
        "http://letta.internal:8284/letta/", connect_timeout_s=1, read_timeout_s=1, max_connections=1
    )
    url = up.url(b"/v1/agents/a%2Fb/messages", b"limit=1&order=desc")
    assert url.raw_path == b"/letta/v1/agents/a%2Fb/messages?limit=1&order=desc"
    assert url.host == "letta.internal" and url.port == 8284


def test_failures_say_whether_a_retry_is_safe() -> None:
    request = httpx.Request("POST", "http://u")
    refused = failure(httpx.ConnectError("refused", request=request), "POST", "http://u")
    assert (refused.status, refused.code, refused.retry) == (502, "UPSTREAM_UNREACHABLE", True)
    busy = failure(httpx.PoolTimeout("busy", request=request), "POST", "http://u")
    assert (busy.status, busy.retry) == (503, True)
    slow_post = failure(httpx.ReadTimeout("slow", request=request), "POST", "http://u")
    assert (slow_post.status, slow_post.code, slow_post.retry) == (504, "UPSTREAM_TIMEOUT", False)
    slow_get = failure(httpx.ReadTimeout("slow", request=request), "GET", "http://u")
    assert slow_get.retry
    lost = failure(httpx.RemoteProtocolError("eof", request=request), "PATCH", "http://u")
    assert (lost.status, lost.retry) == (502, False)
