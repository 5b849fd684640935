"""The SQL store on SQLite and on the real PostgreSQL: keys, slots, paging, liveness flushes, teleports."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory

from tether.store.base import (
    Heartbeat,
    ListQuery,
    Principal,
    Registration,
    SchemaTooNew,
    StatusUpdate,
    TeleportRow,
    UnknownCursor,
)
from tether.store.engine import _alembic_config
from tether.store.sql import SqlStore
from tether.store.tables import api_keys, environments


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[SqlStore]:
    s = SqlStore(database_url)
    await s.start()
    yield s
    await s.close()


async def principal(store: SqlStore, org: str = "acme", user: str = "alice") -> Principal:
    found = await store.authenticate(await store.create_key(org, user, "test", 1_000))
    assert found is not None
    return found


def reg(
    p: Principal, device: str, lease: str, at: int, instance: str | None = "server-1", **meta: object
) -> Registration:
    return Registration(p.org_id, p.user_id, device, instance, f"name-{device}", dict(meta), lease, at)


# ---- keys ---------------------------------------------------------------------------------------


async def test_keys_are_stored_only_as_hashes_and_authenticate_until_revoked(store: SqlStore) -> None:
    secret = await store.create_key("acme", "alice", "laptop", 1_000)
    random_part = secret.split("_", 2)[2]  # tk_<key id>_<random>
    assert len(random_part) >= 40
    async with store.engine.connect() as conn:
        rows = (await conn.execute(sa.select(api_keys))).mappings().all()
    [row] = rows
    for value in row.values():
        assert secret not in str(value) and random_part not in str(value)
    assert row["secret_hash"] != secret

    who = await store.authenticate(secret)
    assert who is not None and who.key_id == row["id"]
    assert await store.authenticate(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    assert await store.authenticate(hashlib.sha256(secret.encode()).hexdigest()) is None
    for junk in ("", "tk_", "tk_\x00_x", f"tk_{row['id']}", "Bearer " + secret):
        assert await store.authenticate(junk) is None

    [info] = await store.list_keys()
    assert (info.key_id, info.org_name, info.user_name, info.name, info.revoked_at) == (
        row["id"],
        "acme",
        "alice",
        "laptop",
        None,
    )
    assert await store.revoke_key(row["id"], 2_000) is True
    assert await store.authenticate(secret) is None
    assert await store.revoke_key(row["id"], 3_000) is False  # already revoked
    assert await store.revoke_key("no-such-key", 3_000) is False
    assert (await store.list_keys())[0].revoked_at == 2_000


async def test_organizations_and_users_are_created_on_first_use_and_reused(store: SqlStore) -> None:
    a1 = await principal(store, "acme", "alice")
    a2 = await principal(store, "acme", "alice")
    b = await principal(store, "acme", "bob")
    other = await principal(store, "globex", "alice")
    assert a1.key_id != a2.key_id and (a1.org_id, a1.user_id) == (a2.org_id, a2.user_id)
    assert b.org_id == a1.org_id and b.user_id != a1.user_id
    assert other.org_id != a1.org_id and other.user_id != a1.user_id
    # Concurrent first use of a new organization creates it once.
    keys = await asyncio.gather(*(store.create_key("initech", f"u{i}", "k", 1) for i in range(5)))
    orgs = {p.org_id for p in [await store.authenticate(k) for k in keys] if p is not None}
    assert len(orgs) == 1


async def test_the_first_key_is_created_once_even_when_pods_race(store: SqlStore) -> None:
    made = await asyncio.gather(*(store.create_first_key("default", "developer", "dev", 1) for _ in range(5)))
    assert len([k for k in made if k is not None]) == 1
    assert await store.count_keys() == 1
    assert await store.create_first_key("default", "developer", "dev", 2) is None


# ---- environments -----------------------------------------------------------------------------


async def test_a_slot_keeps_its_row_across_registrations_and_reports_the_lease_it_replaces(
    store: SqlStore,
) -> None:
    p = await principal(store)
    first = await store.register(
        reg(p, "dev", "conn-1", 1_000, os="linux", workingDirectory="/w", gitBranch="main")
    )
    assert first.previous_connection_id is None
    assert first.row.connection_id == "conn-1" and first.row.first_seen_at == 1_000
    assert first.row.user_id == p.user_id and first.row.api_key_owner == p.user_id

    again = await store.register(reg(p, "dev", "conn-2", 2_000, os="darwin"))
    assert again.previous_connection_id == "conn-1"
    assert again.row.id == first.row.id
    assert (again.row.first_seen_at, again.row.last_seen_at) == (1_000, 2_000)
    # New metadata replaces the old, except what status frames set (the device re-sends it soon).
    assert again.row.metadata == {"os": "darwin", "workingDirectory": "/w", "gitBranch": "main"}
    assert await store.get_by_connection("conn-1") is None
    current = await store.get_by_connection("conn-2")
    assert current is not None and current.id == first.row.id

    other_instance = await store.register(reg(p, "dev", "conn-3", 3_000, instance="listen-1"))
    legacy = await store.register(reg(p, "dev", "conn-4", 4_000, instance=None))
    legacy_again = await store.register(reg(p, "dev", "conn-5", 5_000, instance=None))
    assert len({first.row.id, other_instance.row.id, legacy.row.id}) == 3
    assert legacy_again.row.id == legacy.row.id and legacy_again.row.listener_instance_id is None
    assert [r.id for r in await store.get_by_device(p.org_id, "dev")] == [
        first.row.id,
        other_instance.row.id,
        legacy.row.id,
    ]

    elsewhere = await principal(store, "globex")
    theirs = await store.register(reg(elsewhere, "dev", "conn-6", 6_000))
    assert theirs.previous_connection_id is None and theirs.row.id != first.row.id
    assert await store.get_by_device(elsewhere.org_id, "dev") == [theirs.row]


async def test_concurrent_registrations_of_one_slot_make_one_row_and_chain_every_lease(
    store: SqlStore,
) -> None:
    p = await principal(store)
    leases = [f"conn-{i}" for i in range(8)]
    results = await asyncio.gather(
        *(store.register(reg(p, "dev", lease, 1_000 + i)) for i, lease in enumerate(leases))
    )
    rows = await store.get_by_device(p.org_id, "dev")
    assert len(rows) == 1 and len({r.row.id for r in results}) == 1
    previous = [r.previous_connection_id for r in results]
    # Exactly one registration created the slot; every other lease was replaced exactly once, so the
    # router closes every superseded device socket and none twice.
    assert previous.count(None) == 1
    replaced = [c for c in previous if c is not None]
    assert len(replaced) == len(set(replaced)) == 7
    assert sorted([*replaced, rows[0].connection_id]) == sorted(leases)


async def test_listing_is_ordered_by_first_registration_and_pages_by_cursor(store: SqlStore) -> None:
    p = await principal(store)
    bob = await principal(store, user="bob")
    other = await principal(store, "globex")
    # Out-of-order and tied first-seen times.
    for i, at in enumerate([3_000, 1_000, 2_000, 2_000, 1_000, 5_000]):
        await store.register(reg(bob if i % 2 else p, f"dev-{i}", f"conn-{i}", at))
    await store.register(reg(other, "dev-x", "conn-x", 500))

    everything = await store.list_environments(ListQuery(p.org_id, 100))
    assert [(r.first_seen_at, r.id) for r in everything] == sorted(
        (r.first_seen_at, r.id) for r in everything
    )
    assert len(everything) == 6 and all(r.org_id == p.org_id for r in everything)

    paged, after = [], None
    while True:
        page = await store.list_environments(ListQuery(p.org_id, 4, after))
        paged += page
        if len(page) < 4:
            break
        after = page[-1].id
    assert [r.id for r in paged] == [r.id for r in everything]

    bobs = await store.list_environments(ListQuery(p.org_id, 100, user_id=bob.user_id))
    assert {r.device_id for r in bobs} == {"dev-1", "dev-3", "dev-5"}
    assert await store.list_environments(ListQuery(p.org_id, 100, user_id="a\x00b")) == []
    for cursor in ("env-unknown", "a\x00b", (await store.get_by_device(other.org_id, "dev-x"))[0].id):
        with pytest.raises(UnknownCursor):
            await store.list_environments(ListQuery(p.org_id, 10, cursor))

    await store.mark_connected("conn-2", "pod-a", 9_000)
    connected = await store.list_environments(ListQuery(p.org_id, 100, only_connected=True))
    assert [r.connection_id for r in connected] == ["conn-2"]
    assert connected[0].pod_id == "pod-a" and connected[0].connected_at == 9_000


async def test_lookups_by_values_no_row_can_hold_answer_not_found(store: SqlStore) -> None:
    p = await principal(store)
    assert await store.get_by_device(p.org_id, "a\x00b") == []
    assert await store.get_by_connection("conn-\x00") is None
    assert await store.get_teleport(p.org_id, "tp-\x00") is None
    assert await store.find_teleport_by_key(p.org_id, "\x00") is None
    assert await store.revoke_key("\x00", 1) is False


async def test_heartbeat_flushes_never_move_time_backwards(store: SqlStore) -> None:
    p = await principal(store)
    await store.register(reg(p, "dev", "conn-1", 1_000))
    await store.mark_connected("conn-1", "pod-a", 2_000)
    await store.flush_heartbeats([Heartbeat("conn-1", 5_000), Heartbeat("conn-unknown", 9_000)])
    [row] = await store.get_by_device(p.org_id, "dev")
    assert (row.last_heartbeat, row.last_seen_at) == (5_000, 5_000)

    await store.flush_heartbeats([Heartbeat("conn-1", 4_000)])  # a stale value from a slower pod
    [row] = await store.get_by_device(p.org_id, "dev")
    assert (row.last_heartbeat, row.last_seen_at) == (5_000, 5_000)

    await store.update_status("conn-1", StatusUpdate(), 8_000)  # activity later than the next beat
    await store.flush_heartbeats([Heartbeat("conn-1", 6_000)])
    [row] = await store.get_by_device(p.org_id, "dev")
    assert row.last_heartbeat == 6_000 and row.last_seen_at == 8_000


async def test_status_updates_patch_metadata_and_mode(store: SqlStore) -> None:
    p = await principal(store)
    await store.register(reg(p, "dev", "conn-1", 1_000, os="linux", gitBranch="main", workingDirectory="/a"))
    patch = {"workingDirectory": "/b", "gitBranch": None, "permissionMode": "acceptEdits"}
    await store.update_status("conn-1", StatusUpdate("acceptEdits", True, patch), 2_000)
    [row] = await store.get_by_device(p.org_id, "dev")
    assert row.metadata == {"os": "linux", "workingDirectory": "/b", "permissionMode": "acceptEdits"}
    assert row.current_mode == "acceptEdits" and row.last_seen_at == 2_000

    await store.update_status("conn-1", StatusUpdate(None, False, {"workingDirectory": "/c"}), 3_000)
    [row] = await store.get_by_device(p.org_id, "dev")
    assert row.current_mode == "acceptEdits" and row.metadata["workingDirectory"] == "/c"
    await store.update_status("conn-1", StatusUpdate(None, True), 4_000)
    [row] = await store.get_by_device(p.org_id, "dev")
    assert row.current_mode is None
    await store.update_status("conn-unknown", StatusUpdate("default", True), 5_000)  # no error, no row


async def test_a_disconnect_only_clears_the_pod_that_holds_the_device(store: SqlStore) -> None:
    p = await principal(store)
    await store.register(reg(p, "dev", "conn-1", 1_000))
    await store.mark_connected("conn-1", "pod-b", 2_000)
    await store.mark_disconnected("conn-1", "pod-a", 3_000)  # a late close from the pod it left
    [row] = await store.get_by_device(p.org_id, "dev")
    assert (row.pod_id, row.connected_at) == ("pod-b", 2_000)
    await store.mark_disconnected("conn-1", "pod-b", 4_000)
    [row] = await store.get_by_device(p.org_id, "dev")
    assert (row.pod_id, row.connected_at, row.last_seen_at) == (None, None, 4_000)
    assert row.connection_id == "conn-1"  # the lease survives: the device may reconnect with it


async def test_rows_of_dead_pods_are_released(store: SqlStore) -> None:
    p = await principal(store)
    for i, pod in enumerate(["pod-a", "pod-b", "pod-c"]):
        await store.register(reg(p, f"dev-{i}", f"conn-{i}", 1_000))
        await store.mark_connected(f"conn-{i}", pod, 2_000)
    assert await store.clear_dead_pods({"pod-b"}, 3_000) == 2
    rows = await store.list_environments(ListQuery(p.org_id, 10))
    assert {r.device_id: r.pod_id for r in rows} == {"dev-0": None, "dev-1": "pod-b", "dev-2": None}


# ---- teleports --------------------------------------------------------------------------------


def teleport(p: Principal, tid: str, key: str | None) -> TeleportRow:
    return TeleportRow(
        tid,
        p.org_id,
        "agent-1",
        "conv-1",
        "conn-s",
        "conn-t",
        "dev-t",
        "t",
        "waiting_for_source",
        None,
        key,
        1,
        1,
    )


async def test_a_teleport_idempotency_key_is_unique_per_organization(store: SqlStore) -> None:
    p = await principal(store)
    other = await principal(store, "globex")
    first = await store.create_teleport(teleport(p, "tp-1", "key-1"))
    again = await store.create_teleport(teleport(p, "tp-2", "key-1"))
    assert again.id == first.id == "tp-1"
    assert await store.get_teleport(p.org_id, "tp-2") is None
    theirs = await store.create_teleport(teleport(other, "tp-3", "key-1"))
    assert theirs.id == "tp-3"
    assert await store.get_teleport(p.org_id, "tp-3") is None  # not visible across organizations
    # Without a key nothing is de-duplicated.
    assert (await store.create_teleport(teleport(p, "tp-4", None))).id == "tp-4"
    assert (await store.create_teleport(teleport(p, "tp-5", None))).id == "tp-5"
    found = await store.find_teleport_by_key(p.org_id, "key-1")
    assert found is not None and found.id == "tp-1"
    await store.update_teleport("tp-1", "failed", "no", 7)
    updated = await store.get_teleport(p.org_id, "tp-1")
    assert updated is not None and (updated.status, updated.error, updated.updated_at) == ("failed", "no", 7)


# ---- migrations -------------------------------------------------------------------------------


async def test_a_schema_from_a_newer_tether_is_refused(database_url: str) -> None:
    store = SqlStore(database_url)
    await store.start()
    async with store.engine.begin() as conn:
        await conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999_future'"))
    await store.close()
    again = SqlStore(database_url)
    try:
        with pytest.raises(SchemaTooNew, match="9999_future"):
            await again.start()
    finally:
        await again.close()


async def test_migrations_are_idempotent_and_create_the_schema(database_url: str) -> None:
    for _ in range(2):
        store = SqlStore(database_url)
        await store.start()
        await store.close()
    store = SqlStore(database_url)
    try:
        async with store.engine.connect() as conn:
            version = (await conn.execute(sa.text("SELECT version_num FROM alembic_version"))).scalar_one()
            tables = await conn.run_sync(lambda c: set(sa.inspect(c).get_table_names()))
        head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
        assert head is not None and version == head
        assert {"organizations", "users", "api_keys", "environments", "teleports"} <= tables
        assert "upstream_actors" in tables
        assert environments.name in tables
    finally:
        await store.close()
