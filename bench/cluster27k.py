"""A cluster on one machine: three pods on PostgreSQL + Redis holding 27,000 split-channel devices.

Each pod gets 9,000 reference devices (registered on it, their sockets on it). The devices live in six
load-generator processes (`python -m bench.cluster27k`, the `bench.agent` line protocol), two per pod,
each opening its sockets from its own 127.0.0.x address and holding at most 9,000 of the 20,000 file
descriptors a process may have here. The PostgreSQL database is a fresh one on the local server
(`bench.pg`); Redis is a private `redis-server` (tests/services.py) so that its INFO is this
cluster's alone.

Figures: the time to connect all of them; RSS per device of each pod; Redis memory per device
(`used_memory` after - before, over the devices); heartbeat CPU of each pod, per 10,000 devices;
REST `onlineOnly=true` counting exactly the fleet; then one pod drained by SIGTERM.

The drain. A device reconnects to the `wsUrl` it registered with; in production a balancer sends it
to a pod that is up. Each generator plays that balancer: a socket for a pod out of its rotation goes
to one in it chosen by a hash of the URL's path, which names the connection, so that a device's
control and stream sockets reach the same pod. (Round robin, as README's nginx example does, sends
them to different pods half the time: the stream socket is closed with 4002, "no current control
socket for this stream", and the device retries with backoff; at 900 drained devices this left 80
not back after 90 s.) The harness takes the pod out of the rotation, then sends SIGTERM
(a balancer takes a pod out as its readiness turns; the draining pod closes its listeners at once).
Two pods cannot hold 27,000 split-channel devices: that is 27,000 sockets each, past the 20,000 file
descriptors a process may have. So before the drain one generator on each surviving pod stops its
devices (4,500 each): the drained pod's 9,000 then land on two pods holding 4,500, leaving them at
9,000 each, the per-pod load of the first part. A refused connect is counted by the generators.

Ratios, where the same run has them: the single pod of the `idle` row (SQLite, 8,000 devices) for
RSS per device and heartbeat CPU per device.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import time
import urllib.parse
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

import tether.device.client as device_client
from bench.agent import IP_BIND_ADDRESS_NO_PORT, Agent, serve
from bench.core import Figure, Run, at_most
from bench.fleet import REPO, AgentProcess, _log_file
from bench.idle import HEARTBEAT_SECONDS, listen_overflows, online_count
from bench.pg import create_database, drop_database
from bench.servers import PYTHON, Server, start_tether

PODS = 3
DEVICES_PER_POD = 9_000
GENERATORS_PER_POD = 2
BATCH = 50  # devices each generator starts at once
FD_LIMIT = 20_000
DRAIN_SECONDS = 10.0  # `TETHER_SHUTDOWN_DRAIN_SECONDS`'s default: what an operator's SIGTERM does
DRAIN_LIMIT_SECONDS = 30.0
DRAIN_WAIT_SECONDS = 90.0
WINDOW_SECONDS = 60.0
SETTLE_CPU_PERCENT = 20.0
SETTLE_MAX_SECONDS = 60.0
CONNECT_READY_TIMEOUT = 120.0


# ---- the generators' side ---------------------------------------------------------------------------


class ClusterAgent(Agent):
    """`bench.agent`'s reference devices, behind a balancer of the process's own."""

    def __init__(self, source_ip: str) -> None:
        super().__init__()
        self.source_ip = source_ip
        self.rotation: list[str] = []  # host:port of the pods a socket may go to
        self.refused: Counter[str] = Counter()
        self.where: dict[str, str] = {}  # deviceId -> host:port of its last accepted socket
        device_client.connect = self._connect  # type: ignore[assignment,attr-defined]

    async def balance(self, pods: list[str]) -> None:
        self.rotation = list(pods)

    async def refusals(self) -> dict[str, int]:
        return dict(self.refused)

    async def placement(self, group: str) -> dict[str, int]:
        """Ready devices of `group` by the pod their sockets went to last."""
        return dict(
            Counter(self.where.get(d.device_id, "?") for d in self.groups.get(group, []) if d.ready.is_set())
        )

    async def mark(self, group: str) -> None:
        """Note every device's counters, as `sever` does, without severing: `await_reconnect` then
        waits for each to be ready on a new connection."""
        devices = self.groups[group]
        self.before[group] = [(d.connects, d.connect_attempts, d.registrations) for d in devices]
        self.closes_before[group] = [len(d.closed_codes) for d in devices]

    async def _connect(self, uri: str, **kwargs: Any) -> Any:
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidHandshake

        parts = urllib.parse.urlsplit(uri)
        if self.rotation and parts.netloc not in self.rotation:
            # By the path (it names the connection), so a device's two sockets reach the same pod.
            parts = parts._replace(netloc=self.rotation[zlib.crc32(parts.path.encode()) % len(self.rotation)])
            uri = urllib.parse.urlunsplit(parts)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((self.source_ip, 0))
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (parts.hostname, parts.port or 80))
        except ConnectionRefusedError:
            sock.close()
            self.refused["tcp connect refused"] += 1
            raise
        except BaseException:
            sock.close()
            raise
        try:
            ws = await connect(uri, sock=sock, **kwargs)
        except InvalidHandshake as exc:
            self.refused[f"handshake refused: {str(exc)[:80]}"] += 1
            raise
        query = dict(urllib.parse.parse_qsl(parts.query))
        if "deviceId" in query:
            self.where[query["deviceId"]] = parts.netloc
        return ws


def _raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, FD_LIMIT), hard))


def main() -> None:
    import argparse
    import logging
    import os

    import uvloop

    from tether.cli import tune_gc
    from tether.config import Settings

    parser = argparse.ArgumentParser(prog="python -m bench.cluster27k")
    parser.add_argument("--source-ip", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=os.environ.get("BENCH_AGENT_LOG", "WARNING"))
    _raise_fd_limit()
    tune_gc(Settings().gc_thresholds)
    uvloop.run(serve(ClusterAgent(args.source_ip)))


# ---- the harness's side -----------------------------------------------------------------------------


async def start_generator(name: str, run: Run, source_ip: str) -> AgentProcess:
    with _log_file(run.workdir, f"agent-{name}.log") as log:
        proc = await asyncio.create_subprocess_exec(
            PYTHON,
            "-m",
            "bench.cluster27k",
            "--source-ip",
            source_ip,
            cwd=REPO,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            limit=64 * 1024 * 1024,
        )
    return AgentProcess(name, proc)


def _netloc(server: Server) -> str:
    return urllib.parse.urlsplit(server.base_url).netloc


def fd_count(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


class RedisProbe:
    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url)

    async def info(self) -> dict[str, Any]:
        def read() -> dict[str, Any]:
            info: dict[str, Any] = {}
            for section in ("memory", "cpu", "stats", "keyspace"):
                info.update(self.client.info(section))
            return info

        return await asyncio.to_thread(read)


class PgProbe:
    """Writes and backend CPU of the cluster's database, from pg_stat_database and /proc."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.name = dsn.rsplit("/", 1)[-1]

    async def sample(self) -> dict[str, float]:
        import asyncpg

        from bench.servers import cpu_seconds

        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute("SELECT pg_stat_force_next_flush()")
            row = await conn.fetchrow(
                "SELECT xact_commit, tup_inserted, tup_updated, tup_deleted FROM pg_stat_database "
                "WHERE datname = $1",
                self.name,
            )
            pids = [r["pid"] for r in await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", self.name
            )]  # fmt: skip
        finally:
            await conn.close()
        cpu = 0.0
        for pid in pids:
            with contextlib.suppress(OSError):
                cpu += cpu_seconds(pid)
        assert row is not None
        return {
            "commits": float(row["xact_commit"]),
            "rows_written": float(row["tup_inserted"] + row["tup_updated"] + row["tup_deleted"]),
            "backend_cpu_seconds": cpu,
            "backends": float(len(pids)),
        }


