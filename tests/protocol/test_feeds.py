"""Scoped relay feeds (client-protocol §2.4, §2.5; checklist 28 and 32).

The device numbers events once across every conversation it runs, and clients resync on any jump.
A socket scoped to one conversation must therefore see its own events numbered without holes,
except where a frame was really lost upstream; there it must see exactly one hole.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.protocol.feeds import Feed, Scope
from tether.protocol.frames import Frame, decode


def event(seq: int, agent: str | None, conv: str | None, **extra: Any) -> Frame:
    body: dict[str, Any] = {
        "type": "stream_delta",
        "delta": {"message_type": "assistant_message", "content": f"chunk {seq}"},
        "event_seq": seq,
        "emitted_at": "2026-01-01T00:00:00.000Z",
        "idempotency_key": f"stream_delta:{seq}:uuid-{seq}",
        **extra,
    }
    if agent is not None or conv is not None:
        body["runtime"] = {"agent_id": agent, "conversation_id": conv}
    return decode(orjson.dumps(body))


def numbers(texts: list[str]) -> list[int]:
    return [orjson.loads(t)["event_seq"] for t in texts]


# ---- which frames a scope sees -----------------------------------------------------------------


def test_a_conversation_scope_sees_only_its_conversation_and_unscoped_frames() -> None:
    scope = Scope("agent-1", "conv-1")
    assert scope.matches(event(1, "agent-1", "conv-1"))
    assert not scope.matches(event(2, "agent-1", "conv-2"))
    assert not scope.matches(event(3, "agent-2", "conv-1"))
    unscoped = decode('{"type":"file_changed","path":"/x","lastModified":1}')
    assert scope.matches(unscoped), "frames without a runtime concern every watcher of the device"


def test_an_agent_only_scope_sees_every_conversation_of_that_agent() -> None:
    scope = Scope("agent-1", None)
    assert scope.matches(event(1, "agent-1", "conv-1"))
    assert scope.matches(event(2, "agent-1", "default"))
    assert not scope.matches(event(3, "agent-2", "conv-1"))


def test_the_unscoped_scope_sees_everything() -> None:
    scope = Scope(None, None)
    assert scope.unscoped
    assert scope.matches(event(1, "agent-1", "conv-1"))
    assert scope.matches(event(2, "agent-2", "conv-9"))


# ---- renumbering --------------------------------------------------------------------------------


def test_a_scoped_feed_renumbers_contiguously_and_keeps_everything_else() -> None:
    feed = Feed(Scope("agent-1", "conv-1"))
    frames = [event(n, "agent-1", "conv-1") for n in (40, 43, 47)]
    out = [feed.text_for(f, losses=0) for f in frames]
    assert numbers(out) == [1, 2, 3]
    for frame, text in zip(frames, out, strict=True):
        body = orjson.loads(text)
        assert body["device_event_seq"] == frame.event_seq
        rest = {k: v for k, v in body.items() if k not in ("event_seq", "device_event_seq")}
        assert rest == {k: v for k, v in frame.body.items() if k != "event_seq"}
        assert body["idempotency_key"] == frame.body["idempotency_key"], "clients dedupe on it"


def test_frames_without_event_seq_pass_through_a_scoped_feed_untouched() -> None:
    feed = Feed(Scope("agent-1", "conv-1"))
    reply = decode(
        '{"type":"sync_response", "request_id":"r1","success":true,'
        '"runtime":{"agent_id":"agent-1","conversation_id":"conv-1"}}'
    )
    assert feed.text_for(reply, losses=5) == reply.text
    assert numbers([feed.text_for(event(9, "agent-1", "conv-1"), losses=5)]) == [1]


def test_the_unscoped_feed_passes_text_through_byte_for_byte() -> None:
    feed = Feed(Scope(None, None))
    text = (
        '{"type": "stream_delta",  "event_seq": 7, '
        '"runtime": {"agent_id": "a", "conversation_id": "c"}, "x": 1.50}'
    )
    frame = decode(text)
    assert feed.text_for(frame, losses=0) is frame.text
    assert feed.text_for(frame, losses=3) == text, (
        "device numbers, holes included, reach unscoped sockets as sent"
    )


def test_two_interleaved_conversations_give_each_scoped_feed_a_gapless_sequence() -> None:
    """Checklist 32: the device's single counter spans both conversations."""
    a, b = Feed(Scope("agent-1", "conv-a")), Feed(Scope("agent-1", "conv-b"))
    agent_wide = Feed(Scope("agent-1", None))
    seen: dict[Feed, list[str]] = {a: [], b: [], agent_wide: []}
    for n in range(1, 41):
        frame = event(n, "agent-1", "conv-a" if n % 3 else "conv-b")
        for feed in seen:
            if feed.scope.matches(frame):
                seen[feed].append(feed.text_for(frame, losses=0))
    for texts in seen.values():
        assert numbers(texts) == list(range(1, len(texts) + 1))
    assert [orjson.loads(t)["device_event_seq"] for t in seen[agent_wide]] == list(range(1, 41))
    assert len(seen[a]) + len(seen[b]) == 40


