"""Many keys in few round trips: one pipeline per chunk of items, not one per item."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

# Items per pipeline round trip (each adds one to three commands): large enough that re-publishing
# 100,000 leases takes 100 round trips, small enough that one reply stays a few hundred kB.
PIPELINE_CHUNK = 1000

Item = TypeVar("Item")


async def pipelined(
    redis: Redis, items: Sequence[Item], add: Callable[[Pipeline, Item], Awaitable[object]]
) -> list[Any]:
    """Queue `add(pipe, item)` for every item, PIPELINE_CHUNK items a round trip; every reply in order."""
    replies: list[Any] = []
    for start in range(0, len(items), PIPELINE_CHUNK):
        pipe = redis.pipeline(transaction=False)
        for item in items[start : start + PIPELINE_CHUNK]:
            await add(pipe, item)
        replies.extend(await pipe.execute())
    return replies