def _delta(after: dict[str, float], before: dict[str, float], seconds: float) -> dict[str, float]:
    return {k: (after[k] - before[k]) / seconds for k in ("commits", "rows_written")} | {
        "backend_cpu_percent": 100 * (after["backend_cpu_seconds"] - before["backend_cpu_seconds"]) / seconds
    }


async def _settle(pods: list[Server]) -> float:
    started = time.monotonic()
    while time.monotonic() - started < SETTLE_MAX_SECONDS:
        before = [p.cpu_seconds() for p in pods]
        await asyncio.sleep(2)
        if all(
            100 * (p.cpu_seconds() - b) / 2 < SETTLE_CPU_PERCENT for p, b in zip(pods, before, strict=True)
        ):
            break
    return time.monotonic() - started


async def _progress(run: Run, agents: list[AgentProcess], total: int, started: float, group: str) -> None:
    while True:
        await asyncio.sleep(10)
        counts = await asyncio.gather(*(a.call("ready_count", group=group) for a in agents))
        run.say(f"  ... {sum(counts)}/{total} ready after {time.monotonic() - started:.0f}s")


def _single_pod(run: Run) -> dict[str, float]:
    """The idle row's single-pod figures, when this run measured them."""
    got: dict[str, float] = {}
    for f in run.figures:
        if f.key == "rss_per_device" and f.value is not None:
            got["rss_kib"] = f.value
        if f.key == "heartbeat_cpu" and f.value is not None:
            ready = f.detail.get("pings_per_second", 0) * HEARTBEAT_SECONDS / 2
            if ready:
                got["cpu_per_10k"] = f.value * 10_000 / ready
    return got


