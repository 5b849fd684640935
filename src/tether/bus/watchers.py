"""Who watches a connection, as its publishing pod last read it from `conn:{id}:watchers`."""

from __future__ import annotations

import time
from collections.abc import Callable

from tether.clock import now_ms
from tether.redisconn.link import PodLink

# The publishing pod remembers who watches a connection for this long (a watch notice, or a request
# from the watching pod, refreshes it at once), and for at most this many connections (beyond it,
# expired entries are dropped before new ones are added).
WATCHERS_CACHE_SECONDS = 1.0
WATCHERS_CACHE_MAX = 100_000


class WatchersCache:
    def __init__(self, link: PodLink, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._link = link
        self._clock = clock
        self._known: dict[str, tuple[float, frozenset[str]]] = {}  # connection -> (read at, pods)

    async def of(self, connection_ids: set[str]) -> dict[str, frozenset[str]]:
        """The pods watching each connection: from memory while fresh, else in one round trip."""
        now = self._clock()
        found: dict[str, frozenset[str]] = {}
        missing: list[str] = []
        for connection_id in connection_ids:
            hit = self._known.get(connection_id)
            if hit is not None and now - hit[0] < WATCHERS_CACHE_SECONDS:
                found[connection_id] = hit[1]
            else:
                missing.append(connection_id)
        if not missing:
            return found
        pipe = self._link.redis.pipeline(transaction=False)
        wall = now_ms()
        for connection_id in missing:
            pipe.zrangebyscore(self._link.keys.watchers(connection_id), wall, "+inf")
        answers = await pipe.execute()
        if len(self._known) + len(missing) > WATCHERS_CACHE_MAX:
            self._known = {c: hit for c, hit in self._known.items() if now - hit[0] < WATCHERS_CACHE_SECONDS}
        for connection_id, pods in zip(missing, answers, strict=True):
            found[connection_id] = frozenset(pods)
            self._known[connection_id] = (now, found[connection_id])
        return found

    def heard_from(self, connection_id: str, pod_id: str) -> None:
        """`pod_id` watches `connection_id` (or is about to): read it again before the next publish.
        A pod already known to watch teaches nothing, and keeping the entry spares that publish a
        Redis round trip."""
        known = self._known.get(connection_id)
        if known is None or pod_id not in known[1]:
            self._known.pop(connection_id, None)
