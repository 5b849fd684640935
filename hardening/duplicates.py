"""Duplicate listeners: two processes on one slot, graceful restarts, and reconnects in a row.

A slot is (organization, `deviceId`, `listenerInstanceId`); `letta server` derives the instance id
from `--computer-name` (device-protocol §1.1), so two processes with the same deviceId and name hold
the same slot. The router's rule (§1.4, §4.2): the newer registration takes the slot and the older
process is closed with 1000 "Replaced by new connection", on which it exits. Judged over a window of
`run.scaled(300)` seconds after both started: exactly one owner (one process alive, the slot's
`connectionId` its lease), and 0 ownership changes after settling — no lease going back and forth
(letta-code #3197, #3450). Pairs run on one pod, across two pods (PostgreSQL + Redis), and with the
real Letta Code CLI when it runs here.

A graceful restart (SIGTERM, then the same identity started again) must never meet a refusal (1008, or
"Replaced" for the new process), nor leave a second row; and 100 reconnects in a row — the socket cut
by a TCP proxy between device and pod (abortive, as a network drop is), now and then a restart by
SIGTERM or SIGKILL — must never earn a terminal close: the device comes back on the same row each time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from bench.servers import REPO

from hardening.cluster import PYTHON, Cluster, Device, Server, pod
from hardening.core import Row, Run
from hardening.halfopen import Api, device_closes, terminal

SETTLE_SECONDS = 10.0  # both processes registered and connected, the loser gone
SAMPLE_SECONDS = 0.5


def spawn_device(workdir: Path, base_url: str, key: str, name: str, device_id: str, label: str) -> Device:
    """A `tether device` process for a given slot, not waited for (the caller watches the slot)."""
    log_path = workdir / f"device-{label}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TETHER_", "LETTA_"))}
    env.update({"LETTA_BASE_URL": base_url, "LETTA_API_KEY": key})
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [PYTHON, "-m", "tether", "device", "--name", name, "--device-id", device_id],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return Device(proc, device_id, log_path)


# ---- a TCP proxy whose connections can be cut -------------------------------------------------------


class Proxy:
    """Forwards 127.0.0.1:port to a pod; `cut()` aborts every connection through it (an RST each way,
    as when a NAT or Wi-Fi drops a flow), and counts the connections it carried."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.accepted = 0
        self._pipes: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> int:
        pipes, self._pipes = self._pipes, set()
        for a, b in pipes:
            a.transport.abort()
            b.transport.abort()
        return len(pipes)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        pipe = (writer, up_writer)
        self._pipes.add(pipe)
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            self._pipes.discard(pipe)
            for w in pipe:
                w.transport.abort()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError, RuntimeError):
        writer.write_eof()


# ---- two processes on one slot ----------------------------------------------------------------------


@dataclass
class Watch:
    """The slot's owner as REST reads it, sampled through the window."""

    label: str
    device_id: str
    samples: int = 0
    owners: list[str] = field(default_factory=list)  # each distinct non-null connectionId, in order
    null_reads: int = 0
    changes_after_settle: int = 0
    events_after_settle: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


async def watch_slot(api: Api, watch: Watch, seconds: float, settle: float) -> None:
    started = time.monotonic()
    settled_events: int | None = None
    row_id: str | None = None
    while (at := time.monotonic() - started) < seconds:
        row = await api.find(watch.device_id)
        if row is None:  # not registered yet
            await asyncio.sleep(SAMPLE_SECONDS)
            continue
        row_id = row["id"]
        watch.samples += 1
        conn = row["connectionId"]
        if conn is None:
            watch.null_reads += at >= settle
        elif not watch.owners or watch.owners[-1] != conn:
            watch.owners.append(conn)
            if at >= settle:
                watch.changes_after_settle += 1
        if settled_events is None and at >= settle and row_id is not None:
            settled_events = len(await api.history(row_id))
        await asyncio.sleep(SAMPLE_SECONDS)
    if row_id is not None and settled_events is not None:
        history = await api.history(row_id)  # newest first
        fresh = history[: max(0, len(history) - settled_events)]
        watch.events_after_settle = [f"{e['event']} {e.get('code') or ''}".strip() for e in fresh]
    rows = await api.fleet_rows(watch.device_id)
    if len(rows) != 1:
        watch.problems.append(f"{len(rows)} rows for the slot")


