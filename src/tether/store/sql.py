"""The SQLAlchemy store: one implementation for SQLite (embedded) and PostgreSQL (scaled).

Its queries live by subject: keys.py, environments.py, teleports.py, upstream.py (gateway mode),
fleet.py (the fleet API's listing); the engine and schema in engine.py.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from tether.store.engine import make_engine, upgrade
from tether.store.environments import REGISTER_BATCH_MAX, REGISTER_PENDING_MAX, EnvironmentsSql
from tether.store.fleet import FleetSql
from tether.store.keys import KEY_PREFIX
from tether.store.teleports import TeleportsSql
from tether.store.upstream import UpstreamSql

__all__ = ["KEY_PREFIX", "SqlStore"]


class SqlStore(UpstreamSql, EnvironmentsSql, TeleportsSql, FleetSql):
    def __init__(
        self, url: str, register_batch: int = REGISTER_BATCH_MAX, register_pending: int = REGISTER_PENDING_MAX
    ) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._start_registrations(register_batch, register_pending)

    async def start(self) -> None:
        if self.url.startswith("sqlite"):
            path = self.url.split(":///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        async with self.engine.begin() as conn:
            await conn.run_sync(upgrade)

    async def close(self) -> None:
        await self.registrations.close()
        await self.engine.dispose()

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
