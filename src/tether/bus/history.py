"""Relay sockets' resume history beyond their pod: one process keeps it in the socket (memory), a
cluster also writes it to Redis Streams so a client whose pod died can resume on another.

The write path never waits for Redis: `RecordedHistory.append` (once per relayed frame) queues the
frame for this pod's flusher, which writes every few milliseconds in one pipeline. So a pod killed
between two flushes takes its last frames with it, and frames the device sends after it died were
never numbered for its sockets. Both come back from the connection's event log, which the device's
pod writes (`bus.publishing`): the record keeps the log position of the last event it numbered, and
a resume routes and numbers the log after it as the dead pod would have
(`protocol.history.plan_catch_up`). What neither holds (trimmed, a hole) is announced with
`resync_required`, never skipped in silence.

Keys, per relay socket (`tether.redisconn.keys`): `relay:{socket}:history`, a stream with entry ids
`<seq>-1` (so trimming by seq is MINID), and `relay:{socket}`, a hash (connection, key, last seq,
the event-log position of the last event numbered in).
Both bounded like the socket's own history: about TETHER_HISTORY_FRAMES entries (MAXLEN ~),
TETHER_HISTORY_BYTES (MINID at the oldest seq that fits), and TETHER_HISTORY_SECONDS after the
socket's last write or, while it is open, after its pod last refreshed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from tether.bus.publishing import read_event
from tether.config import Settings
from tether.protocol.events import DeviceEvent, Position
from tether.protocol.history import History
from tether.redisconn.backoff import Backoff
from tether.redisconn.connect import connect_lean
from tether.redisconn.health import REDIS_ERRORS
from tether.redisconn.keys import KEY_PREFIX
from tether.redisconn.link import PodLink

log = logging.getLogger("tether.bus.history")

# Frames per pipeline round trip of the flusher.
FLUSH_BATCH = 2000
# Entries read for one resume: far above TETHER_HISTORY_FRAMES' "~" slack, so the stream is read whole.
FETCH_MAX = 100_000


@dataclass(frozen=True, slots=True)
class HistoryRecord:
    """A relay socket's history as another pod wrote it."""

    connection_id: str
    key_id: str
    last_seq: int
    frames: list[tuple[int, str]]  # (seq, text), oldest first
    position: Position | None = None  # in the connection's event log, of the last event numbered in


