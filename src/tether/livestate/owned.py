"""What this pod holds in Redis and writes behind: its leases, their heartbeats, releases still to
make, and runtime notes.

Pings never touch Redis inline: they are kept here and written in one pipeline per flush, so other
pods see heartbeats at most a flush interval stale. The leases held here are the source of truth
for re-publishing after Redis lost them (a restart: Redis keeps nothing on disk in the reference
setup).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

from redis.asyncio.client import Pipeline

from tether.protocol.presence import Liveness
from tether.redisconn.link import PodLink
from tether.redisconn.pipelines import pipelined

# How long the teleport source of a conversation is remembered.
RUNTIME_TTL_SECONDS = 24 * 3600.0
# Runtime notes waiting for the next flush; beyond this the oldest are dropped (teleport falls back).
MAX_PENDING_RUNTIMES = 100_000

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

# One buffered write: a heartbeat (connection, beat), a runtime note (key, connection) or a release
# (connection, unused).
_Write = tuple[Literal["beat", "runtime", "release"], str, str | int]


class OwnedLeases:
    def __init__(self, link: PodLink, *, lease_ttl_ms: int) -> None:
        self.pod_id = link.pod_id
        self.keys = link.keys
        self.lease_ttl_ms = lease_ttl_ms
        self._redis = link.redis
        # Every map below holds at most one entry per lease of this pod (bounded by its sockets),
        # except the runtime notes (bounded by MAX_PENDING_RUNTIMES).
        self.leases: dict[str, Liveness] = {}
        self._beats: dict[str, int] = {}  # heartbeats not yet written to Redis
        self._dirty: dict[str, int] = {}  # heartbeats not yet flushed to the database
        self._releases: set[str] = set()  # leases to delete once Redis answers again
        self._runtimes: OrderedDict[str, str] = OrderedDict()  # runtime key -> connection, unflushed
        # Whatever Redis held may be gone: write every lease again before the next flush.
        self.needs_reassert = True
        self._heartbeat = link.redis.register_script(_HEARTBEAT)
        self._release = link.redis.register_script(_RELEASE)
        self._reassert = link.redis.register_script(_REASSERT)

    def connected(self, connection_id: str, live: Liveness) -> None:
        self.leases[connection_id] = live
        self._releases.discard(connection_id)
        self._beats.pop(connection_id, None)

    def disconnected(self, connection_id: str) -> None:
        self.leases.pop(connection_id, None)
        self._beats.pop(connection_id, None)

    def release_later(self, connection_id: str) -> None:
        self._releases.add(connection_id)

    def beat(self, connection_id: str, now_ms: int) -> None:
        live = self.leases.get(connection_id)
        if live is None:
            return
        self.leases[connection_id] = Liveness(live.pod_id, live.connected_at, now_ms)
        self._beats[connection_id] = now_ms
        self._dirty[connection_id] = now_ms

    def take_dirty(self) -> dict[str, int]:
        dirty, self._dirty = self._dirty, {}
        return dirty

    def freshest(self, connection_id: str, live: Liveness) -> Liveness:
        """A lease as read from Redis, with this pod's own pings, fresher in memory (flushed once a
        flush interval), applied."""
        mine = self.leases.get(connection_id)
        if live.pod_id != self.pod_id or mine is None:
            return live
        return Liveness(live.pod_id, live.connected_at, max(live.last_heartbeat, mine.last_heartbeat))

    def note_runtime(self, key: str, connection_id: str) -> None:
        self._runtimes[key] = connection_id
        self._runtimes.move_to_end(key)
        while len(self._runtimes) > MAX_PENDING_RUNTIMES:
            self._runtimes.popitem(last=False)

    def pending_runtime(self, key: str) -> str | None:
        return self._runtimes.get(key)

    async def release(self, connection_id: str, pod_id: str, pipe: Pipeline | None = None) -> None:
        """Delete the lease if `pod_id` still owns it (now, or queued on `pipe`)."""
        await self._release(keys=[self.keys.lease(connection_id)], args=[pod_id], client=pipe)

    async def withdraw(self, pipe: Pipeline) -> None:
        """Stopping: queue the release of every lease this pod holds."""
        for connection_id in list(self.leases):
            await self.release(connection_id, self.pod_id, pipe)

    async def reassert_all(self) -> None:
        await pipelined(self._redis, list(self.leases.items()), self._queue_reassert)
        self.needs_reassert = False

    async def _queue_reassert(self, pipe: Pipeline, lease: tuple[str, Liveness]) -> None:
        connection_id, live = lease
        await self._reassert(
            keys=[self.keys.lease(connection_id)],
            args=[self.pod_id, live.connected_at, live.last_heartbeat, self.lease_ttl_ms],
            client=pipe,
        )

    async def flush(self) -> None:
        beats, self._beats = self._beats, {}
        runtimes, self._runtimes = self._runtimes, OrderedDict()
        releases, self._releases = self._releases, set()
        writes: list[_Write] = [("beat", c, beat) for c, beat in beats.items()]
        writes += [("runtime", key, c) for key, c in runtimes.items()]
        writes += [("release", c, "") for c in releases]
        try:
            await pipelined(self._redis, writes, self._queue_write)
        except BaseException:
            # Keep what was not written (newer values recorded meanwhile win).
            for connection_id, beat in beats.items():
                if connection_id in self.leases:
                    self._beats[connection_id] = max(beat, self._beats.get(connection_id, 0))
            for key, connection_id in runtimes.items():
                self._runtimes.setdefault(key, connection_id)
            self._releases |= {c for c in releases if c not in self.leases}
            raise

    async def _queue_write(self, pipe: Pipeline, write: _Write) -> None:
        kind, name, value = write
        if kind == "beat":
            await self._heartbeat(
                keys=[self.keys.lease(name)], args=[self.pod_id, value, self.lease_ttl_ms], client=pipe
            )
        elif kind == "runtime":
            pipe.set(name, value, px=int(RUNTIME_TTL_SECONDS * 1000))
        else:
            await self.release(name, self.pod_id, pipe)