def _not_measured(run: Run, why: str) -> None:
    run.add(
        Figure(
            "cluster_connect",
            "cluster: 27,000 devices on three pods connected",
            "s",
            "all connected",
            note=f"not measured: {why}"[:400],
        )
    )


async def measure(run: Run) -> None:
    from tests.services import Throwaway, Unavailable

    per_pod = run.scaled(DEVICES_PER_POD, GENERATORS_PER_POD * 10)
    per_gen = per_pod // GENERATORS_PER_POD
    per_pod = per_gen * GENERATORS_PER_POD
    total = per_pod * PODS
    throwaway = Throwaway()
    try:
        redis_server = await asyncio.to_thread(throwaway.redis)
    except Unavailable as exc:
        _not_measured(run, str(exc))
        return
    try:
        dsn = await create_database()
    except OSError as exc:
        throwaway.close()
        _not_measured(run, f"PostgreSQL on 127.0.0.1:5432: {exc!r}")
        return
    url = dsn.replace("postgresql://", "postgresql+asyncpg://", 1)
    run.say(
        f"cluster: {PODS} pods on PostgreSQL + a private Redis ({redis_server.describe()}), {total:,} "
        f"devices from {PODS * GENERATORS_PER_POD} generator processes"
    )
    pods: list[Server] = []
    agents: list[AgentProcess] = []
    try:
        for i in range(PODS):
            pod = await start_tether(
                run.workdir / f"cluster-{i}",
                f"cluster-{i}",
                database_url=url,
                redis_url=redis_server.url,
                create_key=i == 0,
                shutdown_drain_seconds=str(DRAIN_SECONDS),
            )
            pods.append(pod)
        for pod in pods[1:]:
            pod.key = pods[0].key
        agents = [
            await start_generator(f"cluster-{i}", run, f"127.0.0.{20 + i}")
            for i in range(PODS * GENERATORS_PER_POD)
        ]
        home = {a.name: pods[i % PODS] for i, a in enumerate(agents)}
        await _measure(run, pods, agents, home, per_gen, total, RedisProbe(redis_server.url), PgProbe(dsn))
        run.sections["cluster_problems"] = [line for pod in pods for line in pod.problems()][:20]
    finally:
        for pod in pods:
            pod.kill()
        await asyncio.gather(*(a.close(timeout=120) for a in agents))
        await drop_database(dsn)
        await asyncio.to_thread(throwaway.close)


