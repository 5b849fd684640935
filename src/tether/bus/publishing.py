"""Device events out of this pod: written to the event stream (`pod:{pod}:events`) of every other
pod that watches the device, and to the connection's event log (`conn:{id}:log`), in batches,
behind a bounded queue so `publish` never blocks.

Each event is stamped with its position (`protocol.events.Positions`) before this pod's own
watchers see it. Nothing goes to the streams of pods not watching the device; the log is written
while some other pod watches the connection and for TETHER_HISTORY_SECONDS after (the resume window
of a relay socket whose pod died): a pod resuming that socket replays from it what the dead pod could
not number (`ops.relays`). A reader that misses entries (stream trimmed, Redis restarted, queue
overflowed) sees the hole in the positions: a watcher flags the next frame `gap_before`, a resume
announces `resync_required`.

The log of a connection holds about TETHER_HISTORY_FRAMES entries (MAXLEN ~) and lapses
TETHER_HISTORY_SECONDS after its last write; entry ids are the positions, `<epoch>-<n>`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from tether.bus.watchers import WatchersCache
from tether.clock import now_ms
from tether.protocol.events import DeviceEvent, DeviceState, Position, Positions
from tether.protocol.frames import Frame, FrameError, decode
from tether.redisconn.backoff import Backoff
from tether.redisconn.health import REDIS_ERRORS
from tether.redisconn.link import PodLink
from tether.redisconn.resp import RespConnection
from tether.redisconn.streams import Fields, xadd

log = logging.getLogger("tether.bus.redis")

# Device events waiting to be written to Redis; beyond this the oldest are dropped (and readers see
# the gap through the positions).
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
    def __init__(
        self,
        link: PodLink,
        writes: RespConnection,
        watchers: WatchersCache,
        log_frames: int,
        log_seconds: float,
    ) -> None:
        self._link = link
        self._writes = writes
        self._watchers = watchers
        self._queue: deque[tuple[str, DeviceEvent]] = deque()
        self._wake = asyncio.Event()
        self.positions = Positions()
        self._log_frames = log_frames
        self._log_ms = int(log_seconds * 1000)
        # Per connection of this pod watched elsewhere: until when its events go to its log. Bounded
        # by this pod's connections (dropped when one goes offline).
        self._log_until: dict[str, int] = {}
        self._dropped = 0
        # Events handed to `publish` and events written (or given up on): `flushed` waits on them.
        self._published = 0
        self._done = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def publish(self, connection_id: str, event: DeviceEvent) -> None:
        self.positions.stamp(connection_id, event, now_ms())
        self._published += 1
        if len(self._queue) >= PUBLISH_QUEUE_MAX:
            self._queue.popleft()
            self._dropped += 1
            self._finished(1)
            if self._dropped in DROP_LOG_AT or self._dropped % DROP_LOG_EVERY == 0:
                log.warning("publish queue full: dropped %d device events so far", self._dropped)
        self._queue.append((connection_id, event))
        self._wake.set()

    async def flushed(self) -> None:
        """Once every event published so far is written (or lost to a Redis failure)."""
        if self._done >= self._published:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((self._published, waiter))
        await waiter

    def _finished(self, count: int) -> None:
        self._done += count
        if self._waiters:
            waiting = []
            for target, waiter in self._waiters:
                if target <= self._done:
                    if not waiter.done():
                        waiter.set_result(None)
                else:
                    waiting.append((target, waiter))
            self._waiters = waiting

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
                    # The batch is lost; readers see the hole in the positions and flag a gap.
                    log.warning("publishing device events failed: %r", exc)
                    await backoff.sleep()

    async def flush_once(self) -> None:
        """Write one batch from the queue (none when it is empty)."""
        batch = [self._queue.popleft() for _ in range(min(len(self._queue), PUBLISH_BATCH))]
        if not batch:
            return
        try:
            await self._write(batch)
        finally:
            self._finished(len(batch))

    async def _write(self, batch: list[tuple[str, DeviceEvent]]) -> None:
        watchers = await self._watchers.of({connection_id for connection_id, _ in batch})
        commands: list[tuple[str | int, ...]] = []
        written: set[str] = set()
        logged: set[str] = set()
        now = now_ms()
        keys = self._link.keys
        for connection_id, event in batch:
            pods = watchers.get(connection_id, frozenset()) - {self._link.pod_id}
            position = event.position or (0, 0)
            if pods:
                self._log_until[connection_id] = now + self._log_ms
            if self._log_until.get(connection_id, 0) > now:
                entry = f"{position[0]}-{position[1]}"
                stream = keys.connection_log(connection_id)
                flat = (x for kv in (event_fields(event) or {"x": ""}).items() for x in kv)
                commands.append(("XADD", stream, "MAXLEN", "~", self._log_frames, entry, *flat))
                logged.add(connection_id)
            if event.state is DeviceState.OFFLINE:
                self._log_until.pop(connection_id, None)
            if not pods:
                continue
            fields = event_fields(event)
            fields.update(c=connection_id, p=self._link.pod_id, e=str(position[0]), n=str(position[1]))
            fields["t"] = str(now)
            for pod in pods:
                stream = keys.pod_events(pod)
                commands.append(xadd(stream, EVENT_STREAM_MAXLEN, fields))
                written.add(stream)
        for stream in written:
            commands.append(("PEXPIRE", stream, int(EVENT_STREAM_TTL_SECONDS * 1000)))
        for connection_id in logged:
            commands.append(("PEXPIRE", keys.connection_log(connection_id), self._log_ms))
        if commands:
            # An entry id not above its log's last (a clock stepped back across a device's move)
            # fails alone: a hole in that log, which a resume across it announces.
            await self._writes.pipeline(commands)


def event_fields(event: DeviceEvent) -> Fields:
    # "t" (set by the publisher): when it was written, so the reading pod can measure the bus's lag.
    fields: Fields = {}
    if event.frame is not None:
        fields["f"] = event.frame.text
    if event.gap_before:
        fields["g"] = "1"
    if event.state is not None:
        fields["s"] = event.state.value
    return fields


def read_event(connection_id: str, fields: Fields, position: Position | None) -> DeviceEvent:
    """An event as `event_fields` wrote it (an undecodable frame read as none: its place is kept)."""
    frame = _frame(connection_id, fields.get("f"))
    state = DeviceState(fields["s"]) if fields.get("s") in DeviceState._value2member_map_ else None
    return DeviceEvent(frame=frame, gap_before=fields.get("g") == "1", state=state, position=position)


def _frame(connection_id: str, text: str | None) -> Frame | None:
    if text is None:
        return None
    try:
        return decode(text)
    except FrameError as exc:
        log.warning("undecodable relayed frame for %s: %s", connection_id, exc)
        return None
