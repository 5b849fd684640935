"""Gap flags on relayed device events (`tether.bus.gaps`): pure, no Redis, no sleeps."""

from __future__ import annotations

from tether.bus.gaps import Gaps


def test_consecutive_counters_flag_nothing() -> None:
    gaps = Gaps()
    assert [gaps.event("c", "a", n, flagged=False, frame=True) for n in (1, 2, 3)] == [False] * 3


def test_a_missed_counter_flags_the_next_frame() -> None:
    gaps = Gaps()
    gaps.event("c", "a", 1, flagged=False, frame=True)
    assert gaps.event("c", "a", 3, flagged=False, frame=True)
    assert not gaps.event("c", "a", 4, flagged=False, frame=True)


def test_a_hole_seen_on_a_state_event_is_flagged_on_the_next_frame() -> None:
    gaps = Gaps()
    gaps.event("c", "a", 1, flagged=False, frame=True)
    gaps.event("c", "a", 5, flagged=False, frame=False)  # a state change after a hole
    assert gaps.event("c", "a", 6, flagged=False, frame=True)
    assert not gaps.event("c", "a", 7, flagged=False, frame=True)


def test_the_publishers_own_flag_is_kept_and_a_new_publisher_starts_afresh() -> None:
    gaps = Gaps()
    gaps.event("c", "a", 7, flagged=False, frame=True)
    assert not gaps.event("c", "b", 1, flagged=False, frame=True)  # the device moved to pod b
    assert gaps.event("c", "b", 2, flagged=True, frame=True)


def test_forgetting_a_connection_drops_its_pending_hole() -> None:
    gaps = Gaps()
    gaps.event("c", "a", 1, flagged=True, frame=False)
    gaps.forget("c")
    assert not gaps.event("c", "a", 2, flagged=False, frame=True)
