"""Which pods are alive, as one pod sees it through Redis.

Each pod rewrites its key `pod:{pod}` (PX pod_ttl, its refresh time as value) on every tick and
lists itself in `pods`. A pod whose key is gone is dead, unless this pod saw it refreshing within
its TTL: Redis may just have restarted empty, and the others have not re-published yet.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from redis.asyncio.client import Pipeline

from tether.clock import now_ms
from tether.redisconn.health import RedisHealth
from tether.redisconn.link import PodLink

# `live_pods()` answers from memory for this long; it is read on every list/retrieve.
LIVE_PODS_CACHE_SECONDS = 1.0


class LivePods:
    def __init__(
        self,
        link: PodLink,
        health: RedisHealth,
        *,
        pod_ttl_ms: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pod_id = link.pod_id
        self.keys = link.keys
        self._redis = link.redis
        self._health = health
        self.pod_ttl_ms = pod_ttl_ms
        # Other pods are listed at least this often, so a Redis restart finds them in `_seen`.
        self.refresh_seconds = pod_ttl_ms / 1000 / 3
        self._clock = clock
        self._pods: set[str] | None = None
        self._read_at = 0.0
        # Pod -> its last refresh (epoch ms) as last read; bounded by the pods of the cluster (an
        # entry goes once its pod has not refreshed within its TTL).
        self._seen: dict[str, int] = {}

    def cached(self) -> set[str] | None:
        if self._pods is not None and self._clock() - self._read_at < LIVE_PODS_CACHE_SECONDS:
            return set(self._pods)
        return None

    @property
    def due(self) -> bool:
        """Time to list the other pods again, even if nothing asked (keeps `_seen` current)."""
        return self._clock() - self._read_at >= self.refresh_seconds

    async def read(self) -> set[str]:
        members = sorted(str(m) for m in await self._redis.smembers(self.keys.pods))
        self._health.ok()  # before pruning: a recovery first extends every pod's grace
        values = await self._redis.mget([self.keys.pod(p) for p in members]) if members else []
        now = now_ms()
        dead: list[str] = []
        for pod, value in zip(members, values, strict=True):
            if value is None:
                dead.append(pod)
                continue
            with contextlib.suppress(ValueError):
                self._seen[pod] = max(self._seen.get(pod, 0), int(value))
        if dead:
            await self._redis.srem(self.keys.pods, *dead)
        # A pod seen refreshing within its TTL is alive even if Redis just restarted empty and it has
        # not re-published yet; without this, a restart would make every pod clear the others' rows.
        for pod, refreshed in list(self._seen.items()):
            if now - refreshed >= self.pod_ttl_ms:
                del self._seen[pod]
        pods = set(self._seen) | {self.pod_id}
        self._pods = pods
        self._read_at = self._clock()
        return set(pods)

    async def refresh_own(self) -> bool:
        """Rewrite this pod's key; True when it was gone although refreshed within its TTL (or never
        written): Redis lost its data."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(self.keys.pod(self.pod_id), now_ms(), px=self.pod_ttl_ms, get=True)
        pipe.sadd(self.keys.pods, self.pod_id)
        previous, _ = await pipe.execute()
        return previous is None

    def grace_all(self) -> None:
        """Redis answers again after an outage. Other pods could not refresh during it either: give
        every pod seen before it a full TTL to re-publish before it counts as dead."""
        self._seen = dict.fromkeys(self._seen, now_ms())
        self._pods = None

    def withdraw(self, pipe: Pipeline) -> None:
        pipe.delete(self.keys.pod(self.pod_id))
        pipe.srem(self.keys.pods, self.pod_id)
