"""The sockets of this pod as the hub holds them: a device socket and a relay (client) socket.

Both sit over a `Transport` (the WebSocket edge) and bound what they queue: a device socket how many
writes may wait on it, a relay socket its outbound frames and bytes (the slow client is closed).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from time import perf_counter
from typing import Protocol

from tether.metrics import Histogram
from tether.protocol.events import Position
from tether.protocol.feeds import Scope
from tether.protocol.frames import with_seq
from tether.protocol.history import History

# A relay socket writes what queued up during one turn of the loop in writes of at most this much.
WRITE_BATCH_FRAMES = 128
WRITE_BATCH_BYTES = 256 * 1024


class Transport(Protocol):
    """The socket edge as the hub sees it."""

    async def send(self, text: str) -> None: ...
    def send_now(self, texts: list[str]) -> bool: ...
    async def send_many(self, texts: list[str]) -> None: ...
    async def close(self, code: int, reason: str) -> None: ...


class DeviceSocket:
    """One device WebSocket. Writes are serialised; the device reads promptly (it drops us otherwise)."""

    __slots__ = ("_lock", "_waiting", "close_code", "close_reason", "closed", "max_waiting", "transport")

    def __init__(self, transport: Transport, max_waiting: int) -> None:
        self.transport = transport
        self.max_waiting = max_waiting
        # Made when a write first has to wait (rare: a device reads promptly); 180 bytes otherwise
        # kept by every idle device socket.
        self._lock: asyncio.Lock | None = None
        self._waiting = 0
        self.closed = False
        self.close_code: int | None = None  # set when the router closed it
        self.close_reason: str | None = None

    async def send(self, text: str) -> bool:
        """Write one frame; False when the socket is gone or too many writes already wait on it."""
        if self.closed or self._waiting >= self.max_waiting:
            return False
        if self.send_nowait(text):
            return True
        self._waiting += 1
        if self._lock is None:
            self._lock = asyncio.Lock()
        try:
            async with self._lock:
                await self.transport.send(text)
        except Exception:  # the peer went away mid-write; the receive loop will notice
            return False
        finally:
            self._waiting -= 1
        return True

    def send_nowait(self, text: str) -> bool:
        """Write one frame at once if nothing is queued ahead of it and the socket takes it."""
        return not self.closed and self._waiting == 0 and self.transport.send_now([text])

    async def close(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_code = code
        self.close_reason = reason
        with contextlib.suppress(Exception):
            await self.transport.close(code, reason)


class ClientSocket:
    """One relay socket: its scope, its `seq`, a bounded outbound queue and its resume history."""

    def __init__(
        self,
        socket_id: str,
        transport: Transport,
        connection_id: str,
        key_id: str,
        scope: Scope,
        channel: str | None,
        history: History,
        max_frames: int,
        max_bytes: int,
        latency: Histogram | None = None,
    ) -> None:
        self.id = socket_id
        self.transport: Transport | None = transport
        self.connection_id = connection_id
        self.key_id = key_id
        self.scope = scope
        self.channel = channel
        self.history = history
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.seq = 0
        self.closed = False
        self.detached_at: int | None = None
        self._queue: deque[str] = deque()
        self._queued_bytes = 0
        self._started = False
        self._flush_scheduled = False
        self._gathered = False
        self._waiting: asyncio.Task[None] | None = None  # a write waiting for the socket's buffer
        # When the oldest relayed frame not yet written was handed over (0.0: none): one
        # observation of `latency` per write, not per frame.
        self.latency = latency
        self._handed_at = 0.0
        self.on_overflow: Callable[[ClientSocket], None] | None = None
        # Set by a resume across pods: the event-log position it replayed up to (later ones only).
        self.after: Position | None = None

    def start(self) -> None:
        """The socket is accepted: from now on what is queued goes out."""
        self._started = True
        self._schedule()

    def deliver(self, text: str, position: Position | None = None) -> None:
        """Number a relayed frame for this socket and queue it (or only record it while detached).
        `position`: the device event it carries, which the history records for a resume elsewhere."""
        if self.closed:
            return  # on its way out of the fan-out: no `seq` or history for a socket nobody resumes
        if position is not None and self.after is not None:
            if position <= self.after:
                return  # a resume replayed it already (from the connection's event log)
            self.after = None
        self.seq += 1
        out = with_seq(text, self.seq)
        self.history.append(self.seq, out, position)
        if self.transport is not None and not self.closed:
            if not self._handed_at:
                self._handed_at = perf_counter()
            self.push(out)

    def push(self, text: str) -> None:
        """Queue text as-is (pongs and replays carry no new `seq`)."""
        if self.closed:
            return
        self._queue.append(text)
        self._queued_bytes += len(text)
        if len(self._queue) > self.max_frames or self._queued_bytes > self.max_bytes:
            # Once: the close runs as a task, and every frame relayed before it would report again.
            overflow, self.on_overflow = self.on_overflow, None
            if overflow is not None:
                overflow(self)
            return
        self._schedule()

    def _schedule(self) -> None:
        # At the end of this turn of the loop, not at once: the frames of one device read go out
        # in one write; and without a task switch, a lone answer goes out as soon as possible.
        if self._started and not self._flush_scheduled and self._waiting is None:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if len(self._queue) > 1 and not self._gathered:
            # A burst is arriving (a stream of deltas): one more turn of the loop gathers more of it
            # into the same write. A lone frame (an answer) goes out now.
            self._gathered = True
            self._schedule()
            return
        self._gathered = False
        while self._queue and not self.closed and self.transport is not None and self._waiting is None:
            batch = self._take_batch()
            if not self.transport.send_now(batch):
                # The socket's buffer is full (or this transport only writes by awaiting): a task
                # waits for it and writes this batch and the rest, in order.
                self._waiting = asyncio.get_running_loop().create_task(self._write_waiting(batch))
            else:
                self._written()

    async def _write_waiting(self, batch: list[str]) -> None:
        try:
            while self.transport is not None and not self.closed:
                await self.transport.send_many(batch)
                self._written()
                if not self._queue:
                    break
                batch = self._take_batch()
        except Exception:
            self.closed = True
        finally:
            self._waiting = None

    def _written(self) -> None:
        """A write went out: its oldest relayed frame's wait. What is still queued has waited at
        least until now (a lower bound: one timestamp, not one per frame)."""
        if self._handed_at:
            now = perf_counter()
            if self.latency is not None:
                self.latency.observe(now - self._handed_at)
            self._handed_at = now if self._queue else 0.0

    @property
    def queued(self) -> int:
        return len(self._queue)

    def _take_batch(self) -> list[str]:
        """What is queued, up to WRITE_BATCH_FRAMES / WRITE_BATCH_BYTES: one write to the kernel."""
        queue = self._queue
        batch = [queue.popleft()]
        size = len(batch[0])
        while queue and len(batch) < WRITE_BATCH_FRAMES and size < WRITE_BATCH_BYTES:
            text = queue.popleft()
            batch.append(text)
            size += len(text)
        self._queued_bytes -= size
        return batch

    async def close(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self._queue.clear()
        self._queued_bytes = 0
        self.stop_writer()  # a slow consumer's write waits for a buffer that never drains
        transport, self.transport = self.transport, None
        if transport is not None:
            with contextlib.suppress(Exception):
                await transport.close(code, reason)

    def detach(self, at_ms: int) -> None:
        """The client went away: keep numbering into history so it can resume."""
        self.transport = None
        self.detached_at = at_ms
        self._queue.clear()
        self._queued_bytes = 0
        self._handed_at = 0.0
        self._started = False  # a resumed socket starts again once accepted
        self.stop_writer()

    def attach(self, transport: Transport, replay: list[str]) -> None:
        self.transport = transport
        self.detached_at = None
        self.closed = False
        for text in replay:
            self.push(text)

    def stop_writer(self) -> None:
        if self._waiting is not None:
            self._waiting.cancel()
            self._waiting = None
