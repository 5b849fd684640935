"""The faults row's load generator (`python -m hardening.faultload`): devices and relay clients that
keep records a fault can be judged by.

It speaks `bench.agent`'s stdin/stdout protocol (one JSON request per line, one answer per line) and
adds what the row needs on top of its reference devices:

* routing as a load balancer in front of the pods does it, over the ready pods the harness keeps
  current (`route`): a device's sockets by a hash of its `deviceId` (as nginx `hash $arg_deviceId`),
  every other connection to the next pod in turn; a device whose pod died reconnects, with its own
  backoff, to another;
* devices that keep every frame (`record=True`): the harness reads back which tagged messages each
  received and which events each emitted;
* relay client pairs (control + stream) that check every frame's per-socket `seq`, resume after a
  dropped socket (`?resume=&resumeFrom=`) and note each announcement of a loss (`resync_required`,
  or a hole in the feed's `event_seq`), so lost frames can be told from announced ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import zlib
from collections import Counter
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
import uvloop
from bench.agent import Agent, serve
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

import tether.device.client as device_client
from tether.device.client import Device

# Netlocs ("127.0.0.1:port") of the pods new connections go to, in turn; set by the harness.
ROUTE: list[str] = []
# Devices held on one pod whatever ROUTE says (the harness's route probes): deviceId -> netloc.
PINS: dict[str, str] = {}
_turn = itertools.count()
_post_json = device_client.post_json
RELAY_BACKOFF_SECONDS = (0.2, 0.5, 1.0, 2.0, 4.0)  # a relay client's waits between reconnects
PING_SECONDS = 30.0
MAX_SIZE = 32 * 1024 * 1024


def rerouted(url: str) -> str:
    """`url` pointed at a pod in ROUTE (unchanged while ROUTE is empty): a device socket by its
    `deviceId` (a device's control and stream sockets must meet on one pod: a pair split over two
    pods never completes), anything else at the next pod in turn."""
    if not ROUTE:
        return url
    parts = urlsplit(url)
    device = dict(parse_qsl(parts.query)).get("deviceId")
    if device in PINS:
        return urlunsplit(parts._replace(netloc=PINS[device]))
    turn = zlib.crc32(device.encode()) if device else next(_turn)
    return urlunsplit(parts._replace(netloc=ROUTE[turn % len(ROUTE)]))


async def _routed_connect(uri: str, **kwargs: Any) -> ClientConnection:
    return await connect(rerouted(uri), **kwargs)


async def _routed_post(
    url: str, headers: Mapping[str, str], body: bytes, *, time_limit: float
) -> tuple[int, dict[str, str], bytes]:
    return await _post_json(rerouted(url), headers, body, time_limit=time_limit)


def tag_of(frame: Mapping[str, Any]) -> str | None:
    """The id a tagged send carries (its first message's client_message_id)."""
    messages = frame.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[0], dict):
        tag = messages[0].get("client_message_id")
        return tag if isinstance(tag, str) else None
    return None


