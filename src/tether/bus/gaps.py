"""Which relayed events follow a hole: a pure tracker of each publisher's per-connection counter."""

from __future__ import annotations


class Gaps:
    """Per watched connection: the last (publisher, counter) seen, and whether a hole is still to be
    reported. A hole is flagged on the next frame (state-only events carry no flag), so the client
    resyncs where it has something to resync from. Holds only connections its owner says it watches
    (`forget` on unwatch)."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[str, int]] = {}
        self._pending: set[str] = set()

    def event(self, connection_id: str, publisher: str, counter: int, *, flagged: bool, frame: bool) -> bool:
        """Record one event; whether it follows a hole (missed counters, the publisher's own flag, or
        a hole seen on an earlier event without a frame). For an event without a frame the answer
        is kept for the next frame instead."""
        previous = self._seen.get(connection_id)
        # A new publisher (the device moved pods) restarts its counter: that is no hole.
        missed = previous is not None and previous[0] == publisher and counter > previous[1] + 1
        self._seen[connection_id] = (publisher, counter)
        gap = missed or flagged or connection_id in self._pending
        if frame:
            self._pending.discard(connection_id)
        elif gap:
            self._pending.add(connection_id)
        return gap

    def forget(self, connection_id: str) -> None:
        self._seen.pop(connection_id, None)
        self._pending.discard(connection_id)
