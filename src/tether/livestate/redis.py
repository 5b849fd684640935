"""Live state shared by many pods through Redis: this module answers the `LiveState` calls and runs
the tick that flushes, refreshes and recovers.

Its parts: `pods` (which pods are alive), `owned` (what this pod holds and writes behind). Key
layout: `tether.redisconn.keys`. A lease whose pod is not alive reads as absent, so a killed pod's
devices read offline within `pod_ttl_seconds` (+ `LIVE_PODS_CACHE_SECONDS`). Heartbeats and runtime
notes reach Redis every `FLUSH_INTERVAL_SECONDS`. When Redis comes back empty (or after any outage)
this pod re-publishes its pod key and every lease it holds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from redis.asyncio.client import Pipeline

from tether.config import Settings
from tether.livestate.base import LiveStateUnavailable
from tether.livestate.fleet import FleetNotes, RedisFleetNotes
from tether.livestate.owned import OwnedLeases
from tether.livestate.pods import LIVE_PODS_CACHE_SECONDS as LIVE_PODS_CACHE_SECONDS
from tether.livestate.pods import LivePods
from tether.protocol.presence import Liveness
from tether.redisconn.backoff import Backoff
from tether.redisconn.cancel import stop_tasks
from tether.redisconn.health import REDIS_ERRORS, RedisHealth
from tether.redisconn.keys import KEY_PREFIX
from tether.redisconn.link import PodLink
from tether.redisconn.pipelines import pipelined

log = logging.getLogger("tether.livestate.redis")

# Buffered heartbeats and runtime notes are written this often: other pods read heartbeats at most
# this stale. The pod key is refreshed on the same tick, so a Redis restart is noticed (and this pod's
# state re-published) within about this long.
FLUSH_INTERVAL_SECONDS = 1.0
# A lease hash outlives the online window by this much. Pings refresh it; it only matters as garbage
# collection when its pod died (lookups already ignore leases of dead pods).
LEASE_TTL_MARGIN_SECONDS = 60.0
# `healthy` stays true while a Redis call succeeded this recently.
HEALTHY_WITHIN_SECONDS = 3.0
_LEASE_FIELDS = ["pod", "connected_at", "last_heartbeat"]
# A claim's value once its message was delivered; before, the claiming pod's id.
DELIVERED_MARK = "delivered"


def _unavailable(exc: Exception) -> LiveStateUnavailable:
    return LiveStateUnavailable(f"Redis unavailable: {exc!r}")


class RedisLiveState:
    def __init__(self, settings: Settings, *, prefix: str = KEY_PREFIX) -> None:
        self.link = PodLink.open(settings.redis_url, settings.pod_id, prefix, "RedisLiveState")
        self.pod_id = settings.pod_id
        self.keys = self.link.keys
        self.redis = self.link.redis
        self.dedupe_ms = int(settings.dedupe_seconds * 1000)
        self.lease_ttl_ms = int((settings.offline_after_seconds + LEASE_TTL_MARGIN_SECONDS) * 1000)
        self.revoked_ttl_ms = int(settings.lease_ttl_seconds * 1000)
        self.health = RedisHealth(f"pod {self.pod_id}", log, on_back=self._back, on_failure=self._lost)
        pod_ttl_ms = int(settings.pod_ttl_seconds * 1000)
        self.pods = LivePods(self.link, self.health, pod_ttl_ms=pod_ttl_ms)
        self.owned = OwnedLeases(self.link, lease_ttl_ms=self.lease_ttl_ms)
        self.notes = RedisFleetNotes(self.link, pod_ttl_ms)
        self.fleet: FleetNotes = self.notes
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._state_lost = False

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await self.link.wait("live state")
        await self._tick()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            await stop_tasks([self._task])
        try:
            await self.owned.flush()
            pipe: Pipeline = self.redis.pipeline(transaction=False)
            await self.owned.withdraw(pipe)
            self.pods.withdraw(pipe)
            self.notes.withdraw(pipe)
            await pipe.execute()
        except REDIS_ERRORS as exc:
            log.warning("could not withdraw pod %s from Redis on shutdown: %r", self.pod_id, exc)
        await self.redis.aclose()

    @property
    def healthy(self) -> bool:
        return not self._closed and self.health.fresh(HEALTHY_WITHIN_SECONDS)

    # ---- presence ------------------------------------------------------------------------

    async def device_connected(self, connection_id: str, pod_id: str, now_ms: int) -> None:
        if pod_id == self.pod_id:
            # Kept here even if Redis fails below: published when Redis answers again.
            self.owned.connected(connection_id, Liveness(pod_id, now_ms, now_ms))
        key = self.keys.lease(connection_id)
        with self.health.guard("device_connected"):
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(key, mapping={"pod": pod_id, "connected_at": now_ms, "last_heartbeat": now_ms})
            pipe.pexpire(key, self.lease_ttl_ms)
            await pipe.execute()

    def heartbeat(self, connection_id: str, now_ms: int) -> None:
        self.owned.beat(connection_id, now_ms)

    async def device_disconnected(self, connection_id: str, pod_id: str) -> None:
        mine = pod_id == self.pod_id
        if mine:
            self.owned.disconnected(connection_id)
        try:
            await self.owned.release(connection_id, pod_id)
            self.health.ok()
        except REDIS_ERRORS as exc:
            if mine:
                self.owned.release_later(connection_id)
            self.health.failed("device_disconnected", exc)

    async def lookup(self, connection_ids: Iterable[str]) -> dict[str, Liveness]:
        ids = list(dict.fromkeys(connection_ids))
        if not ids:
            return {}
        pods = await self.live_pods()
        with self.health.guard("lookup", _unavailable):
            rows = await pipelined(self.redis, ids, self._queue_lease_read)
        found: dict[str, Liveness] = {}
        for connection_id, (pod, connected_at, heartbeat) in zip(ids, rows, strict=True):
            if pod is None or pod not in pods or connected_at is None or heartbeat is None:
                continue
            found[connection_id] = self.owned.freshest(
                connection_id, Liveness(pod, int(connected_at), int(heartbeat))
            )
        return found

    async def _queue_lease_read(self, pipe: Pipeline, connection_id: str) -> None:
        pipe.hmget(self.keys.lease(connection_id), _LEASE_FIELDS)

    async def live_pods(self) -> set[str]:
        cached = self.pods.cached()
        if cached is not None:
            return cached
        with self.health.guard("live_pods", _unavailable):
            pods = await self.pods.read()
        return pods

    async def revoke(self, connection_id: str) -> None:
        # Kept for the lease TTL: a pod trusts a link in memory only while its lease is that fresh.
        with self.health.guard("revoke", _unavailable):
            await self.redis.set(self.keys.revoked(connection_id), "1", px=self.revoked_ttl_ms)

    async def revoked(self, connection_id: str) -> bool:
        with self.health.guard("revoked", _unavailable):
            found = await self.redis.exists(self.keys.revoked(connection_id))
        return bool(found)

    # ---- dedupe and teleport bookkeeping -------------------------------------------------

    async def claim(self, key: str) -> bool:
        with self.health.guard("claim", _unavailable):
            won = await self.redis.set(self.keys.claim(key), self.pod_id, nx=True, px=self.dedupe_ms)
        return bool(won)

    async def confirm(self, key: str) -> None:
        # KEEPTTL: the window still runs from the claim. On failure the claim stays pending, and a
        # repeat waits for it in vain: it is answered as not delivered, never delivered twice.
        with self.health.guard("confirm"):
            await self.redis.set(self.keys.claim(key), DELIVERED_MARK, xx=True, keepttl=True)

    async def claim_state(self, key: str) -> bool | None:
        with self.health.guard("claim_state", _unavailable):
            value = await self.redis.get(self.keys.claim(key))
        return None if value is None else value == DELIVERED_MARK

    async def release(self, key: str) -> None:
        # On failure the claim simply expires with the dedupe window.
        with self.health.guard("release"):
            await self.redis.delete(self.keys.claim(key))

    def note_runtime(self, org_id: str, agent_id: str, conversation_id: str, connection_id: str) -> None:
        self.owned.note_runtime(self.keys.runtime(org_id, agent_id, conversation_id), connection_id)

    async def runtime_location(self, org_id: str, agent_id: str, conversation_id: str) -> str | None:
        key = self.keys.runtime(org_id, agent_id, conversation_id)
        pending = self.owned.pending_runtime(key)
        if pending is not None:
            return pending
        with self.health.guard("runtime_location", _unavailable):
            value = await self.redis.get(key)
        return str(value) if value is not None else None

    def take_dirty(self) -> dict[str, int]:
        return self.owned.take_dirty()

    def take_lost(self) -> bool:
        lost, self._state_lost = self._state_lost, False
        return lost

    # ---- background: flush, refresh, recover --------------------------------------------

    async def _loop(self) -> None:
        backoff = Backoff()
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_SECONDS if self.health.up else backoff.next())
            try:
                await self._tick()
                backoff.reset()
            except REDIS_ERRORS as exc:
                self.health.failed("flush", exc)
            except Exception:
                # A bug here must not stop liveness for good: log it and keep refreshing.
                log.exception("live state loop failed")

    async def _tick(self) -> None:
        # The pod key is rewritten every tick (one cheap SET): finding it gone is how a Redis restart
        # that redis-py's reconnect hid from us is noticed within a second.
        gone = await self.pods.refresh_own()
        self._state_lost = self._state_lost or gone
        if gone and not self.owned.needs_reassert:
            log.warning(
                "pod %s: Redis lost this pod's state (restart?); re-publishing %d leases",
                self.pod_id,
                len(self.owned.leases),
            )
            self.owned.needs_reassert = True
        if self.owned.needs_reassert:
            await self.owned.reassert_all()
        await self.owned.flush()
        await self.notes.flush()
        if self.pods.due:
            await self.pods.read()
        self.health.ok()

    def _back(self) -> None:
        if self._task is not None:  # not the first answer, at start-up
            log.info("pod %s: Redis answers again", self.pod_id)
            self.pods.grace_all()

    def _lost(self) -> None:
        # Whatever Redis held may be gone when it answers again.
        self.owned.needs_reassert = True