class RelaySocket:
    """One logical relay socket: the physical sockets it was carried on, linked by resume."""

    def __init__(self, pair: RelayPair, channel: str) -> None:
        self.pair = pair
        self.channel = channel
        self.socket_id: str | None = None
        self.last_seq: int | None = None
        self.last_event_seq: int | None = None
        self.announce = False  # the next event frame follows an announced loss
        self.frames: list[tuple[str, float, bool]] = []  # (idempotency_key, arrival, announced)
        self.opened_at: float | None = None
        self.seq_gaps = 0  # frames missing from the seq numbering, unannounced
        self.seq_repeats = 0
        self.resyncs = 0
        self.holes = 0
        self.opens = 0
        self.resume_hits = 0
        self.resume_misses = 0
        self.refused: Counter[str] = Counter()
        self.closes: Counter[str] = Counter()
        self.ws: ClientConnection | None = None

    def url(self, netloc: str) -> str:
        pair = self.pair
        query = {"agentId": pair.agent_id, "conversationId": pair.conversation_id, "channel": self.channel}
        if self.socket_id is not None:
            query |= {"resume": self.socket_id, "resumeFrom": str(self.last_seq or 0)}
        return f"ws://{netloc}/v1/environments/{pair.connection_id}/status/ws?{urlencode(query)}"

    async def run(self) -> None:
        failures = 0
        while True:
            netloc = ROUTE[next(_turn) % len(ROUTE)]
            try:
                ws = await connect(
                    self.url(netloc),
                    additional_headers={"Authorization": f"Bearer {self.pair.key}"},
                    compression=None,
                    max_size=MAX_SIZE,
                    ping_interval=None,
                    open_timeout=10,
                )
            except InvalidStatus as exc:
                self.refused[str(exc.response.status_code)] += 1
            except (OSError, TimeoutError, WebSocketException) as exc:
                self.refused[type(exc).__name__] += 1
            else:
                failures = 0
                self._opened(ws)
                await self._read(ws)
                continue
            await asyncio.sleep(RELAY_BACKOFF_SECONDS[min(failures, len(RELAY_BACKOFF_SECONDS) - 1)])
            failures += 1

    def _opened(self, ws: ClientConnection) -> None:
        socket_id = ws.response.headers.get("x-tether-socket-id") if ws.response else None
        self.opens += 1
        if self.opened_at is None:
            self.opened_at = time.time()
        elif socket_id == self.socket_id:
            self.resume_hits += 1
        else:
            # A fresh socket: its numbering starts over, and what was missed must be announced.
            self.resume_misses += 1
            self.last_seq = None
            self.last_event_seq = None
        self.socket_id = socket_id
        self.ws = ws

    async def _read(self, ws: ClientConnection) -> None:
        try:
            while True:
                self._on_frame(orjson.loads(await ws.recv(decode=False)))
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else 1006
            self.closes[f"{code} {exc.rcvd.reason if exc.rcvd else ''}".strip()] += 1
        finally:
            self.ws = None

    def _on_frame(self, frame: dict[str, Any]) -> None:
        seq = frame.get("seq")
        if isinstance(seq, int):
            if self.last_seq is not None and seq != self.last_seq + 1:
                if seq > self.last_seq + 1:
                    self.seq_gaps += seq - self.last_seq - 1
                else:
                    self.seq_repeats += 1
            self.last_seq = seq if self.last_seq is None else max(seq, self.last_seq)
        if frame.get("type") == "resync_required":
            self.resyncs += 1
            self.announce = True
            self.last_event_seq = None
            return
        key = frame.get("idempotency_key")
        event_seq = frame.get("event_seq")
        if not isinstance(key, str) or not isinstance(event_seq, int):
            return
        announced = self.announce
        if self.last_event_seq is not None and event_seq > self.last_event_seq + 1:
            self.holes += 1
            announced = True
        if self.last_event_seq is None or event_seq > self.last_event_seq:
            self.last_event_seq = event_seq
        self.announce = False
        self.frames.append((key, time.time(), announced))

    async def ping(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(ConnectionClosed):
                await self.ws.send('{"type":"ping"}')

    def report(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "opened_at": self.opened_at,
            "open": self.ws is not None,
            "frames": self.frames,
            "seq_gaps": self.seq_gaps,
            "seq_repeats": self.seq_repeats,
            "resyncs": self.resyncs,
            "holes": self.holes,
            "opens": self.opens,
            "resume_hits": self.resume_hits,
            "resume_misses": self.resume_misses,
            "refused": dict(self.refused),
            "closes": dict(self.closes),
        }


class RelayPair:
    """A client as the Agent SDK holds one: control and stream sockets scoped to one conversation."""

    def __init__(self, key: str, connection_id: str, agent_id: str, conversation_id: str) -> None:
        self.key = key
        self.connection_id = connection_id
        self.agent_id = agent_id
        self.conversation_id = conversation_id
        self.sockets = [RelaySocket(self, "control"), RelaySocket(self, "stream")]
        self.tasks = [asyncio.create_task(s.run()) for s in self.sockets]

    def attached(self) -> bool:
        return all(s.ws is not None for s in self.sockets)


class FaultAgent(Agent):
    def __init__(self) -> None:
        super().__init__()
        self.pairs: dict[str, RelayPair] = {}
        self._pinger: asyncio.Task[None] | None = None

    async def route(self, netlocs: list[str], pins: dict[str, str] | None = None) -> None:
        ROUTE[:] = netlocs
        if pins is not None:
            PINS.clear()
            PINS.update(pins)

    async def tagged_devices(
        self, group: str, base_url: str, key: str, count: int, batch: int = 50, ids: list[str] | None = None
    ) -> Any:
        """`count` reference devices that keep every frame (device ids `ids`, if given); their ids
        once all are ready."""
        devices = self.groups.setdefault(group, [])
        for first in range(0, count, batch):
            fresh = [
                Device(
                    base_url,
                    key,
                    f"{group}-{len(devices) + i}",
                    device_id=ids[first + i] if ids else None,
                    record=True,
                    ready_timeout=30,
                )
                for i in range(min(batch, count - first))
            ]
            devices.extend(fresh)
            for device in fresh:
                await device.start()
            await asyncio.gather(*(d.wait_ready(60) for d in fresh))
        return [{"device_id": d.device_id, "connection_id": d.connection_id} for d in devices]

    async def received_tags(self, group: str) -> dict[str, list[str]]:
        """device id -> tags of the messages it received, in arrival order."""
        out: dict[str, list[str]] = {}
        for device in self.groups.get(group, []):
            tags = [t for f in device.received if f.get("type") == "message" and (t := tag_of(f))]
            out[device.device_id] = tags
        return out

    async def emitted(self, group: str, device_ids: list[str]) -> dict[str, list[tuple[str, str, float]]]:
        """device id -> the scoped events it wrote: (conversation, idempotency_key, emitted_at)."""
        wanted = set(device_ids)
        out: dict[str, list[tuple[str, str, float]]] = {}
        for device in self.groups.get(group, []):
            if device.device_id not in wanted:
                continue
            events = []
            for frame in device.sent:
                runtime = frame.get("runtime")
                if isinstance(runtime, dict) and isinstance(frame.get("idempotency_key"), str):
                    events.append(
                        (str(runtime.get("conversation_id")), frame["idempotency_key"], _epoch(frame))
                    )
            out[device.device_id] = events
        return out

    async def device_stats(self, group: str) -> dict[str, Any]:
        devices = self.groups.get(group, [])
        closes: Counter[str] = Counter(f"{c} {r}".strip() for d in devices for c, r in d.closed_codes)
        return {
            "ready": sum(1 for d in devices if d.ready.is_set()),
            "total": len(devices),
            "registrations": sum(d.registrations for d in devices),
            "connects": sum(d.connects for d in devices),
            "attempts": sum(d.connect_attempts for d in devices),
            "stopped": [f"{d.name}: {d.error}" for d in devices if d.task is not None and d.task.done()][:5],
            "closes": dict(closes.most_common(8)),
        }

    async def relays(self, key: str, specs: list[dict[str, str]]) -> None:
        for spec in specs:
            self.pairs[spec["name"]] = RelayPair(
                key, spec["connection_id"], spec["agent_id"], spec["conversation_id"]
            )
        if self._pinger is None:
            self._pinger = asyncio.create_task(self._ping_loop())

    async def relays_attached(self) -> int:
        return sum(1 for p in self.pairs.values() if p.attached())

    async def relay_report(self) -> dict[str, Any]:
        return {
            name: {"connection_id": p.connection_id, "sockets": [s.report() for s in p.sockets]}
            for name, p in self.pairs.items()
        }

    async def _ping_loop(self) -> None:
        while True:
            await asyncio.sleep(PING_SECONDS)
            await asyncio.gather(*(s.ping() for p in self.pairs.values() for s in p.sockets))


def _epoch(frame: Mapping[str, Any]) -> float:
    import datetime as dt

    stamp = frame.get("emitted_at")
    if not isinstance(stamp, str):
        return 0.0
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def main() -> None:
    device_client.connect = _routed_connect  # type: ignore[assignment,attr-defined]
    device_client.post_json = _routed_post
    uvloop.run(serve(FaultAgent()))


if __name__ == "__main__":
    main()
