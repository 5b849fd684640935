"""Which relayed events follow a hole: a pure tracker of each publisher's per-connection counter.

Two kinds of hole. Within one publisher (a pod's run of a connection's events), its counter skips.
Across publishers (the device moved pods), the counter restarts and says nothing; but the device's
own `event_seq` continues across reconnects (client-protocol §2.5), so frames the device wrote to a
pod that died before publishing them show as a jump from the last number the old publisher carried
to the first the new one carries. Within one publisher such a jump is that pod's to flag (its
reorder buffer knows whether it gave up on a number); across publishers nobody else can see it.
"""

from __future__ import annotations


class Gaps:
    """Per watched connection: the last (publisher, counter) seen, the device's last `event_seq` and
    its publisher, and whether a hole is still to be reported. A hole is flagged on the next frame
    (state-only events carry no flag), so the client resyncs where it has something to resync from.
    Holds only connections its owner says it watches (`forget` on unwatch)."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[str, int]] = {}
        self._device_seq: dict[str, tuple[str, int]] = {}  # connection -> (publisher, event_seq)
        self._pending: set[str] = set()

    def event(
        self,
        connection_id: str,
        publisher: str,
        counter: int,
        *,
        flagged: bool,
        frame: bool,
        event_seq: int | None = None,
    ) -> bool:
        """Record one event; whether it follows a hole (missed counters, the publisher's own flag, a
        jump in the device's `event_seq` since another publisher's last frame, or a hole seen on an
        earlier event without a frame). For an event without a frame the answer is kept for the
        next frame instead."""
        previous = self._seen.get(connection_id)
        # A new publisher (the device moved pods) restarts its counter: that is no hole.
        missed = previous is not None and previous[0] == publisher and counter > previous[1] + 1
        self._seen[connection_id] = (publisher, counter)
        if event_seq is not None:
            last = self._device_seq.get(connection_id)
            # A lower number after a move is a re-registration (the count restarts at 1) or a late
            # frame: no hole either way.
            missed = missed or (last is not None and last[0] != publisher and event_seq > last[1] + 1)
            self._device_seq[connection_id] = (publisher, event_seq)
        gap = missed or flagged or connection_id in self._pending
        if frame:
            self._pending.discard(connection_id)
        elif gap:
            self._pending.add(connection_id)
        return gap

    def expect(self, connection_id: str, publisher: str, counter: int) -> None:
        """Before the first event of a connection: a hole after `counter` is one too (a resumed
        socket caught up to there from the event log)."""
        self._seen.setdefault(connection_id, (publisher, counter))

    def forget(self, connection_id: str) -> None:
        self._seen.pop(connection_id, None)
        self._device_seq.pop(connection_id, None)
        self._pending.discard(connection_id)
