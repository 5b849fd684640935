"""Half-open devices: a reference device frozen with SIGSTOP, one whose packets are dropped, and
sockets that connect but never become ready.

One pod (embedded SQLite) with short presence bounds, so that a trial takes seconds instead of the
production two minutes; the bounds judged are the ones the settings document, computed from the
values set here (README "Presence, leases and close codes"):

* `connectionId` reads null (REST, `GET /v1/environments/{deviceId}`) once the last ping is
  `TETHER_OFFLINE_AFTER_SECONDS` old: within that long of the freeze.
* The fleet API's `state` reads offline within OFFLINE_AFTER + one sweep + RECONNECT_GRACE: the sweep
  closes the silent pair (4004) and counts it away at once, the grace window then ends it.
* A control socket whose pair never completes (it never opens its stream socket) reads `connecting`
  meanwhile and is closed with 4006 within READY_TIMEOUT + one sweep. A single socket that never
  pings is closed with 4004 within OFFLINE_AFTER + one sweep.

After SIGCONT (or the link coming back) the same process must be online again with the same row, no
second row for its slot, and no close that ends it (1000 "Replaced by new connection") or makes it
re-register (1008).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import statistics
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from hardening.cluster import Device, Server, pod, reference_device
from hardening.core import Row, Run

OFFLINE_AFTER = 6.0  # TETHER_OFFLINE_AFTER_SECONDS for the run (production default: 120 s)
GRACE = 3.0  # TETHER_RECONNECT_GRACE_SECONDS (default 10 s)
READY_TIMEOUT = 5.0  # TETHER_READY_TIMEOUT_SECONDS (default 35 s)
HEARTBEAT = 1.5  # the devices' ping interval here (the CLI's: 30 s, a quarter of the online window)
SWEEP = min(5.0, max(0.05, OFFLINE_AFTER / 10))  # the pod's sweep interval (node.py)
POLL = 0.1  # how often the trials read the API
SLACK = 1.0  # reading, scheduling and the API's own round trips on a loaded 2-core machine
# The device reconnects at once after a ready socket, then backs off 1, 2, 4 … 30 s (§4.3): the
# longest a link that comes back can wait for the device's next attempt.
DEVICE_BACKOFF_CAP = 30.0
NULL_BOUND = OFFLINE_AFTER + SLACK
OFFLINE_BOUND = OFFLINE_AFTER + SWEEP + GRACE + SLACK
REAP_BOUND = READY_TIMEOUT + SWEEP + SLACK
SILENT_REAP_BOUND = OFFLINE_AFTER + SWEEP + SLACK
RESUME_BOUND = 5.0  # SIGCONT: the device reads the 4004 waiting for it and reconnects at once
RELINK_BOUND = DEVICE_BACKOFF_CAP + 5.0
SETTINGS = {
    "offline_after_seconds": str(OFFLINE_AFTER),
    "reconnect_grace_seconds": str(GRACE),
    "ready_timeout_seconds": str(READY_TIMEOUT),
}
DEVICE_ARGS = ("--heartbeat", str(HEARTBEAT))
REPLACED_REASON = "Replaced by new connection"
Step = Callable[[], Awaitable[None]]
_CLOSE_LINE = re.compile(r"socket closed (?:before ready )?\((\d+) '(.*)'\)")


def device_closes(log_text: str) -> list[tuple[int, str]]:
    """The closes a reference device logged (code, reason), in order."""
    return [(int(m[1]), m[2]) for m in _CLOSE_LINE.finditer(log_text)]


def terminal(code: int, reason: str) -> bool:
    """A close that ends the device (REPLACED) or throws its lease away (1008): never deserved here."""
    return code == 1008 or (code == 1000 and reason == REPLACED_REASON)


class Api:
    """The reads a trial polls: the REST row of a deviceId and the fleet rows of that slot."""

    def __init__(self, server: Server, key: str) -> None:
        self.server = server
        self.http = httpx.AsyncClient(
            base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=10
        )

    async def close(self) -> None:
        await self.http.aclose()

    async def rest(self, device_id: str) -> dict[str, Any]:
        row = await self.find(device_id)
        if row is None:
            raise LookupError(f"no environment {device_id!r}")
        return row

    async def find(self, device_id: str) -> dict[str, Any] | None:
        """The REST row of `device_id`, None before it registered."""
        r = await self.http.get(f"/v1/environments/{device_id}")
        if r.status_code == 404:
            return None
        r.raise_for_status()
        return dict(r.json())

    async def fleet_rows(self, device_id: str) -> list[dict[str, Any]]:
        r = await self.http.get("/v1/tether/environments", params={"q": device_id, "limit": "200"})
        r.raise_for_status()
        return [i for i in r.json()["items"] if i["deviceId"] == device_id]

    async def fleet_state(self, device_id: str) -> str:
        rows = await self.fleet_rows(device_id)
        return str(rows[0]["state"]) if len(rows) == 1 else f"{len(rows)} rows"

    async def history(self, row_id: str) -> list[dict[str, Any]]:
        r = await self.http.get(f"/v1/tether/environments/{row_id}")
        r.raise_for_status()
        return list(r.json()["history"])

    async def until(self, what: str, check: Callable[[], Awaitable[bool]], timeout: float) -> float:
        """Seconds until the coroutine function `check()` is true; TimeoutError after `timeout`."""
        started = time.monotonic()
        while True:
            if await check():
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{what}: not within {timeout:.1f} s")
            await asyncio.sleep(POLL)


@dataclass
class Freeze:
    """One freeze of a device and its return, in seconds from the freeze (or the restore)."""

    to_null: float | None = None
    to_offline: float | None = None  # when the fleet state last turned offline before the restore
    to_recover: float | None = None
    states: list[tuple[float, str]] = field(default_factory=list)  # each change of the fleet state
    problems: list[str] = field(default_factory=list)


async def freeze_trial(api: Api, device: Device, connection_id: str, cut: Step, restore: Step) -> Freeze:
    """Cut the device off (`cut()`) for OFFLINE_BOUND + 1 s while reading its REST row and fleet state,
    restore it, and time its return. Its state must go online -> (away) -> offline, never back."""
    trial = Freeze()
    device_id = device.device_id
    closes_before = len(device_closes(device.log_path.read_text(errors="replace")))
    row_id = (await api.fleet_rows(device_id))[0]["id"]

    async def is_back() -> bool:
        row = await api.rest(device_id)
        return row["connectionId"] is not None and await api.fleet_state(device_id) == "online"

    await cut()
    started = time.monotonic()
    try:
        while (at := time.monotonic() - started) < OFFLINE_BOUND + 1:
            if trial.to_null is None and (await api.rest(device_id))["connectionId"] is None:
                trial.to_null = at
            state = await api.fleet_state(device_id)
            if not trial.states or trial.states[-1][1] != state:
                trial.states.append((round(at, 2), state))
            await asyncio.sleep(POLL)
    finally:
        await restore()
    order = [state for _, state in trial.states]
    if order[-1:] == ["offline"]:
        trial.to_offline = trial.states[-1][0]
    else:
        trial.problems.append(f"not offline {OFFLINE_BOUND + 1:.1f} s after the cut: {trial.states}")
    if order not in (["online", "offline"], ["online", "away", "offline"], ["away", "offline"]):
        trial.problems.append(f"the fleet state went {' -> '.join(order)}")
    if trial.to_null is None:
        trial.problems.append("connectionId never read null")
    try:
        trial.to_recover = await api.until("back online", is_back, RELINK_BOUND * 2)
    except TimeoutError as exc:
        trial.problems.append(str(exc))
    rest = await api.rest(device_id)
    if rest["connectionId"] is not None and rest["connectionId"] != connection_id:
        trial.problems.append(f"came back with another lease {rest['connectionId']} (re-registered)")
    if rest["id"] != row_id:
        trial.problems.append(f"came back as row {rest['id']}, was {row_id}")
    rows = await api.fleet_rows(device_id)
    if len(rows) != 1:
        trial.problems.append(f"{len(rows)} rows for its slot after the return")
    if not device.alive():
        trial.problems.append(f"the device exited with {device.proc.returncode}")
    for code, reason in device_closes(device.log_path.read_text(errors="replace"))[closes_before:]:
        if terminal(code, reason):
            trial.problems.append(f"the device got a terminal close {code} {reason!r}")
    return trial


# ---- packets dropped: the device in a network namespace ---------------------------------------------


@dataclass
class Netns:
    """A network namespace joined to the host by a veth pair; `down()` drops every packet both ways
    (the host end loses its link, the namespace end its carrier) without a reset or a FIN."""

    name: str
    host_if: str
    host_ip: str
    ns_ip: str

    @property
    def prefix(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.name)

    async def down(self) -> None:
        await _ip("link", "set", self.host_if, "down")

    async def up(self) -> None:
        await _ip("link", "set", self.host_if, "up")


async def _ip(*args: str) -> None:
    done = await asyncio.to_thread(subprocess.run, ["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@contextlib.asynccontextmanager
async def netns() -> AsyncIterator[Netns]:
    """A namespace of the run's own; needs root and iproute2 (RuntimeError otherwise)."""
    tag = uuid.uuid4().hex[:6]
    subnet = 16 + int(tag, 16) % 200
    ns = Netns(f"tether-h-{tag}", f"th{tag}a", f"10.250.{subnet}.1", f"10.250.{subnet}.2")
    peer = f"th{tag}b"
    await _ip("netns", "add", ns.name)
    try:
        await _ip("link", "add", ns.host_if, "type", "veth", "peer", "name", peer)
        await _ip("link", "set", peer, "netns", ns.name)
        await _ip("addr", "add", f"{ns.host_ip}/24", "dev", ns.host_if)
        await _ip("link", "set", ns.host_if, "up")
        for args in (("addr", "add", f"{ns.ns_ip}/24", "dev", peer), ("link", "set", peer, "up"),
                     ("link", "set", "lo", "up")):  # fmt: skip
            await _ip("netns", "exec", ns.name, "ip", *args)
        yield ns
    finally:
        with contextlib.suppress(RuntimeError):
            await _ip("link", "del", ns.host_if)
        with contextlib.suppress(RuntimeError):
            await _ip("netns", "del", ns.name)


