"""Puts a device's events back in `event_seq` order.

A split-mode device writes events on two sockets from one counter (device-protocol §3.3, §4.5), so
they can arrive interleaved: `turn_finished` #20 on control may overtake `stream_delta` #19 on stream.
Clients treat a jump as a loss and a step back as noise, so the router holds an early frame briefly
for the missing number. A number that never arrives within the wait is a real loss: the held frames
are released and the jump stays visible, so clients still resync.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(order=True, slots=True)
class _Held(Generic[T]):
    seq: int
    since_ms: float = field(compare=False)
    item: T = field(compare=False)


@dataclass(slots=True)  # built per relayed frame; not frozen for speed (see protocol.frames.Frame)
class Released(Generic[T]):
    item: T
    gap_before: bool  # numbers were lost right before this item


class ReorderBuffer(Generic[T]):
    def __init__(self, wait_ms: float, max_held: int = 1024) -> None:
        self.wait_ms = wait_ms
        self.max_held = max_held
        self.next_seq: int | None = None
        self._held: list[_Held[T]] = []

    def push(self, seq: int, item: T, now_ms: float) -> list[Released[T]]:
        if self.next_seq is None and seq != 1:
            # Joining a device mid-count (a reconnect after a router restart): the first number
            # seen may have overtaken a lower one, so it waits like any early frame.
            return self._hold(seq, item, now_ms)
        if self.next_seq is None or seq == self.next_seq:
            out = [Released(item, gap_before=False)]
            self.next_seq = seq + 1
            out.extend(self._drain_contiguous())
            return out
        if seq < self.next_seq:
            # Late or repeated: pass it on; clients ignore numbers below their last.
            return [Released(item, gap_before=False)]
        return self._hold(seq, item, now_ms)

    def expire(self, now_ms: float) -> list[Released[T]]:
        """Release held frames whose wait is over; call at `deadline()`."""
        out: list[Released[T]] = []
        while self._held and min(h.since_ms for h in self._held) + self.wait_ms <= now_ms:
            out.extend(self._release_oldest_gap())
        return out

    def deadline(self) -> float | None:
        if not self._held:
            return None
        return min(h.since_ms for h in self._held) + self.wait_ms

    def reset(self) -> None:
        """The device re-registered: its counter restarts at 1."""
        self.next_seq = None
        self._held.clear()

    @property
    def held(self) -> int:
        return len(self._held)

    def _hold(self, seq: int, item: T, now_ms: float) -> list[Released[T]]:
        heapq.heappush(self._held, _Held(seq, now_ms, item))
        if len(self._held) > self.max_held:
            return self._release_oldest_gap()
        return []

    def _release_oldest_gap(self) -> list[Released[T]]:
        first = heapq.heappop(self._held)
        known_hole = self.next_seq is not None
        self.next_seq = first.seq + 1
        out = [Released(first.item, gap_before=known_hole)]
        out.extend(self._drain_contiguous())
        return out

    def _drain_contiguous(self) -> list[Released[T]]:
        out: list[Released[T]] = []
        while self._held and self._held[0].seq <= (self.next_seq or 0):
            held = heapq.heappop(self._held)
            if held.seq == self.next_seq:
                self.next_seq = held.seq + 1
            out.append(Released(held.item, gap_before=False))
        return out
