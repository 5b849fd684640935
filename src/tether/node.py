"""The node wires storage, live state, the bus, the hub and the operations, and runs the pod's loops.

The edges (REST routes, device socket, relay socket) call the operations in `ops/`; those call the
store for durable rows, live state for presence, and the hub for sockets here and elsewhere (the
hub reaches other pods through the bus).
"""

from __future__ import annotations

import asyncio
import logging
import random

from tether.bus.base import Bus
from tether.clock import now_ms
from tether.config import Settings
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
from tether.store.base import Heartbeat, Store
from tether.tasks import TaskSet

log = logging.getLogger("tether.node")


class Node:
    def __init__(self, settings: Settings, store: Store, live: LiveState, bus: Bus) -> None:
        self.settings = settings
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
        self.relays = Relays(settings, self.hub, self.counters, self.tasks)
        self.teleports = Teleports(store, live, self.hub, self.environments, self.tasks)
        self.pod_stats = PodStats(settings, store, live, self.hub, self.counters)
        self.fleet = Fleet(settings, store, live, self.hub, bus, self.pod_stats)
        self.draining = False

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await self.store.start()
        await self.live.start()
        await self.bus.start()
        await self.store.clear_dead_pods(await self.live.live_pods(), now_ms())
        self.tasks.spawn(self._flush_loop())
        self.tasks.spawn(self._sweep_loop())
        self.tasks.spawn(self.pod_stats.run())

    async def stop(self) -> None:
        await self.tasks.cancel()
        await self._flush_heartbeats()
        await self.leases.stop()
        await self.bus.close()
        await self.live.close()
        await self.store.close()
        if self.gateway is not None:
            await self.gateway.close()

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
        try:
            await self.store.ping()
        except Exception as exc:
            return False, f"database unreachable: {exc.__class__.__name__}"
        if not self.live.healthy:
            return False, "live state (Redis) unavailable"
        if not self.bus.healthy:
            return False, "bus (Redis) subscription not running"
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
