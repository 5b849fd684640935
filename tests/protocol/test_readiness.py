"""The readiness tracker: a dependency that leaves a call unanswered is not answering."""

from __future__ import annotations

from tether.protocol.readiness import CallWatch


def test_a_call_answered_in_time_is_no_problem() -> None:
    watch = CallWatch(stall_after=1.0)
    token = watch.began(10.0)
    assert watch.problem(10.9) is None
    watch.answered(token, 10.9)
    assert watch.problem(100.0) is None
    assert watch.answered_at == 10.9


def test_a_call_left_unanswered_past_its_allowance_is_a_problem() -> None:
    watch = CallWatch(stall_after=1.0)
    watch.began(10.0)
    assert watch.problem(11.0) is None
    assert watch.problem(11.2) == "no answer for 1.2 s"


def test_the_oldest_waiting_call_decides() -> None:
    watch = CallWatch(stall_after=1.0)
    first = watch.began(10.0)
    watch.began(10.8)
    watch.answered(first, 10.9)  # the newer call is still within its allowance
    assert watch.problem(11.5) is None
    assert watch.problem(11.9) == "no answer for 1.1 s"


def test_a_blocking_read_may_wait_its_block_first() -> None:
    watch = CallWatch(stall_after=1.0, may_wait=2.0)
    watch.began(0.0)
    assert watch.problem(2.9) is None
    assert watch.problem(3.1) is not None


def test_failures_and_abandoned_calls_leave_nothing_waiting() -> None:
    watch = CallWatch(stall_after=1.0)
    failed, abandoned = watch.began(0.0), watch.began(0.0)
    watch.failed(failed)
    watch.abandoned(abandoned)
    assert watch.waiting == 0
    assert watch.problem(50.0) is None
    assert watch.failures == 1 and watch.last_failed
    watch.answered(watch.began(60.0), 60.1)
    assert not watch.last_failed
    # An outcome for a call already ended changes nothing.
    watch.failed(failed)
    assert watch.failures == 1