class HistoryStore(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...

    def history(self, socket_id: str, connection_id: str, key_id: str) -> History:
        """The history a new relay socket numbers its frames into."""
        ...

    def forget(self, socket_id: str) -> None:
        """The socket is gone for good on this pod (closed finally, or its resume window ended)."""
        ...

    async def fetch(self, socket_id: str) -> HistoryRecord | None:
        """A socket another pod served, as far as it was written; None if unknown (or unreachable)."""
        ...

    async def events_after(self, connection_id: str, position: Position) -> list[DeviceEvent] | None:
        """The connection's event log after `position`, oldest first; None if unreadable."""
        ...


class MemoryHistoryStore:
    """One process: a socket's history lives in the socket; no other pod could ask for it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def history(self, socket_id: str, connection_id: str, key_id: str) -> History:
        return History(self.settings.history_frames, self.settings.history_bytes)

    def forget(self, socket_id: str) -> None:
        return None

    async def fetch(self, socket_id: str) -> HistoryRecord | None:
        return None

    async def events_after(self, connection_id: str, position: Position) -> list[DeviceEvent] | None:
        return None  # never asked: `fetch` knows no socket of another pod


class RecordedHistory(History):
    """A socket's own history that also hands each frame to the pod's flusher."""

    def __init__(
        self, store: RedisHistoryStore, socket_id: str, connection_id: str, key_id: str, settings: Settings
    ) -> None:
        super().__init__(settings.history_frames, settings.history_bytes)
        self.store = store
        self.socket_id = socket_id
        self.connection_id = connection_id
        self.key_id = key_id

    def append(self, seq: int, text: str, position: Position | None = None) -> None:
        super().append(seq, text, position)
        self.store.queue(self, seq, text)


class RedisHistoryStore:
    def __init__(self, settings: Settings, *, prefix: str = KEY_PREFIX) -> None:
        self.settings = settings
        self.link = PodLink.open(settings.redis_url, settings.pod_id, prefix, "RedisHistoryStore")
        self._writes = connect_lean(self.link.address)
        self.ttl_ms = int(settings.history_seconds * 1000)
        self.buffer_frames = settings.history_buffer_frames
        self.flush_seconds = settings.history_flush_ms / 1000
        # Frames waiting for the flusher: (the socket's history, seq, text, oldest seq it still keeps,
        # the event position it had then).
        self._queue: deque[tuple[RecordedHistory, int, str, int, Position | None]] = deque()
        # Sockets on this pod, whose keys are refreshed while they live: forgotten when the relay
        # operations say so, or at the latest when the socket itself is gone (weak references).
        self._open: weakref.WeakValueDictionary[str, RecordedHistory] = weakref.WeakValueDictionary()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0  # frames the full buffer dropped (their sockets' records then have a hole)
        self.written = 0

    async def start(self) -> None:
        await self.link.wait("resume history")
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await self.flush_once()
        except REDIS_ERRORS as exc:
            log.warning("could not write the last relay history on shutdown: %r", exc)
        self._writes.close()
        await self.link.redis.aclose()

    def history(self, socket_id: str, connection_id: str, key_id: str) -> History:
        history = RecordedHistory(self, socket_id, connection_id, key_id, self.settings)
        self._open[socket_id] = history
        return history

    def forget(self, socket_id: str) -> None:
        self._open.pop(socket_id, None)  # its keys lapse TETHER_HISTORY_SECONDS after the last write

    def queue(self, history: RecordedHistory, seq: int, text: str) -> None:
        if len(self._queue) >= self.buffer_frames:
            self._queue.popleft()  # a hole in that socket's record: a resume across it resyncs
            self.dropped += 1
        self._queue.append((history, seq, text, history.first_seq, history.last_position))
        self._wake.set()

    async def _run(self) -> None:
        backoff = Backoff()
        refreshed = asyncio.get_running_loop().time()
        while True:
            # Woken by a frame, or at the latest when open sockets are due for their refresh.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.history_seconds / 3)
            self._wake.clear()
            # Gather what arrives meanwhile into the same pipeline: one round trip per interval.
            await asyncio.sleep(self.flush_seconds)
            try:
                now = asyncio.get_running_loop().time()
                if now - refreshed > self.settings.history_seconds / 3:
                    refreshed = now
                    await self._refresh()
                while self._queue:
                    await self.flush_once()
                backoff.reset()
            except REDIS_ERRORS as exc:
                # The batch is lost: a hole in those sockets' records, which a resume across resyncs.
                log.warning("writing relay history to Redis failed: %r", exc)
                await backoff.sleep()
                self._wake.set()

    async def flush_once(self) -> None:
        batch = [self._queue.popleft() for _ in range(min(len(self._queue), FLUSH_BATCH))]
        if not batch:
            return
        keys = self.link.keys
        commands: list[tuple[str | int, ...]] = []
        last: dict[str, tuple[RecordedHistory, int, int, Position | None]] = {}
        for history, seq, text, first_seq, position in batch:
            stream = keys.relay_history(history.socket_id)
            commands.append(
                ("XADD", stream, "MAXLEN", "~", self.settings.history_frames, f"{seq}-1", "f", text)
            )
            last[history.socket_id] = (history, seq, first_seq, position)
        for socket_id, (history, seq, first_seq, position) in last.items():
            stream, meta = keys.relay_history(socket_id), keys.relay(socket_id)
            # The socket's own history says what still fits in frames and bytes: trim to its oldest.
            commands.append(("XTRIM", stream, "MINID", f"{first_seq}-0"))
            commands.append(("HSET", meta, "seq", seq, "conn", history.connection_id, "key", history.key_id))
            if position is not None:
                commands.append(("HSET", meta, "pos", f"{position[0]}-{position[1]}"))
            commands.append(("PEXPIRE", stream, self.ttl_ms))
            commands.append(("PEXPIRE", meta, self.ttl_ms))
        # An entry id not above the stream's last (a socket's frames split over two pipelines that
        # raced, impossible with one flusher) fails alone; the other commands still apply.
        await self._writes.pipeline(commands)
        self.written += len(batch)

    async def _refresh(self) -> None:
        """Open sockets that relay nothing for a while must stay resumable."""
        commands: list[tuple[str | int, ...]] = []
        for socket_id in list(self._open):
            commands.append(("PEXPIRE", self.link.keys.relay_history(socket_id), self.ttl_ms))
            commands.append(("PEXPIRE", self.link.keys.relay(socket_id), self.ttl_ms))
        if commands:
            await self._writes.pipeline(commands)

    async def fetch(self, socket_id: str) -> HistoryRecord | None:
        keys = self.link.keys
        try:
            meta = await self.link.redis.hgetall(keys.relay(socket_id))
            if not meta:
                return None
            entries = await self.link.redis.xrange(keys.relay_history(socket_id), count=FETCH_MAX)
        except REDIS_ERRORS as exc:
            log.warning("reading relay history %s from Redis failed: %r", socket_id, exc)
            return None
        # decode_responses: every id and value is a str.
        frames = [
            (int(str(entry_id).split("-", 1)[0]), str((fields or {}).get("f", "")))
            for entry_id, fields in entries or []
        ]
        connection_id, key_id = str(meta.get("conn", "")), str(meta.get("key", ""))
        pos = str(meta.get("pos", ""))
        return HistoryRecord(connection_id, key_id, int(meta.get("seq", "0")), frames, _position(pos))

    async def events_after(self, connection_id: str, position: Position) -> list[DeviceEvent] | None:
        stream = self.link.keys.connection_log(connection_id)
        try:
            entries = await self.link.redis.xrange(
                stream, min=f"({position[0]}-{position[1]}", count=FETCH_MAX
            )
        except REDIS_ERRORS as exc:
            log.warning("reading the event log of %s from Redis failed: %r", connection_id, exc)
            return None
        # decode_responses: every id and value is a str.
        return [
            read_event(connection_id, {str(k): str(v) for k, v in (fields or {}).items()}, _position(str(i)))
            for i, fields in entries or []
        ]


def _position(text: str) -> Position | None:
    epoch, _, n = text.partition("-")
    return (int(epoch), int(n)) if epoch.isdigit() and n.isdigit() else None