# ---- sockets that never become ready ----------------------------------------------------------------


@dataclass
class NeverReady:
    connection_id: str
    state_while_open: str = ""
    to_close: float | None = None
    close_code: int | None = None
    to_offline: float | None = None
    problems: list[str] = field(default_factory=list)


async def register(api: Api, device_id: str, name: str) -> tuple[str, str]:
    """Register a slot as `letta server` does; its connectionId and wsUrl."""
    body = {
        "deviceId": device_id,
        "connectionName": name,
        "listenerInstanceId": f"server-{uuid.uuid4().hex[:16]}",
        "metadata": {"lettaCodeVersion": "0.32.18", "os": "linux", "environmentMessageProtocol": "v2-input",
                     "supportsPairedListenerGenerations": True},
    }  # fmt: skip
    r = await api.http.post("/v1/environments/register", json=body)
    r.raise_for_status()
    return str(r.json()["connectionId"]), str(r.json()["wsUrl"])


async def never_ready_trial(api: Api, key: str, split: bool) -> NeverReady:
    """Open a control socket (split: paired, its stream never opened; else a single socket that never
    pings) and wait for the router to close it; then time the fleet row reading offline."""
    device_id = f"never-ready-{uuid.uuid4().hex[:8]}"
    connection_id, ws_url = await register(api, device_id, device_id)
    trial = NeverReady(connection_id)
    query = "?channel=control&connectionGeneration=" + str(uuid.uuid4()) + "&connectionAttempt=1"
    url = ws_url + (query if split else "")
    bound = REAP_BOUND if split else SILENT_REAP_BOUND
    started = time.monotonic()
    ws: ClientConnection = await connect(
        url, additional_headers={"Authorization": f"Bearer {key}"}, ping_interval=None, compression=None
    )
    try:
        if split:
            first = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
            if first.get("type") != "listener_ready":
                trial.problems.append(f"first frame {first!r}, not listener_ready")
        await asyncio.sleep(min(1.0, bound / 3))
        trial.state_while_open = await api.fleet_state(device_id)
        expected = "connecting" if split else "online"
        if trial.state_while_open != expected:
            trial.problems.append(f"state {trial.state_while_open!r} while open, expected {expected}")
        try:
            while True:  # a real peer answers the close: this one reads on, and never pings
                await asyncio.wait_for(ws.recv(), bound * 3)
        except ConnectionClosed as exc:
            trial.to_close = time.monotonic() - started
            trial.close_code = exc.rcvd.code if exc.rcvd is not None else None
        except TimeoutError:
            trial.problems.append(f"still open after {bound * 3:.0f} s")
    finally:
        await ws.close()

    async def is_offline() -> bool:
        return await api.fleet_state(device_id) == "offline"

    try:
        trial.to_offline = (time.monotonic() - started) + await api.until(
            "never-ready row offline", is_offline, bound + GRACE + 10
        )
    except TimeoutError as exc:
        trial.problems.append(str(exc))
    want = 4006 if split else 4004
    if trial.close_code != want:
        trial.problems.append(f"closed with {trial.close_code}, expected {want}")
    if trial.to_close is not None and trial.to_close > bound:
        trial.problems.append(f"closed after {trial.to_close:.1f} s (bound {bound:.1f} s)")
    return trial


