"""Putting split-socket events back in `event_seq` order (device-protocol §3.3, §4.5).

Clients resync on any jump in `event_seq` and ignore a step back, so an overtaking frame must be held
for the number it skipped, and a number that never comes must show as exactly one visible jump.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from tether.protocol.ordering import Released, ReorderBuffer

WAIT = 50.0


def seqs(out: list[Released[int]]) -> list[int]:
    return [r.item for r in out]


def gaps(out: list[Released[int]]) -> list[int]:
    return [r.item for r in out if r.gap_before]


def push(buf: ReorderBuffer[int], seq: int, now: float) -> list[Released[int]]:
    """The item is the event_seq itself, so released order is easy to read."""
    return buf.push(seq, seq, now)


def test_in_order_frames_pass_straight_through() -> None:
    buf: ReorderBuffer[int] = ReorderBuffer(WAIT)
    for n in range(1, 15):
        out = push(buf, n, now=n)
        assert seqs(out) == [n] and gaps(out) == []
    assert buf.held == 0 and buf.deadline() is None


def test_joining_mid_count_waits_once_for_lower_numbers_then_counts_from_there() -> None:
    """After a router restart the device's counter is already high and its first two frames may
    have crossed on the two sockets; the lowest number seen in the first wait is the baseline."""
    buf: ReorderBuffer[int] = ReorderBuffer(WAIT)
    assert push(buf, 501, now=0) == []
    assert push(buf, 500, now=10) == []
    assert push(buf, 502, now=20) == []
    assert buf.deadline() == WAIT
    out = buf.expire(WAIT)
    assert seqs(out) == [500, 501, 502]
    assert gaps(out) == [], "nothing was seen before the baseline, so nothing is known lost"
    assert seqs(push(buf, 503, now=WAIT + 1)) == [503]


def test_joining_mid_count_still_marks_a_hole_after_the_baseline() -> None:
    buf: ReorderBuffer[int] = ReorderBuffer(WAIT)
    push(buf, 500, now=0)
    push(buf, 502, now=0)
    out = buf.expire(WAIT)
    assert seqs(out) == [500, 502] and gaps(out) == [502]


def test_an_overtaking_frame_waits_for_the_hole_and_both_leave_in_order() -> None:
    buf: ReorderBuffer[int] = ReorderBuffer(WAIT)
    for n in range(1, 19):
        push(buf, n, now=0)
    assert push(buf, 20, now=1) == [], "turn_finished #20 overtook stream_delta #19: hold it"
    assert push(buf, 21, now=2) == []
    assert buf.held == 2
    out = push(buf, 19, now=3)
    assert seqs(out) == [19, 20, 21]
    assert gaps(out) == []
    assert buf.held == 0 and buf.deadline() is None


def test_a_hole_never_filled_is_released_at_the_deadline_with_one_gap_mark() -> None:
    buf: ReorderBuffer[int] = ReorderBuffer(WAIT)
    push(buf, 1, now=0)
    push(buf, 3, now=10)
    push(buf, 4, now=20)
    assert buf.deadline() == 10 + WAIT
    assert buf.expire(10 + WAIT - 1) == []
    out = buf.expire(10 + WAIT)
    assert seqs(out) == [3, 4]
    assert gaps(out) == [3], "the jump is visible once, right after the hole"
    assert buf.held == 0 and buf.deadline() is None
    # Counting resumes after the released frames.
    assert seqs(push(buf, 5, now=100)) == [5]


def test_two_holes_expire_separately_each_with_its_own_gap_mark() -> None:
    buf: ReorderBuffer[int] = ReorderBuffer(WAIT)
    push(buf, 1, now=0)
    push(buf, 3, now=0)  # 2 missing since t=0
    push(buf, 6, now=30)  # 4 and 5 missing since t=30
    out = buf.expire(WAIT)
    assert seqs(out) == [3] and gaps(out) == [3]
    assert buf.deadline() == 30 + WAIT
    out = buf.expire(30 + WAIT)
    assert seqs(out) == [6] and gaps(out) == [6]


def test_the_wait_for_a_number_starts_when_the_first_frame_past_it_arrives() -> None:
    buf: ReorderBuffer[int] = ReorderBuffer(WAIT)
    push(buf, 1, now=0)
    push(buf, 10, now=0)  # numbers 2..9 are missing from t=0
    push(buf, 5, now=40)  # a later arrival does not restart the clock for 2..4
    assert buf.deadline() == WAIT
    out = buf.expire(WAIT)
    assert seqs(out) == [5, 10]
    assert gaps(out) == [5, 10]


def test_late_and_duplicate_numbers_pass_through_unmarked() -> None:
    buf: ReorderBuffer[int] = ReorderBuffer(WAIT)
    push(buf, 1, now=0)
    push(buf, 3, now=0)
    out = buf.expire(WAIT)
    assert gaps(out) == [3]
    late = push(buf, 2, now=WAIT + 5)
    assert seqs(late) == [2] and gaps(late) == [], "clients ignore a step back; do not mark it"
    again = push(buf, 3, now=WAIT + 6)
    assert seqs(again) == [3] and gaps(again) == []
    assert seqs(push(buf, 4, now=WAIT + 7)) == [4]


def test_reset_starts_a_new_baseline_and_forgets_held_frames() -> None:
    buf: ReorderBuffer[int] = ReorderBuffer(WAIT)
    push(buf, 1, now=0)
    push(buf, 3, now=0)
    buf.reset()
    assert buf.held == 0 and buf.deadline() is None
    out = push(buf, 1, now=1)  # a re-registered device counts from 1 again
    assert seqs(out) == [1] and gaps(out) == []
    assert seqs(push(buf, 2, now=2)) == [2]


def test_held_frames_are_bounded_by_max_held() -> None:
    buf: ReorderBuffer[int] = ReorderBuffer(WAIT, max_held=3)
    push(buf, 1, now=0)
    for n in (3, 4, 5):
        assert push(buf, n, now=0) == []
    assert buf.held == 3
    out = push(buf, 7, now=0)
    # The oldest hole (2) is given up on to make room; 6 is still awaited.
    assert seqs(out) == [3, 4, 5] and gaps(out) == [3]
    assert buf.held == 1
    assert seqs(push(buf, 6, now=1)) == [6, 7]


def test_deadline_follows_the_oldest_held_frame() -> None:
    buf: ReorderBuffer[int] = ReorderBuffer(WAIT)
    assert buf.deadline() is None
    push(buf, 1, now=0)
    assert buf.deadline() is None
    push(buf, 3, now=100)
    assert buf.deadline() == 100 + WAIT
    push(buf, 5, now=120)
    assert buf.deadline() == 100 + WAIT
    assert seqs(push(buf, 2, now=130)) == [2, 3]
    assert buf.deadline() == 120 + WAIT


def test_expire_at_infinity_flushes_everything_in_order() -> None:
    buf: ReorderBuffer[str] = ReorderBuffer(WAIT)
    buf.push(1, "a", 0)
    buf.push(4, "d", 0)
    buf.push(3, "c", 0)
    buf.push(7, "g", 0)
    out = buf.expire(float("inf"))
    assert [(r.item, r.gap_before) for r in out] == [("c", True), ("d", False), ("g", True)]


@settings(max_examples=200, deadline=None)
@given(st.permutations(list(range(2, 30))))
def test_any_arrival_order_within_the_wait_comes_out_in_order_with_no_gap(order: list[int]) -> None:
    buf: ReorderBuffer[int] = ReorderBuffer(WAIT)
    out = push(buf, 1, now=0)
    for i, n in enumerate(order):
        out += push(buf, n, now=i * WAIT / len(order))  # all inside the first frame's wait
    assert seqs(out) == list(range(1, 30))
    assert gaps(out) == []
    assert buf.held == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=40), st.randoms(use_true_random=False))
def test_lost_numbers_show_as_one_gap_mark_per_hole(kept: list[bool], rnd: random.Random) -> None:
    arriving = [n for n, keep in zip(range(2, 2 + len(kept)), kept, strict=True) if keep]
    shuffled = arriving[:]
    rnd.shuffle(shuffled)
    buf: ReorderBuffer[int] = ReorderBuffer(WAIT)
    out = push(buf, 1, now=0)
    for n in shuffled:
        out += push(buf, n, now=1)
    out += buf.expire(1 + WAIT)
    assert seqs(out) == [1, *arriving], "everything arrives, in order, once"
    expected_gaps = [n for prev, n in zip([1, *arriving], arriving, strict=False) if n != prev + 1]
    assert gaps(out) == expected_gaps
    assert buf.held == 0


def test_joining_mid_count_is_bounded_by_max_held_too() -> None:
    buf: ReorderBuffer[int] = ReorderBuffer(WAIT, max_held=3)
    out: list[Released[int]] = []
    for n in range(100, 110):
        out += push(buf, n, now=0)
        assert buf.held <= 3
    # Overflow fixes the baseline at the lowest held number; the rest then flows in order.
    assert seqs(out) == list(range(100, 110)) and gaps(out) == []


_op = st.one_of(
    st.tuples(st.just("push"), st.integers(1, 40), st.floats(0, 30)),
    st.tuples(st.just("expire"), st.just(0), st.floats(0, 100)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, max_size=60), st.integers(1, 8))
def test_every_frame_leaves_exactly_once_and_held_stays_bounded(
    ops: list[tuple[str, int, float]], max_held: int
) -> None:
    buf: ReorderBuffer[tuple[int, int]] = ReorderBuffer(WAIT, max_held=max_held)
    now = 0.0
    pushed: list[tuple[int, int]] = []
    released: list[tuple[int, int]] = []
    for i, (kind, seq, step) in enumerate(ops):
        now += step  # time only moves forward
        if kind == "push":
            item = (seq, i)
            pushed.append(item)
            released += [r.item for r in buf.push(seq, item, now)]
        else:
            released += [r.item for r in buf.expire(now)]
        assert buf.held <= max_held
        assert (buf.deadline() is None) == (buf.held == 0)
    released += [r.item for r in buf.expire(float("inf"))]
    assert sorted(released) == sorted(pushed)
    assert buf.held == 0
