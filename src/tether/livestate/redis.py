"""Live state shared by many pods through Redis.

What lives where (all keys under `tether:`):

    pod:{pod}              string, PX pod_ttl   this pod's last refresh (epoch ms): the pod is alive
    pods                   set                  index of pod ids, pruned lazily when their key is gone
    lease:{connectionId}   hash, PX lease ttl   pod, connected_at, last_heartbeat of a connected lease
    claim:{key}            string, PX dedupe    first claimant of a client_message_id
    runtime:{org}:{agent}:{conv}  string        the connection that last ran a conversation

A lease whose pod is not alive reads as absent, so a killed pod's devices read offline within
`pod_ttl_seconds` (+ `LIVE_PODS_CACHE_SECONDS`). Pings never touch Redis inline: they are kept in
memory and written in one pipeline every `FLUSH_INTERVAL_SECONDS`, so other pods see heartbeats at
most that stale. Redis keeps nothing on disk in the reference setup: when it comes back empty (or
after any outage) this pod re-publishes its pod key and every lease it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError

from tether.clock import now_ms
from tether.config import Settings
from tether.livestate.base import LiveStateUnavailable
from tether.protocol.presence import Liveness

log = logging.getLogger("tether.livestate.redis")

KEY_PREFIX = "tether:"
# Buffered heartbeats and runtime notes are written this often: other pods read heartbeats at most
# this stale. The pod key is refreshed on the same tick, so a Redis restart is noticed (and this pod's
# state re-published) within about this long.
FLUSH_INTERVAL_SECONDS = 1.0
# `live_pods()` answers from memory for this long; it is read on every list/retrieve.
LIVE_PODS_CACHE_SECONDS = 1.0
# A lease hash outlives the online window by this much. Pings refresh it; it only matters as garbage
# collection when its pod died (lookups already ignore leases of dead pods).
LEASE_TTL_MARGIN_SECONDS = 60.0
# How long the teleport source of a conversation is remembered.
RUNTIME_TTL_SECONDS = 24 * 3600.0
# Runtime notes waiting for the next flush; beyond this the oldest are dropped (teleport falls back).
MAX_PENDING_RUNTIMES = 100_000
# Commands per pipeline round trip when re-publishing or flushing many leases.
PIPELINE_CHUNK = 1000
# `healthy` stays true while a Redis call succeeded this recently.
HEALTHY_WITHIN_SECONDS = 3.0
# Redis client: connect timeout, per-command timeout (must exceed the bus's XREAD BLOCK), and one
# quick retry so a pooled connection broken by a Redis restart is replaced without failing the call.
CONNECT_TIMEOUT_SECONDS = 2.0
COMMAND_TIMEOUT_SECONDS = 5.0
COMMAND_RETRIES = 1
# Connections per client (the live state and the bus each have one client); a burst of calls waits
# for a free connection (up to COMMAND_TIMEOUT_SECONDS) instead of failing.
MAX_CONNECTIONS = 64
# Back-off between attempts while Redis is unreachable (doubling, capped).
BACKOFF_MIN_SECONDS = 0.1
BACKOFF_MAX_SECONDS = 1.0
# While waiting for Redis at start-up, say so this often.
WAITING_LOG_SECONDS = 5.0

# Write heartbeat and TTL only while this pod still owns the lease (the device may have moved).
_HEARTBEAT = """
if redis.call('HGET', KEYS[1], 'pod') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'last_heartbeat', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
"""
# Delete a lease only if this pod still owns it.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'pod') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# Re-publish a lease after an outage unless another pod took it meanwhile.
_REASSERT = """
local owner = redis.call('HGET', KEYS[1], 'pod')
if owner and owner ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'pod', ARGV[1], 'connected_at', ARGV[2], 'last_heartbeat', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""


