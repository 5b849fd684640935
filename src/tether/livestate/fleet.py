"""What the fleet API reads across pods: connection history per environment and each pod's stats.

History is written where it happens (registration and forget on any pod, connects and disconnects
on the pod holding the lease) and read from any pod. Pod stats are published by each pod every few
seconds and expire with the pod. One pod keeps both in memory (`MemoryFleetNotes`); many pods keep
them in Redis (`RedisFleetNotes`), written behind on live state's tick, so noting never blocks.

Redis keys (beside those in `tether.redisconn.keys`, under the same prefix):

    history:{sha1(slot)}   list, PX HISTORY_TTL  newest first, at most HISTORY_EVENTS (JSON each)
    podstats:{pod}         string, PX pod_ttl    the pod's last published stats (JSON)
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from typing import Any, Protocol

import orjson
from redis.asyncio.client import Pipeline

from tether.redisconn.link import PodLink
from tether.redisconn.pipelines import pipelined

HISTORY_EVENTS = 50  # kept per environment
HISTORY_TTL_MS = 7 * 24 * 3600 * 1000  # an environment silent this long forgets its history
MAX_HISTORY_SLOTS = 100_000  # environments whose history one pod keeps in memory (oldest dropped)
MAX_PENDING_HISTORY = 10_000  # events waiting for the next Redis flush (oldest dropped)


class FleetNotes(Protocol):
    def note_history(self, slot: str, event: dict[str, Any]) -> None:
        """Record an event of an environment's connection. Never blocks."""
        ...

    async def history(self, slot: str) -> list[dict[str, Any]]:
        """Newest first, at most HISTORY_EVENTS."""
        ...

    def publish_stats(self, stats: dict[str, Any]) -> None:
        """This pod's stats, for every pod to read (published on the next tick). Never blocks."""
        ...

    async def pod_stats(self, pods: set[str]) -> dict[str, dict[str, Any]]: ...


class MemoryFleetNotes:
    def __init__(self, pod_id: str) -> None:
        self.pod_id = pod_id
        # Oldest first, at most HISTORY_EVENTS each. A list, not a deque(maxlen=...): a deque
        # reserves 64 slots (760 bytes) for the one or two events an idle device has.
        self._history: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self._stats: dict[str, Any] | None = None

    def note_history(self, slot: str, event: dict[str, Any]) -> None:
        ring = self._history.get(slot)
        if ring is None:
            ring = self._history[slot] = []
            while len(self._history) > MAX_HISTORY_SLOTS:
                self._history.popitem(last=False)
        else:
            self._history.move_to_end(slot)
        ring.append(event)
        if len(ring) > HISTORY_EVENTS:
            del ring[0]

    async def history(self, slot: str) -> list[dict[str, Any]]:
        return list(reversed(self._history.get(slot, ())))

    def publish_stats(self, stats: dict[str, Any]) -> None:
        self._stats = stats

    async def pod_stats(self, pods: set[str]) -> dict[str, dict[str, Any]]:
        return {self.pod_id: self._stats} if self._stats is not None and self.pod_id in pods else {}


class RedisFleetNotes:
    def __init__(self, link: PodLink, pod_ttl_ms: int) -> None:
        self.pod_id = link.pod_id
        self.prefix = link.keys.prefix
        self._redis = link.redis
        self.pod_ttl_ms = pod_ttl_ms
        self._pending: deque[tuple[str, bytes]] = deque(maxlen=MAX_PENDING_HISTORY)
        self._stats: bytes | None = None

    def _history_key(self, slot: str) -> str:
        return f"{self.prefix}history:{hashlib.sha1(slot.encode()).hexdigest()}"

    def _stats_key(self, pod_id: str) -> str:
        return f"{self.prefix}podstats:{pod_id}"

    def note_history(self, slot: str, event: dict[str, Any]) -> None:
        self._pending.append((slot, orjson.dumps(event)))

    async def history(self, slot: str) -> list[dict[str, Any]]:
        key = self._history_key(slot)
        stored = [orjson.loads(v) for v in await self._redis.lrange(key, 0, HISTORY_EVENTS - 1)]
        # Events of this pod not flushed yet come first (newest first, as stored).
        mine = [orjson.loads(v) for s, v in reversed(self._pending) if s == slot]
        return (mine + stored)[:HISTORY_EVENTS]

    def publish_stats(self, stats: dict[str, Any]) -> None:
        self._stats = orjson.dumps(stats)

    async def pod_stats(self, pods: set[str]) -> dict[str, dict[str, Any]]:
        ids = sorted(pods)
        values = await self._redis.mget([self._stats_key(p) for p in ids]) if ids else []
        return {p: orjson.loads(v) for p, v in zip(ids, values, strict=True) if v is not None}

    async def flush(self) -> None:
        """On live state's tick: pending history events, then this pod's stats."""
        pending = list(self._pending)
        self._pending.clear()
        try:
            await pipelined(self._redis, pending, self._queue_event)
        except BaseException:
            self._pending.extendleft(reversed(pending))  # kept, in order, for the next tick
            raise
        if self._stats is not None:
            await self._redis.set(self._stats_key(self.pod_id), self._stats, px=self.pod_ttl_ms)

    async def _queue_event(self, pipe: Pipeline, item: tuple[str, bytes]) -> None:
        key = self._history_key(item[0])
        pipe.lpush(key, item[1])
        pipe.ltrim(key, 0, HISTORY_EVENTS - 1)
        pipe.pexpire(key, HISTORY_TTL_MS)

    def withdraw(self, pipe: Pipeline) -> None:
        pipe.delete(self._stats_key(self.pod_id))
