"""A WebSocket's inbound queue and write-ready flag, at a fraction of asyncio's per-socket memory.

uvicorn gives every WebSocket an `asyncio.Queue` (for the messages its one reader, the application,
takes) and an `asyncio.Event` (the transport is writable). Each deque asyncio allocates reserves a
block of 64 slots: the queue holds four (items, getters, putters, and its own `Event`'s waiters), the
flag one: 5.1 KiB of every idle device's two sockets in the queues and 3.0 KiB in the events
(tracemalloc, a router holding 1,000 devices). A socket has one reader and, at most, a few writers
waiting on a full buffer, so a deque made on demand and one pending future do the same work.
"""

from __future__ import annotations

from asyncio import Future, get_running_loop
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class Inbox(Generic[T]):
    """`asyncio.Queue`'s `put_nowait`, `get`, `get_nowait`, `empty` and `qsize`, for one reader.

    Unbounded, as uvicorn's queue is: uvicorn stops reading the socket while a message waits (and
    `TetherWebSocketProtocol` while writes do), so what waits here is a handful of messages."""

    __slots__ = ("_items", "_reader")

    def __init__(self) -> None:
        self._items: deque[T] | None = None  # made on the first message that finds no reader waiting
        self._reader: Future[T] | None = None  # the reader's pending `get`

    def put_nowait(self, item: T) -> None:
        self.hand(item)

    def hand(self, item: T) -> bool:
        """Queue `item`; True when it went straight to a waiting reader (nothing waits here)."""
        reader = self._reader
        if reader is not None:
            self._reader = None
            if not reader.done():  # not cancelled meanwhile
                reader.set_result(item)
                return True
        if self._items is None:
            self._items = deque()
        self._items.append(item)
        return False

    def get(self) -> Future[T]:
        """A future of the next message: already done when one is waiting."""
        future: Future[T] = get_running_loop().create_future()
        if self._items:
            future.set_result(self._items.popleft())
            if not self._items:
                self._items = None
        else:
            if self._reader is not None and not self._reader.done():
                raise RuntimeError("Inbox has one reader: a get() is already pending")
            self._reader = future
        return future

    def get_nowait(self) -> T:
        if not self._items:
            raise IndexError("the inbox is empty")
        item = self._items.popleft()
        if not self._items:
            self._items = None
        return item

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items) if self._items else 0


class Flag:
    """`asyncio.Event`'s `set`, `clear`, `is_set` and `wait`, its waiters in a list made on demand."""

    __slots__ = ("_set", "_waiters")

    def __init__(self, value: bool = False) -> None:
        self._set = value
        self._waiters: list[Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> bool:
        if self._set:
            return True
        waiter: Future[None] = get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)
        return True
