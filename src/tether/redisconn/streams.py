"""Redis Streams as the bus uses them: building entries, parsing XREAD, and the one reader loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis

from tether.redisconn.address import RedisAddress
from tether.redisconn.backoff import Backoff
from tether.redisconn.connect import connect_lean
from tether.redisconn.health import REDIS_ERRORS, RedisHealth

# XREAD BLOCK of every reader; also bounds how fast `healthy` notices a stuck loop.
READ_BLOCK_MS = 2000
# The first XREAD after a failure blocks only this long, so readiness returns as soon as Redis does.
RECOVERY_BLOCK_MS = 50
# Entries taken per XREAD: bounds one turn of a reader's loop (and the reply it parses).
READ_COUNT = 500
# `healthy` allows this much beyond READ_BLOCK_MS since a read last returned.
HEALTHY_GRACE_SECONDS = 2.0

Fields = dict[str, str]


def xadd(stream: str, maxlen: int, fields: Fields) -> tuple[str | int, ...]:
    """XADD to a stream kept at about `maxlen` entries (MAXLEN ~, so trimming stays cheap)."""
    return ("XADD", stream, "MAXLEN", "~", maxlen, "*", *(x for kv in fields.items() for x in kv))


def entries(response: Any) -> list[tuple[str, Fields]]:
    """XREAD's raw RESP2 answer for one stream as (entry id, fields) pairs."""
    if not response:
        return []
    _, found = response[0]
    return [(entry_id, dict(zip(flat[::2], flat[1::2], strict=True))) for entry_id, flat in found]


async def last_id(redis: Redis, stream: str) -> str:
    last = await redis.xrevrange(stream, count=1)
    return str(last[0][0]) if last else "0-0"


class StreamReader:
    """One pod's reader of one stream (`name` says which in logs, "its inbox"): a blocking XREAD on
    its own lean connection from the last id it saw (so a short gap, a Redis blip or a busy loop,
    loses nothing the stream still holds), backing off while Redis is away. `on_back` runs whenever
    a read returns after a failure."""

    def __init__(
        self,
        name: str,
        stream: str,
        address: RedisAddress,
        health: RedisHealth,
        on_entry: Callable[[Fields], None],
        log: logging.Logger,
        on_back: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.name = name
        self.stream = stream
        self.health = health
        self.last_id = "0-0"
        self.task: asyncio.Task[None] | None = None
        self._reads = connect_lean(address, waits_up_to=READ_BLOCK_MS / 1000)
        self._on_entry = on_entry
        self._on_back = on_back
        self._log = log

    async def start(self, redis: Redis) -> asyncio.Task[None]:
        # Start after whatever the stream holds: entries there are for an earlier process.
        self.last_id = await last_id(redis, self.stream)
        # Redis just answered: healthy from now on, as long as the reads keep returning.
        self.health.ok()
        self.task = asyncio.get_running_loop().create_task(self._run())
        return self.task

    @property
    def healthy(self) -> bool:
        running = self.task is not None and not self.task.done()
        return running and self.health.fresh(READ_BLOCK_MS / 1000 + HEALTHY_GRACE_SECONDS)

    def problem(self, now: float) -> str | None:
        """Why this reader cannot be counted on right now (readiness), or None."""
        if not self.healthy:
            return f"not reading {self.name}"
        return self._reads.watch.problem(now)

    def close(self) -> None:
        self._reads.close()

    async def _run(self) -> None:
        backoff = Backoff()
        while True:
            try:
                # Right after an outage, return quickly: readiness waits for this read to come back.
                block = READ_BLOCK_MS if self.health.up else RECOVERY_BLOCK_MS
                response = await self._reads.call(
                    "XREAD", "COUNT", READ_COUNT, "BLOCK", block, "STREAMS", self.stream, self.last_id
                )
                if self.health.ok():
                    self._log.info("%s: reading %s again", self.health.who, self.name)
                    if self._on_back is not None:
                        await self._on_back()
            except REDIS_ERRORS as exc:
                self.health.failed(f"XREAD of {self.name}", exc)
                await backoff.sleep()
                continue
            backoff.reset()
            for entry_id, fields in entries(response):
                self.last_id = entry_id
                try:
                    self._on_entry(fields)
                except Exception:
                    self._log.exception("%s: bad entry %s in %s", self.health.who, entry_id, self.name)
