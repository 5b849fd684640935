"""List latency: `GET /v1/environments?limit=100` over 100,000 rows, on SQLite and on PostgreSQL.

The rows go straight into the router's database (registering 100,000 devices over REST would take
longer than the whole benchmark), shaped as registrations leave them: a device id, a listener instance,
the CLI's metadata, most rows offline, every tenth of another user. 600 devices then register over REST
and hold their sockets open: the online rows. The client walks the pagination: each walk starts at the
top or at a random row and follows `after` for five pages; unfiltered, `onlineOnly=true` and `userId=`.

The baseline is the forwarder (bench/baseline.py) serving the same rows, fetched from Tether once, from
memory: the same page bytes, no database. Walks alternate between the two, the same walk on each.
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
import orjson

from bench.core import Figure, Run, at_most, percentile
from bench.fastdevice import FastDevice
from bench.pg import create_database, drop_database
from bench.servers import Server, start_baseline, start_tether

ROWS = 100_000
ONLINE = 600  # devices connected for the onlineOnly walks, on top of the rows
PAGE = 100
PAGES_PER_WALK = 5
WARMUP_WALKS = 4
TARGET_RATIO = 1.5
OTHER_USER = "user-ops"  # every tenth row belongs to this user: the userId= walks
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
                OTHER_USER if i % 10 == 0 else user_id,
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


async def walk(
    server: Server, ids: list[str], walks: int, params: dict[str, str], seed: int = 6
) -> list[float]:
    """Paginate from the top and from random rows of `ids` (the rows these `params` select, in order);
    returns each request's latency in ms."""
    async with client(server) as http:
        return [t for w in range(-WARMUP_WALKS, walks) for t in await walk_once(http, ids, w, params, seed)]


def client(server: Server) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=server.base_url, headers={"Authorization": f"Bearer {server.key}"}, timeout=30
    )


async def walk_once(
    http: httpx.AsyncClient, ids: list[str], w: int, params: dict[str, str], seed: int = 6
) -> list[float]:
    """Walk number `w` (negative: a warm-up, its latencies discarded): from the top when w <= 0, else
    from a random row, following `after` for PAGES_PER_WALK pages."""
    rng = random.Random(seed * 100_003 + w)
    latencies: list[float] = []
    after: str | None = None if w <= 0 else rng.choice(ids[: -PAGE * PAGES_PER_WALK])
    for _ in range(PAGES_PER_WALK):
        query = {"limit": str(PAGE), **params} | ({"after": after} if after else {})
        started = time.perf_counter()
        response = await http.get("/v1/environments", params=query)
        elapsed = (time.perf_counter() - started) * 1000
        response.raise_for_status()
        page = response.json()
        if len(page["connections"]) != PAGE:
            raise RuntimeError(f"expected a full page, got {len(page['connections'])} rows")
        if w >= 0:
            latencies.append(elapsed)
        after = page["connections"][-1]["id"]
    return latencies


async def everything(server: Server) -> list[dict[str, Any]]:
    """Every row as the list endpoint renders it, in its order (the baseline serves the same rows)."""
    rows: list[dict[str, Any]] = []
    after: str | None = None
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {server.key}"}, timeout=60) as http:
        while True:
            query = {"limit": "500"} | ({"after": after} if after else {})
            response = await http.get(f"{server.base_url}/v1/environments", params=query)
            response.raise_for_status()
            page = response.json()
            rows.extend(page["connections"])
            if not page["hasNextPage"]:
                return rows
            after = rows[-1]["id"]


async def connect_devices(server: Server, count: int) -> list[FastDevice]:
    """Devices registered over REST with both sockets open: the online rows (the newest ones)."""
    devices = [FastDevice(server.base_url, server.key, f"online-{i:04d}") for i in range(count)]
    for start in range(0, count, 50):
        await asyncio.gather(*(d.start() for d in devices[start : start + 50]))
    return devices


