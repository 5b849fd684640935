"""Resume across pods (issue 16, row 7): `plan_catch_up` answers a client whose socket another pod
served from that pod's record and the connection's event log after it; `Positions` numbers the
events that log is ordered by."""

from __future__ import annotations

import json

from tether.protocol.events import DeviceEvent, DeviceState, Position, Positions, follows
from tether.protocol.feeds import Scope
from tether.protocol.frames import decode, with_seq
from tether.protocol.history import History, plan_catch_up

UNSCOPED = Scope(None, None)
EPOCH = 1_000


def _record(first: int, last: int) -> list[tuple[int, str]]:
    """What the dead pod wrote: seq n carried device event n."""
    return [(n, with_seq(_device(n), n)) for n in range(first, last + 1)]


def _device(n: int, conversation: str = "default") -> str:
    return json.dumps(
        {
            "type": "stream_delta",
            "event_seq": n,
            "runtime": {"agent_id": "agent-1", "conversation_id": conversation},
        }
    )


def _log(first: int, last: int, epoch: int = EPOCH, conversation: str = "default") -> list[DeviceEvent]:
    return [
        DeviceEvent(frame=decode(_device(n, conversation)), position=(epoch, n))
        for n in range(first, last + 1)
    ]


def _seen(texts: list[str], key: str = "event_seq") -> list[int]:
    return [json.loads(text)[key] for text in texts]


def test_the_record_then_the_log_replay_every_missed_frame_numbered_on() -> None:
    # The socket numbered device events 1..10 as seq 1..10 and wrote them; the device went on
    # to 25 after the pod died. The client had read up to seq 6.
    plan = plan_catch_up(_record(1, 10), 10, (EPOCH, 10), _log(11, 25), 6, UNSCOPED)
    assert plan.resync_reason is None
    assert _seen(plan.replay) == list(range(7, 26))
    assert _seen(plan.replay, "seq") == list(range(7, 26))
    assert plan.seq == 25 and plan.position == (EPOCH, 25)
    # The new socket's history holds everything, so it can be resumed again.
    assert [seq for seq, _, _ in plan.frames] == list(range(1, 26))


def test_a_client_ahead_of_the_record_is_not_sent_what_it_read() -> None:
    # The dead pod delivered seq 11 and 12 but died before writing them: the log numbers them again
    # exactly as it did, and the client gets only what follows.
    plan = plan_catch_up(_record(1, 10), 10, (EPOCH, 10), _log(11, 20), 12, UNSCOPED)
    assert plan.resync_reason is None
    assert _seen(plan.replay, "seq") == list(range(13, 21))
    assert _seen(plan.replay) == list(range(13, 21))


def test_nothing_missed_means_nothing_replayed_and_no_announcement() -> None:
    plan = plan_catch_up(_record(1, 10), 10, (EPOCH, 10), [], 10, UNSCOPED)
    assert plan.replay == [] and plan.resync_reason is None and plan.seq == 10


def test_a_log_trimmed_past_the_resume_point_replays_the_record_and_announces_the_rest() -> None:
    plan = plan_catch_up(_record(1, 10), 10, (EPOCH, 10), _log(14, 20), 6, UNSCOPED)
    assert _seen(plan.replay) == [7, 8, 9, 10]
    assert plan.resync_reason == "the event log no longer holds every event after the resume point"


def test_a_resume_point_older_than_the_record_resyncs_without_a_partial_replay() -> None:
    plan = plan_catch_up(_record(5, 10), 10, (EPOCH, 10), _log(11, 12), 2, UNSCOPED)
    assert plan.replay == [] and plan.resync_reason == "resume point is no longer in history"
    # The oldest frame kept follows the resume point directly: still exact.
    exact = plan_catch_up(_record(5, 10), 10, (EPOCH, 10), _log(11, 12), 4, UNSCOPED)
    assert _seen(exact.replay) == list(range(5, 13)) and exact.resync_reason is None


