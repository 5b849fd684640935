"""Faults under load: three pods on one PostgreSQL and one Redis, each restarted, killed or cut off
while devices, relay clients and sends keep going.

The load: reference devices spread over the pods by the load generators' routing (each new connection
to the next ready pod, as a load balancer does), relay client pairs watching a conversation on some of
them, and tagged sends (`POST .../messages`, each with a unique `client_message_id`) round-robin over
the live pods. One fault after another, each followed by recovery: Redis restarted (empty), PostgreSQL
restarted, a pod killed with SIGKILL (a fresh pod replaces it), a pod stopped with SIGTERM (it drains;
a fresh pod replaces it), and one pod cut off from Redis (its Redis runs through a proxy here that
stops passing bytes, both ways, as a partition does).

Judged per fault: accepted sends (`success: true`) that no device received (0); relay frames missing
on a client socket without an announcement (`resync_required`, a hole in the feed's `event_seq`, or a
fresh socket) and `seq` gaps (0); `/readyz` samples, every 200 ms per pod, answering 200 just before
and just after the pod failed to route a send (0). Reported: sends answered 503 (retryable), and the time
until every device is online again (REST `onlineOnly` count back to the fleet, every device ready).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from bench.fleet import AgentProcess
from bench.idle import online_count
from bench.servers import PYTHON, REPO, Server, free_port, start_tether
from tests.services import PostgresServer, RedisServer, Throwaway

from hardening.core import Row, Run

DEVICES = 2_000
RELAY_CLIENTS = 200
SENDS_PER_SECOND = 50.0
GENERATORS = 2  # device processes; the relay clients and the probe devices run in a third
WATCHED_SHARE = 0.3  # sends that go to a device a relay client watches (so relay frames flow)
SAMPLE_SECONDS = 0.2  # /readyz and the route probe, per pod
PROBE_TIMEOUT_SECONDS = 4.0
SEND_TIMEOUT_SECONDS = 15.0
OUTAGE_SECONDS = 4.0  # how long Redis or PostgreSQL stays down
PARTITION_SECONDS = 10.0
RECOVERY_LIMIT_SECONDS = 180.0
SETTLE_SECONDS = 5.0
TAIL_SECONDS = 3.0  # frames emitted this close to the end of a socket's watch are not judged
AGENT = "agent-faults"
POD_SETTINGS = {"shutdown_drain_seconds": "5", "log_level": "warning"}


# ---- Redis behind a proxy that can be cut --------------------------------------------------------


class Partition:
    """A TCP proxy to Redis for one pod: `cut()` stops every byte both ways (connections stay open,
    new ones hang unanswered), `heal()` lets them through again, as after a network partition."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.open = asyncio.Event()
        self.open.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    def cut(self) -> None:
        self.open.clear()

    def heal(self) -> None:
        self.open.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.open.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        for pump in (self._pump(reader, up_writer), self._pump(up_reader, writer)):
            task = asyncio.get_running_loop().create_task(pump)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self.open.wait()
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()


# ---- the run's records ---------------------------------------------------------------------------


@dataclass
class Send:
    tag: str
    device_id: str
    pod: str
    at: float  # wall clock, as the devices' emitted_at
    status: int = 0  # 0: no HTTP answer
    success: bool | None = None
    code: str = ""


@dataclass
class Sample:
    pod: str
    at: float
    ready: int  # /readyz status; 0: no answer
    routes: bool | None  # None: the probe could not tell (its device was offline)
    local: bool | None = None  # the send to the probe device on this pod
    cross: bool | None = None  # the send to the probe device on the next pod


@dataclass
class Phase:
    name: str
    start: float
    end: float = 0.0
    recovered_seconds: float | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Target:
    device_id: str
    connection_id: str
    conversation: str  # the conversation a relay client watches, or "default"


