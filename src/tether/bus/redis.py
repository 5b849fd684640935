"""The bus between pods, over Redis Streams: this module wires the parts.

* `inbox`: requests to a device's pod (write a frame, close its sockets, "someone now watches it")
  and their replies, through one stream per pod, `pod:{pod}:inbox`.
* `publishing` and `watchers`: a device's events out to the other pods watching it.
* `watching` (with `gaps`): the events of the devices this pod watches, from its own stream
  `pod:{pod}:events`.

A pod reads only its own two streams, each with one blocking XREAD (`tether.redisconn.streams`)
that keeps the last id it saw, so a short gap (a Redis blip, a busy loop) loses nothing the stream
still holds. Streams rather than pub/sub: a pub/sub message sent while the subscriber reconnects is
gone. Key names: `tether.redisconn.keys`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from tether.bus.base import BoundBus
from tether.bus.inbox import CLOSE_TIMEOUT_SECONDS, Inbox
from tether.bus.publishing import EventPublisher
from tether.bus.watchers import WatchersCache
from tether.bus.watching import Watches
from tether.config import Settings
from tether.metrics import BUS_LAG_BUCKETS, Histogram
from tether.protocol.events import DeviceEvent, Position
from tether.redisconn.cancel import stop_tasks
from tether.redisconn.connect import connect_lean
from tether.redisconn.health import REDIS_ERRORS, RedisHealth, describe
from tether.redisconn.keys import KEY_PREFIX
from tether.redisconn.link import PodLink
from tether.redisconn.streams import Fields, StreamReader

log = logging.getLogger("tether.bus.redis")
# How long /readyz waits for Redis to answer its PING before calling the pod not ready.
READY_PING_SECONDS = 1.0


class RedisBus(BoundBus):
    def __init__(self, settings: Settings, *, prefix: str = KEY_PREFIX) -> None:
        self.link = PodLink.open(settings.redis_url, settings.pod_id, prefix, "RedisBus")
        self.pod_id = settings.pod_id
        self.keys = self.link.keys
        self.send_timeout = settings.send_timeout_seconds
        # The hot path (requests, replies, events) goes through lean connections (`redisconn.resp`):
        # this one shared by every write, and one per stream reader.
        self._writes = connect_lean(self.link.address)
        watchers = WatchersCache(self.link)
        self._inbox = Inbox(self.link, self._writes, self, watchers.heard_from)
        self._publisher = EventPublisher(
            self.link, self._writes, watchers, settings.history_frames, settings.history_seconds
        )
        # Publish (owning pod's clock) to read (this pod's): tether_bus_lag_seconds.
        self.lag = Histogram(BUS_LAG_BUCKETS)
        self._healths: list[RedisHealth] = []
        self._watches = Watches(self.link, self._inbox, self, self.lag)
        self._inbox_reader = self._reader("its inbox", self.keys.inbox(self.pod_id), self._inbox.on_entry)
        # Back after an outage, the event reader joins the watchers again (Redis may have restarted empty).
        self._event_reader = self._reader(
            "its event stream",
            self.keys.pod_events(self.pod_id),
            self._watches.on_entry,
            self._watches.on_back,
        )
        self._background: list[asyncio.Task[None]] = []
        self._closed = False

    def _reader(
        self,
        name: str,
        stream: str,
        on_entry: Callable[[Fields], None],
        on_back: Callable[[], Awaitable[None]] | None = None,
    ) -> StreamReader:
        health = RedisHealth(f"pod {self.pod_id}", log)
        self._healths.append(health)
        return StreamReader(name, stream, self.link.address, health, on_entry, log, on_back)

    async def start(self) -> None:
        await self.link.wait("bus")
        # Each task is listed as soon as it runs, so `close` stops it even if a later step failed.
        self._background.append(await self._inbox_reader.start(self.link.redis))
        self._background.append(await self._event_reader.start(self.link.redis))
        loop = asyncio.get_running_loop()
        self._background.append(loop.create_task(self._publisher.run()))
        self._background.append(loop.create_task(self._watches.refresh_loop()))

    async def close(self) -> None:
        self._closed = True
        await stop_tasks(self._background)
        await self._inbox.stop()
        try:
            await self._publisher.flush_once()
            await self._watches.withdraw()
        except REDIS_ERRORS as exc:
            log.warning("could not withdraw pod %s's watches on shutdown: %r", self.pod_id, exc)
        self._writes.close()
        self._inbox_reader.close()
        self._event_reader.close()
        await self.link.redis.aclose()

    @property
    def redis_failures(self) -> int:
        """Failed reads of this pod's streams since start (tether_redis_errors_total)."""
        return sum(h.failures for h in self._healths)

    @property
    def healthy(self) -> bool:
        return not self._closed and self._inbox_reader.healthy and self._event_reader.healthy

    async def readiness(self) -> str | None:
        """Why this pod cannot route through Redis right now, or None: a reader not reading, a call
        left unanswered (a partition raises no error), or no answer to a PING now. Asked afresh on
        every /readyz, so it is never green on the strength of an answer from before an outage."""
        if self._closed:
            return "closed"
        now = asyncio.get_running_loop().time()
        for problem in (
            self._inbox_reader.problem(now),
            self._event_reader.problem(now),
            self._writes.watch.problem(now),
        ):
            if problem is not None:
                return problem
        try:
            async with asyncio.timeout(READY_PING_SECONDS):
                await self._writes.call("PING")
        except TimeoutError:
            return f"no answer to PING within {READY_PING_SECONDS:.0f} s"
        except REDIS_ERRORS as exc:
            return describe(exc)
        return None

    async def send_to_device(self, connection_id: str, owner_pod: str, text: str) -> bool:
        if owner_pod == self.pod_id:
            return await self.handler.write_to_device(connection_id, text)
        request = {"k": "send", "cid": connection_id, "text": text}
        return await self._inbox.ask(owner_pod, request, self.send_timeout)

    async def close_device(self, connection_id: str, owner_pod: str, code: int, reason: str) -> bool:
        if owner_pod == self.pod_id:
            return await self.handler.close_device(connection_id, code, reason)
        request = {"k": "close", "cid": connection_id, "code": str(code), "reason": reason}
        return await self._inbox.ask(owner_pod, request, min(CLOSE_TIMEOUT_SECONDS, self.send_timeout))

    def publish(self, connection_id: str, event: DeviceEvent) -> None:
        self._publisher.publish(connection_id, event)  # stamps the position `local` reads
        self._watches.local(connection_id, event)

    async def flushed(self) -> None:
        await self._publisher.flushed()

    def expect(self, connection_id: str, position: Position) -> None:
        self._watches.expect(connection_id, position)

    async def watch(self, connection_id: str) -> None:
        await self._watches.watch(connection_id)

    async def unwatch(self, connection_id: str) -> None:
        await self._watches.unwatch(connection_id)
