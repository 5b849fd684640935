"""Device events out of this pod: written to the event stream (`pod:{pod}:events`) of every other
pod that watches the device, in batches, behind a bounded queue so `publish` never blocks.

Nothing is written for a device no other pod watches. Each event carries this pod's per-connection
counter, so a reader that misses entries (stream trimmed, Redis restarted, queue overflowed) sees
the hole and flags the next frame `gap_before`."""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from tether.bus.watchers import WatchersCache
from tether.clock import now_ms
from tether.protocol.events import DeviceEvent, DeviceState
from tether.redisconn.backoff import Backoff
from tether.redisconn.health import REDIS_ERRORS
from tether.redisconn.link import PodLink
from tether.redisconn.resp import RespConnection
from tether.redisconn.streams import Fields, xadd

log = logging.getLogger("tether.bus.redis")

# Device events waiting to be written to Redis; beyond this the oldest are dropped (and readers see
# the gap through the per-connection counter).
PUBLISH_QUEUE_MAX = 100_000
# Events per pipeline round trip.
PUBLISH_BATCH = 1000
# A pod's event stream keeps about this many entries (MAXLEN ~): enough to bridge its reader's
# reconnect while the devices it watches stream fast. Memory per pod is about this many frames.
EVENT_STREAM_MAXLEN = 10_000
# An event stream nobody publishes to for this long disappears (its pod is gone or watches nothing).
EVENT_STREAM_TTL_SECONDS = 60.0
# The dropped-events warning is logged at these counts and then every DROP_LOG_EVERY drops.
DROP_LOG_AT = (1, 10, 100)
DROP_LOG_EVERY = 10_000


class EventPublisher:
    def __init__(self, link: PodLink, writes: RespConnection, watchers: WatchersCache) -> None:
        self._link = link
        self._writes = writes
        self._watchers = watchers
        self._queue: deque[tuple[str, int, DeviceEvent]] = deque()
        self._wake = asyncio.Event()
        # Per online connection of this pod (dropped when it goes offline).
        self._counters: dict[str, int] = {}
        self._dropped = 0

    def publish(self, connection_id: str, event: DeviceEvent) -> None:
        counter = self._counters.get(connection_id, 0) + 1
        if event.state is DeviceState.OFFLINE:
            self._counters.pop(connection_id, None)
        else:
            self._counters[connection_id] = counter
        if len(self._queue) >= PUBLISH_QUEUE_MAX:
            self._queue.popleft()
            self._dropped += 1
            if self._dropped in DROP_LOG_AT or self._dropped % DROP_LOG_EVERY == 0:
                log.warning("publish queue full: dropped %d device events so far", self._dropped)
        self._queue.append((connection_id, counter, event))
        self._wake.set()

    async def run(self) -> None:
        backoff = Backoff()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                try:
                    await self.flush_once()
                    backoff.reset()
                except REDIS_ERRORS as exc:
                    # The batch is lost; readers see the hole in the counters and flag a gap.
                    log.warning("publishing device events failed: %r", exc)
                    await backoff.sleep()

    async def flush_once(self) -> None:
        """Write one batch from the queue (none when it is empty)."""
        batch = [self._queue.popleft() for _ in range(min(len(self._queue), PUBLISH_BATCH))]
        if not batch:
            return
        watchers = await self._watchers.of({connection_id for connection_id, _, _ in batch})
        commands: list[tuple[str | int, ...]] = []
        written: set[str] = set()
        for connection_id, counter, event in batch:
            pods = watchers.get(connection_id, frozenset()) - {self._link.pod_id}
            if not pods:
                continue
            fields = _fields(self._link.pod_id, connection_id, counter, event)
            for pod in pods:
                stream = self._link.keys.pod_events(pod)
                commands.append(xadd(stream, EVENT_STREAM_MAXLEN, fields))
                written.add(stream)
        for stream in written:
            commands.append(("PEXPIRE", stream, int(EVENT_STREAM_TTL_SECONDS * 1000)))
        if commands:
            await self._writes.pipeline(commands)


def _fields(pod_id: str, connection_id: str, counter: int, event: DeviceEvent) -> Fields:
    # "t": when it was written, so the reading pod can measure the bus's lag (tether_bus_lag_seconds).
    fields = {"c": connection_id, "p": pod_id, "n": str(counter), "t": str(now_ms())}
    if event.frame is not None:
        fields["f"] = event.frame.text
    if event.gap_before:
        fields["g"] = "1"
    if event.state is not None:
        fields["s"] = event.state.value
    return fields
