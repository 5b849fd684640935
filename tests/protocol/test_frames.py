"""Frame parsing, the per-socket `seq` splice, router-made frames and the status-to-row mapping
(device-protocol §3.2, §3.6; client-protocol §2.3, §2.6; checklist 17 and client 11, 25, 34)."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.protocol.frames import (
    FrameError,
    decode,
    error_frame,
    listener_ready,
    rest_mode,
    scoped_sync,
    status_fields,
    with_seq,
)

# ---- decode ------------------------------------------------------------------------------------


def test_decode_reads_the_routing_facts_once() -> None:
    text = (
        '{"type":"stream_delta","request_id":"r-1","event_seq":12,'
        '"runtime":{"agent_id":"agent-1","conversation_id":"default"},"delta":{}}'
    )
    for data in (text, text.encode()):
        frame = decode(data)
        assert frame.text == text
        assert frame.type == "stream_delta"
        assert frame.request_id == "r-1"
        assert (frame.agent_id, frame.conversation_id) == ("agent-1", "default")
        assert frame.event_seq == 12
        assert frame.scoped


def test_decode_ignores_routing_fields_of_the_wrong_type() -> None:
    frame = decode(
        '{"type":"x","request_id":"","event_seq":true,"runtime":{"agent_id":5,"conversation_id":null}}'
    )
    assert frame.request_id is None
    assert frame.event_seq is None, "a boolean is not a sequence number"
    assert (frame.agent_id, frame.conversation_id) == (None, None)
    assert not frame.scoped
    assert decode('{"type":"x","event_seq":"3","runtime":"a"}').event_seq is None


@pytest.mark.parametrize(
    "data",
    [
        '[{"type":"x"}]',
        '"ping"',
        "42",
        "null",
        "{}",
        '{"type":7}',
        '{"type":null}',
        "{not json",
        "",
        b"\xff\xfe",
    ],
)
def test_decode_rejects_what_is_not_an_object_with_a_string_type(data: str | bytes) -> None:
    with pytest.raises(FrameError):
        decode(data)


# ---- with_seq ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "{}",
        "  {  }  ",
        '{"type":"pong"}',
        '\n\t {"type":"x", "a": {"b": {"c": [1, {"d": "}"}]}}}',
        '{ "type" : "x" , "s" : "{\\"seq\\":1}" }',
        '{"type":"x","u":"caf\\u00e9 \\ud83d\\ude00 ☃"}',
    ],
)
def test_with_seq_gives_the_same_object_plus_seq(text: str) -> None:
    out = with_seq(text, 42)
    assert json.loads(out) == {"seq": 42, **json.loads(text)}


def test_with_seq_keeps_the_device_bytes_after_the_splice() -> None:
    text = '{"type":"stream_delta","n":1.50,"big":123456789012345678901234567890}'
    out = with_seq(text, 7)
    assert out == '{"seq":7,"type":"stream_delta","n":1.50,"big":123456789012345678901234567890}'


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(st.text(max_size=8).filter(lambda k: k != "seq"), _json, max_size=5),
    st.integers(1, 2**53),
    st.sampled_from(["", " ", "\n  "]),
)
def test_with_seq_on_any_object(body: dict[str, Any], seq: int, pad: str) -> None:
    text = pad + json.dumps(body, indent=None if not pad else 1) + pad
    assert json.loads(with_seq(text, seq)) == {"seq": seq, **body}


# ---- frames the router makes ------------------------------------------------------------------


def test_listener_ready_echoes_generation_and_attempt() -> None:
    assert orjson.loads(listener_ready("5b3c-gen", 3)) == {
        "type": "listener_ready",
        "connection_generation": "5b3c-gen",
        "connection_attempt": 3,
    }


def test_error_frame_fails_a_pending_request_cleanly() -> None:
    """Client-protocol §2.6: a request answered with this must resolve as a failure."""
    frame = orjson.loads(error_frame("req-9", "environment offline"))
    assert frame == {
        "type": "error",
        "request_id": "req-9",
        "success": False,
        "error": "environment offline",
        "message": "environment offline",
        "code": "environment_offline",
    }
    bare = orjson.loads(error_frame(None, "rate limited", code="rate_limited"))
    assert "request_id" not in bare
    assert bare["success"] is False and bare["code"] == "rate_limited"


def test_scoped_sync_subscribes_without_side_effects() -> None:
    frame = orjson.loads(scoped_sync("agent-1", "default", "tether-sub-1"))
    assert frame == {
        "type": "sync",
        "request_id": "tether-sub-1",
        "runtime": {"agent_id": "agent-1", "conversation_id": "default"},
        "recover_approvals": False,
        "force_device_status": False,
    }


# ---- update_device_status onto the row ----------------------------------------------------------


def status(**device_status: Any) -> dict[str, Any]:
    return {"type": "update_device_status", "device_status": device_status}


@pytest.mark.parametrize(
    ("device_mode", "current_mode"),
    [
        ("standard", "standard"),
        ("default", "standard"),
        ("acceptEdits", "acceptEdits"),
        ("unrestricted", "unrestricted"),
        ("bypassPermissions", "unrestricted"),
        ("fullAccess", "unrestricted"),
        ("strict", None),
        ("plan", None),
    ],
)
def test_permission_modes_map_onto_the_rest_enum(device_mode: str, current_mode: str | None) -> None:
    fields = status_fields(status(current_permission_mode=device_mode))
    assert fields is not None
    mode, patch = fields
    assert mode == current_mode
    assert patch["permissionMode"] == device_mode, "the exact mode survives in metadata"
    assert rest_mode(device_mode) == current_mode


def test_rest_mode_values_are_all_in_the_client_enum() -> None:
    allowed = {"default", "standard", "acceptEdits", "bypassPermissions", "unrestricted"}
    for mode in (
        "standard",
        "default",
        "acceptEdits",
        "unrestricted",
        "bypassPermissions",
        "fullAccess",
        "strict",
    ):
        assert rest_mode(mode) in allowed | {None}
    assert rest_mode(None) is None and rest_mode(3) is None


def test_working_directory_and_git_branch() -> None:
    fields = status_fields(
        status(
            current_permission_mode="acceptEdits",
            current_working_directory="/home/me/repo",
            git_context={"branch": "feature/x", "recent_branches": ["main"]},
        )
    )
    assert fields == (
        "acceptEdits",
        {"permissionMode": "acceptEdits", "workingDirectory": "/home/me/repo", "gitBranch": "feature/x"},
    )


def test_git_branch_clears_on_detached_head_or_outside_a_repository() -> None:
    detached = status_fields(status(git_context={"branch": None, "recent_branches": []}))
    outside = status_fields(status(git_context=None))
    assert detached is not None and detached[1] == {"gitBranch": None}
    assert outside is not None and outside[1] == {"gitBranch": None}


def test_absent_fields_leave_the_row_alone() -> None:
    fields = status_fields(status(is_online=True))
    assert fields is not None
    assert fields[1] == {}, "no key means no change to that metadata field"


def test_a_frame_without_device_status_changes_nothing() -> None:
    assert status_fields({"type": "update_device_status"}) is None
    assert status_fields({"type": "update_device_status", "device_status": None}) is None
