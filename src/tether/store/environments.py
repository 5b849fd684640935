"""Environment rows in SQL: registration, listing, lookups, presence, heartbeats and status."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tether.store.base import (
    EnvironmentRow,
    Heartbeat,
    ListQuery,
    PresenceChange,
    RegisterResult,
    Registration,
    StatusUpdate,
    UnknownCursor,
)
from tether.store.rows import environment_row, new_id, storable
from tether.store.tables import environments

# Status-derived metadata keys survive a re-registration (the device re-sends them soon after).
_STATUS_METADATA_KEYS = ("workingDirectory", "gitBranch")


class EnvironmentsSql:
    engine: AsyncEngine

    async def register(self, reg: Registration) -> RegisterResult:
        slot = (
            environments.c.org_id == reg.org_id,
            environments.c.device_id == reg.device_id,
            environments.c.listener_instance_id == (reg.listener_instance_id or ""),
        )
        for _ in range(3):
            try:
                async with self.engine.begin() as conn:
                    # Lock the slot while reading it, so concurrent re-registrations of one slot queue
                    # up and each sees the lease it replaces (none is lost without being reported as
                    # previous). PostgreSQL: FOR UPDATE. SQLite ignores that; a no-op write as the first
                    # statement takes its database write lock instead.
                    if conn.dialect.name == "sqlite":
                        await conn.execute(
                            environments.update()
                            .where(*slot)
                            .values(last_seen_at=environments.c.last_seen_at)
                        )
                    locked = sa.select(environments).where(*slot).with_for_update()
                    existing = (await conn.execute(locked)).mappings().first()
                    if existing is None:
                        row_id, previous = await self._insert(conn, reg), None
                    else:
                        row_id, previous = existing["id"], existing["connection_id"]
                        await self._reregister(conn, reg, existing)
                    fresh = (
                        (await conn.execute(sa.select(environments).where(environments.c.id == row_id)))
                        .mappings()
                        .one()
                    )
                return RegisterResult(row=environment_row(fresh), previous_connection_id=previous)
            except IntegrityError:
                # Two first registrations of one slot raced; the loser retries as an update.
                continue
        raise RuntimeError("registration kept conflicting; giving up")

    async def _insert(self, conn: AsyncConnection, reg: Registration) -> str:
        row_id = new_id("env")
        await conn.execute(
            environments.insert().values(
                id=row_id,
                org_id=reg.org_id,
                device_id=reg.device_id,
                listener_instance_id=reg.listener_instance_id or "",
                connection_name=reg.connection_name,
                metadata=reg.metadata,
                user_id=reg.user_id,
                api_key_owner=reg.user_id,
                first_seen_at=reg.now_ms,
                last_seen_at=reg.now_ms,
                connection_id=reg.connection_id,
                lease_issued_at=reg.now_ms,
            )
        )
        return row_id

    async def _reregister(self, conn: AsyncConnection, reg: Registration, existing: sa.RowMapping) -> None:
        """A new lease for a known slot; status-derived metadata survives it."""
        row_id = existing["id"]
        metadata = dict(reg.metadata)
        for key in _STATUS_METADATA_KEYS:
            old = (existing["metadata"] or {}).get(key)
            if key not in metadata and old is not None:
                metadata[key] = old
        await conn.execute(
            environments.update()
            .where(environments.c.id == row_id)
            .values(
                connection_name=reg.connection_name,
                metadata=metadata,
                user_id=reg.user_id,
                api_key_owner=reg.user_id,
                last_seen_at=reg.now_ms,
                connection_id=reg.connection_id,
                lease_issued_at=reg.now_ms,
                connected_at=None,
                pod_id=None,
            )
        )

    async def list_environments(self, query: ListQuery) -> list[EnvironmentRow]:
        t = environments
        if query.after is not None and not storable(query.after):
            raise UnknownCursor(query.after)
        if query.user_id is not None and not storable(query.user_id):
            return []
        conds: list[sa.ColumnElement[bool]] = [t.c.org_id == query.org_id]
        if query.user_id is not None:
            conds.append(t.c.user_id == query.user_id)
        if query.only_connected:
            conds.append(t.c.pod_id.is_not(None))
        async with self.engine.connect() as conn:
            if query.after is not None:
                cursor = (
                    await conn.execute(
                        sa.select(t.c.first_seen_at, t.c.id).where(
                            t.c.id == query.after, t.c.org_id == query.org_id
                        )
                    )
                ).first()
                if cursor is None:
                    raise UnknownCursor(query.after)
                # A row-value comparison, so both SQLite and PostgreSQL seek the (org, order) index
                # instead of scanning: an OR of the two cases defeats the index.
                conds.append(
                    sa.tuple_(t.c.first_seen_at, t.c.id)
                    > sa.tuple_(sa.literal(cursor.first_seen_at), sa.literal(cursor.id))
                )
            q = sa.select(t).where(*conds).order_by(t.c.first_seen_at, t.c.id).limit(query.limit)
            rows = (await conn.execute(q)).mappings().all()
        return [environment_row(r) for r in rows]

    async def get_by_device(self, org_id: str, device_id: str) -> list[EnvironmentRow]:
        if not storable(device_id):
            return []
        q = (
            sa.select(environments)
            .where(environments.c.org_id == org_id, environments.c.device_id == device_id)
            .order_by(environments.c.first_seen_at, environments.c.id)
        )
        async with self.engine.connect() as conn:
            return [environment_row(r) for r in (await conn.execute(q)).mappings().all()]

    async def get_by_connection(self, connection_id: str) -> EnvironmentRow | None:
        if not storable(connection_id):
            return None
        q = sa.select(environments).where(environments.c.connection_id == connection_id)
        async with self.engine.connect() as conn:
            row = (await conn.execute(q)).mappings().first()
        return None if row is None else environment_row(row)

    async def delete_environment(self, org_id: str, environment_id: str) -> EnvironmentRow | None:
        if not storable(environment_id):
            return None
        t = environments
        async with self.engine.begin() as conn:
            row = (
                (await conn.execute(sa.select(t).where(t.c.id == environment_id, t.c.org_id == org_id)))
                .mappings()
                .first()
            )
            if row is None:
                return None
            await conn.execute(t.delete().where(t.c.id == environment_id))
        return environment_row(row)

    async def mark_connected(self, connection_id: str, pod_id: str, now_ms: int) -> None:
        await self.write_presence([PresenceChange(connection_id, pod_id, True, now_ms)])

    async def mark_disconnected(self, connection_id: str, pod_id: str, now_ms: int) -> None:
        await self.write_presence([PresenceChange(connection_id, pod_id, False, now_ms)])

    async def write_presence(self, changes: Sequence[PresenceChange]) -> None:
        t = environments
        ups = [{"cid": c.connection_id, "pod": c.pod_id, "at": c.at_ms} for c in changes if c.connected]
        downs = [{"cid": c.connection_id, "pod": c.pod_id, "at": c.at_ms} for c in changes if not c.connected]
        at: sa.BindParameter[int] = sa.bindparam("at")
        async with self.engine.begin() as conn:
            if ups:
                await conn.execute(
                    t.update()
                    .where(t.c.connection_id == sa.bindparam("cid"))
                    .values(connected_at=at, pod_id=sa.bindparam("pod"), last_heartbeat=at, last_seen_at=at),
                    ups,
                )
            if downs:
                # Only the pod that claimed the lease clears it: a late close from a pod the device
                # already left must not undo the new pod's claim.
                await conn.execute(
                    t.update()
                    .where(t.c.connection_id == sa.bindparam("cid"), t.c.pod_id == sa.bindparam("pod"))
                    .values(connected_at=None, pod_id=None, last_seen_at=at),
                    downs,
                )

    async def flush_heartbeats(self, beats: Sequence[Heartbeat]) -> None:
        if not beats:
            return
        t = environments
        stmt = (
            t.update()
            .where(
                t.c.connection_id == sa.bindparam("cid"),
                sa.or_(t.c.last_heartbeat.is_(None), t.c.last_heartbeat < sa.bindparam("hb")),
            )
            .values(
                last_heartbeat=sa.bindparam("hb"),
                # lastSeenAt may already be later (a registration, a status frame): keep the later one.
                last_seen_at=sa.case(
                    (t.c.last_seen_at < sa.bindparam("hb"), sa.bindparam("hb")), else_=t.c.last_seen_at
                ),
            )
        )
        async with self.engine.begin() as conn:
            await conn.execute(stmt, [{"cid": b.connection_id, "hb": b.last_heartbeat} for b in beats])

    async def update_status(self, connection_id: str, update: StatusUpdate, now_ms: int) -> None:
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    sa.select(environments.c.id, environments.c.metadata).where(
                        environments.c.connection_id == connection_id
                    )
                )
            ).first()
            if row is None:
                return
            values: dict[str, Any] = {"last_seen_at": now_ms}
            if update.metadata_patch:
                metadata = dict(row.metadata or {})
                for key, value in update.metadata_patch.items():
                    if value is None:
                        metadata.pop(key, None)
                    else:
                        metadata[key] = value
                values["metadata"] = metadata
            if update.set_mode:
                values["current_mode"] = update.current_mode
            await conn.execute(environments.update().where(environments.c.id == row.id).values(**values))

    async def clear_dead_pods(self, live_pods: set[str], now_ms: int) -> int:
        t = environments
        conds: list[sa.ColumnElement[bool]] = [t.c.pod_id.is_not(None)]
        if live_pods:
            conds.append(t.c.pod_id.not_in(sorted(live_pods)))
        async with self.engine.begin() as conn:
            result = await conn.execute(t.update().where(*conds).values(pod_id=None, connected_at=None))
        return int(result.rowcount or 0)
