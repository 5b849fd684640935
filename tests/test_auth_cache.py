"""The API-key cache in front of the store: what the socket edges and REST routes authenticate with."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tether.ops.auth import AuthCache
from tether.store.base import Principal
from tether.store.sql import SqlStore


class CountingStore(SqlStore):
    """The real store, counting the key lookups that reach the database."""

    reads = 0

    async def authenticate(self, secret: str) -> Principal | None:
        self.reads += 1
        return await super().authenticate(secret)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[CountingStore]:
    s = CountingStore(database_url)
    await s.start()
    yield s
    await s.close()


async def test_a_burst_of_handshakes_with_one_key_reads_the_database_once(store: CountingStore) -> None:
    secret = await store.create_key("acme", "alice", "laptop", 1_000)
    cache = AuthCache(store.authenticate, ttl_ms=10_000)
    found = await asyncio.gather(*(cache.resolve(secret) for _ in range(500)))
    assert None not in found and {p.org_id for p in found if p is not None} == {found[0].org_id}
    assert store.reads == 1
    assert await cache.resolve(secret) == found[0] and store.reads == 1


async def test_a_waiter_that_gives_up_does_not_fail_the_others(store: CountingStore) -> None:
    secret = await store.create_key("acme", "alice", "laptop", 1_000)
    cache = AuthCache(store.authenticate, ttl_ms=10_000)
    impatient = asyncio.ensure_future(cache.resolve(secret))
    patient = asyncio.ensure_future(cache.resolve(secret))
    await asyncio.sleep(0)
    impatient.cancel()
    principal = await patient
    assert principal is not None and principal == await store.authenticate(secret)
    assert impatient.cancelled()


async def test_an_unknown_key_is_looked_up_again_each_time(store: CountingStore) -> None:
    cache = AuthCache(store.authenticate, ttl_ms=10_000)
    assert await cache.resolve("sk-not-yet") is None
    assert await cache.resolve("sk-not-yet") is None
    assert store.reads == 2