class RedisKeys:
    """Key names shared by the Redis live state and the Redis bus."""

    def __init__(self, prefix: str = KEY_PREFIX) -> None:
        self.prefix = prefix

    @property
    def pods(self) -> str:
        return f"{self.prefix}pods"

    def pod(self, pod_id: str) -> str:
        return f"{self.prefix}pod:{pod_id}"

    def lease(self, connection_id: str) -> str:
        return f"{self.prefix}lease:{connection_id}"

    def claim(self, key: str) -> str:
        return f"{self.prefix}claim:{key}"

    def revoked(self, connection_id: str) -> str:
        return f"{self.prefix}revoked:{connection_id}"

    def runtime(self, org_id: str, agent_id: str, conversation_id: str) -> str:
        return f"{self.prefix}runtime:{org_id}:{agent_id}:{conversation_id}"

    def inbox(self, pod_id: str) -> str:
        return f"{self.prefix}pod:{pod_id}:inbox"

    def pod_events(self, pod_id: str) -> str:
        return f"{self.prefix}pod:{pod_id}:events"

    def watchers(self, connection_id: str) -> str:
        return f"{self.prefix}conn:{connection_id}:watchers"


def connect_redis(url: str) -> Redis:
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=COMMAND_TIMEOUT_SECONDS,
        decode_responses=True,
        socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
        socket_timeout=COMMAND_TIMEOUT_SECONDS,
        retry=Retry(ExponentialWithJitterBackoff(cap=0.2, base=0.05), COMMAND_RETRIES),
    )
    return Redis.from_pool(pool)