class Harness:
    def __init__(self, run: Run) -> None:
        self.run = run
        self.workdir = run.workdir / "faults"
        self.services = Throwaway()
        self.redis: RedisServer | None = None
        self.pg: PostgresServer | None = None
        self.partition: Partition | None = None
        self.database_url = ""
        self.pods: dict[str, Server] = {}  # alive (started, not killed or stopped)
        self.ready: dict[str, bool] = {}
        self.names = (f"pod{i}" for i in itertools.count(1))
        self.key = ""
        self.agents: list[AgentProcess] = []
        self.clients: AgentProcess | None = None
        self.fleet: list[Target] = []
        self.watched: list[Target] = []
        self.probes: list[Target] = []
        self.sends: list[Send] = []
        self.samples: list[Sample] = []
        self.phases: list[Phase] = []
        self.problems: list[str] = []
        self.lost_frames: list[str] = []  # examples of relay frames lost unannounced, for the report
        self.dishonest: list[str] = []  # examples of /readyz 200 while not routing
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.pending: set[asyncio.Task[None]] = set()
        self.http = httpx.AsyncClient(
            timeout=SEND_TIMEOUT_SECONDS,
            limits=httpx.Limits(max_connections=400, max_keepalive_connections=100),
        )
        self._route: list[str] = []
        self._pins: dict[str, str] = {}
        self.probe_of: dict[str, Target] = {}  # pod -> the probe device held on it
        self._tag = itertools.count(1)

    # ---- services and pods -------------------------------------------------------------------

    async def start_services(self) -> None:
        self.redis = await asyncio.to_thread(self.services.redis)
        self.pg = await asyncio.to_thread(self.services.postgres)
        import asyncpg

        name = f"tether_faults_{uuid.uuid4().hex[:8]}"
        conn = await asyncpg.connect(self.pg.admin_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        parts = urlsplit(self.pg.admin_url)
        self.database_url = urlunsplit(parts._replace(scheme="postgresql+asyncpg", path=f"/{name}"))
        self.partition = Partition(self.redis.port)
        await self.partition.start()

    async def start_pod(self, *, behind_partition: bool = False) -> Server:
        assert self.redis is not None and self.partition is not None
        name = next(self.names)
        redis_url = self.partition.url if behind_partition else self.redis.url
        server = await start_tether(
            self.workdir / name, name, database_url=self.database_url, redis_url=redis_url,
            org="alpha", user="alice", create_key=not self.key, **POD_SETTINGS,
        )  # fmt: skip
        if not self.key:
            self.key = server.key
        server.key = self.key
        self.pods[name] = server
        self.ready[name] = True
        orphan = next((t for p, t in self.probe_of.items() if p not in self.pods), None)
        if orphan is not None:  # the probe device of a pod that is gone moves to its replacement
            self.probe_of = {p: t for p, t in self.probe_of.items() if t is not orphan}
            self.probe_of[name] = orphan
        await self.push_route()
        return server

    def netloc(self, server: Server) -> str:
        return urlsplit(server.base_url).netloc

    async def push_route(self) -> None:
        """New connections go to the ready pods (all live ones when none is ready), as through a
        load balancer that follows /readyz."""
        ready = [self.netloc(s) for n, s in self.pods.items() if self.ready.get(n)]
        route = ready or [self.netloc(s) for s in self.pods.values()]
        pins = {t.device_id: self.netloc(self.pods[p]) for p, t in self.probe_of.items() if p in self.pods}
        if route != self._route or pins != self._pins:
            self._route, self._pins = route, pins
            everyone = [*self.agents, *([self.clients] if self.clients else [])]
            await asyncio.gather(*(a.call("route", netlocs=route, pins=pins) for a in everyone))

    # ---- load ---------------------------------------------------------------------------------

    async def start_agent(self, name: str) -> AgentProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with (self.workdir / f"agent-{name}.log").open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                PYTHON, "-m", "hardening.faultload", cwd=REPO,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
                limit=256 * 1024 * 1024,
            )  # fmt: skip
        agent = AgentProcess(name, proc)
        await agent.call("route", netlocs=self._route, pins=self._pins)
        return agent

    async def start_load(self, devices: int, relays: int) -> None:
        base = next(iter(self.pods.values())).base_url
        self.agents = [await self.start_agent(f"devices-{i}") for i in range(GENERATORS)]
        self.clients = await self.start_agent("clients")
        # One probe device held on each pod, so that each pod's route probe can reach a device there.
        probe_ids = [str(uuid.uuid4()) for _ in self.pods]
        self.probe_of = {p: Target(i, "", "default") for p, i in zip(self.pods, probe_ids, strict=True)}
        self._route = []  # pushed again, with the pins
        await self.push_route()
        started = time.monotonic()
        each = devices // GENERATORS
        groups = await asyncio.gather(
            *(
                a.call("tagged_devices", group="fleet", base_url=base, key=self.key, count=each)
                for a in self.agents
            ),
            self.clients.call(
                "tagged_devices",
                group="probe",
                base_url=base,
                key=self.key,
                count=len(probe_ids),
                ids=probe_ids,
            ),
        )
        per_agent = relays // GENERATORS
        for i, group in enumerate(groups[:-1]):
            for j, d in enumerate(group):
                conversation = f"conv-{i}-{j}" if j < per_agent else "default"
                target = Target(d["device_id"], d["connection_id"], conversation)
                self.fleet.append(target)
                if j < per_agent:
                    self.watched.append(target)
        for target, d in zip(self.probe_of.values(), groups[-1], strict=True):
            target.connection_id = d["connection_id"]
        self.probes = list(self.probe_of.values())
        self.run.say(
            f"  {len(self.fleet)} devices and {len(self.probes)} probe devices ready in "
            f"{time.monotonic() - started:.0f} s; opening {len(self.watched)} relay client pairs"
        )
        specs = [
            {"name": t.device_id, "connection_id": t.connection_id, "agent_id": AGENT,
             "conversation_id": t.conversation}
            for t in self.watched
        ]  # fmt: skip
        await self.clients.call("relays", key=self.key, specs=specs)

    def total_devices(self) -> int:
        return len(self.fleet) + len(self.probes)

    async def send(self, target: Target, pod: str, server: Server, record: list[Send]) -> Send:
        tag = f"f{next(self._tag)}-{uuid.uuid4().hex[:6]}"
        sent = Send(tag, target.device_id, pod, time.time())
        record.append(sent)
        body = {
            "agentId": AGENT,
            "conversationId": target.conversation,
            "messages": [{"role": "user", "content": f"fault probe {tag}", "client_message_id": tag}],
        }
        url = f"{server.base_url}/v1/environments/{target.connection_id}/messages"
        try:
            response = await self.http.post(url, json=body, headers={"Authorization": f"Bearer {self.key}"})
        except httpx.HTTPError as exc:
            sent.code = type(exc).__name__
            return sent
        sent.status = response.status_code
        with contextlib.suppress(ValueError):
            answer = response.json()
            sent.success = answer.get("success") if response.status_code == 200 else None
            sent.code = str(answer.get("errorCode") or answer.get("message") or "")
        return sent

    async def send_loop(self, rate: float) -> None:
        turn = itertools.count()
        rng = random.Random(16)
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not self.stop.is_set():
            alive = list(self.pods.items())
            if alive:
                pod, server = alive[next(turn) % len(alive)]
                pool = self.watched if rng.random() < WATCHED_SHARE else self.fleet
                self._spawn(self.send(rng.choice(pool), pod, server, self.sends))
            next_at += 1 / rate
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        async def run() -> None:
            await coro

        task = asyncio.get_running_loop().create_task(run())
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    # ---- readiness honesty -----------------------------------------------------------------

    async def sample_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not self.stop.is_set():
            self._spawn(self._round())
            next_at += SAMPLE_SECONDS
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    async def _round(self) -> None:
        """One instant's samples of every live pod: its /readyz, and whether it routed a send to the
        probe device on itself (database, Redis, its own socket) and to the one on the next pod (the
        bus). A failed cross-pod send counts against this pod only when the next pod, in the same
        instant, said it was ready and routed its own probe: a pod is not blamed for another's outage
        (which that pod's own samples judge). /readyz is asked before and after the sends."""
        at = time.time()
        pods = [(n, s) for n, s in self.pods.items() if n in self.probe_of]
        if not pods:
            return

        async def readyz(server: Server) -> int:
            try:
                response = await self.http.get(f"{server.base_url}/readyz", timeout=PROBE_TIMEOUT_SECONDS)
            except httpx.HTTPError:
                return 0
            return response.status_code

        async def probe(name: str, server: Server, target: Target) -> bool | None:
            try:
                sent = await asyncio.wait_for(
                    self.send(target, name, server, self.sends), PROBE_TIMEOUT_SECONDS
                )
            except TimeoutError:
                return False
            if sent.success:
                return True
            return None if sent.status == 200 else False  # success: false: the probe device is away

        nexts = {n: pods[(i + 1) % len(pods)][0] for i, (n, _) in enumerate(pods)}
        before, local, cross = await asyncio.gather(
            asyncio.gather(*(readyz(s) for _, s in pods)),
            asyncio.gather(*(probe(n, s, self.probe_of[n]) for n, s in pods)),
            asyncio.gather(*(probe(n, s, self.probe_of[nexts[n]]) for n, s in pods)),
        )
        # Asked again once the sends ended: a pod counts as ready at this instant only if it said so
        # both before and after, so a fault that began (or ended) while the sends were under way
        # does not make an honest answer look like a lie.
        after = await asyncio.gather(*(readyz(s) for _, s in pods))
        codes = [b if b != 200 else a for b, a in zip(before, after, strict=True)]
        own = {n: local[i] for i, (n, _) in enumerate(pods)}
        ready_of = {n: codes[i] for i, (n, _) in enumerate(pods)}
        changed = False
        for i, (name, _) in enumerate(pods):
            routes = local[i]
            following = nexts[name]
            healthy_next = own[following] is True and ready_of[following] == 200
            if routes is not False and cross[i] is False and healthy_next and len(pods) > 1:
                routes = False
            elif routes is None and cross[i] is True:
                routes = True
            if name not in self.pods:
                continue
            self.samples.append(Sample(name, at, codes[i], routes, local[i], cross[i]))
            if self.ready.get(name) != (codes[i] == 200):
                self.ready[name] = codes[i] == 200
                changed = True
        if changed:
            await self.push_route()

    # ---- recovery ---------------------------------------------------------------------------

    async def wait_recovered(self, phase: Phase) -> None:
        """Until every live pod is ready, every device is ready and REST counts the whole fleet online,
        and every relay client has both sockets open."""
        assert self.clients is not None
        deadline = time.monotonic() + RECOVERY_LIMIT_SECONDS
        total = self.total_devices()
        last = ""
        while time.monotonic() < deadline:
            ready_pods = all(self.ready.get(n) for n in self.pods)
            stats = await asyncio.gather(
                *(a.call("device_stats", group="fleet") for a in self.agents),
                self.clients.call("device_stats", group="probe"),
            )
            devices_ready = sum(s["ready"] for s in stats)
            online = None
            server = next((s for n, s in self.pods.items() if self.ready.get(n)), None)
            if server is not None and devices_ready == total:
                online = await online_count(server)
            attached = await self.clients.call("relays_attached")
            last = (
                f"pods ready {ready_pods}, devices ready {devices_ready}/{total}, REST online {online}, "
                f"relay pairs attached {attached}/{len(self.watched)}"
            )
            if ready_pods and devices_ready == total and online == total and attached == len(self.watched):
                phase.recovered_seconds = time.time() - phase.start
                return
            await asyncio.sleep(1.0)
        phase.notes.append(f"not recovered in {RECOVERY_LIMIT_SECONDS:.0f} s: {last}")
        self.run.say(f"  {phase.name}: NOT recovered: {last}")

    async def fault(self, name: str, inject: Callable[[], Awaitable[None]]) -> Phase:
        phase = Phase(name, time.time())
        self.phases.append(phase)
        self.run.say(f"  fault: {name}")
        await inject()
        await self.wait_recovered(phase)
        if phase.recovered_seconds is not None:
            self.run.say(f"  {name}: everything back {phase.recovered_seconds:.1f} s after the fault began")
        await asyncio.sleep(SETTLE_SECONDS)
        phase.end = time.time()
        return phase

    # ---- the faults ----------------------------------------------------------------------

    async def restart_redis(self) -> None:
        assert self.redis is not None
        await asyncio.to_thread(self.redis.stop)
        await asyncio.sleep(OUTAGE_SECONDS)
        await asyncio.to_thread(self.redis.start)

    async def restart_postgres(self) -> None:
        assert self.pg is not None
        import asyncpg

        await asyncio.to_thread(self.pg.stop)
        await asyncio.sleep(OUTAGE_SECONDS)
        await asyncio.to_thread(self.pg.server.launch)
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = await asyncpg.connect(self.pg.admin_url, timeout=2)
            except (OSError, asyncpg.PostgresError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
                continue
            await conn.close()
            return

    def victim(self) -> str:
        """A pod to kill or stop: the oldest one not behind the partition proxy."""
        assert self.partition is not None
        return next(
            n for n, s in self.pods.items() if str(self.partition.port) not in s.env["TETHER_REDIS_URL"]
        )

    async def kill_pod(self) -> None:
        name = self.victim()
        server = self.pods.pop(name)
        await asyncio.to_thread(server.kill)
        await self.push_route()
        await asyncio.sleep(OUTAGE_SECONDS)
        await self.start_pod()

    async def drain_pod(self) -> None:
        name = self.victim()
        server = self.pods[name]
        started = time.monotonic()
        # The pod goes on answering while it drains: sends and probes still reach it until it exits.
        await asyncio.to_thread(server.stop, 60)
        self.pods.pop(name)
        await self.push_route()
        self.phases[-1].notes.append(f"{name} drained and exited in {time.monotonic() - started:.1f} s")
        await self.start_pod()

    async def partition_pod(self) -> None:
        assert self.partition is not None
        self.partition.cut()
        await asyncio.sleep(PARTITION_SECONDS)
        self.partition.heal()

    # ---- judging ------------------------------------------------------------------------------

    def phase_of(self, at: float) -> str:
        for phase in reversed(self.phases):
            if at >= phase.start:
                return phase.name
        return "steady"

    async def collect(self) -> dict[str, Any]:
        assert self.clients is not None
        received: dict[str, list[str]] = {}
        for agent in self.agents:
            received |= await agent.call("received_tags", group="fleet")
        received |= await self.clients.call("received_tags", group="probe")
        watched_ids = [t.device_id for t in self.watched]
        emitted: dict[str, list[Any]] = {}
        for agent in self.agents:
            emitted |= await agent.call("emitted", group="fleet", device_ids=watched_ids)
        relays = await self.clients.call("relay_report")
        stats = [await a.call("device_stats", group="fleet") for a in self.agents]
        return {"received": received, "emitted": emitted, "relays": relays, "stats": stats}

    def judge(self, row: Row, data: dict[str, Any], end: float) -> None:
        names = ["steady", *(p.name for p in self.phases)]
        per: dict[str, Counter[str]] = {n: Counter() for n in names}

        got = {tag for tags in data["received"].values() for tag in tags}
        duplicates = sum(len(tags) - len(set(tags)) for tags in data["received"].values())
        lost_sends: list[str] = []
        for s in self.sends:
            c = per[self.phase_of(s.at)]
            c["sends"] += 1
            if s.success:
                c["accepted"] += 1
                if s.tag not in got:
                    c["accepted_lost"] += 1
                    lost_sends.append(f"{s.tag} via {s.pod} at {s.at:.1f}")
            elif s.status == 503:
                c["503"] += 1
            elif s.status == 200:
                c["offline"] += 1
            else:
                c[f"other {s.status or s.code or 'no answer'}"] += 1

        for sample in self.samples:
            c = per[self.phase_of(sample.at)]
            c["samples"] += 1
            if sample.ready == 200 and sample.routes is False:
                c["dishonest"] += 1
                if len(self.dishonest) < 20:
                    phase = next((p for p in self.phases if p.name == self.phase_of(sample.at)), None)
                    since = sample.at - phase.start if phase is not None else 0.0
                    self.dishonest.append(
                        f"{sample.pod} at +{since:.1f} s of {phase.name if phase else 'steady'}: "
                        f"own probe {sample.local}, next pod's {sample.cross}"
                    )
            if sample.ready != 200 and sample.routes is True:
                c["ready_503_but_routing"] += 1

        self._judge_relays(data, per, end)

        lines = [
            "| phase | sends | accepted | accepted, never delivered | 503 (retryable) | offline | other "
            "| back online (s) | relay frames | lost unannounced | seq gaps | resyncs | /readyz samples "
            "| 200 while not routing |",
            "|" + " --- |" * 1 + " ---: |" * 5 + " --- |" + " ---: |" * 7,
        ]
        recovered = {p.name: p.recovered_seconds for p in self.phases}
        for n in names:
            c = per[n]
            other = ", ".join(f"{k[6:]}: {v}" for k, v in c.items() if k.startswith("other ")) or "0"
            back = recovered.get(n)
            back_text = "—" if n == "steady" else ("not back" if back is None else f"{back:.1f}")
            lines.append(
                f"| {n} | {c['sends']} | {c['accepted']} | {c['accepted_lost']} | {c['503']} "
                f"| {c['offline']} "
                f"| {other} | {back_text} | {c['relay_frames']} | {c['relay_lost']} | {c['seq_gaps']} "
                f"| {c['resyncs']} | {c['samples']} | {c['dishonest']} |"
            )
        row.detail["markdown"] = lines
        row.detail["phases"] = {n: dict(per[n]) for n in names}
        row.detail["recovered_seconds"] = recovered
        row.detail["device_stats"] = data["stats"]
        row.detail["duplicate_deliveries"] = duplicates
        row.detail["relay_lost_examples"] = self.lost_frames
        row.detail["dishonest_examples"] = self.dishonest
        for example in self.dishonest[:10]:
            self.run.say(f"  /readyz 200 while not routing: {example}")
        for example in self.lost_frames[:10]:
            self.run.say(f"  relay frame lost unannounced: {example}")
        for line in lines:
            self.run.say("  " + line)

        total = Counter[str]()
        for c in per.values():
            total.update(c)
        row.inputs = {
            "tagged sends": total["sends"],
            "relay frames checked": total["relay_frames"],
            "/readyz samples": total["samples"],
            "faults": len(self.phases),
        }
        row.lost = (
            f"{total['accepted_lost']} accepted sends never delivered; "
            f"{total['relay_lost']} relay frames lost unannounced, {total['seq_gaps']} seq gaps; "
            f"{total['dishonest']} /readyz 200 while not routing"
        )
        if total["accepted_lost"]:
            row.fail(f"{total['accepted_lost']} accepted sends never delivered, e.g. {lost_sends[:3]}")
        if total["relay_lost"] or total["seq_gaps"]:
            row.fail(f"{total['relay_lost']} relay frames lost unannounced, {total['seq_gaps']} seq gaps")
        for n in names:
            if per[n]["dishonest"]:
                row.fail(f"{n}: {per[n]['dishonest']} /readyz samples said 200 while the pod could not route")
        for phase in self.phases:
            if phase.recovered_seconds is None:
                row.fail(f"{phase.name}: {'; '.join(phase.notes)}")
        for name, server in self.pods.items():
            if server.proc.poll() is not None:
                row.fail(f"{name} exited during the run ({server.proc.returncode})")

    def _judge_relays(self, data: dict[str, Any], per: dict[str, Counter[str]], end: float) -> None:
        """Per relay client's stream socket: each event its device wrote for the watched conversation
        while the client watched, either received, or followed by an announcement."""
        by_device = {t.device_id: t for t in self.watched}
        for device_id, report in data["relays"].items():
            target = by_device[device_id]
            events = [e for e in data["emitted"].get(device_id, []) if e[0] == target.conversation]
            for sock in report["sockets"]:
                per[self.phase_of(sock["opened_at"] or 0)]["resyncs"] += sock["resyncs"]
                # seq gaps: attributed to the run as a whole (the socket does not say when)
                per["steady"]["seq_gaps"] += sock["seq_gaps"]
                if sock["channel"] != "stream" or sock["opened_at"] is None:
                    continue
                position = {key: i for i, (_, key, _) in enumerate(events)}
                arrived = sorted(
                    (position[key], announced) for key, _, announced in sock["frames"] if key in position
                )
                seen = [p for p, _ in arrived]
                start = sock["opened_at"] + 1.0
                for i, (_, _key, emitted_at) in enumerate(events):
                    if emitted_at < start or emitted_at > end - TAIL_SECONDS:
                        continue
                    c = per[self.phase_of(emitted_at)]
                    c["relay_frames"] += 1
                    j = bisect.bisect_left(seen, i)
                    if j < len(seen) and seen[j] == i:
                        continue
                    if j < len(arrived) and arrived[j][1]:
                        continue  # the next frame it got followed an announced loss
                    c["relay_lost"] += 1
                    if len(self.lost_frames) < 20:
                        phase = self.phase_of(emitted_at)
                        began = next((p.start for p in self.phases if p.name == phase), 0.0)
                        self.lost_frames.append(
                            f"{phase} +{emitted_at - began:.1f} s: device {device_id[:8]} frame {i} of "
                            f"{len(events)}; socket opens {sock['opens']}, resumed {sock['resume_hits']}, "
                            f"closes {sock['closes']}"
                        )

    async def close(self) -> None:
        self.stop.set()
        for task in self.tasks:
            task.cancel()
        for task in list(self.pending):
            task.cancel()
        for agent in [*self.agents, *([self.clients] if self.clients else [])]:
            with contextlib.suppress(Exception):
                await agent.close(timeout=20)
        for server in self.pods.values():
            await asyncio.to_thread(server.kill)
        if self.partition is not None:
            await self.partition.close()
        await self.http.aclose()
        await asyncio.to_thread(self.services.close)


async def measure(run: Run) -> None:
    devices = run.scaled(DEVICES, 30)
    relays = min(run.scaled(RELAY_CLIENTS, 4), devices)
    rate = max(5.0, SENDS_PER_SECOND * run.scale)
    row = Row(
        "faults",
        "Faults under load",
        load=f"{devices} devices over 3 pods, {relays} relay client pairs, {rate:.0f} tagged sends/s",
        faults="Redis restart; PostgreSQL restart; kill -9 of a pod; SIGTERM drain of a pod; "
        "partition of one pod from Redis",
        bound="0 accepted sends lost; 0 relay frames lost unannounced; 0 /readyz 200 while not routing; "
        f"every device back online within {RECOVERY_LIMIT_SECONDS:.0f} s",
    )
    started = time.monotonic()
    h = Harness(run)
    try:
        run.say(f"faults: private PostgreSQL and Redis, 3 pods, {devices} devices, {relays} relay pairs")
        await h.start_services()
        await h.start_pod()
        await h.start_pod()
        await h.start_pod(behind_partition=True)
        await h.start_load(devices, relays)
        h.tasks.append(asyncio.get_running_loop().create_task(h.send_loop(rate)))
        h.tasks.append(asyncio.get_running_loop().create_task(h.sample_loop()))
        steady = Phase("start", time.time())
        await h.wait_recovered(steady)
        await asyncio.sleep(max(10.0, 30 * run.scale))
        for name, inject in (
            ("Redis restart", h.restart_redis),
            ("PostgreSQL restart", h.restart_postgres),
            ("kill -9 of a pod", h.kill_pod),
            ("SIGTERM drain of a pod", h.drain_pod),
            ("pod partitioned from Redis", h.partition_pod),
        ):
            await h.fault(name, inject)
        h.stop.set()
        await asyncio.sleep(TAIL_SECONDS + 2)  # the last sends' turns end
        end = time.time()
        data = await h.collect()
        h.judge(row, data, end)
        for name, server in h.pods.items():
            problems = server.problems()[:5]
            if problems:
                row.detail.setdefault("pod_problems", {})[name] = problems
        row.note = (
            "Every fault is followed by recovery before the next; a killed or stopped pod is replaced "
            "by a fresh one. Sends go round-robin to every live pod (ready or not), new device and relay "
            "connections only to ready pods. 'back online': from the fault's start until every pod is "
            "ready, every device ready and counted online by REST, and every relay pair attached."
        )
        row.judge()
    finally:
        row.seconds = time.monotonic() - started
        await h.close()
    run.add(row)
