"""Group commit of registrations (store/batching.py): concurrent calls share transactions, and each
caller still gets its own outcome. On SQLite and on the real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa

from tether.store.base import Principal, RegisterResult, Registration, StatusUpdate
from tether.store.batching import GroupCommit
from tether.store.sql import SqlStore
from tether.store.tables import environments

BATCH = 4


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[SqlStore]:
    s = SqlStore(database_url, register_batch=BATCH)
    await s.start()
    yield s
    await s.close()


async def principal(store: SqlStore) -> Principal:
    found = await store.authenticate(await store.create_key("acme", "alice", "test", 1_000))
    assert found is not None
    return found


def reg(p: Principal, device: str, lease: str, org_id: str | None = None) -> Registration:
    return Registration(
        org_id or p.org_id, p.user_id, device, "server-1", f"name-{device}", {"n": 1}, lease, 1
    )


async def leases(store: SqlStore) -> dict[str, str | None]:
    async with store.engine.connect() as conn:
        rows = (await conn.execute(sa.select(environments.c.device_id, environments.c.connection_id))).all()
    return {device: lease for device, lease in rows}


async def test_concurrent_registrations_share_bounded_batches_and_each_gets_its_own_row(
    store: SqlStore,
) -> None:
    p = await principal(store)
    results = await asyncio.gather(*(store.register(reg(p, f"dev-{i}", f"conn-{i}")) for i in range(10)))
    assert [r.row.connection_id for r in results] == [f"conn-{i}" for i in range(10)]
    assert [r.row.device_id for r in results] == [f"dev-{i}" for i in range(10)]
    assert all(r.previous_connection_id is None for r in results)
    assert len({r.row.id for r in results}) == 10
    assert await leases(store) == {f"dev-{i}": f"conn-{i}" for i in range(10)}
    # Ten calls at once: grouped (fewer transactions than calls), never more than BATCH in one.
    assert 1 < store.registrations.largest <= BATCH
    assert store.registrations.batches < 10


async def test_a_failing_registration_fails_alone_and_the_rest_of_its_batch_is_stored(
    store: SqlStore,
) -> None:
    p = await principal(store)
    batch = [
        reg(p, "dev-a", "conn-a"),
        reg(p, "dev-bad", "conn-bad", org_id="no-such-org"),
        reg(p, "dev-b", "conn-b"),
    ]
    outcomes = await asyncio.gather(*(store.register(r) for r in batch), return_exceptions=True)
    good_a, bad, good_b = outcomes
    assert isinstance(good_a, RegisterResult) and good_a.row.connection_id == "conn-a"
    assert isinstance(good_b, RegisterResult) and good_b.row.connection_id == "conn-b"
    assert isinstance(bad, sa.exc.IntegrityError)  # its organization does not exist
    assert await leases(store) == {"dev-a": "conn-a", "dev-b": "conn-b"}
    # The store keeps working after the failed batch.
    again = await store.register(reg(p, "dev-a", "conn-a2"))
    assert again.previous_connection_id == "conn-a"


async def test_one_slot_twice_in_a_batch_is_applied_in_order(store: SqlStore) -> None:
    p = await principal(store)
    first, second = await asyncio.gather(
        store.register(reg(p, "dev", "conn-1")), store.register(reg(p, "dev", "conn-2"))
    )
    assert first.previous_connection_id is None
    assert second.previous_connection_id == "conn-1"  # the lease it replaced is reported, not lost
    assert first.row.id == second.row.id
    assert await leases(store) == {"dev": "conn-2"}


async def test_a_reregistration_in_a_batch_returns_the_row_as_stored(store: SqlStore) -> None:
    p = await principal(store)
    await store.register(reg(p, "dev", "conn-1"))
    await store.update_status("conn-1", StatusUpdate(current_mode="plan", set_mode=True), 5)
    results = await asyncio.gather(
        store.register(reg(p, "dev", "conn-2")), store.register(reg(p, "x", "conn-x"))
    )
    [stored] = await store.get_by_device(p.org_id, "dev")
    assert results[0].row == stored  # what the batch computed is what a read gives back
    assert stored.current_mode == "plan" and stored.connection_id == "conn-2"


# ---- the batcher itself -------------------------------------------------------------------------


async def test_each_submitter_gets_its_own_outcome_and_batches_stay_bounded() -> None:
    seen: list[list[int]] = []

    async def apply(items: list[int]) -> list[str | Exception]:
        seen.append(items)
        return [ValueError(f"odd {i}") if i % 2 else f"even {i}" for i in items]

    commit: GroupCommit[int, str] = GroupCommit(apply, max_batch=3, max_pending=100)
    outcomes = await asyncio.gather(*(commit.submit(i) for i in range(8)), return_exceptions=True)
    for i, outcome in enumerate(outcomes):
        if i % 2:
            assert isinstance(outcome, ValueError) and str(outcome) == f"odd {i}"
        else:
            assert outcome == f"even {i}"
    assert sorted(i for batch in seen for i in batch) == list(range(8))  # each item applied once
    assert max(len(b) for b in seen) <= 3 and commit.largest == 3
    await commit.close()


async def test_a_batch_that_raises_fails_each_of_its_submitters_and_the_next_batch_still_runs() -> None:
    calls = 0

    async def apply(items: list[int]) -> list[int | Exception]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("database gone")
        return [i * 10 for i in items]

    commit: GroupCommit[int, int] = GroupCommit(apply, max_batch=10, max_pending=10)
    first = await asyncio.gather(commit.submit(1), commit.submit(2), return_exceptions=True)
    assert all(isinstance(o, ConnectionError) for o in first)
    assert await commit.submit(3) == 30
    await commit.close()


async def test_submitters_beyond_the_pending_bound_wait_for_room() -> None:
    release = asyncio.Event()

    async def apply(items: list[int]) -> list[int | Exception]:
        await release.wait()
        return list(items)

    commit: GroupCommit[int, int] = GroupCommit(apply, max_batch=1, max_pending=2)
    tasks = [asyncio.create_task(commit.submit(i)) for i in range(5)]
    for _ in range(5):
        await asyncio.sleep(0)  # let every submitter run as far as it can
    # One item is being applied, two wait in the queue, two submitters wait for room.
    assert commit.batches == 1 and commit.pending == 2
    assert sum(1 for t in tasks if not t.done()) == 5
    release.set()
    assert await asyncio.gather(*tasks) == [0, 1, 2, 3, 4]
    assert commit.largest == 1
    await commit.close()
