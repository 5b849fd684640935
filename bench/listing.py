"""List latency: `GET /v1/environments?limit=100` over 100,000 rows, on SQLite and on PostgreSQL.

The rows go straight into the router's database (registering 100,000 devices over REST would take
longer than the whole benchmark), shaped as registrations leave them: a device id, a listener instance,
the CLI's metadata, most rows offline. The client walks the pagination: each walk starts at the top or
at a random row and follows `after` for five pages.
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import time
import uuid
from typing import Any

import httpx

from bench.core import Figure, Run, at_most, percentile
from bench.pg import create_database, drop_database
from bench.servers import Server, start_tether

ROWS = 100_000
PAGE = 100
PAGES_PER_WALK = 5
METADATA = {
    "lettaCodeVersion": "0.32.18",
    "os": "linux",
    "nodeVersion": "v22.19.0",
    "environmentMessageProtocol": "v2-input",
    "supportsPairedListenerGenerations": True,
    "supported_commands": ["clear", "doctor", "memory", "model", "init", "remember", "search"],
    "self_update": {"supported": False, "writable": False, "manual_command": "npm i -g @letta-ai/letta-code"},
    "workingDirectory": "/home/dev/projects/app",
    "gitBranch": "main",
    "permissionMode": "standard",
}
OWNER_SQL = (
    "SELECT users.org_id, users.id FROM users JOIN organizations ON organizations.id = users.org_id "
    "WHERE organizations.name = 'bench'"
)
COLUMNS = (
    "id",
    "org_id",
    "device_id",
    "listener_instance_id",
    "connection_name",
    "metadata",
    "user_id",
    "api_key_owner",
    "current_mode",
    "first_seen_at",
    "last_seen_at",
    "connection_id",
    "lease_issued_at",
    "last_heartbeat",
)


def make_rows(org_id: str, user_id: str, count: int) -> list[tuple[Any, ...]]:
    now = int(time.time() * 1000)
    metadata = json.dumps(METADATA)
    rows = []
    for i in range(count):
        seen = now - (count - i) * 1000
        leased = i % 10 == 0  # a tenth hold a lease whose device is not connected
        rows.append(
            (
                f"env-{uuid.uuid4().hex}",
                org_id,
                str(uuid.uuid4()),
                f"server-{uuid.uuid4().hex[:16]}",
                f"host-{i:06d}",
                metadata,
                user_id,
                user_id,
                "standard",
                seen,
                seen + 500,
                f"conn-{uuid.uuid4().hex}" if leased else None,
                seen if leased else None,
                seen + 400,
            )
        )
    return rows


async def fill_sqlite(server: Server, count: int) -> list[str]:
    path = server.env["TETHER_DATA_DIR"] + "/tether.db"

    def fill() -> list[str]:
        db = sqlite3.connect(path, timeout=30)
        try:
            org_id, user_id = db.execute(OWNER_SQL).fetchone()
            rows = make_rows(org_id, user_id, count)
            marks = ",".join("?" * len(COLUMNS))
            with db:
                db.executemany(f"INSERT INTO environments ({','.join(COLUMNS)}) VALUES ({marks})", rows)
            return [r[0] for r in rows]
        finally:
            db.close()

    return await asyncio.to_thread(fill)


async def fill_postgres(dsn: str, count: int) -> list[str]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        org_id, user_id = await conn.fetchrow(OWNER_SQL)
        rows = make_rows(org_id, user_id, count)
        await conn.copy_records_to_table("environments", records=rows, columns=list(COLUMNS))
        await conn.execute("ANALYZE environments")
        return [r[0] for r in rows]
    finally:
        await conn.close()


async def walk(server: Server, ids: list[str], walks: int) -> list[float]:
    """Paginate from the top and from random rows; returns each request's latency in ms."""
    rng = random.Random(6)
    latencies: list[float] = []
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {server.key}"}, timeout=30) as http:
        for w in range(-4, walks):  # four warm-up walks, discarded
            after: str | None = None if w <= 0 else rng.choice(ids[: -PAGE * PAGES_PER_WALK])
            for _ in range(PAGES_PER_WALK):
                params = {"limit": PAGE} | ({"after": after} if after else {})
                started = time.perf_counter()
                response = await http.get(f"{server.base_url}/v1/environments", params=params)
                elapsed = (time.perf_counter() - started) * 1000
                response.raise_for_status()
                page = response.json()
                if len(page["connections"]) != PAGE:
                    raise RuntimeError(f"expected a full page, got {len(page['connections'])} rows")
                if w >= 0:
                    latencies.append(elapsed)
                after = page["connections"][-1]["id"]
    return latencies


async def measure(run: Run) -> None:
    rows = run.scaled(ROWS, 1000)
    walks = run.scaled(60, 10)
    for backend in ("sqlite", "postgres"):
        dsn = None
        server = None
        try:
            if backend == "postgres":
                dsn = await create_database()
            run.say(f"list latency on {backend}: inserting {rows} rows")
            server = await start_tether(
                run.workdir / f"list-{backend}",
                f"list-{backend}",
                database_url=dsn.replace("postgresql://", "postgresql+asyncpg://", 1) if dsn else None,
            )
            started = time.monotonic()
            ids = await (fill_postgres(dsn, rows) if dsn else fill_sqlite(server, rows))
            run.say(
                f"  {len(ids)} rows in {time.monotonic() - started:.1f}s; "
                f"walking {walks} x {PAGES_PER_WALK} pages"
            )
            latencies = await walk(server, ids, walks)
            p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
            figure = Figure(
                f"list_{backend}_p99",
                f"list latency p99, {'SQLite' if backend == 'sqlite' else 'PostgreSQL'}",
                "ms",
                "≤ 25 ms",
                value=p99,
                note=f"{len(latencies)} requests of limit={PAGE} over {rows} rows ({walks} walks of "
                f"{PAGES_PER_WALK} pages from the top or a random row); p50 {p50:.1f} ms",
                detail={"p50": p50, "p90": percentile(latencies, 90), "p99": p99, "max": max(latencies)},
            )
            run.add(at_most(figure, 25))
        except Exception as exc:
            run.add(
                Figure(
                    f"list_{backend}_p99",
                    f"list latency p99, {backend}",
                    "ms",
                    "≤ 25 ms",
                    note=f"not measured: {exc!r}"[:300],
                )
            )
        finally:
            if server is not None:
                server.stop()
            if dsn is not None:
                await drop_database(dsn)
