"""Frame fuzzing at the socket: bad input at device and relay sockets of one pod, next to a live session.

A reference device (`tether device`) and a relay client keep a stream going on the pod (the bystander:
`bench_stream` bursts, every frame checked for its `seq` and its place in the burst) while raw sockets
send malformed JSON, random binary, oversized and fragmented messages, invalid UTF-8, protocol
violations and ping floods. Judged: the pod stays up, the bystander gets every frame in order, RSS
stays within its bound, and each bad socket ends as documented (README "Bounds", RFC 6455 §7.4.1):
input that is not a frame we know is dropped (device) or answered with a `malformed_frame` error
(relay) and the socket lives on; a message over `TETHER_MAX_FRAME_BYTES` is closed with 1009; invalid
UTF-8 in a text message with 1007; a framing violation with 1002 (closes.py). A flood of WebSocket
pings that the peer never reads stalls the peer's input (TCP pushes back) instead of growing the pod.
Before the sockets, the hypothesis properties of tests/protocol/test_frame_fuzz.py (the frame decoder,
the socket edges' query parsing, the relay path fed any frames) run with many more examples.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlencode

import httpx
import orjson
from bench.servers import PYTHON, REPO, rss_kib
from websockets.asyncio.client import connect

from hardening import wire
from hardening.cluster import pod, reference_device
from hardening.core import Row, Run
from tether.protocol import closes

MAX_FRAME_BYTES = 1024 * 1024  # the pod's TETHER_MAX_FRAME_BYTES here: oversized input stays cheap
RSS_GROWTH_BOUND_KIB = 96 * 1024
BYSTANDER_SCOPE = {"agent_id": "agent-bystander", "conversation_id": "conv-bystander"}
ATTACK_SCOPE = {"agentId": "agent-attacker", "conversationId": "conv-attacker"}
BURST = 200
PING = b'{"type":"ping"}'
PUSHBACK_SECONDS = 5.0  # input still going out after this long: the router is pushing back
OPEN = 0  # expected outcome: the socket stays open and still answers a ping
SLOW = closes.SLOW_CONSUMER  # what a relay flood may end in instead: its unread answers overflowed


@dataclass
class Case:
    """One attack: the frames sent on a fresh socket, and the close code expected (OPEN: none)."""

    name: str
    kind: str  # the input family it counts under in the report
    frames: Callable[[], list[bytes]]
    expect: int
    inputs: int = 1  # how many inputs of its kind it sends


def _mutations(rng: random.Random, n: int) -> list[bytes]:
    """Text that is almost a frame: valid frames cut, flipped, re-typed, nested, or not objects."""
    seeds = [
        b'{"type":"ping"}',
        b'{"type":"input","runtime":{"agent_id":"a","conversation_id":"c"},"payload":{"kind":"create_message"}}',
        b'{"type":"update_device_status","device_status":{"current_permission_mode":"default"}}',
        b'{"type":"sync","request_id":"r1","runtime":{"agent_id":"a","conversation_id":"c"}}',
    ]
    fixed = [
        b"", b"null", b"[]", b"[1,2,3]", b"42", b'"ping"', b"{}", b'{"type":1}', b'{"type":null}',
        b'{"type":["ping"]}', b"{\"type\":\"ping\"", b"NaN", b'{"type":"x","n":NaN}', b'{"type":"\\ud800"}',
        b"[" * 5000 + b"]" * 5000, b'{"type":"x","v":' + b"9" * 5000 + b"}", b'{"type":"x"}{"type":"y"}',
        b'{"type":"x",}', b"\xef\xbb\xbf{\"type\":\"ping\"}", b'{"type":"ping","runtime":"not an object"}',
    ]  # fmt: skip
    out = list(fixed)
    while len(out) < n:
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            if not data:
                break
            op = rng.randrange(4)
            at = rng.randrange(len(data))
            if op == 0:
                del data[at:]
            elif op == 1:
                data[at] = rng.choice(b'{}[]",:\\ 0aZ')
            elif op == 2:
                data[at:at] = rng.choice([b"{", b"}", b'"', b"\\u", b",", b"null"])
            else:
                del data[at : at + rng.randint(1, 8)]
        out.append(bytes(data))
    # A text frame must carry UTF-8 (that case is its own, below): these are all ASCII.
    return [d for d in out if d.isascii()][:n]


def cases(rng: random.Random, scale: float) -> list[Case]:
    n_json = max(40, int(300 * scale))
    n_binary = max(20, int(100 * scale))
    flood = max(1000, int(20000 * scale))
    # Each ping is answered with a pong of the same size: a peer that never reads them used to grow
    # the router's write buffer without bound (200 MiB of pings: +190 MiB RSS).
    flood_mib = max(16, int(128 * scale))
    ping_block = b"".join(wire.frame(wire.PING, b"f" * 125) for _ in range(2000))  # ~256 KiB
    big = b'{"type":"x","pad":"' + b"a" * MAX_FRAME_BYTES + b'"}'
    mutations = _mutations(rng, n_json)
    binaries = [rng.randbytes(rng.randint(1, 2048)) for _ in range(n_binary)]
    t, c = wire.TEXT, wire.CONTINUATION
    too_big, bad_utf8, violation = closes.MESSAGE_TOO_BIG, closes.INVALID_UTF8, closes.PROTOCOL_ERROR

    def fragmented(data: bytes, size: int, opcode: int = t) -> list[bytes]:
        pieces = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
        return [
            wire.frame(opcode if i == 0 else c, p, fin=i == len(pieces) - 1) for i, p in enumerate(pieces)
        ]

    return [
        Case("malformed JSON (text)", "malformed JSON", lambda: [wire.frame(t, m) for m in mutations],
             OPEN, len(mutations)),
        Case("random binary messages", "binary", lambda: [wire.frame(wire.BINARY, b) for b in binaries],
             OPEN, len(binaries)),
        Case("a ping frame as one binary message", "binary", lambda: [wire.frame(wire.BINARY, PING)], OPEN),
        Case("a ping in 1-byte fragments", "fragmented", lambda: fragmented(PING, 1), OPEN),
        Case("interleaved control frame inside a fragmented message", "fragmented",
             lambda: [wire.frame(t, PING[:5], fin=False), wire.frame(wire.PING, b"p"),
                      wire.frame(c, PING[5:])], OPEN),
        Case("message of MAX_FRAME_BYTES + 20", "oversized", lambda: [wire.frame(t, big)], too_big),
        Case("binary message over the limit", "oversized", lambda: [wire.frame(wire.BINARY, big)], too_big),
        Case("fragments adding up over the limit", "oversized", lambda: fragmented(big, 64 * 1024), too_big),
        Case("invalid UTF-8 in a text frame", "invalid UTF-8",
             lambda: [wire.frame(t, b'{"type":"\xff\xfe"}')], bad_utf8),
        Case("overlong UTF-8 encoding", "invalid UTF-8",
             lambda: [wire.frame(t, b'{"type":"\xc0\xaf"}')], bad_utf8),
        Case("UTF-16 surrogate encoded in UTF-8", "invalid UTF-8",
             lambda: [wire.frame(t, b'{"type":"\xed\xa0\x80"}')], bad_utf8),
        Case("invalid UTF-8 split across fragments", "invalid UTF-8",
             lambda: [wire.frame(t, b'{"type":"\xe2\x82', fin=False), wire.frame(c, b'\x28"}')], bad_utf8),
        Case("continuation with no message started", "framing", lambda: [wire.frame(c, PING)], violation),
        Case("new message while one is fragmented", "framing",
             lambda: [wire.frame(t, PING[:4], fin=False), wire.frame(t, PING)], violation),
        Case("control frame over 125 bytes", "framing", lambda: [wire.frame(wire.PING, b"p" * 126)],
             violation),
        Case("fragmented control frame", "framing", lambda: [wire.frame(wire.PING, b"p", fin=False)],
             violation),
        Case("reserved opcode 0x3", "framing", lambda: [wire.frame(0x3, b"x")], violation),
        Case("reserved bits set", "framing", lambda: [wire.frame(t, PING, rsv=0b100)], violation),
        Case("unmasked client frame", "framing", lambda: [wire.frame(t, PING, masked=False)], violation),
        Case(f"{flood} WebSocket pings, nothing read", "control-frame flood",
             lambda: [wire.frame(wire.PING, b"flood%03d" % (i % 1000)) for i in range(flood)], OPEN, flood),
        Case(f"{flood} application pings, nothing read", "control-frame flood",
             lambda: [wire.frame(t, PING)] * flood, OPEN, flood),
        Case(f"{flood_mib} MiB of 125-byte WebSocket pings, nothing read (until the input stalls)",
             "control-frame flood", lambda: [ping_block] * (flood_mib * 4), OPEN, flood_mib * 4 * 2000),
    ]  # fmt: skip


@dataclass
class Bystander:
    """The relay client of the live session: asks for bursts and checks every frame it gets."""

    url: str
    key: str
    frames: int = 0
    bursts: int = 0
    problems: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        async with connect(self.url, additional_headers=headers, max_size=None, open_timeout=10) as ws:
            seq = 0
            while not self.stop.is_set():
                request_id = f"burst-{uuid.uuid4().hex[:8]}"
                command = {"type": "bench_stream", "request_id": request_id, "runtime": BYSTANDER_SCOPE,
                           "count": BURST, "size": 64}  # fmt: skip
                await ws.send(orjson.dumps(command).decode())
                index = 0
                # The deltas come on the device's stream socket, the response on its control socket:
                # the response may overtake the last deltas. The burst is over once both are in.
                responded = False
                while not (responded and index >= BURST):
                    try:
                        text = await asyncio.wait_for(ws.recv(), 20)
                    except TimeoutError:
                        self.problems.append(
                            f"burst {self.bursts}: nothing for 20 s after delta {index} "
                            f"(response in: {responded})"
                        )
                        return
                    frame = orjson.loads(text)
                    if frame.get("seq") != seq + 1:
                        self.problems.append(f"seq {frame.get('seq')} after {seq}")
                    seq = frame.get("seq", seq)
                    self.frames += 1
                    kind = frame.get("type")
                    if kind == "stream_delta":
                        got = int(frame["delta"]["id"].rsplit("-", 1)[1])
                        if got != index:
                            self.problems.append(f"burst {self.bursts}: delta {got} where {index} was due")
                        index = got + 1
                    elif kind == "bench_stream_response" and frame.get("request_id") == request_id:
                        responded = True
                    elif kind in ("resync_required", "error"):
                        self.problems.append(f"burst {self.bursts}: {kind} {text[:200]!r}")
                self.bursts += 1


class Target(Protocol):
    """The pod under attack: a bench `Server` or a test's `Router`."""

    @property
    def base_url(self) -> str: ...
    @property
    def ws_base(self) -> str: ...
    @property
    def key(self) -> str: ...


