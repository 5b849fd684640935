"""Duplicate sends: the Python SDK's own retries of one `POST /v1/environments/{connectionId}/messages`,
to the pod holding the device and to another pod, within the dedupe window.

What a retry carries (letta-client 1.12.1, `_base_client.py`): the same body — so the same
`messages[0].client_message_id`, which the SDK's types require on a user message — and an
`x-stainless-retry-count` header. It sends no `Idempotency-Key` (its `_idempotency_header` is None).
The router dedupes on (connectionId, `client_message_id`) for `TETHER_DEDUPE_SECONDS` (README "Bounds"),
claimed in live state: in memory on one pod, `SET NX` in Redis across pods (`livestate/redis.py`).

The SDK (`AsyncLetta`, `max_retries=3`) sends through a balancer of the harness's own, an httpx
transport in front of two pods (PostgreSQL + Redis) that loses the first answers of a send the way a
proxy does: the pod handled the request, the client gets a 502, a 504, a reset, or a timeout while the
request is still in flight (the retry then overlaps the first attempt). The SDK retries each; the
balancer sends the retry to the same pod or the other, by mode. The reference device logs every
message it is handed (before its own dedupe), each send carrying a token of its own: per send it must
arrive exactly once. Counted: sends, attempts, retries, deliveries, duplicates (target 0), losses
(target 0: every send the SDK reports `success: true` arrived).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import httpx
import orjson
from letta_client import AsyncLetta

from hardening.cluster import Cluster, Server, pod, reference_device
from hardening.core import Row, Run

CONCURRENCY = 8
MAX_RETRIES = 3  # the SDK's default is 2; every send here loses one or two answers
# How the balancer loses an answer: the pod got and handled the request each time.
LOSSES = ("502 from the proxy", "504 from the proxy", "connection reset", "timeout in flight")
MODES = {
    "same pod (the device's)": (0, 0),
    "another pod": (1, 1),
    "alternating, device's pod first": (0, 1),
    "alternating, other pod first": (1, 0),
}


@dataclass
class Tally:
    sends: int = 0
    attempts: int = 0
    lost_answers: Counter[str] = field(default_factory=Counter)
    success: int = 0
    failed: list[str] = field(default_factory=list)
    in_flight: list[asyncio.Task[httpx.Response]] = field(default_factory=list)


class LossyBalancer(httpx.AsyncBaseTransport):
    """Routes attempt k of a send to pods[order[k % 2]] and loses the answers of its first
    `lose[token]` attempts."""

    def __init__(self, pods: list[Server], order: tuple[int, int], tally: Tally) -> None:
        self.pods = pods
        self.order = order
        self.tally = tally
        self.inner = httpx.AsyncHTTPTransport()
        self.lose: dict[str, tuple[str, ...]] = {}
        self.seen: Counter[str] = Counter()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content)
        token = str(body["messages"][0]["client_message_id"])
        attempt = self.seen[token]
        self.seen[token] += 1
        self.tally.attempts += 1
        target = httpx.URL(self.pods[self.order[attempt % 2]].base_url)
        request.url = request.url.copy_with(host=target.host, port=target.port)
        planned = self.lose.get(token, ())
        how = planned[attempt] if attempt < len(planned) else None
        if how == "timeout in flight":
            # The client gives up while the pod still works on it: the retry overlaps this attempt.
            task = asyncio.create_task(self._forward(request))
            self.tally.in_flight.append(task)
            self.tally.lost_answers[how] += 1
            raise httpx.ReadTimeout("timed out (harness)", request=request)
        response = await self._forward(request)
        if how is None:
            return response
        self.tally.lost_answers[how] += 1
        if how == "connection reset":
            raise httpx.ReadError("connection reset by peer (harness)", request=request)
        status = 502 if how.startswith("502") else 504
        return httpx.Response(status, json={"error": how}, request=request)

    async def _forward(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        content = await response.aread()
        return httpx.Response(response.status_code, headers=response.headers, content=content)

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class Outcome:
    mode: str
    tally: Tally
    tokens: list[str]
    delivered: Counter[str]

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for t in self.tokens if (n := self.delivered[t]) > 1)

    @property
    def losses(self) -> int:
        return sum(1 for t in self.tokens if self.delivered[t] == 0)


async def send_with_retries(
    pods: list[Server], key: str, connection_id: str, order: tuple[int, int], n: int, rng: random.Random
) -> tuple[Tally, list[str]]:
    """`n` sends through the SDK and the lossy balancer; returns the tally and each send's token."""
    tally = Tally()
    balancer = LossyBalancer(pods, order, tally)
    tokens = [f"dupsend-{uuid.uuid4().hex}" for _ in range(n)]
    for token in tokens:
        balancer.lose[token] = tuple(rng.choice(LOSSES) for _ in range(rng.randint(1, 2)))
    http = httpx.AsyncClient(transport=balancer, timeout=30)
    sdk = AsyncLetta(base_url=pods[0].base_url, api_key=key, max_retries=MAX_RETRIES, http_client=http)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(token: str) -> None:
        async with gate:
            tally.sends += 1
            try:
                answer = await sdk.environments.send_message(
                    connection_id,
                    messages=[{"role": "user", "content": token, "client_message_id": token, "otid": token}],
                    agent_id="agent-dupsends",
                    conversation_id="default",
                )
            except Exception as exc:
                tally.failed.append(f"{token}: {exc!r}"[:200])
                return
            if answer.success:
                tally.success += 1
            else:
                tally.failed.append(f"{token}: success false: {answer.message}")

    try:
        await asyncio.gather(*(one(t) for t in tokens))
        await asyncio.gather(*tally.in_flight, return_exceptions=True)
    finally:
        await http.aclose()
    return tally, tokens


