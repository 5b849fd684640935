"""The bus between pods, over Redis Streams.

Two kinds of stream (key names in `tether.livestate.redis.RedisKeys`):

* `pod:{pod}:inbox`, one per pod: requests to this pod (write a frame to a device it holds, close a
  device's sockets, "someone now watches connection X") and the replies to requests it made. Each
  request carries a correlation id, the requester's pod id and a deadline; the owner answers with a
  boolean in the requester's inbox. A request past its deadline is not carried out, so a sender that
  gave up (and told its client "not delivered") is never contradicted later.
* `pod:{pod}:events`, one per pod: the frames and state changes of the devices this pod watches
  (a client of it has a relay socket to them), written by the pod holding each device for every
  other pod in `conn:{id}:watchers` (a sorted set of pod ids scored by expiry). A pod reads only its
  own stream, with one blocking XREAD, and keeps the last id it saw, so a short gap (a Redis blip, a
  busy loop) loses nothing the stream still holds. Nothing is written for a device no other pod
  watches, and no pod reads back what it published itself. Each event carries its publisher's
  per-connection counter, so a reader that missed entries (stream trimmed, Redis restarted, publish
  queue overflowed) flags the next frame `gap_before`, and clients resync.

Streams rather than pub/sub: a pub/sub message sent while the subscriber reconnects is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable
from typing import Any

from redis.exceptions import RedisError

from tether.bus.base import BoundBus
from tether.bus.resp import RespConnection, script_sha
from tether.clock import now_ms
from tether.config import Settings
from tether.livestate.redis import (
    BACKOFF_MAX_SECONDS,
    BACKOFF_MIN_SECONDS,
    COMMAND_TIMEOUT_SECONDS,
    CONNECT_TIMEOUT_SECONDS,
    KEY_PREFIX,
    PIPELINE_CHUNK,
    RedisKeys,
    connect_redis,
    stop_tasks,
    wait_for_redis,
)
from tether.protocol.events import DeviceEvent, DeviceState
from tether.protocol.frames import FrameError, decode

log = logging.getLogger("tether.bus.redis")

# A pod's inbox keeps about this many entries (MAXLEN ~): requests only wait there while the owner's
# consumer catches up, so this bounds memory, not delivery.
INBOX_MAXLEN = 10_000
# An inbox nobody writes to for this long disappears (its pod is gone).
INBOX_TTL_SECONDS = 300.0
# XREAD BLOCK of the inbox consumer and of the event reader; also bounds how fast `healthy` notices
# a stuck loop.
READ_BLOCK_MS = 2000
# The first XREAD after a failure blocks only this long, so readiness returns as soon as Redis does.
RECOVERY_BLOCK_MS = 50
# Entries taken per stream per XREAD.
READ_COUNT = 500
# A pod's event stream keeps about this many entries (MAXLEN ~): enough to bridge its reader's
# reconnect while the devices it watches stream fast. Memory per pod is about this many frames.
EVENT_STREAM_MAXLEN = 10_000
# An event stream nobody publishes to for this long disappears (its pod is gone or watches nothing).
EVENT_STREAM_TTL_SECONDS = 60.0
# A watching pod re-registers its watches this often; an entry expires after WATCH_TTL_SECONDS
# (so a dead pod stops costing stream writes within that).
WATCH_REFRESH_SECONDS = 10.0
WATCH_TTL_SECONDS = 30.0
# The publishing pod remembers who watches a connection for this long (a watch notice, or a request
# from the watching pod, refreshes it at once).
WATCHERS_CACHE_SECONDS = 1.0
WATCHERS_CACHE_MAX = 100_000
# Device events waiting to be written to Redis; beyond this the oldest are dropped (and readers see
# the gap through the per-connection counter).
PUBLISH_QUEUE_MAX = 100_000
# Events per pipeline round trip.
PUBLISH_BATCH = 1000
# Asking another pod to close a device's sockets waits at most this long for its answer.
CLOSE_TIMEOUT_SECONDS = 2.0
# A request's deadline is this much before the requester gives up, so a frame written just before
# the deadline is still acknowledged (the sender never reports "not delivered" for a written frame,
# short of a reply lost in a Redis outage).
DEADLINE_MARGIN_SECONDS = 1.0
# `healthy` allows this much beyond READ_BLOCK_MS since a read last returned.
HEALTHY_GRACE_SECONDS = 2.0

# XADD to a pod's inbox only while that pod is alive: a request to a dead pod fails at once instead
# of waiting out the timeout, and never lingers to be carried out by nobody.
_REQUEST = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return false
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return id
"""
_REQUEST_SHA = script_sha(_REQUEST)