async def wait_for_redis(client: Redis, what: str) -> None:
    """Start-up waits (and says so) until Redis answers: a pod without it cannot route anything."""
    delay = BACKOFF_MIN_SECONDS
    last_log = 0.0
    while True:
        try:
            await client.ping()
            return
        except (RedisError, OSError) as exc:
            if time.monotonic() - last_log >= WAITING_LOG_SECONDS:
                log.warning("%s: waiting for Redis (%r)", what, exc)
                last_log = time.monotonic()
        await asyncio.sleep(delay)
        delay = min(delay * 2, BACKOFF_MAX_SECONDS)


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel and await tasks, cancelling again while one still runs.

    On Python 3.11, `asyncio.wait_for` (used by redis-py to connect) drops a cancellation that
    arrives just as the connection completes, so a single `cancel()` may be lost.
    """
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            log.warning("background task %s ended with %r", task.get_name(), task.exception())


class RedisLiveState:
    def __init__(self, settings: Settings, *, prefix: str = KEY_PREFIX) -> None:
        assert settings.redis_url, "RedisLiveState needs TETHER_REDIS_URL"
        self.pod_id = settings.pod_id
        self.keys = RedisKeys(prefix)
        self.redis = connect_redis(settings.redis_url)
        self.pod_ttl_ms = int(settings.pod_ttl_seconds * 1000)
        self.dedupe_ms = int(settings.dedupe_seconds * 1000)
        self.lease_ttl_ms = int((settings.offline_after_seconds + LEASE_TTL_MARGIN_SECONDS) * 1000)
        self.revoked_ttl_ms = int(settings.lease_ttl_seconds * 1000)
        # Other pods are listed at least this often, so a Redis restart finds them in `_seen_pods`.
        self.refresh_seconds = settings.pod_ttl_seconds / 3
        # Leases held by this pod: the source of truth for re-publishing after a Redis restart.
        self._owned: dict[str, Liveness] = {}
        self._beats: dict[str, int] = {}  # heartbeats not yet written to Redis
        self._dirty: dict[str, int] = {}  # heartbeats not yet flushed to the database
        self._releases: set[str] = set()  # leases to delete once Redis answers again
        self._runtimes: OrderedDict[str, str] = OrderedDict()  # runtime key -> connection, unflushed
        self._pods: set[str] | None = None
        self._pods_at = 0.0
        self._seen_pods: dict[str, int] = {}  # pod -> its last refresh (epoch ms) as last read
        self._last_ok = 0.0
        self._up = False
        self._needs_reassert = True
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._heartbeat = self.redis.register_script(_HEARTBEAT)
        self._release = self.redis.register_script(_RELEASE)
        self._reassert = self.redis.register_script(_REASSERT)

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await wait_for_redis(self.redis, f"live state of pod {self.pod_id}")
        await self._tick()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            await stop_tasks([self._task])
        try:
            await self._flush()
            pipe = self.redis.pipeline(transaction=False)
            for connection_id in list(self._owned):
                await self._release(keys=[self.keys.lease(connection_id)], args=[self.pod_id], client=pipe)
            pipe.delete(self.keys.pod(self.pod_id))
            pipe.srem(self.keys.pods, self.pod_id)
            await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("could not withdraw pod %s from Redis on shutdown: %r", self.pod_id, exc)
        await self.redis.aclose()

    # ---- presence ------------------------------------------------------------------------

    async def device_connected(self, connection_id: str, pod_id: str, now_ms: int) -> None:
        live = Liveness(pod_id=pod_id, connected_at=now_ms, last_heartbeat=now_ms)
        if pod_id == self.pod_id:
            self._owned[connection_id] = live
            self._releases.discard(connection_id)
            self._beats.pop(connection_id, None)
        key = self.keys.lease(connection_id)
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(key, mapping={"pod": pod_id, "connected_at": now_ms, "last_heartbeat": now_ms})
            pipe.pexpire(key, self.lease_ttl_ms)
            await pipe.execute()
            self._ok()
        except (RedisError, OSError) as exc:
            # Kept in `_owned`: published when Redis answers again.
            self._failed("device_connected", exc)

    def heartbeat(self, connection_id: str, now_ms: int) -> None:
        live = self._owned.get(connection_id)
        if live is None:
            return
        self._owned[connection_id] = Liveness(live.pod_id, live.connected_at, now_ms)
        self._beats[connection_id] = now_ms
        self._dirty[connection_id] = now_ms

    async def device_disconnected(self, connection_id: str, pod_id: str) -> None:
        if pod_id == self.pod_id:
            self._owned.pop(connection_id, None)
            self._beats.pop(connection_id, None)
        try:
            await self._release(keys=[self.keys.lease(connection_id)], args=[pod_id])
            self._ok()
        except (RedisError, OSError) as exc:
            if pod_id == self.pod_id:
                self._releases.add(connection_id)
            self._failed("device_disconnected", exc)

    async def lookup(self, connection_ids: Iterable[str]) -> dict[str, Liveness]:
        ids = list(dict.fromkeys(connection_ids))
        if not ids:
            return {}
        pods = await self.live_pods()
        rows: list[Any] = []
        try:
            for start in range(0, len(ids), PIPELINE_CHUNK):
                pipe = self.redis.pipeline(transaction=False)
                for connection_id in ids[start : start + PIPELINE_CHUNK]:
                    pipe.hmget(self.keys.lease(connection_id), ["pod", "connected_at", "last_heartbeat"])
                rows.extend(await pipe.execute())
            self._ok()
        except (RedisError, OSError) as exc:
            self._failed("lookup", exc)
            raise LiveStateUnavailable(f"Redis unavailable: {exc!r}") from exc
        found: dict[str, Liveness] = {}
        for connection_id, (pod, connected_at, heartbeat) in zip(ids, rows, strict=True):
            if pod is None or pod not in pods or connected_at is None or heartbeat is None:
                continue
            live = Liveness(pod, int(connected_at), int(heartbeat))
            mine = self._owned.get(connection_id)
            if pod == self.pod_id and mine is not None:
                # Our own pings are fresher in memory than in Redis (flushed once a second).
                live = Liveness(pod, live.connected_at, max(live.last_heartbeat, mine.last_heartbeat))
            found[connection_id] = live
        return found

    async def live_pods(self) -> set[str]:
        if self._pods is not None and time.monotonic() - self._pods_at < LIVE_PODS_CACHE_SECONDS:
            return set(self._pods)
        try:
            pods = await self._read_pods()
            self._ok()
        except (RedisError, OSError) as exc:
            self._failed("live_pods", exc)
            raise LiveStateUnavailable(f"Redis unavailable: {exc!r}") from exc
        return set(pods)

    async def _read_pods(self) -> set[str]:
        members = sorted(str(m) for m in await self.redis.smembers(self.keys.pods))
        self._ok()  # before pruning: a recovery first extends every pod's grace
        values = await self.redis.mget([self.keys.pod(p) for p in members]) if members else []
        now = now_ms()
        dead: list[str] = []
        for pod, value in zip(members, values, strict=True):
            if value is None:
                dead.append(pod)
                continue
            with contextlib.suppress(ValueError):
                self._seen_pods[pod] = max(self._seen_pods.get(pod, 0), int(value))
        if dead:
            await self.redis.srem(self.keys.pods, *dead)
        # A pod seen refreshing within its TTL is alive even if Redis just restarted empty and it has
        # not re-published yet; without this, a restart would make every pod clear the others' rows.
        for pod, refreshed in list(self._seen_pods.items()):
            if now - refreshed >= self.pod_ttl_ms:
                del self._seen_pods[pod]
        pods = set(self._seen_pods) | {self.pod_id}
        self._pods = pods
        self._pods_at = time.monotonic()
        return pods

    async def revoke(self, connection_id: str) -> None:
        # Kept for the lease TTL: a pod trusts a link in memory only while its lease is that fresh.
        try:
            await self.redis.set(self.keys.revoked(connection_id), "1", px=self.revoked_ttl_ms)
            self._ok()
        except (RedisError, OSError) as exc:
            self._failed("revoke", exc)
            raise LiveStateUnavailable(f"Redis unavailable: {exc!r}") from exc

    async def revoked(self, connection_id: str) -> bool:
        try:
            found = await self.redis.exists(self.keys.revoked(connection_id))
            self._ok()
        except (RedisError, OSError) as exc:
            self._failed("revoked", exc)
            raise LiveStateUnavailable(f"Redis unavailable: {exc!r}") from exc
        return bool(found)

    # ---- dedupe and teleport bookkeeping -------------------------------------------------

    async def claim(self, key: str) -> bool:
        try:
            won = await self.redis.set(self.keys.claim(key), self.pod_id, nx=True, px=self.dedupe_ms)
            self._ok()
        except (RedisError, OSError) as exc:
            self._failed("claim", exc)
            raise LiveStateUnavailable(f"Redis unavailable: {exc!r}") from exc
        return bool(won)

    async def release(self, key: str) -> None:
        try:
            await self.redis.delete(self.keys.claim(key))
            self._ok()
        except (RedisError, OSError) as exc:
            # The claim then simply expires with the dedupe window.
            self._failed("release", exc)

    def note_runtime(self, org_id: str, agent_id: str, conversation_id: str, connection_id: str) -> None:
        key = self.keys.runtime(org_id, agent_id, conversation_id)
        self._runtimes[key] = connection_id
        self._runtimes.move_to_end(key)
        while len(self._runtimes) > MAX_PENDING_RUNTIMES:
            self._runtimes.popitem(last=False)

    async def runtime_location(self, org_id: str, agent_id: str, conversation_id: str) -> str | None:
        key = self.keys.runtime(org_id, agent_id, conversation_id)
        pending = self._runtimes.get(key)
        if pending is not None:
            return pending
        try:
            value = await self.redis.get(key)
            self._ok()
        except (RedisError, OSError) as exc:
            self._failed("runtime_location", exc)
            raise LiveStateUnavailable(f"Redis unavailable: {exc!r}") from exc
        return str(value) if value is not None else None

    def take_dirty(self) -> dict[str, int]:
        dirty, self._dirty = self._dirty, {}
        return dirty

    @property
    def healthy(self) -> bool:
        return not self._closed and self._up and time.monotonic() - self._last_ok < HEALTHY_WITHIN_SECONDS

    # ---- background: flush, refresh, recover --------------------------------------------

    async def _loop(self) -> None:
        delay = BACKOFF_MIN_SECONDS
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_SECONDS if self._up else delay)
            try:
                await self._tick()
                delay = BACKOFF_MIN_SECONDS
            except (RedisError, OSError) as exc:
                self._failed("flush", exc)
                delay = min(delay * 2, BACKOFF_MAX_SECONDS)
            except Exception:
                # A bug here must not stop liveness for good: log it and keep refreshing.
                log.exception("live state loop failed")

    async def _tick(self) -> None:
        # The pod key is rewritten every tick (one cheap SET): finding it gone is how a Redis restart
        # that redis-py's reconnect hid from us is noticed within a second.
        await self._refresh_pod()
        if self._needs_reassert:
            await self._reassert_all()
        await self._flush()
        if time.monotonic() - self._pods_at >= self.refresh_seconds:
            # Keeps `_seen_pods` current even when nothing asks for live pods (see `_read_pods`).
            await self._read_pods()
        self._ok()

    async def _refresh_pod(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.pod(self.pod_id), now_ms(), px=self.pod_ttl_ms, get=True)
        pipe.sadd(self.keys.pods, self.pod_id)
        previous, _ = await pipe.execute()
        if previous is None and not self._needs_reassert:
            # Our key was gone although we refreshed it within its TTL: Redis lost its data.
            log.warning(
                "pod %s: Redis lost this pod's state (restart?); re-publishing %d leases",
                self.pod_id,
                len(self._owned),
            )
            self._needs_reassert = True

    async def _reassert_all(self) -> None:
        owned = list(self._owned.items())
        for start in range(0, len(owned), PIPELINE_CHUNK):
            pipe = self.redis.pipeline(transaction=False)
            for connection_id, live in owned[start : start + PIPELINE_CHUNK]:
                await self._reassert(
                    keys=[self.keys.lease(connection_id)],
                    args=[self.pod_id, live.connected_at, live.last_heartbeat, self.lease_ttl_ms],
                    client=pipe,
                )
            await pipe.execute()
        self._needs_reassert = False

    async def _flush(self) -> None:
        beats, self._beats = self._beats, {}
        runtimes, self._runtimes = self._runtimes, OrderedDict()
        releases, self._releases = self._releases, set()
        try:
            ops: list[tuple[str, Any]] = [("beat", item) for item in beats.items()]
            ops += [("runtime", item) for item in runtimes.items()]
            ops += [("release", c) for c in releases]
            for start in range(0, len(ops), PIPELINE_CHUNK):
                pipe = self.redis.pipeline(transaction=False)
                for kind, item in ops[start : start + PIPELINE_CHUNK]:
                    if kind == "beat":
                        connection_id, beat = item
                        await self._heartbeat(
                            keys=[self.keys.lease(connection_id)],
                            args=[self.pod_id, beat, self.lease_ttl_ms],
                            client=pipe,
                        )
                    elif kind == "runtime":
                        key, connection_id = item
                        pipe.set(key, connection_id, px=int(RUNTIME_TTL_SECONDS * 1000))
                    else:
                        await self._release(keys=[self.keys.lease(item)], args=[self.pod_id], client=pipe)
                await pipe.execute()
        except BaseException:
            # Keep what was not written (newer values recorded meanwhile win).
            for connection_id, beat in beats.items():
                if connection_id in self._owned:
                    self._beats[connection_id] = max(beat, self._beats.get(connection_id, 0))
            for key, connection_id in runtimes.items():
                self._runtimes.setdefault(key, connection_id)
            self._releases |= {c for c in releases if c not in self._owned}
            raise

    def _ok(self) -> None:
        self._last_ok = time.monotonic()
        if not self._up:
            if self._task is not None:
                log.info("pod %s: Redis answers again", self.pod_id)
                # Other pods could not refresh during the outage either: give every pod seen before
                # it a full TTL to re-publish before it counts as dead.
                now = now_ms()
                self._seen_pods = dict.fromkeys(self._seen_pods, now)
                self._pods = None
            self._up = True

    def _failed(self, what: str, exc: BaseException) -> None:
        if self._up:
            log.warning("pod %s: Redis unavailable during %s: %r", self.pod_id, what, exc)
        self._up = False
        # Whatever Redis held may be gone when it answers again.
        self._needs_reassert = True
