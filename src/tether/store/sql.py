"""The SQLAlchemy store: one implementation for SQLite (embedded) and PostgreSQL (scaled)."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from tether.store.base import (
    ApiKeyInfo,
    EnvironmentRow,
    Heartbeat,
    ListQuery,
    PresenceChange,
    Principal,
    RegisterResult,
    Registration,
    SchemaTooNew,
    StatusUpdate,
    TeleportRow,
    UnknownCursor,
)
from tether.store.tables import api_keys, environments, organizations, teleports, users

KEY_PREFIX = "tk_"
# Keys carry 256 bits of randomness, so a fast hash is enough: no offline guessing is feasible.
_HASH = hashlib.sha256

# Status-derived metadata keys survive a re-registration (the device re-sends them soon after).
_STATUS_METADATA_KEYS = ("workingDirectory", "gitBranch")


def _hash_secret(secret: str) -> str:
    return _HASH(secret.encode()).hexdigest()


_KEY_ID = re.compile(r"[0-9a-f]{16}")


def storable(text: str) -> bool:
    """Whether `text` can be stored at all: PostgreSQL text cannot hold NUL, so no row has one.

    Lookups by such a value answer "not found" instead of sending it to the database, which would fail.
    """
    return "\x00" not in text


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    return cfg


# Arbitrary constant: the PostgreSQL advisory lock serialising the migrations of pods starting at once.
_MIGRATION_LOCK = 0x7E7E_0001


def _upgrade(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        # Held to the end of the transaction, so the second pod sees the first pod's finished schema.
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
    cfg = _alembic_config()
    cfg.attributes["connection"] = connection
    _check_not_newer(connection)
    command.upgrade(cfg, "head")


def _check_not_newer(connection: Connection) -> None:
    current = MigrationContext.configure(connection).get_current_revision()
    if current is None:
        return
    known = {rev.revision for rev in ScriptDirectory.from_config(_alembic_config()).walk_revisions()}
    if current not in known:
        raise SchemaTooNew(
            f"the database schema is at revision {current!r}, which this Tether does not know; "
            "it was migrated by a newer version. Upgrade Tether or point TETHER_DATABASE_URL elsewhere."
        )


def _engine(url: str) -> AsyncEngine:
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 30}
    else:
        kwargs["pool_size"] = 10
        kwargs["max_overflow"] = 20
        kwargs["pool_pre_ping"] = True
    engine = create_async_engine(url, **kwargs)
    if url.startswith("sqlite"):

        @sa.event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    return engine


def _row(m: sa.RowMapping) -> EnvironmentRow:
    return EnvironmentRow(
        id=m["id"],
        org_id=m["org_id"],
        device_id=m["device_id"],
        listener_instance_id=m["listener_instance_id"] or None,
        connection_name=m["connection_name"],
        metadata=dict(m["metadata"] or {}),
        user_id=m["user_id"],
        api_key_owner=m["api_key_owner"],
        current_mode=m["current_mode"],
        first_seen_at=m["first_seen_at"],
        last_seen_at=m["last_seen_at"],
        connection_id=m["connection_id"],
        lease_issued_at=m["lease_issued_at"],
        connected_at=m["connected_at"],
        pod_id=m["pod_id"],
        last_heartbeat=m["last_heartbeat"],
    )


def _teleport(m: sa.RowMapping) -> TeleportRow:
    return TeleportRow(**{c.name: m[c.name] for c in teleports.columns})


class SqlStore:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = _engine(url)

    async def start(self) -> None:
        if self.url.startswith("sqlite"):
            path = self.url.split(":///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        async with self.engine.begin() as conn:
            await conn.run_sync(_upgrade)

    async def close(self) -> None:
        await self.engine.dispose()

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    # ---- organizations, users, keys -------------------------------------------------------

    async def _ensure_org_user(self, conn: AsyncConnection, org: str, user: str, now: int) -> tuple[str, str]:
        org_id = (
            await conn.execute(sa.select(organizations.c.id).where(organizations.c.name == org))
        ).scalar()
        if org_id is None:
            org_id = new_id("org")
            await conn.execute(organizations.insert().values(id=org_id, name=org, created_at=now))
        user_q = sa.select(users.c.id).where(users.c.org_id == org_id, users.c.name == user)
        user_id = (await conn.execute(user_q)).scalar()
        if user_id is None:
            user_id = new_id("user")
            await conn.execute(users.insert().values(id=user_id, org_id=org_id, name=user, created_at=now))
        return org_id, user_id

    async def create_key(self, org_name: str, user_name: str, key_name: str, now_ms: int) -> str:
        for attempt in range(3):
            try:
                async with self.engine.begin() as conn:
                    return await self._insert_key(conn, org_name, user_name, key_name, now_ms)
            except IntegrityError:
                # Another process created the same organization or user first; use theirs.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def create_first_key(self, org_name: str, user_name: str, key_name: str, now_ms: int) -> str | None:
        async with self.engine.begin() as conn:
            await self._lock_keys(conn)
            if (await conn.execute(sa.select(sa.func.count()).select_from(api_keys))).scalar():
                return None
            return await self._insert_key(conn, org_name, user_name, key_name, now_ms)

    async def _lock_keys(self, conn: AsyncConnection) -> None:
        """Serialise "create a key if there is none" between pods sharing one database."""
        if conn.dialect.name == "postgresql":
            await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK + 1})
        else:
            # A write as the first statement takes SQLite's write lock before the count is read.
            await conn.execute(api_keys.update().where(sa.false()).values(name=api_keys.c.name))

    async def _insert_key(
        self, conn: AsyncConnection, org_name: str, user_name: str, key_name: str, now_ms: int
    ) -> str:
        key_id = uuid.uuid4().hex[:16]
        secret = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        org_id, user_id = await self._ensure_org_user(conn, org_name, user_name, now_ms)
        await conn.execute(
            api_keys.insert().values(
                id=key_id,
                org_id=org_id,
                user_id=user_id,
                name=key_name,
                secret_hash=_hash_secret(secret),
                created_at=now_ms,
            )
        )
        return secret

    async def list_keys(self) -> list[ApiKeyInfo]:
        q = (
            sa.select(
                api_keys.c.id,
                api_keys.c.name,
                api_keys.c.org_id,
                organizations.c.name.label("org_name"),
                api_keys.c.user_id,
                users.c.name.label("user_name"),
                api_keys.c.created_at,
                api_keys.c.revoked_at,
            )
            .join(organizations, organizations.c.id == api_keys.c.org_id)
            .join(users, users.c.id == api_keys.c.user_id)
            .order_by(api_keys.c.created_at, api_keys.c.id)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(q)).mappings().all()
        return [
            ApiKeyInfo(
                key_id=r["id"],
                name=r["name"],
                org_id=r["org_id"],
                org_name=r["org_name"],
                user_id=r["user_id"],
                user_name=r["user_name"],
                created_at=r["created_at"],
                revoked_at=r["revoked_at"],
            )
            for r in rows
        ]

    async def revoke_key(self, key_id: str, now_ms: int) -> bool:
        if not storable(key_id):
            return False
        async with self.engine.begin() as conn:
            result = await conn.execute(
                api_keys.update()
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=now_ms)
            )
        return bool(result.rowcount)

    async def count_keys(self) -> int:
        async with self.engine.connect() as conn:
            return int((await conn.execute(sa.select(sa.func.count()).select_from(api_keys))).scalar() or 0)

    async def authenticate(self, secret: str) -> Principal | None:
        if not secret.startswith(KEY_PREFIX):
            return None
        key_id = secret[len(KEY_PREFIX) :].split("_", 1)[0]
        if not _KEY_ID.fullmatch(key_id):
            return None
        q = sa.select(api_keys).where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
        async with self.engine.connect() as conn:
            row = (await conn.execute(q)).mappings().first()
        if row is None or not hmac.compare_digest(row["secret_hash"], _hash_secret(secret)):
            return None
        return Principal(key_id=row["id"], org_id=row["org_id"], user_id=row["user_id"])

    # ---- environments ----------------------------------------------------------------------

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
                        previous = None
                    else:
                        row_id = existing["id"]
                        previous = existing["connection_id"]
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
                    fresh = (
                        (await conn.execute(sa.select(environments).where(environments.c.id == row_id)))
                        .mappings()
                        .one()
                    )
                return RegisterResult(row=_row(fresh), previous_connection_id=previous)
            except IntegrityError:
                # Two first registrations of one slot raced; the loser retries as an update.
                continue
        raise RuntimeError("registration kept conflicting; giving up")

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
        return [_row(r) for r in rows]

    async def get_by_device(self, org_id: str, device_id: str) -> list[EnvironmentRow]:
        if not storable(device_id):
            return []
        q = (
            sa.select(environments)
            .where(environments.c.org_id == org_id, environments.c.device_id == device_id)
            .order_by(environments.c.first_seen_at, environments.c.id)
        )
        async with self.engine.connect() as conn:
            return [_row(r) for r in (await conn.execute(q)).mappings().all()]

    async def get_by_connection(self, connection_id: str) -> EnvironmentRow | None:
        if not storable(connection_id):
            return None
        q = sa.select(environments).where(environments.c.connection_id == connection_id)
        async with self.engine.connect() as conn:
            row = (await conn.execute(q)).mappings().first()
        return None if row is None else _row(row)

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
        return _row(row)

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

    # ---- teleports -------------------------------------------------------------------------

    async def create_teleport(self, row: TeleportRow) -> TeleportRow:
        values = {c.name: getattr(row, c.name) for c in teleports.columns}
        try:
            async with self.engine.begin() as conn:
                await conn.execute(teleports.insert().values(**values))
        except IntegrityError:
            if row.idempotency_key is None:
                raise
            existing = await self.find_teleport_by_key(row.org_id, row.idempotency_key)
            if existing is None:
                raise
            return existing
        return row

    async def get_teleport(self, org_id: str, teleport_id: str) -> TeleportRow | None:
        if not storable(teleport_id):
            return None
        q = sa.select(teleports).where(teleports.c.id == teleport_id, teleports.c.org_id == org_id)
        async with self.engine.connect() as conn:
            row = (await conn.execute(q)).mappings().first()
        return None if row is None else _teleport(row)

    async def find_teleport_by_key(self, org_id: str, idempotency_key: str) -> TeleportRow | None:
        if not storable(idempotency_key):
            return None
        q = sa.select(teleports).where(
            teleports.c.org_id == org_id, teleports.c.idempotency_key == idempotency_key
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(q)).mappings().first()
        return None if row is None else _teleport(row)

    async def update_teleport(self, teleport_id: str, status: str, error: str | None, now_ms: int) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                teleports.update()
                .where(teleports.c.id == teleport_id)
                .values(status=status, error=error, updated_at=now_ms)
            )
