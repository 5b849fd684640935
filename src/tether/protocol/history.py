"""What a relay socket has sent, kept briefly so a client that reconnects can resume.

Bounded by frame count and bytes; the oldest frames go first. `since(n)` answers exactly what a
client that last saw `seq` n missed, or None when part of it has already been dropped.
"""

from __future__ import annotations

from collections import deque


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
