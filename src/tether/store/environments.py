"""Environment rows in SQL: registration, listing, lookups, presence, heartbeats and status."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

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
from tether.store.batching import GroupCommit
from tether.store.rows import environment_row, environment_rows, new_id, storable
from tether.store.tables import environments

# Status-derived metadata keys survive a re-registration (the device re-sends them soon after).
_STATUS_METADATA_KEYS = ("workingDirectory", "gitBranch")


# Registrations share transactions (store/batching.py): at most this many in one, at most this many
# waiting for one. A batch holds SQLite's write lock for about a millisecond per 10 rows.
REGISTER_BATCH_MAX = 64
REGISTER_PENDING_MAX = 1024

_t = environments
_INSERT = _t.insert()
_REREGISTER = (
    _t.update()
    .where(_t.c.id == sa.bindparam("rid"))
    .values(
        connection_name=sa.bindparam("connection_name"),
        metadata=sa.bindparam("metadata", type_=_t.c.metadata.type),
        user_id=sa.bindparam("user_id"),
        api_key_owner=sa.bindparam("user_id"),
        last_seen_at=sa.bindparam("now"),
        connection_id=sa.bindparam("connection_id"),
        lease_issued_at=sa.bindparam("now"),
        connected_at=None,
        pod_id=None,
    )
)
# SQLite ignores FOR UPDATE; this no-op write as a transaction's first statement takes its write lock
# instead, so that the slots read next cannot change before the transaction writes them.
_SQLITE_WRITE_LOCK = _t.update().where(_t.c.id == "").values(last_seen_at=_t.c.last_seen_at)
_Slot = tuple[str, str, str]


def _slot(reg: Registration) -> _Slot:
    return (reg.org_id, reg.device_id, reg.listener_instance_id or "")


def _kept_metadata(reg: Registration, old: dict[str, Any] | None) -> dict[str, Any]:
    """A re-registration's metadata: what the device sent, plus the status-derived keys it did not."""
    metadata = dict(reg.metadata)
    for key in _STATUS_METADATA_KEYS:
        value = (old or {}).get(key)
        if key not in metadata and value is not None:
            metadata[key] = value
    return metadata


@functools.cache
def _list_statement(after: bool, user: bool, connected: bool) -> sa.Select[Any]:
    """One page of the list, in (first_seen_at, id) order, as one statement per filter combination
    (built once: composing it per request cost more than running it). Each combination has an
    index that matches its WHERE and ORDER BY (migration 0004), so the database seeks instead of
    walking the organization's rows."""
    conds: list[sa.ColumnElement[bool]] = [_t.c.org_id == sa.bindparam("org")]
    if user:
        conds.append(_t.c.user_id == sa.bindparam("user"))
    if connected:
        conds.append(_t.c.pod_id.is_not(None))
    if after:
        # The cursor row's keys in a subquery (one round trip); a row-value comparison, so both SQLite
        # and PostgreSQL seek the index instead of scanning (an OR of the two cases defeats it).
        last = _t.alias("after_row")
        keys = (
            sa.select(last.c.first_seen_at, last.c.id)
            .where(last.c.id == sa.bindparam("after"), last.c.org_id == sa.bindparam("org"))
            .scalar_subquery()
        )
        conds.append(sa.tuple_(_t.c.first_seen_at, _t.c.id) > keys)
    return sa.select(_t).where(*conds).order_by(_t.c.first_seen_at, _t.c.id).limit(sa.bindparam("limit"))


