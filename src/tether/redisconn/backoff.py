"""The one back-off between attempts while Redis does not answer. Pure: it says how long, the caller
sleeps."""

from __future__ import annotations

import asyncio

# Doubling from the first delay, capped: a restarted Redis is found again within about a second,
# while an absent one costs a few attempts a second per loop.
BACKOFF_MIN_SECONDS = 0.1
BACKOFF_MAX_SECONDS = 1.0


class Backoff:
    def __init__(self, first: float = BACKOFF_MIN_SECONDS, cap: float = BACKOFF_MAX_SECONDS) -> None:
        self.first = first
        self.cap = cap
        self._delay = first

    def next(self) -> float:
        """The delay before the next attempt (each call doubles the one after, up to the cap)."""
        delay = self._delay
        self._delay = min(delay * 2, self.cap)
        return delay

    def reset(self) -> None:
        """An attempt succeeded: the next failure waits the first delay again."""
        self._delay = self.first

    async def sleep(self) -> None:
        await asyncio.sleep(self.next())
