"""A token bucket: how many commands one relay socket may send."""

from __future__ import annotations


class TokenBucket:
    def __init__(self, rate_per_s: float, burst: float) -> None:
        self.rate_per_ms = rate_per_s / 1000
        self.burst = burst
        self.tokens = burst
        self.updated_ms: float | None = None

    def allow(self, now_ms: float) -> bool:
        if self.updated_ms is not None:
            # The wall clock may step back; that is no time passing, not tokens owed.
            elapsed = max(0.0, now_ms - self.updated_ms)
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate_per_ms)
        self.updated_ms = now_ms
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False
