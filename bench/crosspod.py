"""Cross-pod round trip: two Tether pods on one PostgreSQL database and one Redis, device on pod A.

The same lean device and workload as the relay round trip (200 idle reference devices too, all on pod
A). One client process holds a relay pair on pod B (cross-pod: command and answer travel through
Redis) and one on pod A (same pod), measured in alternating rounds; the target compares the two p50s.
"""

from __future__ import annotations

import os
import socket

from bench.core import Figure, Run, percentile
from bench.fleet import AgentProcess
from bench.pg import create_database, drop_database
from bench.relay import IDLE_DEVICES, Side, relay_urls, round_trips
from bench.servers import Server, start_tether

REDIS_URL = os.environ.get("TETHER_BENCH_REDIS", "redis://127.0.0.1:6379/9")


def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _not_measured(run: Run, why: str) -> None:
    run.add(
        Figure(
            "crosspod_rtt_p50",
            "cross-pod round trip p50",
            "µs",
            "≤ same-pod p50 + 1 ms",
            note=f"not measured: {why}"[:400],
        )
    )


async def measure(run: Run) -> None:
    if not _reachable(6379) or not _reachable(5432):
        _not_measured(run, "Redis on 127.0.0.1:6379 or PostgreSQL on 127.0.0.1:5432 is not reachable")
        return
    run.say("cross-pod: two Tether pods on PostgreSQL + Redis, device on pod A")
    dsn = await create_database()
    url = dsn.replace("postgresql://", "postgresql+asyncpg://", 1)
    pods: list[Server] = []
    agents: list[AgentProcess] = []
    try:
        try:
            pod_a = await start_tether(run.workdir / "pod-a", "pod-a", database_url=url, redis_url=REDIS_URL)
            pods.append(pod_a)
            pod_b = await start_tether(
                run.workdir / "pod-b", "pod-b", database_url=url, redis_url=REDIS_URL, create_key=False
            )
            pods.append(pod_b)
            pod_b.key = pod_a.key
            devices = await AgentProcess.start("crosspod-devices", run.workdir)
            client = await AgentProcess.start("crosspod-client", run.workdir)
            agents += [devices, client]
            await devices.call(
                "devices", group="idle", base_url=pod_a.base_url, key=pod_a.key, count=IDLE_DEVICES
            )
            connection_id = await devices.call(
                "fast_device", group="active", base_url=pod_a.base_url, key=pod_a.key
            )
            await client.call(
                "client_open", name="same-pod", urls=relay_urls(pod_a, connection_id), key=pod_a.key
            )
            await client.call(
                "client_open", name="cross-pod", urls=relay_urls(pod_b, connection_id), key=pod_a.key
            )
        except Exception as exc:
            _not_measured(run, f"the two-pod cluster did not come up: {exc!r}")
            return
        sides = [Side("same-pod", pod_a, "same-pod"), Side("cross-pod", pod_b, "cross-pod")]
        try:
            samples = await round_trips(run, client, sides, 0.0, run.scaled(6, 2), run.scaled(600, 100))
        except Exception as exc:
            _not_measured(run, f"round trips through pod B failed: {exc!r}")
            return
        same, cross = samples["same-pod"], samples["cross-pod"]
        same50, cross50 = percentile(same, 50), percentile(cross, 50)
        figure = Figure(
            "crosspod_rtt_p50",
            "cross-pod round trip p50",
            "µs",
            "≤ same-pod p50 + 1 ms",
            value=cross50,
            baseline=same50,
            ratio=cross50 / same50,
            note=f"{len(cross)} round trips per path in alternating rounds; same-pod (pod A, PostgreSQL + "
            f"Redis) p50 {same50:.0f} µs p99 {percentile(same, 99):.0f} µs, "
            f"cross-pod p99 {percentile(cross, 99):.0f} µs",
            detail={
                "same_pod": {f"p{q}": percentile(same, q) for q in (50, 90, 99)},
                "cross_pod": {f"p{q}": percentile(cross, q) for q in (50, 90, 99)},
            },
        )
        figure.passed = cross50 <= same50 + 1000
        if not figure.passed:
            figure.miss = f"{cross50 - same50:.0f} µs above same-pod p50 (allowed 1000 µs)"
        run.add(figure)
        run.sections["crosspod_problems"] = [line for pod in pods for line in pod.problems()][:20]
    finally:
        for agent in agents:
            await agent.close()
        for pod in pods:
            pod.stop()
        await drop_database(dsn)