async def _online_count(server: Server, want: int, timeout: float = 30) -> int:
    """Wait until the REST count of online rows reaches `want` (presence is written behind)."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {server.key}"}, timeout=30) as http:
        while True:
            response = await http.get(
                f"{server.base_url}/v1/environments", params={"limit": "500", "onlineOnly": "true"}
            )
            rows = response.json()["connections"]
            got = len(rows)
            while response.json()["hasNextPage"]:
                response = await http.get(
                    f"{server.base_url}/v1/environments",
                    params={"limit": "500", "onlineOnly": "true", "after": rows[-1]["id"]},
                )
                rows = response.json()["connections"]
                got += len(rows)
            if got >= want or time.monotonic() > deadline:
                return got
            await asyncio.sleep(0.2)


VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "all": ("", {}),
    "online": ("onlineOnly=true", {"onlineOnly": "true"}),
    "user": ("userId=", {"userId": OTHER_USER}),
}


async def _backend(run: Run, backend: str, rows: int, online: int, walks: int) -> None:
    dsn = None
    server = baseline = None
    devices: list[FastDevice] = []
    label = "SQLite" if backend == "sqlite" else "PostgreSQL"
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
        await (fill_postgres(dsn, rows) if dsn else fill_sqlite(server, rows))
        devices = await connect_devices(server, online)
        seen_online = await _online_count(server, online)
        served = await everything(server)
        rows_file = run.workdir / f"list-{backend}-rows.json"
        rows_file.write_bytes(orjson.dumps(served))
        baseline = await start_baseline(run.workdir / f"list-{backend}-baseline", rows_file)
        run.say(
            f"  {len(served)} rows ({seen_online} online) in {time.monotonic() - started:.1f}s; "
            f"walking {walks} x {PAGES_PER_WALK} pages per variant, alternating with the in-memory baseline"
        )
        for variant, (what, params) in VARIANTS.items():
            if variant == "online":
                ids = [r["id"] for r in served if r["connectionId"] is not None]
            elif variant == "user":
                ids = [r["id"] for r in served if r["userId"] == OTHER_USER]
            else:
                ids = [r["id"] for r in served]
            ours: list[float] = []
            theirs: list[float] = []
            async with client(server) as tether_http, client(baseline) as baseline_http:
                for w in range(-WARMUP_WALKS, walks):
                    # Alternating walk by walk, the same walk on both: the machine's moods hit both alike.
                    ours += await walk_once(tether_http, ids, w, params)
                    theirs += await walk_once(baseline_http, ids, w, params)
            p99, base99 = percentile(ours, 99), percentile(theirs, 99)
            name = f"list latency p99, {label}" + (f", {what}" if what else "")
            figure = Figure(
                f"list_{backend}_p99" if variant == "all" else f"list_{backend}_{variant}_p99",
                name,
                "ms",
                f"≤ {TARGET_RATIO}x baseline",
                value=p99,
                baseline=base99,
                ratio=p99 / base99,
                note=(
                    f"{len(ours)} requests of limit={PAGE}{'&' + what if what else ''}"
                    f"{params.get('userId', '')} "
                    f"over {len(served)} rows ({len(ids)} selected; {walks} walks of {PAGES_PER_WALK} pages "
                    f"from the top or a random row); p50 {percentile(ours, 50):.2f} ms vs "
                    f"{percentile(theirs, 50):.2f} ms. Baseline: the forwarder serving the same rows from "
                    f"memory (orjson per request), walk by walk in turn"
                ),
                detail={
                    "p50": percentile(ours, 50),
                    "p90": percentile(ours, 90),
                    "p99": p99,
                    "max": max(ours),
                    "baseline_p50": percentile(theirs, 50),
                    "baseline_p90": percentile(theirs, 90),
                    "baseline_p99": base99,
                    "baseline_max": max(theirs),
                },
            )
            run.add(at_most(figure, TARGET_RATIO))
    except Exception as exc:
        run.add(
            Figure(
                f"list_{backend}_p99",
                f"list latency p99, {label}",
                "ms",
                f"≤ {TARGET_RATIO}x baseline",
                note=f"not measured: {exc!r}"[:300],
            )
        )
    finally:
        for device in devices:
            await device.stop()
        for proc in (server, baseline):
            if proc is not None:
                proc.stop()
        if dsn is not None:
            await drop_database(dsn)


async def measure(run: Run) -> None:
    rows = run.scaled(ROWS, 1000)
    online = max(PAGE * PAGES_PER_WALK + PAGE, run.scaled(ONLINE))
    walks = run.scaled(60, 10)
    for backend in ("sqlite", "postgres"):
        await _backend(run, backend, rows, online, walks)
