"""API keys as the hot paths see them: verified once, then trusted for a few seconds."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from tether.clock import now_ms
from tether.store.base import Principal

# Who checks a credential: the store for Tether's keys, the upstream Letta server in upstream-keys
# mode (gateway/credentials.py). None means refused; an exception means it could not be checked.
Verify = Callable[[str], Awaitable[Principal | None]]


class AuthCache:
    """Verified keys for a short while, so the hot paths do not check each one per request.

    Concurrent misses for one key share one database read: when the entry expires in the middle of a
    reconnect storm, thousands of handshakes carrying the same key would otherwise queue a query each
    for the connection pool."""

    def __init__(self, verify: Verify, ttl_ms: float, max_entries: int = 10_000) -> None:
        self.verify = verify
        self.ttl_ms = ttl_ms
        self.max_entries = max_entries
        self._cache: dict[str, tuple[float, Principal]] = {}
        self._reading: dict[str, asyncio.Task[Principal | None]] = {}

    async def resolve(self, secret: str) -> Principal | None:
        hit = self._cache.get(secret)
        if hit is not None and now_ms() - hit[0] < self.ttl_ms:
            return hit[1]
        reading = self._reading.get(secret)
        if reading is None:
            reading = asyncio.get_running_loop().create_task(self._read(secret))
            self._reading[secret] = reading
            reading.add_done_callback(lambda _: self._reading.pop(secret, None))
        # Shielded: one waiter giving up (its socket closed) must not cancel the others' read.
        return await asyncio.shield(reading)

    async def _read(self, secret: str) -> Principal | None:
        now = now_ms()
        principal = await self.verify(secret)
        if principal is None:
            return None  # not cached: a key created a moment later must work at once
        if len(self._cache) >= self.max_entries:
            self._cache.clear()
        self._cache[secret] = (now, principal)
        return principal