class EnvironmentsSql:
    engine: AsyncEngine
    registrations: GroupCommit[Registration, RegisterResult]

    def _start_registrations(
        self, max_batch: int = REGISTER_BATCH_MAX, max_pending: int = REGISTER_PENDING_MAX
    ) -> None:
        self.registrations = GroupCommit(self._register_batch, max_batch, max_pending)

    async def register(self, reg: Registration) -> RegisterResult:
        return await self.registrations.submit(reg)

    async def _register_batch(self, regs: list[Registration]) -> list[RegisterResult | Exception]:
        """One transaction for the batch; when it fails, each registration alone, so one bad row (or a
        slot another pod inserted meanwhile) costs only its own caller an error."""
        outcomes: dict[int, RegisterResult | Exception] = {}
        pending = list(range(len(regs)))
        while pending:
            # A slot registered twice in one batch: the second waits for the next transaction, where it
            # sees (and reports as replaced) the lease the first was given.
            seen: set[_Slot] = set()
            group: list[int] = []
            later: list[int] = []
            for i in pending:
                (later if _slot(regs[i]) in seen else group).append(i)
                seen.add(_slot(regs[i]))
            if len(group) > 1:
                try:
                    together = await self._register_together([regs[i] for i in group])
                    outcomes.update(zip(group, together, strict=True))
                    group = []
                except Exception:
                    pass  # each alone, below
            for i in group:
                try:
                    outcomes[i] = await self._register_alone(regs[i])
                except Exception as exc:
                    outcomes[i] = exc
            pending = later
        return [outcomes[i] for i in range(len(regs))]

    async def _register_alone(self, reg: Registration) -> RegisterResult:
        for _ in range(2):
            try:
                [result] = await self._register_together([reg])
                return result
            except IntegrityError:
                # Another pod inserted this slot first: the retry finds its row and replaces its lease.
                continue
        # A row that breaks a constraint itself fails every attempt: this one's error is its caller's.
        [result] = await self._register_together([reg])
        return result

    async def _register_together(self, regs: list[Registration]) -> list[RegisterResult]:
        """Registrations of distinct slots in one transaction: lock, read the known slots, insert the
        new ones and re-lease the known ones (one statement each, many rows), no read back."""
        async with self.engine.begin() as conn:
            # Lock the slots while reading them, so concurrent re-registrations of one slot (on other
            # pods) queue up and each sees the lease it replaces: none is lost without being reported
            # as previous. Rows are locked in id order, so two pods' batches cannot deadlock.
            if conn.dialect.name == "sqlite":
                await conn.execute(_SQLITE_WRITE_LOCK)
            # By device id (the slot index's leading columns); other listener slots of these devices
            # come along and are left alone. A row-value IN over the whole slot defeats the index on
            # both backends (a scan per batch).
            read = (
                sa.select(_t)
                .where(
                    _t.c.org_id.in_(sorted({r.org_id for r in regs})),
                    _t.c.device_id.in_(sorted({r.device_id for r in regs})),
                )
                .order_by(_t.c.id)
            )
            if conn.dialect.name != "sqlite":
                read = read.with_for_update()
            existing = {
                (m["org_id"], m["device_id"], m["listener_instance_id"]): m
                for m in (await conn.execute(read)).mappings().all()
            }
            inserts: list[dict[str, Any]] = []
            updates: list[dict[str, Any]] = []
            results: list[RegisterResult] = []
            for reg in regs:
                old = existing.get(_slot(reg))
                if old is None:
                    row = EnvironmentRow(
                        id=new_id("env"),
                        org_id=reg.org_id,
                        device_id=reg.device_id,
                        listener_instance_id=reg.listener_instance_id or None,
                        connection_name=reg.connection_name,
                        metadata=dict(reg.metadata),
                        user_id=reg.user_id,
                        api_key_owner=reg.user_id,
                        current_mode=None,
                        first_seen_at=reg.now_ms,
                        last_seen_at=reg.now_ms,
                        connection_id=reg.connection_id,
                        lease_issued_at=reg.now_ms,
                        connected_at=None,
                        pod_id=None,
                        last_heartbeat=None,
                    )
                    inserts.append(
                        {
                            "id": row.id,
                            "org_id": row.org_id,
                            "device_id": row.device_id,
                            "listener_instance_id": reg.listener_instance_id or "",
                            "connection_name": row.connection_name,
                            "metadata": row.metadata,
                            "user_id": row.user_id,
                            "api_key_owner": row.api_key_owner,
                            "first_seen_at": row.first_seen_at,
                            "last_seen_at": row.last_seen_at,
                            "connection_id": row.connection_id,
                            "lease_issued_at": row.lease_issued_at,
                        }
                    )
                    results.append(RegisterResult(row=row, previous_connection_id=None))
                    continue
                row = environment_row(old)
                previous = row.connection_id
                row.connection_name = reg.connection_name
                row.metadata = _kept_metadata(reg, old["metadata"])
                row.user_id = row.api_key_owner = reg.user_id
                row.last_seen_at = row.lease_issued_at = reg.now_ms
                row.connection_id = reg.connection_id
                row.connected_at = row.pod_id = None
                updates.append(
                    {
                        "rid": row.id,
                        "connection_name": row.connection_name,
                        "metadata": row.metadata,
                        "user_id": reg.user_id,
                        "now": reg.now_ms,
                        "connection_id": reg.connection_id,
                    }
                )
                results.append(RegisterResult(row=row, previous_connection_id=previous))
            if inserts:
                await conn.execute(_INSERT, inserts)
            if updates:
                await conn.execute(_REREGISTER, updates)
        return results

    async def list_environments(self, query: ListQuery) -> list[EnvironmentRow]:
        if query.after is not None and not storable(query.after):
            raise UnknownCursor(query.after)
        if query.user_id is not None and not storable(query.user_id):
            return []
        params: dict[str, Any] = {"org": query.org_id, "user": query.user_id, "after": query.after}
        params["limit"] = query.limit
        stmt = _list_statement(query.after is not None, query.user_id is not None, query.only_connected)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(stmt, params)).all()
            if not rows and query.after is not None:
                # An empty page after a cursor: the end of the list, or a cursor this org cannot see.
                known = sa.select(_t.c.id).where(_t.c.id == query.after, _t.c.org_id == query.org_id)
                if (await conn.execute(known)).first() is None:
                    raise UnknownCursor(query.after)
        return environment_rows(rows)

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

    async def reclaim(self, pod_id: str, connection_ids: Sequence[str], now_ms: int) -> int:
        if not connection_ids:
            return 0
        t = environments
        at: sa.BindParameter[int] = sa.bindparam("at")
        stmt = (
            t.update()
            .where(t.c.connection_id == sa.bindparam("cid"), t.c.pod_id.is_(None))
            .values(connected_at=at, pod_id=sa.bindparam("pod"), last_heartbeat=at, last_seen_at=at)
        )
        params = [{"cid": c, "pod": pod_id, "at": now_ms} for c in connection_ids]
        async with self.engine.begin() as conn:
            result = await conn.execute(stmt, params)
        return int(result.rowcount or 0)

    async def clear_dead_pods(self, live_pods: set[str], now_ms: int) -> int:
        t = environments
        conds: list[sa.ColumnElement[bool]] = [t.c.pod_id.is_not(None)]
        if live_pods:
            conds.append(t.c.pod_id.not_in(sorted(live_pods)))
        async with self.engine.begin() as conn:
            result = await conn.execute(t.update().where(*conds).values(pod_id=None, connected_at=None))
        return int(result.rowcount or 0)
