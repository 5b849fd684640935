"""What a relay socket has sent, kept briefly so a client that reconnects can resume.

Bounded by frame count and bytes; the oldest frames go first. `since(n)` answers exactly what a
client that last saw `seq` n missed, or None when part of it has already been dropped. `plan_resume`
answers the same question from a record another pod wrote (bus/history.py), which may end early.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass


class History:
    def __init__(self, max_frames: int, max_bytes: int) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self._frames: deque[tuple[int, str]] = deque()
        self._bytes = 0
        self.last_seq = 0

    def append(self, seq: int, text: str) -> None:
        self._frames.append((seq, text))
        self._bytes += len(text)
        self.last_seq = seq
        while self._frames and (len(self._frames) > self.max_frames or self._bytes > self.max_bytes):
            _, old = self._frames.popleft()
            self._bytes -= len(old)

    def since(self, seq: int) -> list[str] | None:
        if seq >= self.last_seq:
            return []
        first = self._frames[0][0] if self._frames else self.last_seq + 1
        if seq + 1 < first:
            return None
        return [text for n, text in self._frames if n > seq]

    @property
    def size_bytes(self) -> int:
        return self._bytes

    @property
    def first_seq(self) -> int:
        """The oldest seq still held (last_seq + 1 when none is)."""
        return self._frames[0][0] if self._frames else self.last_seq + 1


@dataclass(frozen=True, slots=True)
class Resumed:
    """What a resuming client gets: `replay` (frames with their original `seq`), then, when
    `resync_reason` is set, a `resync_required` frame announcing what the replay cannot cover."""

    replay: list[str]
    resync_reason: str | None


def plan_resume(
    frames: Sequence[tuple[int, str]], resume_from: int, last_seq: int, complete: bool
) -> Resumed:
    """The answer to `?resumeFrom=resume_from` from a socket's recorded history.

    `frames`: the recorded (seq, text), oldest first; `last_seq`: the highest seq recorded;
    `complete`: whether the record holds every frame numbered for the socket so far (a socket held
    here), or may miss the ones numbered after it was last written (a record from another pod, which
    may have died with frames unwritten and cannot have numbered what the device sent since). The
    replay is exactly the recorded frames after `resume_from`, and only if they follow it without a
    hole; anything it cannot vouch for is announced, never skipped in silence."""
    if complete and resume_from >= last_seq:
        return Resumed([], None)
    first = frames[0][0] if frames else last_seq + 1
    if resume_from + 1 < first:
        return Resumed([], "resume point is no longer in history")
    replay: list[str] = []
    expected = resume_from + 1
    for seq, text in frames:
        if seq < expected:
            continue
        if seq != expected:
            return Resumed([], "history has a hole after the resume point")
        replay.append(text)
        expected += 1
    if not complete:
        return Resumed(
            replay,
            f"frames after seq {max(last_seq, resume_from)} were not recorded by the pod that served it",
        )
    return Resumed(replay, None)