def test_a_hole_in_the_record_is_never_skipped_in_silence() -> None:
    frames = [*_record(1, 4), *_record(7, 10)]  # 5 and 6 dropped before they were written
    plan = plan_catch_up(frames, 10, (EPOCH, 10), _log(11, 12), 3, UNSCOPED)
    assert plan.replay == [] and plan.resync_reason == "history has a hole after the resume point"


def test_a_record_without_a_log_position_or_an_unreadable_log_is_announced() -> None:
    no_position = plan_catch_up(_record(1, 10), 10, None, _log(11, 12), 6, UNSCOPED)
    unreadable = plan_catch_up(_record(1, 10), 10, (EPOCH, 10), None, 6, UNSCOPED)
    for plan in (no_position, unreadable):
        assert _seen(plan.replay) == [7, 8, 9, 10]
        assert plan.resync_reason is not None and "10" in plan.resync_reason


def test_a_device_that_moved_pods_is_followed_into_its_new_epoch() -> None:
    log = [*_log(11, 12), *_log(1, 3, epoch=EPOCH + 5)]
    plan = plan_catch_up(_record(1, 10), 10, (EPOCH, 10), log, 10, UNSCOPED)
    assert plan.resync_reason is None and len(plan.replay) == 5
    assert plan.position == (EPOCH + 5, 3)


def test_the_log_is_filtered_and_renumbered_through_the_sockets_scope() -> None:
    scope = Scope("agent-1", "default")
    # The scoped feed had carried event_seq 1..3 (device events 1..3).
    fanout_texts = [
        (n, with_seq(json.dumps({**json.loads(_device(n)), "device_event_seq": n}), n)) for n in range(1, 4)
    ]
    other = _log(4, 5, conversation="other")  # another conversation: not this socket's
    mine = [DeviceEvent(frame=decode(_device(n)), position=(EPOCH, n)) for n in range(6, 8)]
    plan = plan_catch_up(fanout_texts, 3, (EPOCH, 3), [*other, *mine], 3, scope)
    assert plan.resync_reason is None
    assert _seen(plan.replay) == [4, 5]  # renumbered on, contiguous
    assert _seen(plan.replay, "device_event_seq") == [6, 7]
    assert _seen(plan.replay, "seq") == [4, 5]
    assert plan.feed_next == 6


def test_the_routers_own_requests_answers_are_not_replayed_and_states_only_advance() -> None:
    reply = decode('{"type":"sync_response","request_id":"tether-sub-abc","success":true}')
    log = [
        DeviceEvent(frame=reply, position=(EPOCH, 11)),
        DeviceEvent(state=DeviceState.AWAY, position=(EPOCH, 12)),
        *_log(13, 13),
    ]
    plan = plan_catch_up(_record(1, 10), 10, (EPOCH, 10), log, 10, UNSCOPED)
    assert _seen(plan.replay) == [13] and plan.resync_reason is None


def test_positions_grow_per_connection_and_a_new_epoch_starts_after_offline() -> None:
    positions = Positions()
    first = [positions.stamp("c", DeviceEvent(), 50) for _ in range(3)]
    assert first == [(50, 1), (50, 2), (50, 3)]
    assert positions.stamp("c", DeviceEvent(state=DeviceState.OFFLINE), 50) == (50, 4)
    again: Position = positions.stamp("c", DeviceEvent(), 50)  # same millisecond: still later
    assert again > (50, 4) and again[1] == 1
    assert follows((50, 3), (50, 4)) and not follows((50, 3), (50, 5))
    assert follows((50, 4), again) and not follows(again, (50, 9))


def test_history_records_the_last_event_position() -> None:
    history = History(max_frames=3, max_bytes=1000)
    history.append(1, "x", (EPOCH, 7))
    history.append(2, "resync")  # a frame of the router's own: no event
    assert history.last_position == (EPOCH, 7) and history.first_seq == 1
