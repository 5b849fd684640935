"""What a relay socket has sent, kept briefly so a client that reconnects can resume.

Bounded by frame count and bytes; the oldest frames go first. `since(n)` answers exactly what a
client that last saw `seq` n missed, or None when part of it has already been dropped. Across pods
(bus/history.py), `plan_catch_up` answers from the record another pod wrote, which may end early,
and goes on from where it ends through the connection's event log, numbering what the dead pod
never wrote or never saw, exactly as it would have (`fanout.Fanout` routes it).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson

from tether.protocol.events import DeviceEvent, Position, follows
from tether.protocol.fanout import Fanout
from tether.protocol.feeds import Scope
from tether.protocol.frames import with_seq


class History:
    def __init__(self, max_frames: int, max_bytes: int) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self._frames: deque[tuple[int, str]] = deque()
        self._bytes = 0
        self.last_seq = 0
        self.last_position: Position | None = None  # of the last device event numbered in

    def append(self, seq: int, text: str, position: Position | None = None) -> None:
        self._frames.append((seq, text))
        self._bytes += len(text)
        self.last_seq = seq
        if position is not None:
            self.last_position = position
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


@dataclass(slots=True)
class CatchUp:
    """A resume across pods: `frames` (seq, text, event position) for the new socket's history, of
    which `replay` is what the client missed; the socket goes on at `seq`, after the device event at
    `position`, its scope's feed at `feed_next`. `resync_reason`: what it could not vouch for."""

    frames: list[tuple[int, str, Position | None]] = field(default_factory=list)
    replay: list[str] = field(default_factory=list)
    seq: int = 0
    position: Position | None = None
    feed_next: int = 1
    resync_reason: str | None = None


@dataclass(frozen=True, slots=True)
class _Replayed:
    """The resumed socket as the fan-out sees it while the event log is routed to it."""

    scope: Scope
    channel: str | None
    key_id: str


def plan_catch_up(
    frames: Sequence[tuple[int, str]],
    last_seq: int,
    last_position: Position | None,
    logged: Sequence[DeviceEvent] | None,
    resume_from: int,
    scope: Scope,
    channel: str | None = None,
    key_id: str = "",
) -> CatchUp:
    """The answer to `?resumeFrom=resume_from` for a socket another pod served, from its record
    (`frames` up to `last_seq`, the last of them carrying the device event at `last_position`) and
    the connection's event log after that position (`logged`, oldest first; None: unreadable).

    The log is routed as the live path does (`Fanout.route` for the socket's scope, its feed going on
    from the record's last `event_seq`), numbered on from `last_seq`; what the client had already
    read (`seq` <= resume_from) is kept in history but not replayed. A hole (record or log) stops the
    replay there and is announced."""
    first = frames[0][0] if frames else last_seq + 1
    plan = CatchUp(seq=max(last_seq, resume_from), position=last_position)
    if resume_from + 1 < first:
        plan.resync_reason = "resume point is no longer in history"
        return plan
    expected = first
    for seq, text in frames:
        if seq != expected:
            plan.resync_reason = "history has a hole after the resume point"
            plan.frames, plan.replay = [], []
            return plan
        plan.frames.append((seq, text, last_position if seq == last_seq else None))
        if seq > resume_from:
            plan.replay.append(text)
        expected += 1
    if last_position is None or logged is None:
        plan.resync_reason = f"frames after seq {plan.seq} were not recorded by the pod that served it"
        return plan
    fanout: Fanout[_Replayed] = Fanout()
    member = _Replayed(scope, channel, key_id)
    fanout.add(member)
    feed = fanout.feeds[scope]
    feed.next_event_seq = _feed_next(frames) if not scope.unscoped else 1
    seq, position = last_seq, last_position
    for event in logged:
        if event.position is None or event.position <= position:
            continue
        if not follows(position, event.position):
            plan.resync_reason = "the event log no longer holds every event after the resume point"
            break
        position = event.position
        if event.frame is None:
            continue
        for _, text in fanout.route(event.frame, event.gap_before):
            seq += 1
            out = with_seq(text, seq)
            plan.frames.append((seq, out, position))
            if seq > resume_from:
                plan.replay.append(out)
    if seq < resume_from and plan.resync_reason is None:
        plan.resync_reason = f"seq {resume_from} was never recorded for this socket"
    plan.seq, plan.position, plan.feed_next = max(seq, resume_from), position, feed.next_event_seq
    return plan


def _feed_next(frames: Sequence[tuple[int, str]]) -> int:
    """The next `event_seq` of a scoped socket's feed: after the last one it carried (1: none)."""
    for _, text in reversed(frames):
        if '"device_event_seq"' not in text:
            continue
        body = orjson.loads(text)
        if isinstance(body, dict) and isinstance(body.get("event_seq"), int):
            return int(body["event_seq"]) + 1
    return 1
