"""Gateway mode's rows on both backends: upstream credentials as organizations, users' upstream identities."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tether.store.sql import SqlStore


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[SqlStore]:
    s = SqlStore(database_url)
    await s.start()
    yield s
    await s.close()


async def test_one_credential_is_one_organization_even_when_first_seen_concurrently(store: SqlStore) -> None:
    found = await asyncio.gather(
        *(store.ensure_principal("upstream-aa", "upstream", "upstream:aa", 1) for _ in range(8))
    )
    assert len({(p.org_id, p.user_id) for p in found}) == 1
    other = await store.ensure_principal("upstream-bb", "upstream", "upstream:bb", 2)
    assert other.org_id != found[0].org_id


async def test_the_first_recorded_upstream_identity_wins_unless_replaced(store: SqlStore) -> None:
    alice = await store.ensure_principal("acme", "alice", "k1", 1)
    bob = await store.ensure_principal("acme", "bob", "k2", 1)
    assert await store.upstream_actor(alice.org_id, alice.user_id) is None
    assert await store.save_upstream_actor(
        alice.org_id, alice.user_id, "org-1", "user-a", 1, replace=False
    ) == (
        "org-1",
        "user-a",
    )
    # A second pod provisioned at the same time: the row already there is the answer.
    assert await store.save_upstream_actor(
        alice.org_id, alice.user_id, "org-2", "user-x", 2, replace=False
    ) == (
        "org-1",
        "user-a",
    )
    assert await store.upstream_actor(alice.org_id, alice.user_id) == ("org-1", "user-a")
    # Another user of the organization learns its upstream organization.
    assert await store.upstream_actor(bob.org_id, bob.user_id) == ("org-1", None)
    assert await store.save_upstream_actor(
        alice.org_id, alice.user_id, "org-3", "user-b", 3, replace=True
    ) == (
        "org-3",
        "user-b",
    )
    assert await store.upstream_actor(alice.org_id, alice.user_id) == ("org-3", "user-b")
