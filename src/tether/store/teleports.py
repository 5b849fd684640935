"""Teleport rows in SQL: created once per idempotency key, read, and moved through their statuses."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from tether.store.base import TeleportRow
from tether.store.rows import storable, teleport_row
from tether.store.tables import teleports


class TeleportsSql:
    engine: AsyncEngine

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
        return None if row is None else teleport_row(row)

    async def find_teleport_by_key(self, org_id: str, idempotency_key: str) -> TeleportRow | None:
        if not storable(idempotency_key):
            return None
        q = sa.select(teleports).where(
            teleports.c.org_id == org_id, teleports.c.idempotency_key == idempotency_key
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(q)).mappings().first()
        return None if row is None else teleport_row(row)

    async def update_teleport(self, teleport_id: str, status: str, error: str | None, now_ms: int) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                teleports.update()
                .where(teleports.c.id == teleport_id)
                .values(status=status, error=error, updated_at=now_ms)
            )
