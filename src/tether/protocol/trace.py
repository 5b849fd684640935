"""The frame trace of one environment: a bounded ring, armed by polling (README "Fleet API and roles").

A poll arms it for `ARM_MS`; while armed, the edges record each frame's metadata (and its text only
when a poll asked for contents). The ring keeps the last `MAX_FRAMES`; `seq` numbers them so a
poller asks only for what is newer than it saw. Time is passed in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

ARM_MS = 30_000
MAX_FRAMES = 500
# A frame's text is kept only up to this much (with contents asked for), so the ring stays bounded.
MAX_CONTENT_CHARS = 16 * 1024


@dataclass(frozen=True, slots=True)
class TracedFrame:
    seq: int
    at: int
    direction: str  # in (towards the router) | out
    channel: str  # control | stream | relay
    type: str
    size: int
    content: str | None


class Trace:
    __slots__ = ("armed_until", "contents_until", "frames", "seq")

    def __init__(self) -> None:
        self.frames: deque[TracedFrame] = deque(maxlen=MAX_FRAMES)
        self.seq = 0
        self.armed_until = 0
        self.contents_until = 0

    def arm(self, now_ms: int, contents: bool) -> None:
        self.armed_until = now_ms + ARM_MS
        if contents:
            self.contents_until = now_ms + ARM_MS

    def armed(self, now_ms: int) -> bool:
        return now_ms < self.armed_until

    def record(self, now_ms: int, direction: str, channel: str, kind: str, text: str) -> None:
        self.seq += 1
        content = text[:MAX_CONTENT_CHARS] if now_ms < self.contents_until else None
        self.frames.append(TracedFrame(self.seq, now_ms, direction, channel, kind, len(text), content))

    def since(self, after: int, contents: bool) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for f in self.frames:
            if f.seq <= after:
                continue
            item: dict[str, Any] = {
                "seq": f.seq,
                "at": f.at,
                "direction": f.direction,
                "channel": f.channel,
                "type": f.type,
                "size": f.size,
            }
            if contents:
                item["content"] = f.content
            out.append(item)
        return out


def frame_type(text: str) -> str:
    """The `type` of a frame's text without parsing all of it (commands out are relayed as text)."""
    at = text.find('"type"')
    if at < 0:
        return "?"
    start = text.find('"', text.find(":", at) + 1)
    end = text.find('"', start + 1)
    return text[start + 1 : end] if 0 <= start < end and end - start <= 64 else "?"
