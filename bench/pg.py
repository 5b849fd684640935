"""A fresh PostgreSQL database per figure on the local server (127.0.0.1:5432, user postgres)."""

from __future__ import annotations

import os
import uuid

PG_ADMIN_URL = os.environ.get("TETHER_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


async def create_database() -> str:
    """CREATE DATABASE tether_bench_<random>; returns its plain postgresql:// URL."""
    import asyncpg

    name = f"tether_bench_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


async def drop_database(url: str) -> None:
    import asyncpg

    name = url.rsplit("/", 1)[-1]
    conn = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