@dataclass
class Pair:
    label: str
    watch: Watch
    processes: list[str] = field(default_factory=list)  # how each process ended up
    problems: list[str] = field(default_factory=list)


async def reference_pair(run: Run, label: str, servers: tuple[Server, Server], seconds: float) -> Pair:
    """Two `tether device` processes on one slot (each through its own pod when the servers differ)."""
    slug = label.replace(" ", "-")
    device_id = f"dup-{slug}-{uuid.uuid4().hex[:6]}"
    name = f"dup-{slug}"
    api = Api(servers[0], servers[0].key)
    devices = [
        spawn_device(run.workdir, s.base_url, s.key, name, device_id, f"{slug}-{i}")
        for i, s in enumerate(servers)
    ]
    pair = Pair(label, Watch(label, device_id))
    try:
        await asyncio.sleep(0.3)  # the first registers first, most of the time; either order is fine
        await watch_slot(api, pair.watch, seconds, SETTLE_SECONDS)
        alive = [d for d in devices if d.alive()]
        for d in devices:
            closes = device_closes(d.log_path.read_text(errors="replace"))
            pair.processes.append(f"{'alive' if d.alive() else f'exit {d.proc.returncode}'}, closes {closes}")
        if len(alive) != 1:
            pair.problems.append(f"{len(alive)} processes alive at the end, expected exactly 1")
        if pair.watch.owners and alive:
            owner = pair.watch.owners[-1]
            text = alive[0].log_path.read_text(errors="replace")
            if owner not in text:
                pair.problems.append(f"the slot's lease {owner} is not the live process's")
    finally:
        for d in devices:
            d.stop()
        await api.close()
    return pair


async def cli_pair(run: Run, server: Server, seconds: float) -> Pair:
    """The same with two real `letta server` processes (same LETTA_LISTENER_DEVICE_ID and name)."""
    from tests.realcli import CONNECTED, LettaCli, ensure_cli

    letta_js = await asyncio.to_thread(ensure_cli)
    device_id = f"dup-cli-{uuid.uuid4().hex[:6]}"
    env = {"LETTA_LISTENER_DEVICE_ID": device_id}
    clis = [LettaCli(letta_js), LettaCli(letta_js)]
    api = Api(server, server.key)
    pair = Pair("real CLI", Watch("real CLI", device_id))
    try:
        await clis[0].start(server.base_url, server.key, "dup-cli", extra_env=env)
        await clis[0].wait_for_line(CONNECTED, timeout=60)
        await clis[1].start(server.base_url, server.key, "dup-cli", extra_env=env)
        await watch_slot(api, pair.watch, seconds, SETTLE_SECONDS + 10)
        alive = [c for c in clis if c.returncode is None]
        for c in clis:
            state = "alive" if c.returncode is None else f"exit {c.returncode}"
            pair.processes.append(f"{state}, {c.count('Replaced by new connection')} x Replaced")
        if len(alive) != 1:
            pair.problems.append(f"{len(alive)} CLI processes alive at the end, expected exactly 1")
        for c in alive:
            if c.count(CONNECTED) < 1:
                pair.problems.append("the remaining CLI never connected")
    finally:
        for c in clis:
            await c.stop()
        await api.close()
    return pair


# ---- graceful restarts and reconnects in a row ------------------------------------------------------