async def _attacker_lease(server: Target, n: int) -> str:
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {server.key}"}) as http:
        r = await http.post(
            f"{server.base_url}/v1/environments/register",
            json={"deviceId": f"attacker-{n}", "connectionName": f"attacker-{n}", "metadata": {}},
            timeout=10,
        )
        r.raise_for_status()
        return str(r.json()["connectionId"])


async def _send_all(sock: wire.RawSocket, data: bytes) -> None:
    with contextlib.suppress(ConnectionError):
        for i in range(0, len(data), 256 * 1024):
            await sock.send(data[i : i + 256 * 1024])


async def _discard(sock: wire.RawSocket) -> None:
    with contextlib.suppress(TimeoutError):
        while await sock.receive(600) is not None:
            pass


async def attack(
    server: Target, pid: int, target: str, connection_id: str, n: int, case: Case, rss_samples: list[int]
) -> tuple[str | None, str]:
    """Run one case on a fresh socket of `target` ("device" or "relay"): (None when it ended as
    documented, else what went wrong; how it ended). The pod's RSS (`pid`) is sampled while input
    stalls."""
    if target == "device":
        lease = await _attacker_lease(server, n)
        url = f"{server.ws_base}/v1/environments/ws/{lease}"
    else:
        url = f"{server.ws_base}/v1/environments/{connection_id}/status/ws?{urlencode(ATTACK_SCOPE)}"
    sock = await wire.RawSocket.open(url, {"Authorization": f"Bearer {server.key}"})
    if sock.status != 101:
        return f"upgrade answered {sock.status}", "refused"
    try:
        reader: asyncio.Task[int | None] | None = None
        if case.expect != OPEN:
            # Read while writing: the router closes mid-input, and stops reading what follows.
            reader = asyncio.create_task(sock.close_code(30))
        sending = asyncio.create_task(_send_all(sock, b"".join(case.frames())))
        if reader is not None:
            code = await reader
            sending.cancel()
            if code != case.expect:
                return f"closed with {code}, expected {case.expect}", f"closed {code}"
            return None, f"closed {code}"
        if not (await asyncio.wait({sending}, timeout=PUSHBACK_SECONDS))[0]:
            # The input is still going out: the router stopped reading this socket (or is slow to).
            # Sample its RSS now, then read (and drop) its answers so that the rest can go out.
            rss_samples.append(rss_kib(pid))
            draining = asyncio.create_task(_discard(sock))
            await sending
            draining.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await draining
        await sending
        await sock.send(wire.frame(wire.TEXT, PING))
        answered = case.kind != "malformed JSON" or target != "relay"
        if not answered and not await sock.until(b"malformed_frame", 30):
            return "no malformed_frame error answered", "open"
        if not await sock.until(b'"pong"', 60):
            if target == "relay" and case.kind == "control-frame flood" and sock.closed_with == SLOW:
                # Also as documented: the client read none of the answers, its queue overflowed.
                return None, f"closed {SLOW} (its unread answers overflowed)"
            return "no pong after the input: the socket did not stay usable", f"closed {sock.closed_with}"
        await sock.send(wire.frame(wire.CLOSE, (1000).to_bytes(2, "big")))
        return None, "usable"
    finally:
        sock.abort()


