"""A bounded window of message keys already claimed, so a retried send is not delivered twice.

A claim is pending until its claimant reports the delivery (`confirm`) or its failure (`release`).
A repeat that finds it pending must wait for that outcome rather than answer "already delivered":
the first attempt may still fail (the device dropped meanwhile), and the client, which gave up on
that attempt and retried, would then believe a message delivered that never was.
"""

from __future__ import annotations

from collections import OrderedDict

PENDING = False  # `state`: claimed, the delivery not yet reported
DELIVERED = True


class DedupeWindow:
    def __init__(self, window_ms: float, max_keys: int = 100_000) -> None:
        self.window_ms = window_ms
        self.max_keys = max_keys
        self._seen: OrderedDict[str, tuple[float, bool]] = OrderedDict()  # key -> (claimed at, delivered)

    def claim(self, key: str, now_ms: float) -> bool:
        """True the first time `key` is seen within the window; False for a repeat."""
        self._evict(now_ms)
        if key in self._seen:
            return False
        self._seen[key] = (now_ms, PENDING)
        if len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)
        return True

    def confirm(self, key: str) -> None:
        """The claimant delivered it: a repeat is a duplicate from now on."""
        claimed = self._seen.get(key)
        if claimed is not None:
            self._seen[key] = (claimed[0], DELIVERED)

    def state(self, key: str, now_ms: float) -> bool | None:
        """DELIVERED, PENDING, or None when `key` holds no claim (never, released or expired)."""
        self._evict(now_ms)
        claimed = self._seen.get(key)
        return None if claimed is None else claimed[1]

    def release(self, key: str) -> None:
        """Forget a claim whose delivery failed, so a retry may deliver it."""
        self._seen.pop(key, None)

    def _evict(self, now_ms: float) -> None:
        while self._seen:
            key, (at, _) = next(iter(self._seen.items()))
            if now_ms - at < self.window_ms:
                break
            del self._seen[key]
