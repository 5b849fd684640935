"""Registrations per second on one pod, SQLite and PostgreSQL, against the forwarder in the same run.

A fleet coming back after a router restart waits first on `POST /v1/environments/register`. The load
generator is its own process (`python -m bench.registration`): a few keep-alive HTTP/1.1 connections,
each with one request in flight, 16 in all (as a fleet's devices arrive: independent, concurrent), each
registering a slot of its own with the CLI's metadata. Its ceiling is the same generator against the
forwarder (bench/baseline.py), whose register route answers from memory on the same server stack: what
the generator and the stack can do at most, measured in the same run, in alternating rounds.

Two workloads: first registrations (every slot new: a fleet's first day, a fresh database) and
re-registrations (every slot known: the fleet after a restart).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import uuid
from typing import Any

import orjson

from bench.core import Figure, Run, percentile
from bench.listing import METADATA
from bench.pg import create_database, drop_database
from bench.servers import PYTHON, REPO, Server, start_baseline, start_tether

IN_FLIGHT = 16
ROUND_SECONDS = 4.0
WARMUP_SECONDS = 1.0
ROUNDS = 3
TARGET = 1000.0


# ---- the generator (runs in its own process) -------------------------------------------------------


async def _one_connection(
    host: str,
    port: int,
    key: str,
    devices: list[str],
    until: float,
    warm_until: float,
    latencies: list[float],
    errors: list[str],
) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    head = (
        f"POST /v1/environments/register HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
    ).encode()
    done = 0
    i = 0
    loop = asyncio.get_running_loop()
    try:
        while loop.time() < until:
            device = devices[i % len(devices)]
            i += 1
            body = orjson.dumps(
                {
                    "deviceId": device,
                    "listenerInstanceId": "server-" + device[:8],
                    "connectionName": "host-" + device[:8],
                    "metadata": METADATA,
                }
            )
            started = loop.time()
            writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            payload = await reader.readexactly(length)
            if not status_line.startswith(b"HTTP/1.1 200"):
                errors.append(status_line.decode(errors="replace").strip() + " " + payload[:120].decode())
                continue
            if started >= warm_until:
                done += 1
                latencies.append((loop.time() - started) * 1000)
    finally:
        writer.close()
    return done


async def generate(url: str, key: str, seconds: float, warmup: float, in_flight: int, prefix: str) -> None:
    host, port = url.removeprefix("http://").split(":")
    loop = asyncio.get_running_loop()
    start = loop.time()
    warm_until, until = start + warmup, start + warmup + seconds
    latencies: list[float] = []
    errors: list[str] = []
    # New: enough slots per connection that none repeats within a round. Known: few enough that the
    # first round (which makes them known) covers them all even at 320/s.
    per_conn = 4000 if prefix == "new" else 100
    done = await asyncio.gather(
        *(
            _one_connection(
                host,
                int(port),
                key,
                [f"{prefix}-{c:02d}-{n:05d}-{uuid.uuid4().hex[:6]}" for n in range(per_conn)]
                if prefix == "new"
                else [f"{prefix}-{c:02d}-{n:05d}" for n in range(per_conn)],
                until,
                warm_until,
                latencies,
                errors,
            )
            for c in range(in_flight)
        )
    )
    elapsed = loop.time() - warm_until
    print(
        orjson.dumps(
            {
                "count": sum(done),
                "seconds": elapsed,
                "rate": sum(done) / elapsed,
                "p50_ms": percentile(latencies, 50),
                "p99_ms": percentile(latencies, 99),
                "errors": len(errors),
                "first_errors": errors[:3],
            }
        ).decode()
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.registration")
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--seconds", type=float, default=ROUND_SECONDS)
    parser.add_argument("--warmup", type=float, default=WARMUP_SECONDS)
    parser.add_argument("--in-flight", type=int, default=IN_FLIGHT)
    parser.add_argument(
        "--slots", default="new", help="'new': a fresh slot per request; any other word names known slots"
    )
    args = parser.parse_args()
    import uvloop

    uvloop.run(generate(args.url, args.key, args.seconds, args.warmup, args.in_flight, args.slots))


# ---- the harness side ---------------------------------------------------------------------------------


async def _round(server: Server, seconds: float, warmup: float, slots: str) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        PYTHON,
        "-m",
        "bench.registration",
        "--url",
        server.base_url,
        "--key",
        server.key,
        "--seconds",
        str(seconds),
        "--warmup",
        str(warmup),
        "--slots",
        slots,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"generator failed: {err.decode(errors='replace')[-500:]}")
    result: dict[str, Any] = orjson.loads(out.splitlines()[-1])
    result["router_cpu_s"] = server.cpu_seconds()
    return result


async def measure(run: Run) -> None:
    seconds = max(1.0, ROUND_SECONDS * run.scale)
    warmup = WARMUP_SECONDS
    rounds = ROUNDS if run.scale >= 1 else 1
    dsn = await create_database()
    servers: dict[str, Server] = {}
    try:
        servers["baseline"] = await start_baseline(run.workdir / "registration")
        servers["sqlite"] = await start_tether(run.workdir / "registration-sqlite", "reg-sqlite")
        servers["postgres"] = await start_tether(
            run.workdir / "registration-postgres",
            "reg-postgres",
            database_url=dsn.replace("postgresql://", "postgresql+asyncpg://", 1),
        )
        results: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for workload in ("new", "known"):
            for r in range(rounds):
                for name, server in servers.items():
                    # Re-registrations reuse the slots of the first round of first registrations.
                    slots = "new" if workload == "new" else f"known{name}"
                    if workload == "known" and r == 0:
                        await _round(server, seconds, warmup, slots)  # makes the slots known
                    cpu_before = server.cpu_seconds()
                    got = await _round(server, seconds, warmup, slots)
                    got["router_cpu_percent"] = 100 * (got["router_cpu_s"] - cpu_before) / (seconds + warmup)
                    results.setdefault((workload, name), []).append(got)
                    run.say(
                        f"  registration {workload} {name}: {got['rate']:.0f}/s p50 {got['p50_ms']:.1f} ms "
                        f"p99 {got['p99_ms']:.1f} ms, {got['errors']} errors, router CPU "
                        f"{got['router_cpu_percent']:.0f}%"
                    )
        _report(run, results)
    finally:
        for server in servers.values():
            server.stop()
        await drop_database(dsn)


def _report(run: Run, results: dict[tuple[str, str], list[dict[str, Any]]]) -> None:
    for workload in ("new", "known"):
        ceiling = statistics.median(r["rate"] for r in results[(workload, "baseline")])
        for backend, label in (("sqlite", "SQLite"), ("postgres", "PostgreSQL")):
            got = results[(workload, backend)]
            rate = statistics.median(r["rate"] for r in got)
            errors = sum(r["errors"] for r in got)
            what = "registrations" if workload == "new" else "re-registrations"
            figure = Figure(
                f"register_{workload}_{backend}",
                f"{what}/s, {label}",
                "/s",
                f"≥ {TARGET:,.0f}/s",
                value=rate,
                baseline=ceiling,
                ratio=rate / ceiling,
                note=(
                    f"median of {len(got)} alternating rounds of {got[0]['seconds']:.0f} s, "
                    f"{IN_FLIGHT} in flight from one generator process; "
                    f"{'a new slot' if workload == 'new' else 'a known slot'} each; "
                    f"p50 {statistics.median(r['p50_ms'] for r in got):.1f} ms, "
                    f"p99 {statistics.median(r['p99_ms'] for r in got):.1f} ms; router CPU "
                    f"{statistics.median(r['router_cpu_percent'] for r in got):.0f}% of a core; "
                    f"{errors} errors. "
                    f"Baseline: the generator's ceiling, the forwarder answering register from memory"
                ),
                detail={"rounds": got, "baseline_rounds": results[(workload, "baseline")]},
            )
            # The target is absolute; the ratio shows how close the generator's own ceiling is.
            figure.passed = rate >= TARGET and errors == 0
            if not figure.passed:
                figure.miss = f"{rate:.0f}/s vs {TARGET:.0f}/s" + (f", {errors} errors" if errors else "")
            run.add(figure)


if __name__ == "__main__":
    main()