# ---- the row --------------------------------------------------------------------------------------


def _figures(values: list[float]) -> str:
    if not values:
        return "—"
    return f"median {statistics.median(values):.1f} s, max {max(values):.1f} s (n={len(values)})"


def _judge_freezes(row: Row, trials: list[Freeze], recover_bound: float) -> None:
    for i, t in enumerate(trials, 1):
        for p in t.problems:
            row.fail(f"trial {i}: {p}")
        if t.to_null is not None and t.to_null > NULL_BOUND:
            row.fail(f"trial {i}: connectionId null after {t.to_null:.1f} s (bound {NULL_BOUND:.1f} s)")
        if t.to_offline is not None and t.to_offline > OFFLINE_BOUND:
            row.fail(f"trial {i}: offline after {t.to_offline:.1f} s (bound {OFFLINE_BOUND:.1f} s)")
        if t.to_recover is not None and t.to_recover > recover_bound:
            row.fail(f"trial {i}: back after {t.to_recover:.1f} s (bound {recover_bound:.1f} s)")
    nulls = [t.to_null for t in trials if t.to_null is not None]
    offs = [t.to_offline for t in trials if t.to_offline is not None]
    backs = [t.to_recover for t in trials if t.to_recover is not None]
    row.lost = (
        f"{len(row.failures)} misses; connectionId null {_figures(nulls)}; fleet offline {_figures(offs)}; "
        f"back online {_figures(backs)}; 0 terminal closes and 0 duplicate rows unless listed"
    )
    row.detail = {"to_null": nulls, "to_offline": offs, "to_recover": backs}