async def _properties(run: Run, examples: int) -> tuple[int, int, str]:
    """tests/protocol/test_frame_fuzz.py's properties with `examples` each: (examples passed, pytest's
    exit code, its last lines)."""
    env = {**os.environ, "FRAME_FUZZ_EXAMPLES": str(examples)}
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--hypothesis-show-statistics",
        str(REPO / "tests" / "protocol" / "test_frame_fuzz.py"),
        cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    (run.workdir / "frame_fuzz_properties.log").write_text(text)
    passed = sum(int(n) for n in re.findall(r"(\d+) passing\b", text))
    return passed, proc.returncode or 0, "\n".join(text.strip().splitlines()[-3:])


async def measure(run: Run) -> None:
    started = time.monotonic()
    rng = random.Random(16)
    examples = run.scaled(3000, 200)
    run.say(f"  frame decoders and socket-edge parsers: hypothesis properties, {examples} examples each")
    passed, code, tail = await _properties(run, examples)
    all_cases = cases(rng, run.scale)
    row = Row(
        "socket_fuzz",
        "Frame fuzzing at the device and relay sockets",
        load=f"a reference device streaming {BURST}-frame bursts to a relay client on the same pod",
        faults=f"{len(all_cases)} kinds of bad input on fresh device and relay sockets (one socket per case "
        f"and kind); TETHER_MAX_FRAME_BYTES={MAX_FRAME_BYTES}",
        bound="pod up; bystander: every frame, in order (seq +1, burst complete); RSS growth ≤ "
        f"{RSS_GROWTH_BOUND_KIB // 1024} MiB; each bad socket: dropped/answered and usable, or closed "
        "with 1009 / 1007 / 1002 as documented (a relay socket flooded with pings it never reads: or 4008)",
    )
    row.inputs["property examples (tests/protocol/test_frame_fuzz.py)"] = passed
    if code != 0:
        row.fail(f"property fuzzing failed (pytest exit {code}): {tail}")
    async with pod(run.workdir, "fuzz-pod", settings={"max_frame_bytes": str(MAX_FRAME_BYTES)}) as server:
        device, connection_id = await reference_device(run.workdir, server, server.key, "bystander")
        try:
            relay_url = (
                f"{server.ws_base}/v1/environments/{connection_id}/status/ws?"
                + urlencode({"agentId": BYSTANDER_SCOPE["agent_id"],
                             "conversationId": BYSTANDER_SCOPE["conversation_id"]})
            )  # fmt: skip
            bystander = Bystander(relay_url, server.key)
            watching = asyncio.create_task(bystander.run())
            await asyncio.sleep(1)
            rss_start = server.rss_kib()
            rss_peak = rss_start
            outcomes: dict[str, str] = {}
            n = 0
            for target in ("device", "relay"):
                for case in all_cases:
                    n += 1
                    samples: list[int] = []
                    problem, ended = await attack(server, server.pid, target, connection_id, n, case, samples)
                    rss_peak = max(rss_peak, rss_kib(server.pid), *samples)
                    label = f"{target}: {case.name}"
                    outcomes[label] = problem or ended
                    row.inputs[case.kind] = row.inputs.get(case.kind, 0) + case.inputs
                    if problem:
                        row.fail(f"{label}: {problem}")
                    if server.proc.poll() is not None:
                        row.fail(f"the pod exited with {server.proc.returncode} after {label}")
                        break
                    if watching.done():
                        break
            await asyncio.sleep(1)
            bystander.stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(watching, 30)
            if watching.done() and not watching.cancelled() and watching.exception() is not None:
                row.fail(f"bystander socket failed: {watching.exception()!r}")
            rss_end = server.rss_kib() if server.proc.poll() is None else 0
            if server.proc.poll() is not None:
                row.fail(f"the pod exited with {server.proc.returncode}")
            for problem in bystander.problems[:20]:
                row.fail(f"bystander: {problem}")
            if bystander.bursts < 2:
                row.fail(f"bystander completed only {bystander.bursts} bursts")
            growth = rss_peak - rss_start
            if growth > RSS_GROWTH_BOUND_KIB:
                row.fail(f"RSS grew {growth // 1024} MiB (bound {RSS_GROWTH_BOUND_KIB // 1024} MiB)")
            errors = server.problems()
            for line in errors[:10]:
                row.fail(f"pod log: {line}")
            row.lost = (
                f"{len(bystander.problems)} bystander frames out of order or missing of "
                f"{bystander.frames} ({bystander.bursts} bursts); {len(row.failures)} sockets or checks off"
            )
            row.detail = {
                "sockets": outcomes,
                "bystander_frames": bystander.frames,
                "bystander_bursts": bystander.bursts,
                "rss_kib": {"start": rss_start, "peak": rss_peak, "end": rss_end},
                "pod_log_problems": errors[:20],
            }
            row.note = (
                f"{n} bad sockets; pod RSS {rss_start // 1024} MiB at start, peak {rss_peak // 1024} MiB, "
                f"end {rss_end // 1024} MiB; {passed:,} property examples over the frame decoders and "
                "socket-edge parsers passed"
            )
        finally:
            device.stop()
    row.seconds = time.monotonic() - started
    run.add(row.judge())
