"""Planning for a million devices: BENCHMARKS.md's sizing section, computed from the run's figures.

Nothing here is measured and nothing is assumed beyond what the text says: each quantity is a figure of
the same run (the `cluster` row's pods, Redis and PostgreSQL; the `fanout` row's sessions per pod)
scaled linearly to the fleet. Linear is what the figures support: per-device memory, heartbeat CPU and
database writes were read at 9,000 devices per pod; past a pod's limits the fleet grows by pods.
"""

from __future__ import annotations

import math
import os
from typing import Any

from bench.core import Figure, Run

FLEET = 1_000_000
FD_LIMIT = 20_000  # per process on the measuring machine; a pod's socket count is bounded by it
ACTIVE_SHARES = (0.01, 0.05, 0.10)  # fractions of the fleet streaming at once, to show the fan-out cost


def _figure(run: Run, key: str) -> Figure | None:
    found = next((f for f in run.figures if f.key == key), None)
    return found if found is not None and found.value is not None else None


def sizing(run: Run, fleet: int = FLEET) -> dict[str, Any] | None:
    """The numbers of the section, or None when the run has no cluster figures."""
    rss = _figure(run, "cluster_rss_per_device")
    redis_mem = _figure(run, "cluster_redis_per_device")
    beat = _figure(run, "cluster_heartbeat_cpu")
    connect = _figure(run, "cluster_connect")
    if rss is None or redis_mem is None or beat is None or connect is None or redis_mem.value is None:
        return None
    d = rss.detail
    devices = sum(d["devices_per_pod"])
    fds_per_device = (sum(d["fds_after"]) - sum(d["fds_before"])) / devices
    base_fds = max(d["fds_before"])
    fd_cap = math.floor((FD_LIMIT - base_fds) / fds_per_device)
    kib = max(d["per_pod_kib"])
    base_kib = max(d["rss_before_kib"])
    cpu_per_10k = max(beat.detail["per_10k"])
    cpu_cap = math.floor(100 * 10_000 / cpu_per_10k) if cpu_per_10k > 0 else None
    cap = min(c for c in (fd_cap, cpu_cap) if c is not None)
    # One pod drained or lost: the others take its devices, each still under its cap.
    pods = math.ceil(fleet / cap) + 1
    b = beat.detail
    seen = b["devices"]
    redis_cpu_per_device = b["redis_cpu_percent"] / seen  # % of a core
    pg_cpu_per_device = b["pg_backend_cpu_percent"] / seen
    c = connect.detail
    out: dict[str, Any] = {
        "fleet": fleet,
        "measured_devices": devices,
        "fds_per_device": fds_per_device,
        "fd_cap": fd_cap,
        "cpu_cap": cpu_cap,
        "devices_per_pod": cap,
        "pods": pods,
        "pod_rss_gib": (base_kib + kib * fleet / (pods - 1)) / 2**20,
        "redis_gib": (redis_mem.detail["used_memory_before"] + redis_mem.value * fleet) / 2**30,
        "redis_bytes_per_device": redis_mem.value,
        "redis_cpu_percent": redis_cpu_per_device * fleet,
        "redis_commands_per_second": b["redis_commands_per_second"] / seen * fleet,
        "redis_saturates_at": 100 / redis_cpu_per_device if redis_cpu_per_device > 0 else None,
        "pg_rows_per_second": b["pg_rows_per_second"] / seen * fleet,
        "pg_commits_per_second": b["pg_commits_per_second"] / len(d["devices_per_pod"]) * pods,
        "pg_cpu_percent": pg_cpu_per_device * fleet,
        "pg_rows_per_connect": c["pg_rows_per_connect"],
        "pg_commits_per_connect": c["pg_commits_per_connect"],
        "connects_per_second": c["per_second"],
        "heartbeat_cpu_per_10k": cpu_per_10k,
    }
    if "pods_cpu_seconds" in c:
        cpu_per_connect = sum(c["pods_cpu_seconds"]) / c["ready"]
        out["pod_cpu_ms_per_connect"] = 1000 * cpu_per_connect
        # Each pod on a core of its own, every device reconnecting at once (a full restart).
        out["restart_seconds"] = fleet * cpu_per_connect / pods
        out["restart_pg_rows_per_second"] = c["pg_rows_per_connect"] * fleet / out["restart_seconds"]
    if "redis_cpu_seconds" in c:
        out["redis_ms_per_connect"] = 1000 * c["redis_cpu_seconds"] / c["ready"]
    fan = _figure(run, "fanout_max_sessions")
    if fan is not None and fan.value:
        out["sessions_per_pod"] = fan.value
        out["session_pods"] = {share: math.ceil(fleet * share / fan.value) for share in ACTIVE_SHARES}
    return out