async def _freezes(run: Run, server: Server, api: Api, trials: int) -> Row:
    row = Row(
        "half_open",
        "half-open device: SIGSTOP",
        load="1 reference device (ping every 1.5 s) on 1 pod",
        faults=f"SIGSTOP until the fleet row reads offline, then SIGCONT; {trials} times, same process",
        bound=f"null connectionId ≤ {NULL_BOUND:.1f} s, offline ≤ {OFFLINE_BOUND:.1f} s, back ≤ "
        f"{RESUME_BOUND:.0f} s; 0 terminal closes, 0 duplicate rows",
    )
    started = time.monotonic()
    device, conn = await reference_device(run.workdir, server, server.key, "frozen", args=DEVICE_ARGS)
    results: list[Freeze] = []
    try:
        for i in range(trials):

            async def cut() -> None:
                os.kill(device.proc.pid, signal.SIGSTOP)

            async def restore() -> None:
                os.kill(device.proc.pid, signal.SIGCONT)

            results.append(await freeze_trial(api, device, conn, cut, restore))
            run.say(f"  SIGSTOP trial {i + 1}: {results[-1]}")
    finally:
        device.stop()
    row.inputs = {"SIGSTOP/SIGCONT": trials}
    _judge_freezes(row, results, RESUME_BOUND)
    row.seconds = time.monotonic() - started
    return row.judge()