def test_a_real_loss_leaves_exactly_one_hole_in_every_feed() -> None:
    a, b = Feed(Scope("agent-1", "conv-a")), Feed(Scope("agent-1", "conv-b"))
    losses = 0
    out: dict[Feed, list[str]] = {a: [], b: []}
    # Device 1-6, then 7-9 lost (the reorder buffer gave up: one loss), then 10-15.
    for n in [*range(1, 7), *range(10, 16)]:
        if n == 10:
            losses += 1
        frame = event(n, "agent-1", "conv-a" if n % 2 else "conv-b")
        for feed in out:
            if feed.scope.matches(frame):
                out[feed].append(feed.text_for(frame, losses))
    for texts in out.values():
        got = numbers(texts)
        holes = [(x, y) for x, y in pairwise(got) if y != x + 1]
        assert len(holes) == 1, got
        assert holes[0][1] == holes[0][0] + 2, "a hole of one is enough to make the client resync"


def test_a_loss_while_a_feed_sees_nothing_still_shows_at_its_next_frame() -> None:
    a = Feed(Scope("agent-1", "conv-a"))
    first = a.text_for(event(1, "agent-1", "conv-a"), losses=0)
    # conv-b frames flow (not this feed's), a loss happens among them, then conv-a speaks again.
    second = a.text_for(event(30, "agent-1", "conv-a"), losses=1)
    third = a.text_for(event(31, "agent-1", "conv-a"), losses=1)
    assert numbers([first, second, third]) == [1, 3, 4]


def test_several_losses_between_two_frames_make_one_hole() -> None:
    a = Feed(Scope("agent-1", "conv-a"))
    out = [a.text_for(event(1, "agent-1", "conv-a"), 0), a.text_for(event(50, "agent-1", "conv-a"), 4)]
    assert numbers(out) == [1, 3]


def test_a_feed_opened_after_earlier_losses_starts_at_one() -> None:
    """Regression: the connection's loss counter predates this feed; its clients saw nothing before
    it, so its first frame must not look like it follows a hole."""
    late = Feed(Scope("agent-1", "conv-a"))
    out = [late.text_for(event(n, "agent-1", "conv-a"), losses=3) for n in (90, 91)]
    assert numbers(out) == [1, 2]
    assert numbers([late.text_for(event(95, "agent-1", "conv-a"), losses=4)]) == [4]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["conv-a", "conv-b", "conv-c"]), st.booleans()), min_size=1, max_size=60
    ),
    st.integers(0, 5),
)
def test_renumbered_feeds_have_holes_exactly_where_losses_happened(
    stream: list[tuple[str, bool]], losses_before: int
) -> None:
    feeds = {c: Feed(Scope("agent-1", c)) for c in ("conv-a", "conv-b", "conv-c")}
    rendered: dict[str, list[int]] = {c: [] for c in feeds}
    expected_holes: dict[str, int] = {c: 0 for c in feeds}
    pending_loss: dict[str, bool] = {c: False for c in feeds}
    losses = losses_before
    for n, (conv, lost_before) in enumerate(stream, start=1):
        if lost_before:
            losses += 1
            for c in feeds:
                pending_loss[c] = True
        frame = event(n, "agent-1", conv)
        feed = feeds[conv]
        if pending_loss[conv] and rendered[conv]:
            expected_holes[conv] += 1
        pending_loss[conv] = False
        body = orjson.loads(feed.text_for(frame, losses))
        assert body["device_event_seq"] == n
        rendered[conv].append(body["event_seq"])
    for conv, got in rendered.items():
        if not got:
            continue
        assert got[0] == 1
        steps = [y - x for x, y in pairwise(got)]
        assert all(s in (1, 2) for s in steps), got
        assert steps.count(2) == expected_holes[conv]