@dataclass
class Reconnects:
    cuts: int = 0
    restarts: int = 0
    kills: int = 0
    back: list[float] = field(default_factory=list)
    closes: list[tuple[int, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


async def _online_again(api: Api, device: Device, connects_before: int, timeout: float) -> float:
    """Seconds until `device` logged a new readiness and its slot reads online."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        text = device.log_path.read_text(errors="replace")
        if text.count("Connected. Awaiting instructions.") > connects_before:
            with contextlib.suppress(Exception):
                if (await api.rest(device.device_id))["connectionId"] is not None:
                    return time.monotonic() - started
        await asyncio.sleep(0.05)
    raise TimeoutError(f"not back online within {timeout:.0f} s")


def _connects(device: Device) -> int:
    return device.log_path.read_text(errors="replace").count("Connected. Awaiting instructions.")


async def reconnects(run: Run, server: Server, n: int, restart_every: int) -> Reconnects:
    """`n` reconnects of one listener: cuts through the proxy, every `restart_every`-th a restart of
    the process with the same identity (SIGTERM and SIGKILL in turn)."""
    port = int(server.base_url.rsplit(":", 1)[1])
    proxy = Proxy(port)
    await proxy.start()
    api = Api(server, server.key)
    device_id = f"reconnects-{uuid.uuid4().hex[:6]}"
    base = f"http://127.0.0.1:{proxy.port}"
    out = Reconnects()
    logs: list[Path] = []

    def start(i: int) -> Device:
        d = spawn_device(run.workdir, base, server.key, "reconnects", device_id, f"reconnects-{i}")
        logs.append(d.log_path)
        return d

    device = start(0)
    try:
        out.back.append(await _online_again(api, device, 0, 30))
        row_id = (await api.rest(device_id))["id"]
        for i in range(1, n + 1):
            if i % restart_every == 0:
                kill = (i // restart_every) % 2 == 0
                if kill:
                    device.proc.kill()
                    out.kills += 1
                else:
                    device.proc.send_signal(signal.SIGTERM)
                    out.restarts += 1
                await asyncio.to_thread(device.proc.wait, 15)
                device = start(i)
                before = 0
            else:
                before = _connects(device)
                proxy.cut()
                out.cuts += 1
            try:
                out.back.append(await _online_again(api, device, before, 40))
            except TimeoutError as exc:
                out.problems.append(f"reconnect {i}: {exc}")
                break
            if not device.alive():
                out.problems.append(f"reconnect {i}: the device exited with {device.proc.returncode}")
                break
        rest = await api.rest(device_id)
        if rest["id"] != row_id:
            out.problems.append(f"the slot's row changed from {row_id} to {rest['id']}")
        rows = await api.fleet_rows(device_id)
        if len(rows) != 1:
            out.problems.append(f"{len(rows)} rows for the slot after {n} reconnects")
    finally:
        device.stop()
        await proxy.close()
        await api.close()
    for log in logs:
        out.closes.extend(device_closes(log.read_text(errors="replace")))
    for code, reason in out.closes:
        if terminal(code, reason):
            out.problems.append(f"terminal close {code} {reason!r}")
    return out


async def graceful_restarts(run: Run, server: Server, n: int, cli: bool) -> Reconnects:
    """SIGTERM a listener, start it again at once with the same identity, `n` times; the new process
    must come online on the same row and never be refused or replaced."""
    api = Api(server, server.key)
    out = Reconnects()
    device_id = f"restart-{uuid.uuid4().hex[:6]}"
    try:
        if cli:
            from tests.realcli import CONNECTED, LettaCli, ensure_cli

            letta_js = await asyncio.to_thread(ensure_cli)
            env = {"LETTA_LISTENER_DEVICE_ID": device_id}
            row_id = None
            for i in range(n + 1):
                c = LettaCli(letta_js)
                await c.start(server.base_url, server.key, "restart-cli", extra_env=env)
                started = time.monotonic()
                try:
                    await c.wait_for_line(CONNECTED, timeout=60)
                    await asyncio.sleep(1.0)  # a refusal would follow the connect at once
                    out.back.append(time.monotonic() - started)
                    if c.count("Replaced by new connection") or c.count("expired, re-registering"):
                        out.problems.append(f"restart {i}: the CLI was refused:\n{c.tail(5)}")
                    row = await api.rest(device_id)
                    row_id = row_id or row["id"]
                    if row["id"] != row_id:
                        out.problems.append(f"restart {i}: a new row {row['id']}")
                finally:
                    code = await c.stop()
                out.restarts += i > 0
                if c.returncode is not None and code not in (0, None, -15, 143):
                    out.problems.append(f"restart {i}: the CLI exited with {code} on SIGTERM")
        else:
            row_id = None
            for i in range(n + 1):
                d = spawn_device(
                    run.workdir, server.base_url, server.key, "restart", device_id, f"restart-{i}"
                )
                try:
                    out.back.append(await _online_again(api, d, 0, 30))
                    await asyncio.sleep(0.5)
                    row = await api.rest(device_id)
                    row_id = row_id or row["id"]
                    if row["id"] != row_id:
                        out.problems.append(f"restart {i}: a new row {row['id']}")
                    if not d.alive():
                        out.problems.append(f"restart {i}: exited with {d.proc.returncode}")
                finally:
                    d.proc.send_signal(signal.SIGTERM)
                    await asyncio.to_thread(d.proc.wait, 15)
                out.restarts += i > 0
                for code, reason in device_closes(d.log_path.read_text(errors="replace")):
                    out.closes.append((code, reason))
                    if terminal(code, reason):
                        out.problems.append(f"restart {i}: terminal close {code} {reason!r}")
        rows = await api.fleet_rows(device_id)
        if len(rows) != 1:
            out.problems.append(f"{len(rows)} rows for the slot after {n} restarts")
    finally:
        await api.close()
    return out


# ---- the rows ---------------------------------------------------------------------------------------


def _cli_available() -> str | None:
    try:
        from tests.realcli import ensure_cli

        ensure_cli()
    except Exception as exc:
        return f"{exc}"[:200]
    return None


async def measure(run: Run) -> None:
    seconds = float(run.scaled(300, minimum=30))
    cluster = Cluster()
    cli_missing = await asyncio.to_thread(_cli_available)
    try:
        database, redis = await cluster.database_url(), cluster.redis_url()
        async with (
            pod(run.workdir, "dup-a", database_url=database, redis_url=redis) as a,
            pod(run.workdir, "dup-b", database_url=database, redis_url=redis) as b,
        ):
            b.key = a.key  # one database: one organization, one key
            started = time.monotonic()
            jobs: list[asyncio.Task[Pair]] = [
                asyncio.create_task(reference_pair(run, "one pod", (a, a), seconds)),
                asyncio.create_task(reference_pair(run, "two pods", (a, b), seconds)),
            ]
            if cli_missing is None:
                jobs.append(asyncio.create_task(cli_pair(run, a, seconds)))
            n = run.scaled(100, minimum=10)
            recon = await reconnects(run, a, n, restart_every=10)
            recon_took = time.monotonic() - started
            run.say(f"  {n} reconnects: {recon.problems or 'ok'}")
            restarts = await graceful_restarts(run, a, run.scaled(10, minimum=3), cli=False)
            cli_restarts = (
                await graceful_restarts(run, a, run.scaled(3, minimum=2), cli=True)
                if cli_missing is None
                else None
            )
            restarts_took = time.monotonic() - started - recon_took
            pairs = await asyncio.gather(*jobs)
            run.add(_pairs_row(pairs, seconds, cli_missing, time.monotonic() - started))
            run.add(_restarts_row(restarts, cli_restarts, cli_missing)).seconds = restarts_took
            run.add(_reconnects_row(recon, n)).seconds = recon_took
    finally:
        await asyncio.to_thread(cluster.close)


def _pairs_row(pairs: list[Pair], seconds: float, cli_missing: str | None, took: float) -> Row:
    row = Row(
        "duplicate_listeners",
        "duplicate listeners on one slot",
        load=f"{len(pairs)} pairs of processes on one slot each, watched {seconds:.0f} s: "
        + ", ".join(p.label for p in pairs),
        faults="the second process of each pair registers the slot while the first holds it",
        bound=f"exactly 1 owner at the end; 0 ownership changes after {SETTLE_SECONDS:.0f} s",
        inputs={"pairs": len(pairs), "seconds watched": int(seconds)},
    )
    changes = 0
    for p in pairs:
        w = p.watch
        changes += w.changes_after_settle
        for problem in p.problems + w.problems:
            row.fail(f"{p.label}: {problem}")
        if w.changes_after_settle:
            row.fail(f"{p.label}: {w.changes_after_settle} ownership changes after settling {w.owners}")
        if w.events_after_settle:
            row.fail(f"{p.label}: history after settling: {w.events_after_settle}")
    row.lost = f"{changes} ownership changes after settling; " + "; ".join(
        f"{p.label}: {len(p.watch.owners)} leases seen, {p.watch.samples} reads" for p in pairs
    )
    row.note = " ".join(f"{p.label}: {' / '.join(p.processes)}." for p in pairs)
    if cli_missing is not None:
        row.note += f" The real CLI did not run here ({cli_missing}): reference devices only."
    row.detail = {"pairs": {p.label: {"owners": p.watch.owners, "processes": p.processes} for p in pairs}}
    row.seconds = took
    return row.judge()


def _restarts_row(ref: Reconnects, cli: Reconnects | None, cli_missing: str | None) -> Row:
    row = Row(
        "duplicate_listeners",
        "graceful restart of a listener",
        load="1 listener on 1 pod of 2 (PostgreSQL + Redis)",
        faults="SIGTERM, then the same identity started again at once"
        + ("; reference device and real CLI" if cli is not None else "; reference device"),
        bound="0 refusals (1008, or Replaced for the new process); the same row every time",
        inputs={"reference device restarts": ref.restarts}
        | ({"real CLI restarts": cli.restarts} if cli is not None else {}),
    )
    for label, r in (("reference", ref), ("real CLI", cli)):
        if r is None:
            continue
        for p in r.problems:
            row.fail(f"{label}: {p}")
    backs = ref.back + (cli.back if cli is not None else [])
    row.lost = (
        f"{len(row.failures)} refusals or new rows; online again after a restart in at most "
        f"{max(backs):.1f} s"
        if backs
        else f"{len(row.failures)} refusals"
    )
    if cli_missing is not None:
        row.note = f"The real CLI did not run here ({cli_missing})."
    return row.judge()


def _reconnects_row(r: Reconnects, n: int) -> Row:
    row = Row(
        "duplicate_listeners",
        f"{n} reconnects in a row",
        load="1 reference device through a TCP proxy to 1 pod of 2 (PostgreSQL + Redis)",
        faults=f"{r.cuts} connections cut by the proxy (RST both ways), {r.restarts} SIGTERM restarts, "
        f"{r.kills} SIGKILL restarts",
        bound="0 terminal closes (1008 or 1000 Replaced); the same row; online again every time",
        inputs={"socket cuts": r.cuts, "restarts": r.restarts + r.kills},
    )
    for p in r.problems:
        row.fail(p)
    codes: dict[int, int] = {}
    for code, _ in r.closes:
        codes[code] = codes.get(code, 0) + 1
    terminal_n = sum(1 for c, why in r.closes if terminal(c, why))
    worst = max(r.back) if r.back else 0.0
    row.lost = (
        f"{terminal_n} terminal closes; closes seen by the device {codes}; back online in ≤ {worst:.1f} s"
    )
    return row.judge()
