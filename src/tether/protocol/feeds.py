"""Scoped client feeds: which device frames a relay socket sees, and their `event_seq` there.

The device numbers events once per connection across every conversation it runs. A socket scoped to
one runtime would see the other runtimes' numbers as holes and resync over and over (client-protocol
§2.5). So a scoped feed renumbers the frames it carries contiguously, keeping the device's number in
`device_event_seq`; a real loss upstream (a jump the reorder buffer gave up on, or a device outage)
still appears as a hole of one in every feed, so clients resync exactly when they should. Unscoped
sockets see the device's numbers untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from tether.protocol.frames import Frame


@dataclass(frozen=True, slots=True)
class Scope:
    agent_id: str | None
    conversation_id: str | None

    @property
    def unscoped(self) -> bool:
        return self.agent_id is None and self.conversation_id is None

    def matches(self, frame: Frame) -> bool:
        if not frame.scoped:
            return True
        if self.agent_id is not None and frame.agent_id != self.agent_id:
            return False
        return self.conversation_id is None or frame.conversation_id == self.conversation_id


class Feed:
    """One runtime scope on one connection, shared by every socket watching that scope here."""

    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self.next_event_seq = 1
        self.losses_seen = 0

    def text_for(self, frame: Frame, losses: int) -> str:
        """The text this feed carries for a matching frame (before the per-socket `seq`)."""
        if self.scope.unscoped or frame.event_seq is None:
            return frame.text
        if losses > self.losses_seen:
            # Leave a hole so the client resyncs; a feed that has carried nothing yet starts
            # after losses its clients never saw, and owes them no hole.
            if self.next_event_seq > 1:
                self.next_event_seq += 1
            self.losses_seen = losses
        number = self.next_event_seq
        self.next_event_seq += 1
        body = dict(frame.body)
        body["event_seq"] = number
        body["device_event_seq"] = frame.event_seq
        return orjson.dumps(body).decode()