async def _drops(run: Run, server: Server, api: Api, trials: int) -> Row:
    row = Row(
        "half_open",
        "half-open device: packets dropped",
        load="1 reference device in a network namespace (veth), ping every 1.5 s",
        faults=f"the veth link set down (every packet dropped, no RST/FIN) until the row reads offline, "
        f"then up; {trials} times, same process",
        bound=f"null connectionId ≤ {NULL_BOUND:.1f} s, offline ≤ {OFFLINE_BOUND:.1f} s, back ≤ "
        f"{RELINK_BOUND:.0f} s (the device's backoff cap + 5 s); 0 terminal closes, 0 duplicate rows",
    )
    started = time.monotonic()
    results: list[Freeze] = []
    try:
        async with netns() as ns:
            port = urlsplit(server.base_url).port
            device, conn = await reference_device(
                run.workdir, server, server.key, "netns", args=DEVICE_ARGS, prefix=ns.prefix,
                base_url=f"http://{ns.host_ip}:{port}",
            )  # fmt: skip
            try:
                for i in range(trials):
                    results.append(await freeze_trial(api, device, conn, ns.down, ns.up))
                    run.say(f"  packet-drop trial {i + 1}: {results[-1]}")
            finally:
                device.stop()
    except RuntimeError as exc:
        row.note = f"not measured: {exc}"
        row.seconds = time.monotonic() - started
        return row
    row.inputs = {"link down/up": trials}
    _judge_freezes(row, results, RELINK_BOUND)
    row.seconds = time.monotonic() - started
    return row.judge()


async def _never_ready(run: Run, api: Api, key: str, trials: int) -> Row:
    row = Row(
        "half_open",
        "device that never becomes ready",
        load="1 pod",
        faults=f"{trials} paired control sockets that never open their stream socket; {trials} single "
        "sockets that never ping",
        bound=f"state connecting while open; closed 4006 ≤ {REAP_BOUND:.1f} s (paired) / 4004 ≤ "
        f"{SILENT_REAP_BOUND:.1f} s (single); then offline",
    )
    started = time.monotonic()
    results: list[tuple[str, NeverReady]] = []
    for _ in range(trials):
        for split in (True, False):
            kind = "paired, no stream" if split else "single, no ping"
            results.append((kind, await never_ready_trial(api, key, split)))
            run.say(f"  never-ready ({kind}): {results[-1][1]}")
    row.inputs = {"paired control, no stream": trials, "single socket, no ping": trials}
    for kind, t in results:
        for p in t.problems:
            row.fail(f"{kind}: {p}")
    paired = [t.to_close for k, t in results if k.startswith("paired") and t.to_close is not None]
    single = [t.to_close for k, t in results if k.startswith("single") and t.to_close is not None]
    offline = [t.to_offline for _, t in results if t.to_offline is not None]
    row.lost = (
        f"{len(row.failures)} misses; paired reaped {_figures(paired)}; single reaped {_figures(single)}; "
        f"row offline {_figures(offline)}"
    )
    row.detail = {"paired_to_close": paired, "single_to_close": single, "to_offline": offline}
    row.seconds = time.monotonic() - started
    return row.judge()


async def measure(run: Run) -> None:
    trials = run.scaled(5, minimum=2)
    settings = {**SETTINGS, "host": "0.0.0.0"}  # the namespace reaches the pod on its veth address
    async with pod(run.workdir, "halfopen", settings=settings) as server:
        api = Api(server, server.key)
        try:
            steps: tuple[Callable[[], Awaitable[Row]], ...] = (
                lambda: _freezes(run, server, api, trials),
                lambda: _drops(run, server, api, trials),
                lambda: _never_ready(run, api, server.key, trials),
            )
            for step in steps:
                row = await step()
                row.note = (
                    f"Presence bounds shortened for the run: TETHER_OFFLINE_AFTER_SECONDS={OFFLINE_AFTER:g}, "
                    f"TETHER_RECONNECT_GRACE_SECONDS={GRACE:g}, TETHER_READY_TIMEOUT_SECONDS="
                    f"{READY_TIMEOUT:g} (defaults 120, 10, 35); sweep every {SWEEP:g} s. " + row.note
                ).strip()
                run.add(row)
            for line in server.problems()[:5]:
                run.say(f"  pod log: {line}")
        finally:
            await api.close()