def delivered(log_text: str, tokens: list[str]) -> Counter[str]:
    """How many times the device logged each token's message (`Message for …: 'TOKEN'`)."""
    wanted = set(tokens)
    counts: Counter[str] = Counter()
    for line in log_text.splitlines():
        if "Message for " not in line:
            continue
        text = line.rsplit(": ", 1)[-1].strip("'\"")
        if text in wanted:
            counts[text] += 1
    return counts


async def measure(run: Run) -> None:
    started = time.monotonic()
    n = run.scaled(200, minimum=20)
    rng = random.Random(9)
    cluster = Cluster()
    outcomes: list[Outcome] = []
    try:
        database, redis = await cluster.database_url(), cluster.redis_url()
        async with (
            pod(run.workdir, "sends-a", database_url=database, redis_url=redis) as a,
            pod(run.workdir, "sends-b", database_url=database, redis_url=redis) as b,
        ):
            device, conn = await reference_device(run.workdir, a, a.key, "dupsends")
            try:
                for mode, order in MODES.items():
                    tally, tokens = await send_with_retries([a, b], a.key, conn, order, n, rng)
                    await asyncio.sleep(1.0)  # the last deliveries reach the device's log
                    counts = delivered(device.log_path.read_text(errors="replace"), tokens)
                    outcomes.append(Outcome(mode, tally, tokens, counts))
                    run.say(
                        f"  {mode}: {tally.sends} sends, {tally.attempts} attempts, "
                        f"{outcomes[-1].duplicates} duplicates, {outcomes[-1].losses} lost"
                    )
                problems = a.problems()[:5] + b.problems()[:5]
            finally:
                device.stop()
    finally:
        await asyncio.to_thread(cluster.close)
    run.add(_row(outcomes, problems, n, time.monotonic() - started))


def _row(outcomes: list[Outcome], problems: list[str], n: int, took: float) -> Row:
    sends = sum(o.tally.sends for o in outcomes)
    attempts = sum(o.tally.attempts for o in outcomes)
    kinds: Counter[str] = Counter()
    for o in outcomes:
        kinds.update(o.tally.lost_answers)
    row = Row(
        "duplicate_sends",
        "duplicate sends (SDK retries)",
        load="1 reference device on pod A of 2 (PostgreSQL + Redis); letta-client 1.12.1 AsyncLetta, "
        f"max_retries={MAX_RETRIES}, {CONCURRENCY} sends at a time",
        faults="the first 1-2 answers of every send lost by the balancer: "
        + ", ".join(f"{k} ({v})" for k, v in kinds.items()),
        inputs={"sends": sends, "attempts": attempts, "retries": attempts - sends},
        bound="every send delivered exactly once: 0 duplicates, 0 losses; every send answered success",
    )
    dup = sum(o.duplicates for o in outcomes)
    lost = sum(o.losses for o in outcomes)
    deliveries = sum(sum(o.delivered[t] for t in o.tokens) for o in outcomes)
    for o in outcomes:
        if o.duplicates:
            row.fail(f"{o.mode}: {o.duplicates} duplicate deliveries")
        if o.losses:
            row.fail(f"{o.mode}: {o.losses} sends never delivered")
        for f in o.tally.failed[:5]:
            row.fail(f"{o.mode}: the SDK's send failed: {f}")
    for p in problems:
        row.fail(f"pod log: {p}")
    row.lost = (
        f"{dup} duplicates, {lost} losses; {sends} sends, {attempts - sends} retries, {deliveries} deliveries"
    )
    row.note = " ".join(
        f"{o.mode}: {o.tally.sends} sends, {o.tally.attempts - o.tally.sends} retries, "
        f"{sum(o.delivered[t] for t in o.tokens)} deliveries, {o.duplicates} duplicates, {o.losses} lost."
        for o in outcomes
    )
    row.detail = {
        o.mode: {"sends": o.tally.sends, "attempts": o.tally.attempts, "duplicates": o.duplicates,
                 "losses": o.losses, "success": o.tally.success}
        for o in outcomes
    }  # fmt: skip
    row.seconds = took
    return row.judge()
