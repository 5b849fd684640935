"""The window that stops a retried `client_message_id` from reaching the device twice."""

from __future__ import annotations

from tether.protocol.dedupe import DELIVERED, PENDING, DedupeWindow

WINDOW = 120_000.0


def test_a_repeat_inside_the_window_is_refused() -> None:
    w = DedupeWindow(WINDOW)
    assert w.claim("conn-1:msg-1", 0)
    assert not w.claim("conn-1:msg-1", 1)
    assert not w.claim("conn-1:msg-1", WINDOW - 1)
    assert w.claim("conn-1:msg-2", 5), "another key is independent"


def test_a_key_is_forgotten_once_the_window_has_passed() -> None:
    w = DedupeWindow(WINDOW)
    assert w.claim("k", 1000)
    assert w.claim("k", 1000 + WINDOW)
    assert not w.claim("k", 1000 + WINDOW + 1), "the new claim opens a new window"


def test_the_window_runs_from_the_first_claim_not_the_last_repeat() -> None:
    w = DedupeWindow(WINDOW)
    w.claim("k", 0)
    assert not w.claim("k", WINDOW - 1)
    assert w.claim("k", WINDOW)


def test_release_lets_a_retry_through_after_a_failed_delivery() -> None:
    w = DedupeWindow(WINDOW)
    assert w.claim("k", 0)
    w.release("k")
    assert w.claim("k", 1)
    assert not w.claim("k", 2)
    w.release("never-claimed")  # harmless


def test_max_keys_bounds_memory_by_forgetting_the_oldest() -> None:
    w = DedupeWindow(WINDOW, max_keys=3)
    for key in ("a", "b", "c", "d"):
        assert w.claim(key, 0)
    assert not w.claim("d", 1) and not w.claim("c", 1) and not w.claim("b", 1)
    assert w.claim("a", 1), "the oldest key was dropped to stay within max_keys"
    assert len(w._seen) == 3


def test_a_claim_is_pending_until_confirmed_and_a_released_one_holds_nothing() -> None:
    w = DedupeWindow(WINDOW)
    assert w.state("k", 0) is None
    assert w.claim("k", 0)
    assert w.state("k", 1) is PENDING  # a retry now must wait for the first attempt's outcome
    w.confirm("k")
    assert w.state("k", 2) is DELIVERED
    assert not w.claim("k", 3)
    assert w.state("k", WINDOW) is None, "the window runs from the claim, confirmed or not"
    assert w.claim("j", 0)
    w.release("j")
    assert w.state("j", 1) is None
    w.confirm("never-claimed")  # harmless: a confirm never creates a claim
    assert w.state("never-claimed", 1) is None