async def _measure(
    run: Run,
    pods: list[Server],
    agents: list[AgentProcess],
    home: dict[str, Server],
    per_gen: int,
    total: int,
    redis: RedisProbe,
    pg: PgProbe,
) -> None:
    await asyncio.gather(*(a.call("balance", pods=[_netloc(p) for p in pods]) for a in agents))
    rss_before = [p.rss_kib() for p in pods]
    fds_before = [fd_count(p.pid) for p in pods]
    redis_before = await redis.info()
    pg_before = await pg.sample()
    run.say(
        f"  pods' RSS before: {', '.join(f'{r / 1024:.0f} MiB' for r in rss_before)}; Redis used_memory "
        f"{redis_before['used_memory'] / 2**20:.1f} MiB; {BATCH} devices at a time per generator"
    )
    overflows = listen_overflows()
    connect_cpu = [p.cpu_seconds() for p in pods]
    started = time.monotonic()
    progress = asyncio.create_task(_progress(run, agents, total, started, "cluster"))
    try:
        outcomes = await asyncio.gather(
            *(
                a.call(
                    "devices",
                    group="cluster",
                    base_url=home[a.name].base_url,
                    key=pods[0].key,
                    count=per_gen,
                    heartbeat=HEARTBEAT_SECONDS,
                    batch=BATCH,
                    ready_timeout=CONNECT_READY_TIMEOUT,
                )
                for a in agents
            )
        )
    finally:
        progress.cancel()
    connect_seconds = time.monotonic() - started
    ready = sum(o["ready"] for o in outcomes)
    failed = sum(o["failed"] for o in outcomes)
    pg_connected = await pg.sample()
    redis_connected = await redis.info()
    connect_cpu = [p.cpu_seconds() - b for p, b in zip(pods, connect_cpu, strict=True)]
    run.say(f"  {ready:,}/{total:,} ready in {connect_seconds:.0f} s ({failed} failed); settling")
    settle_seconds = await _settle(pods)
    rss_after = [p.rss_kib() for p in pods]
    fds_after = [fd_count(p.pid) for p in pods]
    redis_after = await redis.info()
    on_pod = [per_gen * GENERATORS_PER_POD] * len(pods)
    per_device = [(a - b) / n for a, b, n in zip(rss_after, rss_before, on_pod, strict=True)]
    redis_per_device = (redis_after["used_memory"] - redis_before["used_memory"]) / max(1, ready)
    rest_started = time.monotonic()
    online = await online_count(pods[0])
    rest_seconds = time.monotonic() - rest_started
    run.say(
        f"  RSS per device per pod: {', '.join(f'{x:.1f}' for x in per_device)} KiB; Redis "
        f"{redis_per_device:.0f} B per device; REST onlineOnly {online} (walked in {rest_seconds:.1f} s)"
    )
    connect_writes = (pg_connected["rows_written"] - pg_before["rows_written"]) / max(1, ready)
    connect_commits = (pg_connected["commits"] - pg_before["commits"]) / max(1, ready)
    single = _single_pod(run)

    figure = Figure(
        "cluster_connect",
        f"cluster: {total:,} devices on {len(pods)} pods connected",
        "s",
        "all connected",
        value=connect_seconds,
        note=f"{ready:,} of {total:,} reference devices (split channels, paired generations) registered "
        f"and ready in {connect_seconds:.0f} s ({ready / connect_seconds:.0f}/s, "
        f"{BATCH * len(agents)} connecting at a time from {len(agents)} processes), {failed} failed; "
        f"{_overflows(overflows)} connects dropped by full listen queues; PostgreSQL: "
        f"{connect_commits:.1f} commits and {connect_writes:.1f} rows written per connected device; "
        "pods' CPU " + ", ".join(f"{c:.0f} s" for c in connect_cpu),
        detail={
            "ready": ready,
            "failed": failed,
            "seconds": connect_seconds,
            "per_second": ready / connect_seconds,
            "settle_seconds": settle_seconds,
            "pg_rows_per_connect": connect_writes,
            "pg_commits_per_connect": connect_commits,
            "pods_cpu_seconds": connect_cpu,
            "redis_cpu_seconds": _redis_cpu(redis_connected) - _redis_cpu(redis_before),
            "pg_backend_cpu_seconds": pg_connected["backend_cpu_seconds"] - pg_before["backend_cpu_seconds"],
        },
    )
    figure.passed = ready == total and failed == 0
    if not figure.passed:
        figure.miss = f"{total - ready} not ready, {failed} failed"
    run.add(figure)

    worst = max(per_device)
    figure = Figure(
        "cluster_rss_per_device",
        "cluster: pod RSS per idle device (worst pod)",
        "KiB",
        "≤ 25 KiB",
        value=worst,
        baseline=single.get("rss_kib"),
        ratio=worst / single["rss_kib"] if "rss_kib" in single else None,
        note="(VmRSS after - before) / devices on the pod, each pod: "
        + ", ".join(
            f"{x:.1f} KiB ({b / 1024:.0f} -> {a / 1024:.0f} MiB)"
            for x, b, a in zip(per_device, rss_before, rss_after, strict=True)
        )
        + f"; file descriptors per device {(sum(fds_after) - sum(fds_before)) / max(1, ready):.2f}"
        + ("; baseline: the idle row's single SQLite pod" if single else ""),
        detail={
            "per_pod_kib": per_device,
            "rss_before_kib": rss_before,
            "rss_after_kib": rss_after,
            "fds_before": fds_before,
            "fds_after": fds_after,
            "devices_per_pod": on_pod,
        },
    )
    figure.ratio = None  # context: the target is absolute
    run.add(at_most(figure, 25))

    keys = sum(v.get("keys", 0) for k, v in redis_after.items() if k.startswith("db") and isinstance(v, dict))
    figure = Figure(
        "cluster_redis_per_device",
        "cluster: Redis memory per device",
        "B",
        "measured",
        value=redis_per_device,
        note=f"used_memory {redis_before['used_memory'] / 2**20:.1f} -> "
        f"{redis_after['used_memory'] / 2**20:.1f} MiB over {ready:,} devices; {keys:,} keys",
        detail={
            "used_memory_before": redis_before["used_memory"],
            "used_memory_after": redis_after["used_memory"],
            "keys": keys,
        },
    )
    run.add(figure)

    window = max(20.0, WINDOW_SECONDS * min(1.0, run.scale * 2))
    run.say(f"  heartbeat window: {window:.0f} s, each pod's CPU, Redis's and the database's")
    cpu_before = [p.cpu_seconds() for p in pods]
    gen_before = sum(a.cpu_seconds() for a in agents)
    redis_w0, pg_w0, t0 = await redis.info(), await pg.sample(), time.monotonic()
    await asyncio.sleep(window)
    seconds = time.monotonic() - t0
    cpu = [100 * (p.cpu_seconds() - b) / seconds for p, b in zip(pods, cpu_before, strict=True)]
    redis_w1, pg_w1 = await redis.info(), await pg.sample()
    gen_cpu = 100 * (sum(a.cpu_seconds() for a in agents) - gen_before) / seconds
    per_10k = [c * 10_000 / n for c, n in zip(cpu, on_pod, strict=True)]
    redis_cpu = 100 * (_redis_cpu(redis_w1) - _redis_cpu(redis_w0)) / seconds
    redis_ops = (redis_w1["total_commands_processed"] - redis_w0["total_commands_processed"]) / seconds
    pg_rates = _delta(pg_w1, pg_w0, seconds)
    worst_10k = max(per_10k)
    figure = Figure(
        "cluster_heartbeat_cpu",
        "cluster: heartbeat CPU per pod, per 10,000 devices (worst pod)",
        "% of a core",
        "measured",
        value=worst_10k,
        baseline=single.get("cpu_per_10k"),
        ratio=worst_10k / single["cpu_per_10k"] if "cpu_per_10k" in single else None,
        note=f"{seconds:.0f} s idle window, devices pinging both sockets every {HEARTBEAT_SECONDS:.0f} s; "
        "pods: "
        + ", ".join(
            f"{c:.1f}% for {n:,} ({p:.1f}% per 10k)" for c, n, p in zip(cpu, on_pod, per_10k, strict=True)
        )
        + f"; Redis {redis_cpu:.1f}% of a core, {redis_ops:.0f} commands/s; PostgreSQL "
        f"{pg_rates['commits']:.1f} commits/s, {pg_rates['rows_written']:.0f} rows written/s, its backends "
        f"{pg_rates['backend_cpu_percent']:.1f}% of a core"
        + f"; the {len(agents)} generators {gen_cpu:.1f}%"
        + ("; baseline: the idle row's single SQLite pod, per 10k devices" if single else ""),
        detail={
            "pods_cpu_percent": cpu,
            "per_10k": per_10k,
            "window_seconds": seconds,
            "redis_cpu_percent": redis_cpu,
            "redis_commands_per_second": redis_ops,
            "pg_commits_per_second": pg_rates["commits"],
            "pg_rows_per_second": pg_rates["rows_written"],
            "pg_backend_cpu_percent": pg_rates["backend_cpu_percent"],
            "devices": ready,
            "generator_cpu_percent": gen_cpu,
        },
    )
    run.add(figure)

    figure = Figure(
        "cluster_rest_online",
        "cluster: REST onlineOnly count",
        "devices",
        f"= {total:,}",
        value=float(online) if online is not None else None,
        note=f"GET /v1/environments?onlineOnly=true&limit=500 on pod 0, every page, {rest_seconds:.1f} s "
        "for the walk, after the fleet settled",
    )
    figure.passed = online == total if online is not None else None
    if online is not None and online != total:
        figure.miss = f"counted {online:,} of {total:,}"
    run.add(figure)

    await _drain(run, pods, agents, home, per_gen)
    generator_rss = [a.rss_kib() for a in agents]
    run.sections["cluster_generators"] = {"rss_kib": generator_rss}