def _entries(response: Any) -> list[tuple[str, dict[str, str]]]:
    """XREAD's raw RESP2 answer for one stream as (entry id, fields) pairs."""
    if not response:
        return []
    _, entries = response[0]
    return [(entry_id, dict(zip(flat[::2], flat[1::2], strict=True))) for entry_id, flat in entries]


def _xadd(stream: str, maxlen: int, fields: dict[str, str]) -> tuple[str | int, ...]:
    return ("XADD", stream, "MAXLEN", "~", maxlen, "*", *(x for kv in fields.items() for x in kv))


class _Loop:
    """Health of one background reader: it is up while its reads keep returning."""

    def __init__(self) -> None:
        self.up = False
        self.ok_at = 0.0
        self.task: asyncio.Task[None] | None = None

    def ok(self) -> bool:
        """Record a successful read; True when the loop was down until now."""
        self.ok_at = time.monotonic()
        recovered = not self.up
        self.up = True
        return recovered

    @property
    def healthy(self) -> bool:
        running = self.task is not None and not self.task.done()
        fresh = time.monotonic() - self.ok_at < READ_BLOCK_MS / 1000 + HEALTHY_GRACE_SECONDS
        return running and self.up and fresh


class RedisBus(BoundBus):
    def __init__(self, settings: Settings, *, prefix: str = KEY_PREFIX) -> None:
        assert settings.redis_url, "RedisBus needs TETHER_REDIS_URL"
        self.pod_id = settings.pod_id
        self.keys = RedisKeys(prefix)
        self.redis = connect_redis(settings.redis_url)
        # The hot path (requests, replies, events) goes through lean connections (`bus.resp`): one
        # shared by every write, one per blocking reader.
        self._writes = RespConnection(
            settings.redis_url, connect_timeout=CONNECT_TIMEOUT_SECONDS, stall_timeout=COMMAND_TIMEOUT_SECONDS
        )
        read_stall = READ_BLOCK_MS / 1000 + COMMAND_TIMEOUT_SECONDS
        self._inbox_reads = RespConnection(
            settings.redis_url, connect_timeout=CONNECT_TIMEOUT_SECONDS, stall_timeout=read_stall
        )
        self._event_reads = RespConnection(
            settings.redis_url, connect_timeout=CONNECT_TIMEOUT_SECONDS, stall_timeout=read_stall
        )
        self.send_timeout = settings.send_timeout_seconds
        self._replies: dict[str, asyncio.Future[bool]] = {}
        self._inbox = _Loop()
        self._events = _Loop()
        self._inbox_last = "0-0"
        self._events_last = "0-0"
        # Watched connections -> whether this pod is registered in their watchers set yet.
        self._watched: dict[str, bool] = {}
        self._seen: dict[str, tuple[str, int]] = {}  # connection -> (publisher pod, its counter)
        self._gap_pending: set[str] = set()
        # Publishing side.
        self._queue: deque[tuple[str, int, DeviceEvent]] = deque()
        self._queue_wake = asyncio.Event()
        self._counters: dict[str, int] = {}
        self._watchers: dict[str, tuple[float, frozenset[str]]] = {}
        self._dropped = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._background: list[asyncio.Task[None]] = []
        self._closed = False

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await wait_for_redis(self.redis, f"bus of pod {self.pod_id}")
        # Start after whatever the streams hold: entries there are for an earlier process.
        self._inbox_last = await self._last_id(self.keys.inbox(self.pod_id))
        self._events_last = await self._last_id(self.keys.pod_events(self.pod_id))
        # Redis just answered: healthy from now on, as long as the loops' reads keep returning.
        self._inbox.ok()
        self._events.ok()
        loop = asyncio.get_running_loop()
        self._inbox.task = loop.create_task(self._inbox_loop())
        self._events.task = loop.create_task(self._events_loop())
        self._background = [
            self._inbox.task,
            self._events.task,
            loop.create_task(self._publish_loop()),
            loop.create_task(self._watch_refresh_loop()),
        ]

    async def close(self) -> None:
        self._closed = True
        await stop_tasks([*self._background, *self._tasks])
        for future in self._replies.values():
            if not future.done():
                future.set_result(False)
        try:
            await self._flush_queue_once()
            if self._watched:
                pipe = self.redis.pipeline(transaction=False)
                for connection_id in self._watched:
                    pipe.zrem(self.keys.watchers(connection_id), self.pod_id)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("could not withdraw pod %s's watches on shutdown: %r", self.pod_id, exc)
        for connection in (self._writes, self._inbox_reads, self._event_reads):
            connection.close()
        await self.redis.aclose()

    @property
    def healthy(self) -> bool:
        return not self._closed and self._inbox.healthy and self._events.healthy

    # ---- commands to a device (request/reply) --------------------------------------------

    async def send_to_device(self, connection_id: str, owner_pod: str, text: str) -> bool:
        if owner_pod == self.pod_id:
            return await self.handler.write_to_device(connection_id, text)
        request = {"k": "send", "cid": connection_id, "text": text}
        return await self._ask(owner_pod, request, self.send_timeout)

    async def close_device(self, connection_id: str, owner_pod: str, code: int, reason: str) -> bool:
        if owner_pod == self.pod_id:
            return await self.handler.close_device(connection_id, code, reason)
        request = {"k": "close", "cid": connection_id, "code": str(code), "reason": reason}
        return await self._ask(owner_pod, request, min(CLOSE_TIMEOUT_SECONDS, self.send_timeout))

    async def _ask(self, owner_pod: str, request: dict[str, str], wait_s: float) -> bool:
        """Put a request in the owner's inbox and wait for its answer; False on any failure."""
        correlation = uuid.uuid4().hex
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._replies[correlation] = future
        # The owner starts no write after this: its answer must still find us waiting.
        deadline = now_ms() + int(max(wait_s / 2, wait_s - DEADLINE_MARGIN_SECONDS) * 1000)
        fields = {**request, "id": correlation, "from": self.pod_id, "dl": str(deadline)}
        args: list[str | int] = [INBOX_MAXLEN, int(INBOX_TTL_SECONDS * 1000)]
        for name, value in fields.items():
            args += [name, value]
        what = f"{request['k']} for {request['cid']}"
        try:
            async with asyncio.timeout(wait_s):
                if await self._put_request(owner_pod, args) is None:
                    log.info("%s not sent: pod %s is not alive", what, owner_pod)
                    return False
                return await future
        except TimeoutError:
            log.warning("%s: pod %s did not answer within %.1fs", what, owner_pod, wait_s)
            return False
        except (RedisError, OSError) as exc:
            log.warning("%s via Redis failed: %r", what, exc)
            return False
        finally:
            self._replies.pop(correlation, None)

    async def _put_request(self, owner_pod: str, args: list[str | int]) -> str | None:
        """Append a request to the owner's inbox; None when that pod is not alive."""
        keys = [self.keys.pod(owner_pod), self.keys.inbox(owner_pod)]
        answer: str | None = await self._writes.script(_REQUEST_SHA, _REQUEST, keys, args)
        return answer

    async def _inbox_loop(self) -> None:
        inbox = self.keys.inbox(self.pod_id)
        delay = BACKOFF_MIN_SECONDS
        while True:
            try:
                # Right after an outage, return quickly: readiness waits for this read to come back.
                block = READ_BLOCK_MS if self._inbox.up else RECOVERY_BLOCK_MS
                response = await self._inbox_reads.call(
                    "XREAD", "COUNT", READ_COUNT, "BLOCK", block, "STREAMS", inbox, self._inbox_last
                )
            except (RedisError, OSError) as exc:
                if self._inbox.up:
                    log.warning("pod %s: inbox consumer lost Redis: %r", self.pod_id, exc)
                self._inbox.up = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_SECONDS)
                continue
            delay = BACKOFF_MIN_SECONDS
            if self._inbox.ok():
                log.info("pod %s: inbox consumer running", self.pod_id)
            for entry_id, fields in _entries(response):
                self._inbox_last = entry_id
                try:
                    self._on_inbox(fields)
                except Exception:
                    log.exception("bad inbox entry %s: %r", entry_id, fields.get("k"))

    def _on_inbox(self, fields: dict[str, str]) -> None:
        kind = fields.get("k")
        if kind == "reply":
            future = self._replies.get(fields.get("id", ""))
            if future is not None and not future.done():
                future.set_result(fields.get("ok") == "1")
            return
        connection_id = fields.get("cid", "")
        requester = fields.get("from", "")
        # The sender watches (or is about to): publish to it without waiting for the cache to expire.
        # A sender already known to watch teaches nothing, and keeping the entry spares the next
        # publish a Redis round trip.
        known = self._watchers.get(connection_id)
        if known is None or requester not in known[1]:
            self._watchers.pop(connection_id, None)
        if kind == "watch":
            return
        correlation = fields.get("id", "")
        if int(fields.get("dl", "0")) < now_ms():
            log.info("dropped a %s for %s from pod %s: past its deadline", kind, connection_id, requester)
            return  # the requester already answered its caller
        if kind == "send":
            text = fields.get("text", "")
            if self.handler.write_to_device_now(connection_id, text):
                # Written in this turn of the loop: only the reply waits for Redis.
                self._spawn(self._reply(requester, correlation, True))
                return
            work: Awaitable[bool] = self.handler.write_to_device(connection_id, text)
        elif kind == "close":
            code = int(fields.get("code", "1000"))
            work = self.handler.close_device(connection_id, code, fields.get("reason", ""))
        else:
            log.warning("unknown inbox entry kind %r", kind)
            return
        # One task per request: a slow device must not hold up the others. Tasks start in inbox order
        # and the device socket's lock is fair, so frames to one device keep their order (a frame is
        # written at once above only while no write waits on that socket).
        self._spawn(self._answer(work, requester, correlation))

    async def _answer(self, work: Awaitable[bool], requester: str, correlation: str) -> None:
        try:
            ok = await work
        except Exception:
            log.exception("carrying out a request from pod %s failed", requester)
            ok = False
        await self._reply(requester, correlation, ok)

    async def _reply(self, requester: str, correlation: str, ok: bool) -> None:
        inbox = self.keys.inbox(requester)
        reply = {"k": "reply", "id": correlation, "ok": "1" if ok else "0"}
        try:
            await self._writes.pipeline(
                [_xadd(inbox, INBOX_MAXLEN, reply), ("PEXPIRE", inbox, int(INBOX_TTL_SECONDS * 1000))]
            )
        except (RedisError, OSError) as exc:
            log.warning("could not answer pod %s: %r", requester, exc)

    def _spawn(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            await work

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- device events: publishing -------------------------------------------------------

    def publish(self, connection_id: str, event: DeviceEvent) -> None:
        counter = self._counters.get(connection_id, 0) + 1
        if event.state is DeviceState.OFFLINE:
            self._counters.pop(connection_id, None)
        else:
            self._counters[connection_id] = counter
        if len(self._queue) >= PUBLISH_QUEUE_MAX:
            self._queue.popleft()
            self._dropped += 1
            if self._dropped in (1, 10, 100) or self._dropped % 10_000 == 0:
                log.warning("publish queue full: dropped %d device events so far", self._dropped)
        self._queue.append((connection_id, counter, event))
        self._queue_wake.set()

    async def _publish_loop(self) -> None:
        delay = BACKOFF_MIN_SECONDS
        while True:
            await self._queue_wake.wait()
            self._queue_wake.clear()
            while self._queue:
                try:
                    await self._flush_queue_once()
                    delay = BACKOFF_MIN_SECONDS
                except (RedisError, OSError) as exc:
                    # The batch is lost; readers see the hole in the counters and flag a gap.
                    log.warning("publishing device events failed: %r", exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, BACKOFF_MAX_SECONDS)

    async def _flush_queue_once(self) -> None:
        batch = [self._queue.popleft() for _ in range(min(len(self._queue), PUBLISH_BATCH))]
        if not batch:
            return
        watchers = await self._watchers_of({connection_id for connection_id, _, _ in batch})
        commands: list[tuple[str | int, ...]] = []
        written: set[str] = set()
        for connection_id, counter, event in batch:
            pods = watchers.get(connection_id, frozenset()) - {self.pod_id}
            if not pods:
                continue
            fields = {"c": connection_id, "p": self.pod_id, "n": str(counter)}
            if event.frame is not None:
                fields["f"] = event.frame.text
            if event.gap_before:
                fields["g"] = "1"
            if event.state is not None:
                fields["s"] = event.state.value
            for pod in pods:
                stream = self.keys.pod_events(pod)
                commands.append(_xadd(stream, EVENT_STREAM_MAXLEN, fields))
                written.add(stream)
        for stream in written:
            commands.append(("PEXPIRE", stream, int(EVENT_STREAM_TTL_SECONDS * 1000)))
        if commands:
            await self._writes.pipeline(commands)

    async def _watchers_of(self, connection_ids: set[str]) -> dict[str, frozenset[str]]:
        now = time.monotonic()
        found: dict[str, frozenset[str]] = {}
        missing: list[str] = []
        for connection_id in connection_ids:
            hit = self._watchers.get(connection_id)
            if hit is not None and now - hit[0] < WATCHERS_CACHE_SECONDS:
                found[connection_id] = hit[1]
            else:
                missing.append(connection_id)
        if missing:
            pipe = self.redis.pipeline(transaction=False)
            wall = now_ms()
            for connection_id in missing:
                pipe.zrangebyscore(self.keys.watchers(connection_id), wall, "+inf")
            answers = await pipe.execute()
            if len(self._watchers) + len(missing) > WATCHERS_CACHE_MAX:
                self._watchers = {
                    c: hit for c, hit in self._watchers.items() if now - hit[0] < WATCHERS_CACHE_SECONDS
                }
            for connection_id, pods in zip(missing, answers, strict=True):
                found[connection_id] = frozenset(pods)
                self._watchers[connection_id] = (now, found[connection_id])
        return found

    # ---- device events: watching ---------------------------------------------------------

    async def watch(self, connection_id: str) -> None:
        if connection_id in self._watched:
            return
        self._watched[connection_id] = False
        try:
            await self._register([connection_id])
        except (RedisError, OSError) as exc:
            # Registered by the refresh loop once Redis answers; never fail the relay socket for it.
            log.warning("watching %s deferred, Redis unavailable: %r", connection_id, exc)

    async def unwatch(self, connection_id: str) -> None:
        self._watched.pop(connection_id, None)
        self._seen.pop(connection_id, None)
        self._gap_pending.discard(connection_id)
        try:
            await self.redis.zrem(self.keys.watchers(connection_id), self.pod_id)
        except (RedisError, OSError) as exc:
            log.info("unwatching %s left to expiry, Redis unavailable: %r", connection_id, exc)

    async def _register(self, connection_ids: list[str], notify: bool = True) -> None:
        """Join the watchers of these connections: their owners write their events to our stream."""
        expires = now_ms() + int(WATCH_TTL_SECONDS * 1000)
        fresh: set[str] = set()
        owners: dict[str, str] = {}
        for start in range(0, len(connection_ids), PIPELINE_CHUNK):
            chunk = connection_ids[start : start + PIPELINE_CHUNK]
            pipe = self.redis.pipeline(transaction=False)
            for connection_id in chunk:
                pipe.zadd(self.keys.watchers(connection_id), {self.pod_id: expires})
                pipe.pexpire(self.keys.watchers(connection_id), int(WATCH_TTL_SECONDS * 1000))
                pipe.hget(self.keys.lease(connection_id), "pod")
            answers = await pipe.execute()
            for i, connection_id in enumerate(chunk):
                owner = answers[3 * i + 2]
                if self._watched.get(connection_id) is False:
                    self._watched[connection_id] = True
                    fresh.add(connection_id)
                if owner and owner != self.pod_id:
                    owners[connection_id] = owner
        if notify:
            ttl_ms = int(INBOX_TTL_SECONDS * 1000)
            for connection_id, owner in owners.items():
                if connection_id in fresh:
                    await self._put_request(owner, [INBOX_MAXLEN, ttl_ms, "k", "watch", "cid", connection_id])

    async def _watch_refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(WATCH_REFRESH_SECONDS)
            with contextlib.suppress(RedisError, OSError):
                await self._refresh_watches()

    async def _refresh_watches(self) -> None:
        """Re-register every watch (after a Redis restart the watcher sets are gone)."""
        pending = [c for c, registered in self._watched.items() if not registered]
        if pending:
            await self._register(pending)
        registered = [c for c, registered in self._watched.items() if registered]
        expires = now_ms() + int(WATCH_TTL_SECONDS * 1000)
        for start in range(0, len(registered), PIPELINE_CHUNK):
            pipe = self.redis.pipeline(transaction=False)
            for connection_id in registered[start : start + PIPELINE_CHUNK]:
                pipe.zadd(self.keys.watchers(connection_id), {self.pod_id: expires})
                pipe.pexpire(self.keys.watchers(connection_id), int(WATCH_TTL_SECONDS * 1000))
            await pipe.execute()

    async def _events_loop(self) -> None:
        stream = self.keys.pod_events(self.pod_id)
        delay = BACKOFF_MIN_SECONDS
        while True:
            try:
                block = READ_BLOCK_MS if self._events.up else RECOVERY_BLOCK_MS
                response = await self._event_reads.call(
                    "XREAD", "COUNT", READ_COUNT, "BLOCK", block, "STREAMS", stream, self._events_last
                )
                if self._events.ok() and self._watched:
                    # Back after an outage: Redis may have restarted empty, so join the watchers again.
                    await self._refresh_watches()
            except (RedisError, OSError) as exc:
                if self._events.up:
                    log.warning("pod %s: event reader lost Redis: %r", self.pod_id, exc)
                self._events.up = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_SECONDS)
                continue
            delay = BACKOFF_MIN_SECONDS
            for entry_id, fields in _entries(response):
                self._events_last = entry_id
                connection_id = fields.get("c", "")
                if connection_id not in self._watched:
                    continue  # unwatched since it was written
                try:
                    self._deliver(connection_id, fields)
                except Exception:
                    log.exception("delivering an event of %s failed", connection_id)

    def _deliver(self, connection_id: str, fields: dict[str, str]) -> None:
        publisher = fields.get("p", "")
        counter = int(fields.get("n", "0"))
        previous = self._seen.get(connection_id)
        missed = previous is not None and previous[0] == publisher and counter > previous[1] + 1
        self._seen[connection_id] = (publisher, counter)
        gap = missed or fields.get("g") == "1" or connection_id in self._gap_pending
        frame = None
        text = fields.get("f")
        if text is not None:
            try:
                frame = decode(text)
            except FrameError as exc:
                log.warning("undecodable relayed frame for %s: %s", connection_id, exc)
        state = DeviceState(fields["s"]) if "s" in fields else None
        if frame is None:
            if gap:
                self._gap_pending.add(connection_id)  # carried to the next frame
            if state is None:
                return
            self.handler.on_device_event(connection_id, DeviceEvent(state=state))
            return
        self._gap_pending.discard(connection_id)
        self.handler.on_device_event(connection_id, DeviceEvent(frame=frame, gap_before=gap, state=state))

    # ---- helpers -------------------------------------------------------------------------

    async def _last_id(self, key: str) -> str:
        last = await self.redis.xrevrange(key, count=1)
        return str(last[0][0]) if last else "0-0"
