"""The devices this pod's clients watch on other pods: joining their watcher sets, keeping them
joined, and taking their events from this pod's own event stream.

A pod is listed in `conn:{id}:watchers` (scored by expiry) of each connection it watches, and the
pod holding the device writes its events to the stream of every pod listed. No pod reads back what
it published itself (its own hub already has it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from redis.asyncio.client import Pipeline

from tether.bus.base import BoundBus
from tether.bus.gaps import Gaps
from tether.bus.inbox import Inbox
from tether.bus.publishing import read_event
from tether.clock import now_ms
from tether.metrics import Histogram
from tether.protocol.events import DeviceEvent, Position
from tether.redisconn.health import REDIS_ERRORS
from tether.redisconn.link import PodLink
from tether.redisconn.pipelines import pipelined
from tether.redisconn.streams import Fields

log = logging.getLogger("tether.bus.redis")

# A watching pod re-registers its watches this often; an entry expires after WATCH_TTL_SECONDS
# (so a dead pod stops costing stream writes within that).
WATCH_REFRESH_SECONDS = 10.0
WATCH_TTL_SECONDS = 30.0


class Watches:
    def __init__(self, link: PodLink, inbox: Inbox, bus: BoundBus, lag: Histogram) -> None:
        self._link = link
        self._lag = lag
        self._redis = link.redis
        self._inbox = inbox
        self._bus = bus
        # Watched connections -> whether this pod is registered in their watchers set yet. Bounded
        # by the relay sockets of this pod (the hub unwatches when the last one closes).
        self._watched: dict[str, bool] = {}
        self._gaps = Gaps()

    async def watch(self, connection_id: str) -> None:
        if connection_id in self._watched:
            return
        self._watched[connection_id] = False
        try:
            await self._register([connection_id])
        except REDIS_ERRORS as exc:
            # Registered by the refresh loop once Redis answers; never fail the relay socket for it.
            log.warning("watching %s deferred, Redis unavailable: %r", connection_id, exc)

    async def unwatch(self, connection_id: str) -> None:
        self._watched.pop(connection_id, None)
        self._gaps.forget(connection_id)
        try:
            await self._redis.zrem(self._link.keys.watchers(connection_id), self._link.pod_id)
        except REDIS_ERRORS as exc:
            log.info("unwatching %s left to expiry, Redis unavailable: %r", connection_id, exc)

    async def withdraw(self) -> None:
        """Stopping: leave every watcher set at once rather than at expiry."""
        if self._watched:
            pipe = self._redis.pipeline(transaction=False)
            for connection_id in self._watched:
                pipe.zrem(self._link.keys.watchers(connection_id), self._link.pod_id)
            await pipe.execute()

    async def _join(self, pipe: Pipeline, connection_id: str) -> None:
        key = self._link.keys.watchers(connection_id)
        pipe.zadd(key, {self._link.pod_id: now_ms() + int(WATCH_TTL_SECONDS * 1000)})
        pipe.pexpire(key, int(WATCH_TTL_SECONDS * 1000))

    async def _join_and_find_owner(self, pipe: Pipeline, connection_id: str) -> None:
        await self._join(pipe, connection_id)
        pipe.hget(self._link.keys.lease(connection_id), "pod")

    async def _register(self, connection_ids: list[str]) -> None:
        """Join the watchers of these connections: their owners write their events to our stream,
        and an owner on another pod is told at once (it may hold a cached "nobody watches")."""
        answers: list[Any] = await pipelined(self._redis, connection_ids, self._join_and_find_owner)
        for i, connection_id in enumerate(connection_ids):
            owner = answers[3 * i + 2]
            fresh = self._watched.get(connection_id) is False
            if fresh:
                self._watched[connection_id] = True
            if fresh and owner and owner != self._link.pod_id:
                await self._inbox.put(owner, {"k": "watch", "cid": connection_id})

    async def refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(WATCH_REFRESH_SECONDS)
            with contextlib.suppress(*REDIS_ERRORS):
                await self.refresh()

    async def refresh(self) -> None:
        """Re-register every watch (after a Redis restart the watcher sets are gone)."""
        pending = [c for c, registered in self._watched.items() if not registered]
        if pending:
            await self._register(pending)
        registered = [c for c, registered in self._watched.items() if registered]
        await pipelined(self._redis, registered, self._join)

    async def on_back(self) -> None:
        """The event stream reads again after an outage: Redis may have restarted empty."""
        if self._watched:
            await self.refresh()

    def expect(self, connection_id: str, position: Position) -> None:
        """A resume caught up to `position` from the connection's event log: if the first event
        this pod then hears of does not follow it, that is a hole (flagged, never silent)."""
        if connection_id in self._watched:
            self._gaps.expect(connection_id, str(position[0]), position[1])

    def local(self, connection_id: str, event: DeviceEvent) -> None:
        """An event of a device on this pod, stamped, before this pod's watchers see it: if the device
        came here from another pod, what it wrote to that one and nobody published is a hole too."""
        if connection_id not in self._watched or event.position is None:
            return
        gap = self._gaps.event(
            connection_id,
            str(event.position[0]),
            event.position[1],
            flagged=event.gap_before,
            frame=event.frame is not None,
            event_seq=event.frame.event_seq if event.frame is not None else None,
        )
        if event.frame is not None:
            event.gap_before = gap

    def on_entry(self, fields: Fields) -> None:
        """One entry of this pod's event stream, to the hub."""
        connection_id = fields.get("c", "")
        if connection_id not in self._watched:
            return  # unwatched since it was written
        written = fields.get("t")
        if written is not None:
            # Across two pods' clocks: skew shows as lag (or as 0, clamped), so keep pods on NTP.
            self._lag.observe(max(0, now_ms() - int(written)) / 1000)
        epoch, n = fields.get("e", "0"), fields.get("n", "0")
        event = read_event(connection_id, fields, (int(epoch), int(n)) if "e" in fields else None)
        # The publisher is the position's epoch (a pod's count of the connection's events; each
        # restart of it starts another), or the pod for a pod that sends none.
        event.gap_before = self._gaps.event(
            connection_id,
            fields.get("e") or fields.get("p", ""),
            int(n),
            flagged=event.gap_before,
            frame=event.frame is not None,
            event_seq=event.frame.event_seq if event.frame is not None else None,
        )
        if event.frame is not None or event.state is not None:
            self._bus.handler.on_device_event(connection_id, event)
