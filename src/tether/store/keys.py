"""Organizations, users and API keys in SQL: created, listed, revoked, and checked on every request."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import uuid

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tether.protocol.roles import DEFAULT_ROLE, parse_role
from tether.store.base import ApiKeyInfo, Principal
from tether.store.engine import MIGRATION_LOCK
from tether.store.rows import new_id, storable
from tether.store.tables import api_keys, organizations, users

KEY_PREFIX = "tk_"
# Keys carry 256 bits of randomness, so a fast hash is enough: no offline guessing is feasible.
_HASH = hashlib.sha256
# The advisory lock serialising "create a key if there is none" (next to the migrations' own).
KEYS_LOCK = MIGRATION_LOCK + 1
_KEY_ID = re.compile(r"[0-9a-f]{16}")


def _hash_secret(secret: str) -> str:
    return _HASH(secret.encode()).hexdigest()


class KeysSql:
    engine: AsyncEngine

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

    async def create_key(
        self, org_name: str, user_name: str, key_name: str, now_ms: int, role: str = DEFAULT_ROLE
    ) -> str:
        role = parse_role(role)  # ValueError before anything is written
        for attempt in range(3):
            try:
                async with self.engine.begin() as conn:
                    return await self._insert_key(conn, org_name, user_name, key_name, now_ms, role)
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
            await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": KEYS_LOCK})
        else:
            # A write as the first statement takes SQLite's write lock before the count is read.
            await conn.execute(api_keys.update().where(sa.false()).values(name=api_keys.c.name))

    async def _insert_key(
        self,
        conn: AsyncConnection,
        org_name: str,
        user_name: str,
        key_name: str,
        now_ms: int,
        role: str = DEFAULT_ROLE,
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
                role=role,
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
                api_keys.c.role,
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
                role=r["role"],
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
        return Principal(key_id=row["id"], org_id=row["org_id"], user_id=row["user_id"], role=row["role"])

    async def principal_names(self, org_id: str, user_id: str) -> tuple[str | None, str | None]:
        """The organization's and the user's names (None for one that is gone)."""
        async with self.engine.connect() as conn:
            org = (
                await conn.execute(sa.select(organizations.c.name).where(organizations.c.id == org_id))
            ).scalar()
            user = (await conn.execute(sa.select(users.c.name).where(users.c.id == user_id))).scalar()
        return org, user