def section(run: Run) -> list[str]:
    s = sizing(run)
    if s is None:
        return []
    first = _first_to_saturate(s)
    lines = [
        "## Planning for a million devices",
        "",
        "Computed by `bench/planning.py` from this run's cluster figures "
        f"({s['measured_devices']:,} devices on three pods, PostgreSQL, a private Redis) and fan-out "
        "figures, scaled linearly to "
        f"{s['fleet']:,} split-channel devices idling with 30 s heartbeats.",
        "",
        "| quantity | for 1,000,000 devices | from |",
        "| --- | --- | --- |",
        f"| devices per pod | {s['devices_per_pod']:,} | {s['fds_per_device']:.2f} file descriptors per "
        f"device under {FD_LIMIT:,} per process ({s['fd_cap']:,}); heartbeat CPU "
        f"{s['heartbeat_cpu_per_10k']:.2f}% of a core per 10,000 devices "
        f"({s['cpu_cap']:,} per core) |",
        f"| pods | {s['pods']:,} | the fleet over devices per pod, plus one so that a drained or lost pod's "
        "devices fit on the others |",
        f"| pod memory | {s['pod_rss_gib']:.2f} GiB RSS each | RSS per device (worst pod) x devices per pod "
        "with one pod down, plus the empty pod |",
        f"| Redis memory | {s['redis_gib']:.2f} GiB | {s['redis_bytes_per_device']:.0f} B per device "
        "(`used_memory` delta) plus the empty instance |",
        f"| Redis CPU, idle fleet | {s['redis_cpu_percent']:.0f}% of a core, "
        f"{s['redis_commands_per_second']:,.0f} commands/s | its CPU and commands over the heartbeat "
        "window |",
        f"| PostgreSQL writes, idle fleet | {s['pg_rows_per_second']:,.0f} rows/s in "
        f"{s['pg_commits_per_second']:,.1f} commits/s | rows written per device-second over the heartbeat "
        "window (heartbeat flushes); commits per pod-second x pods |",
        f"| PostgreSQL backends' CPU, idle fleet | {s['pg_cpu_percent']:.0f}% of a core | the cluster's "
        "backends (pg_stat_activity pids) over the window; WAL writer and checkpointer not counted |",
        f"| PostgreSQL per (re)connect | {s['pg_rows_per_connect']:.1f} rows in "
        f"{s['pg_commits_per_connect']:.2f} commits | the connect phase's writes over the devices |",
    ]
    if "restart_seconds" in s:
        lines.append(
            f"| a full restart: every device reconnecting | {s['restart_seconds']:.0f} s, "
            f"{s['restart_pg_rows_per_second']:,.0f} rows/s to PostgreSQL | "
            f"{s['pod_cpu_ms_per_connect']:.2f} ms of pod CPU per connect, each pod on its own core |"
        )
    if "sessions_per_pod" in s:
        shares = ", ".join(f"{share:.0%}: {n:,} pods" for share, n in s["session_pods"].items())
        lines.append(
            f"| streaming sessions at 20 frames/s | {shares} | {s['sessions_per_pod']:,.0f} sessions per pod "
            "with p99 ≤ 50 ms (the fan-out row), for that share of the fleet streaming at once |"
        )
    lines += ["", first, ""]
    return lines


def _first_to_saturate(s: dict[str, Any]) -> str:
    """Pods are added at will; Redis is one instance on one thread, PostgreSQL one primary."""
    redis_share = s["redis_cpu_percent"] / 100
    limits = [f"Redis's one thread at {redis_share:.0%} of a core for the idle fleet"]
    if "redis_ms_per_connect" in s:
        rate = 1000 / s["redis_ms_per_connect"] if s["redis_ms_per_connect"] > 0 else math.inf
        limits.append(f"{rate:,.0f} connects/s at most before Redis's thread is full during a reconnect wave")
    text = (
        "**What saturates first.** Pods scale out; a pod's first limit is its file descriptors "
        f"({s['fd_cap']:,} devices), long before its heartbeat CPU ({s['cpu_cap']:,}). The shared parts do "
        "not scale out: " + "; ".join(limits) + f"; PostgreSQL at {s['pg_rows_per_second']:,.0f} row "
        f"writes/s and {s['pg_cpu_percent'] / 100:.2f} cores of backend CPU."
    )
    cores = os.cpu_count() or 1
    fills = {"Redis (one thread)": s["redis_saturates_at"]}
    if s["pg_cpu_percent"] > 0:
        fills[f"PostgreSQL (its backends on {cores} cores, as on the measuring machine)"] = (
            s["fleet"] * cores * 100 / s["pg_cpu_percent"]
        )
    known = {k: v for k, v in fills.items() if v is not None}
    if known:
        name = min(known, key=lambda k: known[k])
        text += (
            " Idle fleet size at which each fills: "
            + ", ".join(f"{k} {v:,.0f}" for k, v in known.items())
            + f". First: {name}"
            + (", below a million." if known[name] < s["fleet"] else ", above a million.")
        )
    return text
