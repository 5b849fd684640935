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


def test_a_jump_in_the_devices_numbers_after_it_moved_pods_is_a_hole() -> None:
    # Frames 4 and 5 went to pod a, which died before publishing them; the device reconnected to
    # pod b and numbers on from 6. Pod b's counter restarts, so only the device's number shows it.
    gaps = Gaps()
    for n, seq in ((1, 1), (2, 2), (3, 3)):
        gaps.event("c", "a", n, flagged=False, frame=True, event_seq=seq)
    assert not gaps.event("c", "b", 1, flagged=False, frame=False)  # b's "online": no frame
    assert gaps.event("c", "b", 2, flagged=False, frame=True, event_seq=6)
    assert not gaps.event("c", "b", 3, flagged=False, frame=True, event_seq=7)


def test_a_move_that_lost_nothing_flags_nothing() -> None:
    gaps = Gaps()
    gaps.event("c", "a", 1, flagged=False, frame=True, event_seq=41)
    gaps.event("c", "a", 2, flagged=False, frame=False)
    assert not gaps.event("c", "b", 1, flagged=False, frame=True, event_seq=42)
    assert not gaps.event("c", "a", 1, flagged=False, frame=True, event_seq=43)  # and back


def test_numbers_restarting_after_a_move_are_a_re_registration_not_a_hole() -> None:
    gaps = Gaps()
    gaps.event("c", "a", 1, flagged=False, frame=True, event_seq=90)
    assert not gaps.event("c", "b", 1, flagged=False, frame=True, event_seq=1)
    assert not gaps.event("c", "b", 2, flagged=False, frame=True, event_seq=2)
    assert gaps.event("c", "d", 1, flagged=False, frame=True, event_seq=5)  # the next move counts from 2


def test_within_one_publisher_the_devices_numbers_are_the_publishers_to_judge() -> None:
    # Its reorder buffer knows whether a number was lost or coalesced away; it flags what it lost.
    gaps = Gaps()
    gaps.event("c", "a", 1, flagged=False, frame=True, event_seq=3)
    assert not gaps.event("c", "a", 2, flagged=False, frame=True, event_seq=9)
    assert gaps.event("c", "a", 3, flagged=True, frame=True, event_seq=12)


def test_forgetting_a_connection_drops_the_devices_last_number() -> None:
    gaps = Gaps()
    gaps.event("c", "a", 1, flagged=False, frame=True, event_seq=3)
    gaps.forget("c")
    assert not gaps.event("c", "b", 1, flagged=False, frame=True, event_seq=20)  # a socket new since
