"""`plan_resume`: what a resuming client gets from a socket's recorded history (issue 16, row 7)."""

from __future__ import annotations

from tether.protocol.history import History, plan_resume


def _frames(first: int, last: int) -> list[tuple[int, str]]:
    return [(n, f"f{n}") for n in range(first, last + 1)]


def test_a_complete_record_replays_exactly_the_missed_frames() -> None:
    answer = plan_resume(_frames(1, 10), 6, 10, complete=True)
    assert answer.replay == ["f7", "f8", "f9", "f10"]
    assert answer.resync_reason is None


def test_a_complete_record_owes_nothing_to_a_client_that_saw_everything() -> None:
    answer = plan_resume(_frames(1, 10), 10, 10, complete=True)
    assert answer.replay == [] and answer.resync_reason is None


def test_a_record_from_another_pod_replays_what_it_holds_then_announces_the_rest() -> None:
    answer = plan_resume(_frames(1, 10), 6, 10, complete=False)
    assert answer.replay == ["f7", "f8", "f9", "f10"]
    assert answer.resync_reason is not None and "10" in answer.resync_reason


def test_a_client_ahead_of_the_record_gets_no_replay_but_the_announcement() -> None:
    # The dead pod delivered frames 11 and 12 it never wrote: nothing to replay, and the gap after
    # 12 is still announced.
    answer = plan_resume(_frames(1, 10), 12, 10, complete=False)
    assert answer.replay == []
    assert answer.resync_reason is not None and "12" in answer.resync_reason


def test_a_resume_point_older_than_the_record_resyncs_without_a_partial_replay() -> None:
    answer = plan_resume(_frames(5, 10), 2, 10, complete=True)
    assert answer.replay == [] and answer.resync_reason == "resume point is no longer in history"
    # The oldest frame kept follows the resume point directly: still exact.
    assert plan_resume(_frames(5, 10), 4, 10, complete=True).replay == ["f5", "f6", "f7", "f8", "f9", "f10"]


def test_a_hole_in_the_record_is_never_skipped_in_silence() -> None:
    frames = [*_frames(1, 4), *_frames(7, 10)]  # 5 and 6 dropped before they were written
    answer = plan_resume(frames, 3, 10, complete=False)
    assert answer.replay == []
    assert answer.resync_reason == "history has a hole after the resume point"
    # After the hole, the record is contiguous again.
    assert plan_resume(frames, 7, 10, complete=False).replay == ["f8", "f9", "f10"]


def test_an_empty_record_replays_nothing_and_announces() -> None:
    answer = plan_resume([], 0, 0, complete=False)
    assert answer.replay == [] and answer.resync_reason is not None


def test_first_seq_follows_the_bounds() -> None:
    history = History(max_frames=3, max_bytes=1000)
    assert history.first_seq == 1
    for n in range(1, 6):
        history.append(n, "x")
    assert history.first_seq == 3 and history.last_seq == 5
    assert plan_resume([(n, "x") for n in range(3, 6)], 2, 5, complete=True).replay == ["x", "x", "x"]