async def _drain(
    run: Run, pods: list[Server], agents: list[AgentProcess], home: dict[str, Server], per_gen: int
) -> None:
    drained, survivors = pods[-1], pods[:-1]
    moving = [a for a in agents if home[a.name] is drained]
    staying = [a for a in agents if home[a.name] is not drained]
    # One generator per surviving pod stops its devices, so that the drained pod's land on pods with
    # room under the file-descriptor limit (the module's docstring).
    shed = [next(a for a in staying if home[a.name] is p) for p in survivors]
    run.say(
        f"  drain: stopping {len(shed) * per_gen:,} devices on the surviving pods first (file descriptors), "
        f"then SIGTERM to {drained.name} holding {len(moving) * per_gen:,}"
    )
    await asyncio.gather(*(a.call("stop", group="cluster") for a in shed))
    remaining = len(staying) * per_gen + len(moving) * per_gen - len(shed) * per_gen
    await _wait_online(survivors[0], remaining, 30)
    await asyncio.gather(*(a.call("balance", pods=[_netloc(p) for p in survivors]) for a in agents))
    await asyncio.gather(*(a.call("mark", group="cluster") for a in moving))
    refused_before = await asyncio.gather(*(a.call("refusals") for a in agents))
    overflows = listen_overflows()
    cpu_before = [p.cpu_seconds() for p in survivors]
    started = time.monotonic()
    drained.proc.send_signal(15)
    back = await asyncio.gather(
        *(a.call("await_reconnect", group="cluster", timeout=DRAIN_WAIT_SECONDS) for a in moving)
    )
    devices_seconds = max(b["at"] for b in back) - started
    returned = sum(b["back"] for b in back)
    rest_seconds = await _wait_online(survivors[0], remaining, max(5.0, DRAIN_WAIT_SECONDS - devices_seconds))
    rest_seconds = rest_seconds - started if rest_seconds is not None else None
    cpu = [p.cpu_seconds() - b for p, b in zip(survivors, cpu_before, strict=True)]
    online = await online_count(survivors[0])
    exit_code = await asyncio.to_thread(drained.proc.wait, 60)
    refused_after = await asyncio.gather(*(a.call("refusals") for a in agents))
    refused: Counter[str] = Counter()
    for after, before in zip(refused_after, refused_before, strict=True):
        refused.update({k: v - before.get(k, 0) for k, v in after.items()})
    refused = +refused
    placement: Counter[str] = Counter()
    for got in await asyncio.gather(*(a.call("placement", group="cluster") for a in moving)):
        placement.update(got)
    extra = sum(b["extra_attempts"] for b in back)
    rereg = sum(b["re_registrations"] for b in back)
    stopped = sum(b["stopped"] for b in back)
    closes: Counter[str] = Counter()
    for b in back:
        closes.update(b["closes"])
    moved = len(moving) * per_gen
    seconds = max(devices_seconds, rest_seconds or 0.0) if returned == moved else None
    names = {_netloc(p): p.name for p in pods}
    figure = Figure(
        "cluster_drain",
        f"cluster: SIGTERM-drained pod's {moved:,} devices online elsewhere",
        "s",
        f"≤ {DRAIN_LIMIT_SECONDS:.0f} s, no connect refused",
        value=seconds,
        note=f"SIGTERM to {drained.name} (drain window {DRAIN_SECONDS:.0f} s, closes spread over it); "
        f"{returned:,} of {moved:,} ready again after {devices_seconds:.1f} s, on "
        + ", ".join(f"{names.get(k, k)} {v:,}" for k, v in sorted(placement.items()))
        + f"; REST onlineOnly on {survivors[0].name}: "
        + (f"{online:,} after {rest_seconds:.1f} s" if rest_seconds is not None else f"{online} at the end")
        + f" (expected {remaining:,}); refused connects: {sum(refused.values())}"
        + (f" ({dict(refused)})" if refused else "")
        + f"; {extra} failed connection attempts, {rereg} re-registrations, {stopped} devices gave up; "
        f"close codes seen {dict(closes)}; surviving pods' CPU "
        + ", ".join(f"{c:.1f} s" for c in cpu)
        + f"; {_overflows(overflows)} connects dropped by full listen queues; drained pod exit {exit_code}. "
        f"Before the drain one generator per surviving pod stopped its devices: two pods cannot hold "
        f"{len(agents) * per_gen:,} split-channel devices under 20,000 file descriptors each",
        detail={
            "returned": returned,
            "moved": moved,
            "devices_seconds": devices_seconds,
            "rest_seconds": rest_seconds,
            "rest_online": online,
            "expected_online": remaining,
            "refused": dict(refused),
            "extra_attempts": extra,
            "re_registrations": rereg,
            "stopped": stopped,
            "closes": dict(closes),
            "placement": {names.get(k, k): v for k, v in placement.items()},
            "survivor_cpu_seconds": cpu,
        },
    )
    errors = sum(refused.values()) + extra + rereg + stopped
    figure.passed = seconds is not None and seconds <= DRAIN_LIMIT_SECONDS and errors == 0
    misses = []
    if returned < moved:
        misses.append(f"{moved - returned} not back within {DRAIN_WAIT_SECONDS:.0f} s")
    if rest_seconds is None:
        misses.append(f"REST counted {online} of {remaining}")
    if seconds is not None and seconds > DRAIN_LIMIT_SECONDS:
        misses.append(f"{seconds / DRAIN_LIMIT_SECONDS:.2f}x the limit")
    if errors:
        misses.append(f"{errors} refused or failed connects")
    figure.miss = "; ".join(misses)
    run.add(figure)


def _redis_cpu(info: dict[str, Any]) -> float:
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _overflows(before: int | None) -> str:
    after = listen_overflows()
    return str(after - before) if after is not None and before is not None else "?"


async def _wait_online(server: Server, expected: int, timeout: float) -> float | None:
    """The instant REST's onlineOnly count on `server` reached `expected`, or None after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if await online_count(server) == expected:
                return time.monotonic()
        await asyncio.sleep(0.5)
    return None


if __name__ == "__main__":
    main()
