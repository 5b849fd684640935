"""The teleport state machine (device-protocol §6.2; checklist 19, client 41).

A teleport moves a conversation from the source device to the target: ask the source to hand off,
start the runtime on the target, hand it the continuation, and tell the source if anything fails
so it resumes locally.
"""

from __future__ import annotations

from typing import Any

import orjson

from tether.protocol.frames import Frame, decode
from tether.protocol.teleport import (
    COMPLETED,
    DESTINATION_WAIT_MS,
    FAILED,
    SOURCE_WAIT_MS,
    STARTING_DESTINATION,
    WAITING_FOR_SOURCE,
    Command,
    Endpoint,
    Teleport,
)

TID = "teleport-abc"
RUNTIME = {"agent_id": "agent-1", "conversation_id": "conv-1"}
SOURCE = Endpoint("conn-src", "device-laptop", "laptop")
TARGET = Endpoint("conn-dst", "device-desktop", "desktop")
CONTINUATION = {"approvals": [{"type": "tool", "tool_call_id": "call-1", "tool_return": "ok"}]}


def frame(body: dict[str, Any]) -> Frame:
    return decode(orjson.dumps(body))


def teleport() -> Teleport:
    return Teleport(TID, "agent-1", "conv-1", SOURCE, TARGET)


def ready(success: bool = True, teleport_id: str = TID, **extra: Any) -> Frame:
    return frame(
        {
            "type": "teleport_ready",
            "teleport_id": teleport_id,
            "success": success,
            "active_turn": False,
            "runtime": RUNTIME,
            "event_seq": 31,
            **extra,
        }
    )


def start_response(t: Teleport, success: bool = True, **extra: Any) -> Frame:
    return frame(
        {"type": "runtime_start_response", "request_id": t.request_id("start"), "success": success, **extra}
    )


def accepted(t: Teleport, ok: bool = True, **extra: Any) -> Frame:
    return frame(
        {
            "type": "input_accepted",
            "request_id": t.request_id("continue"),
            "runtime": RUNTIME,
            "accepted": ok,
            **extra,
        }
    )


def failed_notice(cmds: list[Command]) -> dict[str, Any]:
    assert len(cmds) == 1 and cmds[0].to == "source"
    body = cmds[0].frame
    assert body["type"] == "teleport_failed"
    assert body["teleport_id"] == TID and body["runtime"] == RUNTIME
    assert isinstance(body["error"], str) and body["error"]
    return body


def at_starting_destination(now: float = 0) -> Teleport:
    t = teleport()
    t.start(now)
    t.on_frame("source", ready(mode="acceptEdits", continuation=CONTINUATION), now)
    assert t.status == STARTING_DESTINATION
    return t


# ---- the happy path ---------------------------------------------------------------------------------


def test_happy_path_sends_each_command_to_the_right_device() -> None:
    t = teleport()
    assert t.status == WAITING_FOR_SOURCE and not t.finished

    cmds = t.start(1000)
    assert cmds == [
        Command(
            "source",
            {
                "type": "teleport_request",
                "request_id": t.request_id("request"),
                "teleport_id": TID,
                "runtime": RUNTIME,
                "target": {
                    "connection_id": "conn-dst",
                    "device_id": "device-desktop",
                    "connection_name": "desktop",
                },
            },
        )
    ]
    assert t.deadline() == 1000 + SOURCE_WAIT_MS

    cmds = t.on_frame("source", ready(mode="acceptEdits", continuation=CONTINUATION, active_turn=True), 2000)
    assert t.status == STARTING_DESTINATION
    assert cmds == [
        Command(
            "target",
            {
                "type": "runtime_start",
                "request_id": t.request_id("start"),
                "agent_id": "agent-1",
                "conversation_id": "conv-1",
                "teleport_id": TID,
                "mode": "acceptEdits",
            },
        )
    ]
    assert t.deadline() == 2000 + DESTINATION_WAIT_MS

    cmds = t.on_frame("target", start_response(t), 2500)
    assert t.status == STARTING_DESTINATION
    assert cmds == [
        Command(
            "target",
            {
                "type": "input",
                "request_id": t.request_id("continue"),
                "runtime": RUNTIME,
                "payload": {
                    "kind": "teleport_continue",
                    "teleport_id": TID,
                    "source": {"device_id": "device-laptop", "connection_name": "laptop"},
                    "continuation": CONTINUATION,
                },
            },
        )
    ]

    assert t.on_frame("target", accepted(t, disposition="started"), 3000) == []
    assert t.status == COMPLETED and t.finished and t.error is None
    assert t.deadline() is None


def test_without_mode_or_continuation_those_fields_are_left_out() -> None:
    t = teleport()
    t.start(0)
    (start,) = t.on_frame("source", ready(), 1)
    assert "mode" not in start.frame
    (cont,) = t.on_frame("target", start_response(t), 2)
    assert "continuation" not in cont.frame["payload"]


def test_request_ids_are_distinct_per_step_and_per_teleport() -> None:
    t, other = teleport(), Teleport("teleport-xyz", "agent-1", "conv-1", SOURCE, TARGET)
    ids = {t.request_id(s) for s in ("request", "start", "continue")}
    assert len(ids) == 3
    assert not ids & {other.request_id(s) for s in ("request", "start", "continue")}


