"""Resume history of one relay socket: what a reconnecting client missed, or None when it is gone."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tether.protocol.frames import with_seq
from tether.protocol.history import History


def filled(history: History, count: int, size: int = 10) -> list[str]:
    texts = []
    for seq in range(1, count + 1):
        text = with_seq('{"type":"x","p":"' + "a" * max(0, size - 25) + '"}', seq)
        history.append(seq, text)
        texts.append(text)
    return texts


def test_since_replays_exactly_what_came_after() -> None:
    h = History(max_frames=100, max_bytes=1 << 20)
    texts = filled(h, 10)
    assert h.since(0) == texts
    assert h.since(7) == texts[7:]
    assert h.since(9) == texts[9:]
    assert h.since(10) == [], "a client that saw everything gets nothing"


def test_empty_history_has_nothing_to_replay() -> None:
    h = History(max_frames=10, max_bytes=1000)
    assert h.since(0) == []
    assert h.last_seq == 0 and h.size_bytes == 0


def test_frame_bound_drops_the_oldest_and_since_reports_the_loss() -> None:
    h = History(max_frames=3, max_bytes=1 << 20)
    texts = filled(h, 10)
    assert h.since(7) == texts[7:]
    assert h.since(6) is None, "frame 7 is gone: the client must resync, not resume with a hole"
    assert h.since(0) is None
    assert h.last_seq == 10


def test_byte_bound_drops_the_oldest() -> None:
    h = History(max_frames=1000, max_bytes=250)
    texts = filled(h, 10, size=100)
    assert h.size_bytes <= 250
    assert h.size_bytes == sum(len(t) for t in texts[-2:])
    assert h.since(8) == texts[8:]
    assert h.since(7) is None


def test_a_frame_larger_than_the_byte_bound_is_not_kept_and_resume_across_it_fails() -> None:
    h = History(max_frames=10, max_bytes=50)
    filled(h, 2, size=30)
    h.append(3, with_seq('{"type":"x","p":"' + "b" * 100 + '"}', 3))
    assert h.size_bytes == 0
    assert h.last_seq == 3
    assert h.since(2) is None
    assert h.since(3) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=0, max_size=40), st.integers(1, 8), st.integers(1, 300))
def test_since_is_exact_or_none(sizes: list[int], max_frames: int, max_bytes: int) -> None:
    h = History(max_frames, max_bytes)
    sent = []
    for seq, size in enumerate(sizes, start=1):
        text = "x" * size
        h.append(seq, text)
        sent.append(text)
        assert len(h._frames) <= max_frames and h.size_bytes <= max_bytes
    for last_seen in range(len(sent) + 1):
        got = h.since(last_seen)
        assert got is None or got == sent[last_seen:]
        if last_seen == len(sent):
            assert got == []
