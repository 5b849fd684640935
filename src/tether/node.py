"""The node wires storage, live state, the bus, the hub and the operations, and runs the pod's loops.

The edges (REST routes, device socket, relay socket) call the operations in `ops/`; those call the
store for durable rows, live state for presence, and the hub for sockets here and elsewhere (the
hub reaches other pods through the bus).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable

from tether.bus.base import Bus
from tether.bus.history import HistoryStore, MemoryHistoryStore
from tether.clock import now_ms
from tether.config import Settings, redact_url
from tether.gateway.gateway import Gateway
from tether.hub import Hub
from tether.livestate.base import LiveState
from tether.metrics import Counters
from tether.ops.auth import AuthCache
from tether.ops.environments import Environments
from tether.ops.fleet import Fleet
from tether.ops.leases import Leases
from tether.ops.podstats import PodStats
from tether.ops.relays import Relays
from tether.ops.sending import Sending
from tether.ops.teleports import Teleports
from tether.redisconn.backoff import Backoff
from tether.store.base import Heartbeat, SchemaTooNew, Store
from tether.tasks import TaskSet

log = logging.getLogger("tether.node")

# Start-up retries the database with this back-off (seconds, doubling): a database that comes back is
# found within about this much; one that stays away costs one connection attempt per this much.
DATABASE_RETRY_MIN_SECONDS = 0.1
DATABASE_RETRY_MAX_SECONDS = 2.0
# While start-up waits for a service, say so after this long and then this often.
WAITING_LOG_FIRST_SECONDS = 1.0
WAITING_LOG_SECONDS = 5.0
# After its live state was lost, a pod rewrites its devices' rows this long after it is seen again
# (the other pods' view of the live pods is at most LIVE_PODS_CACHE_SECONDS old); the flag is polled
# this often.
RECLAIM_FIRST_SECONDS = 2.0
RECLAIM_POLL_SECONDS = 1.0
# Closing a pod that never reached its services waits at most this long for each of them.
CLOSE_UNCONNECTED_SECONDS = 2.0


class Node:
    def __init__(
        self, settings: Settings, store: Store, live: LiveState, bus: Bus, history: HistoryStore | None = None
    ) -> None:
        self.settings = settings
        self.history = history if history is not None else MemoryHistoryStore(settings)
        self.pod_id = settings.pod_id
        self.store = store
        self.live = live
        self.bus = bus
        self.counters = Counters()
        self.tasks = TaskSet("node")
        self.hub = Hub(
            bus,
            live,
            self.tasks,
            reorder_wait_ms=settings.reorder_wait_ms,
            offline_after_ms=int(settings.offline_after_seconds * 1000),
            grace_seconds=settings.reconnect_grace_seconds,
            send_timeout_seconds=settings.send_timeout_seconds,
        )
        self.gateway = Gateway(settings, store) if settings.letta_url else None
        keys = self.gateway.keys if self.gateway is not None else None
        self.auth = AuthCache(
            keys.verify if keys is not None else store.authenticate, settings.auth_cache_seconds * 1000
        )
        self.environments = Environments(settings, store, live, self.hub, bus, self.counters)
        self.sending = Sending(live, self.hub, self.counters)
        self.leases = Leases(settings, store, live, self.hub, bus, self.counters, self.tasks)
        self.relays = Relays(settings, self.hub, self.counters, self.tasks, self.history)
        self.teleports = Teleports(store, live, self.hub, self.environments, self.tasks)
        self.pod_stats = PodStats(settings, store, live, self.hub, self.counters)
        self.fleet = Fleet(settings, store, live, self.hub, bus, self.pod_stats)
        self.draining = False
        # What start-up still waits for ("database", "redis"); work is refused until it is empty.
        self.waiting: set[str] = set()
        self.connected = False
        self.schema_problem: str | None = None  # the database holds a schema this Tether cannot use
        self.on_connected: Callable[[], Awaitable[None]] | None = None  # the app's first-start steps

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to the database and Redis in the background and return at once: the pod listens
        (and answers /healthz) meanwhile, refusing work retryably until `waiting` is empty."""
        self.waiting = {"database"} | ({"redis"} if self.settings.redis_url else set())
        self.tasks.spawn(self._connect())
        self.tasks.spawn(self._report_waiting())

    async def _connect(self) -> None:
        await asyncio.gather(self._start_store(), self._start_redis())
        if self.schema_problem is not None:
            return
        backoff = Backoff(DATABASE_RETRY_MIN_SECONDS, DATABASE_RETRY_MAX_SECONDS)
        while True:
            try:
                await self.store.clear_dead_pods(await self.live.live_pods(), now_ms())
                break
            except Exception as exc:  # either service went away again: the loops below retry too
                log.warning("clearing dead pods' rows at start-up failed: %r", exc)
                await asyncio.sleep(backoff.next())
        self.tasks.spawn(self._flush_loop())
        self.tasks.spawn(self._sweep_loop())
        self.tasks.spawn(self._reclaim_loop())
        self.tasks.spawn(self.pod_stats.run())
        if self.on_connected is not None:
            await self.on_connected()
        self.connected = True
        log.info("pod %s connected to its services: ready for work", self.pod_id)

    async def _start_store(self) -> None:
        """Migrate (and so reach) the database, retrying while it cannot be reached."""
        backoff = Backoff(DATABASE_RETRY_MIN_SECONDS, DATABASE_RETRY_MAX_SECONDS)
        while True:
            try:
                await self.store.start()
                break
            except SchemaTooNew as exc:
                # Retrying cannot help; the pod stays not ready and says why (`tether serve` checks
                # this before listening when the database answers then).
                self.schema_problem = str(exc)
                log.error("the database cannot be used: %s", exc)
                return
            except Exception as exc:
                log.debug("database not reachable yet: %r", exc)
                await asyncio.sleep(backoff.next())
        self.waiting.discard("database")

    async def _start_redis(self) -> None:
        # Both wait for Redis themselves (`redisconn.waiting`), logging as they go.
        await self.live.start()
        await self.bus.start()
        await self.history.start()
        self.waiting.discard("redis")

    async def _report_waiting(self) -> None:
        started = asyncio.get_running_loop().time()
        await asyncio.sleep(WAITING_LOG_FIRST_SECONDS)
        while "database" in self.waiting and self.schema_problem is None:
            log.warning(
                "waiting for the database %s (%.0f s so far)",
                redact_url(self.settings.resolved_database_url),
                asyncio.get_running_loop().time() - started,
            )
            await asyncio.sleep(WAITING_LOG_SECONDS)

    @property
    def waiting_for(self) -> list[str]:
        """What this pod waits for before it takes work, for /readyz and the refusals."""
        if self.schema_problem is not None:
            return ["database schema"]
        if not self.connected and not self.waiting:
            return ["start-up"]  # both services answered; the last start-up steps are running
        return sorted(self.waiting)

    async def stop(self) -> None:
        await self.tasks.cancel()
        if not self.connected:
            await self._close_unconnected()
            return
        await self._flush_heartbeats()
        await self.leases.stop()
        await self.history.close()
        await self.bus.close()
        await self.live.close()
        await self.store.close()
        if self.gateway is not None:
            await self.gateway.close()

    async def _close_unconnected(self) -> None:
        """Stopped before its services all answered: close each without waiting on one that is away."""
        closes: list[Awaitable[None]] = [
            self.history.close(),
            self.bus.close(),
            self.live.close(),
            self.store.close(),
        ]
        if self.gateway is not None:
            closes.append(self.gateway.close())
        for closing in closes:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(closing, CLOSE_UNCONNECTED_SECONDS)

    async def drain(self, window_s: float) -> None:
        """Close device sockets spread over the window so devices reconnect to other pods gradually."""
        self.draining = True
        links = self.leases.draining()
        if not links:
            return
        random.shuffle(links)
        slot = window_s / len(links)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i, link in enumerate(links):
            # One jittered instant per equal slot: spread is guaranteed, lockstep is not possible.
            await asyncio.sleep(max(0.0, start + (i + random.random()) * slot - loop.time()))
            await self.leases.drain_one(link)

    async def ready(self) -> tuple[bool, str]:
        if self.schema_problem is not None:
            return False, f"database schema: {self.schema_problem}"
        waiting = self.waiting_for
        if waiting:
            return False, "waiting for " + " and ".join(waiting)
        try:
            await self.store.ping()
        except Exception as exc:
            return False, f"database unreachable: {exc.__class__.__name__}"
        if not self.live.healthy:
            return False, "live state (Redis) unavailable"
        bus_problem = await self.bus.readiness()
        if bus_problem is not None:
            return False, f"bus (Redis): {bus_problem}"
        if self.draining:
            return False, "draining"
        if self.gateway is not None:
            # Devices can connect without it, but every agent turn they run would fail.
            return await self.gateway.ready()
        return True, "ok"

    # ---- loops ---------------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_flush_seconds)
            try:
                await self._flush_heartbeats()
                if self.settings.redis_url:
                    # Only Redis knows which other pods are alive; one pod clears stale rows at start.
                    await self.store.clear_dead_pods(await self.live.live_pods(), now_ms())
            except Exception as exc:
                log.warning("heartbeat flush failed: %r", exc)

    async def _flush_heartbeats(self) -> None:
        dirty = self.live.take_dirty()
        if dirty:
            await self.store.flush_heartbeats([Heartbeat(c, hb) for c, hb in dirty.items()])

    async def _reclaim_loop(self) -> None:
        """Rewrite this pod's ready devices' rows after its live state was lost.

        A partition from Redis longer than the pod TTL makes the other pods count this one dead and
        clear its rows (`clear_dead_pods`); the devices stay connected here and their leases never
        change, so nothing else would write the rows again and REST would show them offline for good.
        The rows are reclaimed once the other pods can see this pod again, and once more a pod TTL
        later, for a pod whose view of the live pods was older than this pod's return."""
        while True:
            await asyncio.sleep(RECLAIM_POLL_SECONDS)
            if not self.live.take_lost():
                continue
            for wait in (RECLAIM_FIRST_SECONDS, self.settings.pod_ttl_seconds):
                await asyncio.sleep(wait)
                ready = [link.connection_id for link in self.hub.links() if link.ready]
                try:
                    count = await self.store.reclaim(self.pod_id, ready, now_ms())
                except Exception as exc:
                    log.warning("reclaiming rows after lost live state failed: %r", exc)
                    continue
                if count:
                    log.warning("pod %s: rewrote %d rows other pods had cleared", self.pod_id, count)

    async def _sweep_loop(self) -> None:
        interval = min(5.0, max(0.05, self.settings.offline_after_seconds / 10))
        while True:
            await asyncio.sleep(interval)
            try:
                await self._sweep(now_ms())
            except Exception as exc:
                log.warning("sweep failed: %r", exc)

    async def _sweep(self, now: int) -> None:
        """Drop silent devices, time out teleports, notice devices whose pod went away."""
        await self.leases.drop_silent(now)
        self.teleports.tick(now)
        await self.relays.check_owners(now)

    def gauges(self) -> dict[str, tuple[str, float]]:
        links = self.hub.links()
        watches = self.hub.watches()
        return {
            "devices_ready": (
                "Device leases with a ready socket pair on this pod.",
                sum(1 for k in links if k.ready),
            ),
            "devices_away": (
                "Device leases in their reconnect grace window.",
                sum(1 for k in links if not k.ready),
            ),
            "relay_sockets": ("Open relay sockets.", sum(len(w.sockets) for w in watches)),
            "relay_sockets_detached": (
                "Dropped relay sockets kept for resume.",
                sum(len(w.detached) for w in watches),
            ),
            "watched_connections": ("Connections with relay sockets or watchers here.", len(watches)),
            "teleports_active": ("Teleports this pod is orchestrating.", len(self.teleports.active)),
        }