# ---- refusals -------------------------------------------------------------------------------------


def test_source_refusal_fails_without_a_notice_to_the_source() -> None:
    t = teleport()
    t.start(0)
    cmds = t.on_frame("source", ready(success=False, error="Conversation already has a teleport pending"), 1)
    assert cmds == [], "the source refused: it is not waiting for anything"
    assert t.status == FAILED
    assert t.error == "Conversation already has a teleport pending"
    assert t.deadline() is None


def test_target_refusing_the_runtime_fails_and_tells_the_source() -> None:
    t = at_starting_destination()
    cmds = t.on_frame("target", start_response(t, success=False, error="agent not found"), 1)
    assert t.status == FAILED
    assert "agent not found" in failed_notice(cmds)["error"]
    assert t.error is not None and "agent not found" in t.error


def test_target_refusing_the_continuation_fails_and_tells_the_source() -> None:
    t = at_starting_destination()
    t.on_frame("target", start_response(t), 1)
    cmds = t.on_frame("target", accepted(t, ok=False, error="Destination runtime is already processing"), 2)
    assert t.status == FAILED
    assert "already processing" in failed_notice(cmds)["error"]


# ---- timeouts and devices going away -------------------------------------------------------------


def test_timeout_waiting_for_the_source() -> None:
    t = teleport()
    t.start(0)
    assert t.on_timeout(SOURCE_WAIT_MS - 1) == []
    assert t.status == WAITING_FOR_SOURCE
    cmds = t.on_timeout(SOURCE_WAIT_MS)
    assert t.status == FAILED
    assert "source" in failed_notice(cmds)["error"]


def test_timeout_waiting_for_the_destination_to_start() -> None:
    t = at_starting_destination(now=100)
    assert t.on_timeout(100 + DESTINATION_WAIT_MS - 1) == []
    cmds = t.on_timeout(100 + DESTINATION_WAIT_MS)
    assert t.status == FAILED
    assert "destination" in failed_notice(cmds)["error"]


def test_timeout_waiting_for_the_continuation_to_be_accepted() -> None:
    t = at_starting_destination(now=100)
    t.on_frame("target", start_response(t), 200)
    cmds = t.on_timeout(100 + DESTINATION_WAIT_MS)
    assert t.status == FAILED
    failed_notice(cmds)


def test_timeouts_after_the_end_change_nothing() -> None:
    t = at_starting_destination()
    t.on_frame("target", start_response(t), 1)
    t.on_frame("target", accepted(t), 2)
    assert t.on_timeout(10 * SOURCE_WAIT_MS) == []
    assert t.status == COMPLETED


def test_either_device_going_away_fails_the_teleport_and_tells_the_source() -> None:
    for side in ("source", "target"):
        for prepare in (teleport, at_starting_destination):
            t = prepare()
            if t.status == WAITING_FOR_SOURCE:
                t.start(0)
            cmds = t.on_device_gone(side)
            assert t.status == FAILED
            assert side in failed_notice(cmds)["error"]
            assert t.on_device_gone(side) == [], "only one notice"


def test_device_gone_after_completion_changes_nothing() -> None:
    t = at_starting_destination()
    t.on_frame("target", start_response(t), 1)
    t.on_frame("target", accepted(t), 2)
    assert t.on_device_gone("source") == [] and t.on_device_gone("target") == []
    assert t.status == COMPLETED


# ---- repeats and strangers ------------------------------------------------------------------------


def test_repeated_frames_are_idempotent() -> None:
    t = teleport()
    t.start(0)
    assert len(t.on_frame("source", ready(mode="standard"), 1)) == 1
    assert t.on_frame("source", ready(mode="standard"), 2) == [], "a repeated ready starts nothing twice"
    assert len(t.on_frame("target", start_response(t), 3)) == 1
    assert t.on_frame("target", start_response(t), 4) == [], "one continuation only"
    assert t.on_frame("target", accepted(t), 5) == []
    assert t.status == COMPLETED
    assert t.on_frame("target", accepted(t), 6) == []
    assert t.on_frame("source", ready(), 7) == []
    assert t.status == COMPLETED


def test_frames_for_another_teleport_or_from_the_wrong_side_are_ignored() -> None:
    t = teleport()
    t.start(0)
    assert t.on_frame("source", ready(teleport_id="teleport-other"), 1) == []
    assert t.on_frame("target", ready(), 1) == [], "only the source can declare itself ready"
    assert t.status == WAITING_FOR_SOURCE

    t.on_frame("source", ready(), 2)
    other = Teleport("teleport-other", "agent-1", "conv-1", SOURCE, TARGET)
    assert t.on_frame("target", start_response(other), 3) == []
    assert t.on_frame("target", start_response(other, success=False), 3) == []
    assert t.on_frame("source", start_response(t), 3) == [], "the answer must come from the target"
    unrelated = frame({"type": "input_accepted", "request_id": "client-42", "accepted": False})
    assert t.on_frame("target", unrelated, 3) == []
    assert t.status == STARTING_DESTINATION


def test_an_early_continuation_answer_does_not_complete_the_teleport() -> None:
    t = teleport()
    t.start(0)
    assert t.on_frame("target", accepted(t), 1) == []
    assert t.status == WAITING_FOR_SOURCE
