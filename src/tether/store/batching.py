"""Group commit: concurrent calls of one write share one transaction.

A fleet coming back after a restart registers thousands of devices at once. One transaction each
queues them for SQLite's single write lock (and costs PostgreSQL a round trip per statement per
device); one writer taking whatever is queued as one batch turns N waits into one. There is no added
delay: a batch is what arrived while the previous batch was being written, so an idle router writes a
lone call at once and a busy one writes bigger batches, at most `max_batch` items.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Apply a batch: one outcome per item, in order, an exception standing for that item's failure.
ApplyBatch = Callable[[list[T]], Awaitable[list[R | Exception]]]


class GroupCommit(Generic[T, R]):
    """Calls `apply` with batches of at most `max_batch` submitted items, one batch at a time.

    At most `max_pending` items wait for a batch; a submitter beyond that waits for room (back pressure
    onto the requests, not an unbounded queue). Each submitter gets its own item's outcome."""

    def __init__(self, apply: ApplyBatch[T, R], max_batch: int, max_pending: int) -> None:
        if max_batch < 1 or max_pending < 1:
            raise ValueError("max_batch and max_pending must be at least 1")
        self.apply = apply
        self.max_batch = max_batch
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] = asyncio.Queue(max_pending)
        self._writer: asyncio.Task[None] | None = None
        # For tests and the metrics: how the calls were grouped.
        self.batches = 0
        self.largest = 0

    @property
    def pending(self) -> int:
        """Items waiting for a batch (at most max_pending)."""
        return self._queue.qsize()

    async def submit(self, item: T) -> R:
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write())
        return await done

    async def _write(self) -> None:
        while not self._queue.empty():
            batch = [self._queue.get_nowait()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            self.batches += 1
            self.largest = max(self.largest, len(batch))
            try:
                outcomes = await self.apply([item for item, _ in batch])
                if len(outcomes) != len(batch):
                    raise RuntimeError(f"a batch of {len(batch)} gave {len(outcomes)} outcomes")
            except Exception as exc:
                outcomes = [exc] * len(batch)
            except BaseException:  # cancelled (the store closing): nobody is left waiting unanswered
                for _, done in batch:
                    if not done.done():
                        done.cancel()
                raise
            for (_, done), outcome in zip(batch, outcomes, strict=True):
                if done.done():  # the submitter was cancelled; its write may still have happened
                    continue
                if isinstance(outcome, Exception):
                    done.set_exception(outcome)
                else:
                    done.set_result(outcome)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        while not self._queue.empty():
            _, done = self._queue.get_nowait()
            if not done.done():
                done.cancel()
