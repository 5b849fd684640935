"""Write-behind for the rows devices change often: presence (connected here or not) and status.

Both coalesce: a reconnect storm of thousands of devices becomes a few transactions, not thousands
queueing for the database (SQLite's one write lock) while sockets wait on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging

import orjson

from tether.clock import now_ms
from tether.protocol.frames import Frame, status_fields
from tether.store.base import PresenceChange, StatusUpdate, Store
from tether.tasks import TaskSet

log = logging.getLogger("tether.writes")

# Presence rows are written in batches at most this far behind live state.
PRESENCE_BATCH_SECONDS = 0.1
# A failed batch is tried again after this long (the database may be restarting).
RETRY_SECONDS = 1.0


class PresenceWriter:
    def __init__(self, store: Store, tasks: TaskSet) -> None:
        self.store = store
        self.tasks = tasks
        self._pending: dict[str, PresenceChange] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._writer: asyncio.Task[None] | None = None

    def queue(self, change: PresenceChange) -> asyncio.Future[None]:
        """Resolves once the row is written; a later change for the same row replaces this one."""
        self._pending[change.connection_id] = change
        written = asyncio.get_running_loop().create_future()
        self._waiters.append(written)
        if self._writer is None or self._writer.done():
            self._writer = self.tasks.spawn(self._write())
        return written

    async def _write(self) -> None:
        while self._pending:
            await asyncio.sleep(PRESENCE_BATCH_SECONDS)
            batch, self._pending = self._pending, {}
            waiters, self._waiters = self._waiters, []
            try:
                await self.store.write_presence(list(batch.values()))
            except Exception as exc:
                log.warning("presence write of %d rows failed, retrying: %r", len(batch), exc)
                for conn, change in batch.items():
                    self._pending.setdefault(conn, change)
                self._waiters[:0] = waiters
                await asyncio.sleep(RETRY_SECONDS)
                continue
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def flush_final(self, changes: list[PresenceChange]) -> None:
        """At stop: what was still queued, then `changes`, in one last write (best effort)."""
        for change in changes:
            self._pending[change.connection_id] = change
        with contextlib.suppress(Exception):
            await self.store.write_presence(list(self._pending.values()))
        self._pending.clear()


class StatusWriter:
    """Status frames become `currentMode` and metadata on the row, written one at a time by one task.

    As concurrent transactions, a reconnect storm's re-sent statuses queue for SQLite's write lock
    holding every pool connection, so lease lookups time out. Unchanged ones are not written at all:
    the last status written per device is kept as a digest (the status itself cost ~3.6 KiB per
    device, bench/analysis.md)."""

    def __init__(self, store: Store, tasks: TaskSet) -> None:
        self.store = store
        self.tasks = tasks
        self._pending: dict[str, StatusUpdate] = {}
        self._written: dict[str, bytes] = {}
        self._writer: asyncio.Task[None] | None = None

    def queue(self, connection_id: str, frame: Frame) -> None:
        fields = status_fields(frame.body)
        if fields is None:
            return
        mode, patch = fields
        pending = self._pending.get(connection_id)
        merged = dict(pending.metadata_patch) if pending else {}
        merged.update(patch)
        # A status without a permission mode leaves currentMode as it was.
        keep_mode = "permissionMode" not in patch
        if keep_mode and pending is not None and pending.set_mode:
            mode, keep_mode = pending.current_mode, False
        update = StatusUpdate(current_mode=mode, set_mode=not keep_mode, metadata_patch=merged)
        if pending is None and self._written.get(connection_id) == _digest(update):
            return  # a device re-sends its unchanged status on every reconnect
        self._pending[connection_id] = update
        if self._writer is None or self._writer.done():
            self._writer = self.tasks.spawn(self._write())

    def forget(self, connection_id: str) -> None:
        self._written.pop(connection_id, None)

    async def _write(self) -> None:
        """Oldest first; a burst of status frames from one device coalesces into its latest."""
        while self._pending:
            connection_id = next(iter(self._pending))
            update = self._pending.pop(connection_id)
            try:
                await self.store.update_status(connection_id, update, now_ms())
                self._written[connection_id] = _digest(update)
            except Exception as exc:
                log.warning("status update for %s failed: %r", connection_id, exc)


def _digest(update: StatusUpdate) -> bytes:
    """Equal for equal statuses (keys in any order); 16 bytes, so a collision is not a concern."""
    text = orjson.dumps(
        [update.current_mode, update.set_mode, update.metadata_patch],
        option=orjson.OPT_SORT_KEYS,
        default=repr,
    )
    return hashlib.blake2b(text, digest_size=16).digest()
