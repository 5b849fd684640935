"""A bounded window of message keys already delivered, so a retried send is not delivered twice."""

from __future__ import annotations

from collections import OrderedDict


class DedupeWindow:
    def __init__(self, window_ms: float, max_keys: int = 100_000) -> None:
        self.window_ms = window_ms
        self.max_keys = max_keys
        self._seen: OrderedDict[str, float] = OrderedDict()

    def claim(self, key: str, now_ms: float) -> bool:
        """True the first time `key` is seen within the window; False for a repeat."""
        self._evict(now_ms)
        if key in self._seen:
            return False
        self._seen[key] = now_ms
        if len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)
        return True

    def release(self, key: str) -> None:
        """Forget a claim whose delivery failed, so a retry may deliver it."""
        self._seen.pop(key, None)

    def _evict(self, now_ms: float) -> None:
        while self._seen:
            key, at = next(iter(self._seen.items()))
            if now_ms - at < self.window_ms:
                break
            del self._seen[key]
