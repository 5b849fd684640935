"""The database engine and its schema: SQLite (embedded) or PostgreSQL (scaled), migrated by Alembic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tether.store.base import SchemaTooNew


def _alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    return cfg


# Arbitrary constant: the PostgreSQL advisory lock serialising the migrations of pods starting at once.
MIGRATION_LOCK = 0x7E7E_0001


def upgrade(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        # Held to the end of the transaction, so the second pod sees the first pod's finished schema.
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
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


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def make_engine(url: str) -> AsyncEngine:
    # orjson for the JSON columns (metadata): several times faster than the json module both ways,
    # and a list page decodes a hundred of them.
    kwargs: dict[str, Any] = {"json_serializer": _dumps, "json_deserializer": orjson.loads}
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
