"""Relay sockets: clients watching one device and driving it (client-protocol §2).

Each relay socket edge holds one `RelaySession`; commands go from it to `Hub.send_to_device`, and the
device's frames reach its socket through the hub's watch. `Relays` opens sessions (fresh or resumed),
subscribes the device to the scopes its clients watch, and notices watched devices whose pod died.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from tether.bus.history import HistoryRecord, HistoryStore
from tether.clock import now_ms
from tether.config import Settings
from tether.hub import Hub, Watch
from tether.metrics import Counters
from tether.protocol import closes
from tether.protocol.events import DeviceEvent, DeviceState, follows
from tether.protocol.fanout import INTERNAL_REQUEST_PREFIX
from tether.protocol.feeds import Scope
from tether.protocol.frames import PONG, Frame, encode, error_frame, scoped_sync
from tether.protocol.history import plan_catch_up
from tether.protocol.ratelimit import TokenBucket
from tether.protocol.roles import may_act
from tether.sockets import ClientSocket, Transport
from tether.store.base import Principal
from tether.tasks import TaskSet

log = logging.getLogger("tether.relays")

# Reads of the event log one resume across pods makes at most: a second when frames held meanwhile
# show the first was too early (the device's pod had not yet learnt this pod watches it).
CATCH_UP_READS = 3
# How long one read may take (with this pod's own events flushed first) before the resume gives up on
# the log and announces `resync_required`: the watch holds its frames meanwhile.
CATCH_UP_SECONDS = 3.0


class Relays:
    def __init__(
        self, settings: Settings, hub: Hub, counters: Counters, tasks: TaskSet, history: HistoryStore
    ) -> None:
        self.settings = settings
        self.history = history
        self.hub = hub
        self.counters = counters
        self.tasks = tasks
        hub.on_watch_online = self._resubscribe

    async def reachable(self, connection_id: str) -> bool:
        if self.hub.device(connection_id) is not None:
            return True  # online, or away within its grace window
        return await self.hub.owner_of(connection_id) is not None

    def can_resume(self, connection_id: str, socket_id: str, key_id: str) -> bool:
        watch = self.hub.watch_of(connection_id)
        return watch is not None and watch.resumable(socket_id, key_id) is not None

    async def open(
        self,
        principal: Principal,
        connection_id: str,
        transport: Transport,
        scope: Scope,
        channel: str | None,
        resume: tuple[str, int] | None,
        socket_id: str,
    ) -> RelaySession:
        watch = await self.hub.watch(connection_id)
        if resume is not None:
            old = watch.resumable(resume[0], principal.key_id)
            if old is not None:
                missed = old.history.since(resume[1])
                old.attach(transport, missed or [])
                watch.resume(old)
                if missed is not None:
                    self.counters.resume_hits += 1
                else:
                    self.counters.resume_history_gone += 1
                    old.deliver(
                        encode({"type": "resync_required", "reason": "resume point is no longer in history"})
                    )
                return RelaySession(self, watch, old, may_act(principal.role))
        # A socket another pod served (it died, or the client came back through another one): what
        # that pod wrote of its history, as a new socket here that goes on numbering after it.
        record = await self.history.fetch(resume[0]) if resume is not None else None
        if record is not None and (record.key_id, record.connection_id) != (principal.key_id, connection_id):
            record = None  # another key's socket: as unknown
        settings = self.settings
        sock = ClientSocket(
            socket_id,
            transport,
            connection_id,
            principal.key_id,
            scope,
            channel,
            self.history.history(socket_id, connection_id, principal.key_id),
            settings.client_queue_frames,
            settings.client_queue_bytes,
            self.counters.frame_latency,
        )
        sock.on_overflow = self._slow_client
        if resume is not None and record is not None:
            fresh_scope = await self._catch_up(watch, sock, record, resume[1])
        else:
            fresh_scope = watch.add(sock)
        if resume is not None and record is None:
            self.counters.resume_misses += 1
            sock.deliver(encode({"type": "resync_required", "reason": "unknown or expired resume token"}))
        if fresh_scope and scope.agent_id is not None and not watch.device_away:
            await self.subscribe(watch, scope)
        return RelaySession(self, watch, sock, may_act(principal.role))

    async def _catch_up(
        self, watch: Watch, sock: ClientSocket, record: HistoryRecord, resume_from: int
    ) -> bool:
        """Resume a socket another pod served: its record, then the connection's event log after it,
        then the live feed, with nothing lost or repeated at the hand-over. Returns whether the
        socket's scope is new here.

        The watch holds the frames arriving meanwhile. This pod's own events are in the log once
        its publisher has flushed; another pod's arrive held (they are written to the log first,
        in the same pipeline), and one held past a hole in what the log gave means the log was
        read too early: it is read again."""
        conn = watch.connection_id
        watch.hold()
        try:
            for _ in range(CATCH_UP_READS):
                logged = None
                if record.position is not None:
                    try:
                        async with asyncio.timeout(CATCH_UP_SECONDS):
                            if self.hub.device(conn) is not None:
                                await self.hub.bus.flushed()
                            logged = await self.history.events_after(conn, record.position)
                    except TimeoutError:
                        log.warning("reading the event log of %s timed out: the resume resyncs", conn)
                plan = plan_catch_up(
                    record.frames,
                    record.last_seq,
                    record.position,
                    logged,
                    resume_from,
                    sock.scope,
                    sock.channel,
                    sock.key_id,
                )
                if plan.resync_reason is not None or plan.position is None:
                    break
                later = [e.position for e in watch.held or () if e.position and e.position > plan.position]
                if not later or follows(plan.position, later[0]):
                    break
            else:
                plan.resync_reason = "the event log never caught up with the live feed"
        finally:
            held = watch.unhold()
        # From here on without a pause: the hand-over happens within one turn of the loop.
        after = plan.position
        for event in held:
            if after is not None and event.position is not None and event.position <= after:
                self._deliver(watch, event)  # replayed to this socket already; the others' due
        sock.seq = plan.seq
        for seq, text, position in plan.frames:
            sock.history.append(seq, text, position)
        for text in plan.replay:
            sock.push(text)
        sock.after = after
        if after is not None and self.hub.device(conn) is None:
            self.hub.bus.expect(conn, after)  # what the log could not give is flagged, not skipped
        replayed_from_record = sum(1 for seq, _ in record.frames if seq > resume_from)
        self.counters.resume_log_frames += max(0, len(plan.replay) - replayed_from_record)
        fresh_scope = watch.add(sock)
        reason = plan.resync_reason
        if not sock.scope.unscoped:
            if fresh_scope:
                feed = watch.fanout.feeds[sock.scope]
                feed.next_event_seq, feed.losses_seen = plan.feed_next, watch.fanout.losses
            elif reason is None:
                reason = "this pod numbers the scope's events in its own feed"
        if reason is None:
            self.counters.resume_hits += 1
        else:
            self.counters.resume_history_gone += 1
            sock.deliver(encode({"type": "resync_required", "reason": reason}))
        for event in held:
            if after is None or event.position is None or event.position > after:
                self._deliver(watch, event)
        return fresh_scope

    @staticmethod
    def _deliver(watch: Watch, event: DeviceEvent) -> None:
        if event.frame is not None:
            watch.deliver(event.frame, event.gap_before, event.position)

    async def subscribe(self, watch: Watch, scope: Scope) -> None:
        """Subscribe the device connection to a scope: it emits scoped events only for subscribers."""
        if scope.agent_id is None:
            return
        request_id = f"{INTERNAL_REQUEST_PREFIX}{uuid.uuid4().hex}"
        watch.fanout.internal_request(request_id)
        sync = scoped_sync(scope.agent_id, scope.conversation_id or "default", request_id)
        await self.hub.send_to_device(watch.connection_id, sync)

    def _resubscribe(self, watch: Watch) -> None:
        """The device (re)connected: subscriptions may be gone (re-registration, router restart)."""
        for scope in watch.fanout.scopes():
            if scope.agent_id is not None:
                self.tasks.spawn(self.subscribe(watch, scope))

    def _slow_client(self, sock: ClientSocket) -> None:
        self.counters.relay_slow_consumer_closes += 1
        log.info("relay socket %s cannot keep up (%d frames queued): closing it", sock.id, sock.queued)
        self.tasks.spawn(self._drop(sock, closes.SLOW_CONSUMER, "slow consumer: outbound queue full"))

    async def _drop(self, sock: ClientSocket, code: int, reason: str) -> None:
        # Out of the fan-out before the close is awaited: a slow consumer's close waits on its
        # socket, and meanwhile every relayed frame was still numbered and kept for it.
        self.history.forget(sock.id)
        watch = self.hub.watch_of(sock.connection_id)
        if watch is not None:
            watch.remove(sock)
        await sock.close(code, reason)
        if watch is not None:
            await self.hub.release(watch)

    def detach(self, watch: Watch, sock: ClientSocket) -> None:
        """Keep a dropped socket for resume, for `history_seconds` at most."""
        detached_at = now_ms()
        watch.detach(sock, detached_at)
        asyncio.get_running_loop().call_later(
            self.settings.history_seconds,
            lambda: self.tasks.spawn(self._expire_detached(watch, sock, detached_at)),
        )

    async def _expire_detached(self, watch: Watch, sock: ClientSocket, detached_at: int) -> None:
        # Only if it is still the same detachment: a resumed-then-dropped socket has a later one.
        if watch.detached.get(sock.id) is sock and sock.detached_at == detached_at:
            self.history.forget(sock.id)
            watch.remove(sock)
            await self.hub.release(watch)

    async def check_owners(self, now: int) -> None:
        """Watched devices held by other pods: their pod may have died without a word."""
        grace_ms = self.settings.reconnect_grace_seconds * 1000
        for watch in self.hub.watches():
            conn = watch.connection_id
            if self.hub.device(conn) is not None or not watch.attended:
                continue
            try:
                owner = await self.hub.owner_of(conn)
            except Exception:  # live state unreachable: decide nothing on missing information
                continue
            news = watch.owner_checked(owner, now, grace_ms)
            if news is not None:
                self.hub.on_device_event(conn, DeviceEvent(state=news))


class RelaySession:
    """One relay socket, as its edge sees it: started, frames, closed."""

    __slots__ = ("bucket", "may_act", "relays", "sock", "watch")

    def __init__(self, relays: Relays, watch: Watch, sock: ClientSocket, may_act: bool = True) -> None:
        self.may_act = may_act  # a readonly key watches; its commands are refused
        self.relays = relays
        self.watch = watch
        self.sock = sock
        rate = relays.settings.rate_limit_per_second
        self.bucket = TokenBucket(rate, rate * 2)

    def start(self) -> None:
        self.sock.start()

    def malformed(self, problem: str) -> None:
        self.relays.counters.relay_malformed_frames += 1
        self.sock.push(error_frame(None, f"malformed frame: {problem}", "malformed_frame"))

    async def receive(self, frame: Frame) -> None:
        if frame.type == "ping":
            self.sock.push(PONG)
            return
        if frame.type == "ack":
            return
        if not self.bucket.allow(now_ms()):
            self.sock.push(error_frame(frame.request_id, "rate limit exceeded; slow down", "rate_limited"))
            return
        relays, sock = self.relays, self.sock
        if not self.may_act:
            sock.push(error_frame(frame.request_id, "a readonly key may not send commands", "forbidden"))
            return
        if frame.request_id is not None:
            self.watch.fanout.remember_request(frame.request_id, sock)
        # No shortcut on watch.device_away: across pods, state news can arrive out of order, and
        # the send itself asks live state who holds the device now.
        if not await relays.hub.send_to_device(sock.connection_id, frame.text):
            relays.counters.relay_commands_refused += 1
            sock.push(error_frame(frame.request_id, "environment offline"))
            return
        relays.counters.relay_commands += 1

    async def closed(self, code: int) -> None:
        relays, watch, sock = self.relays, self.watch, self.sock
        resumable = code not in closes.RELAY_FINAL
        if resumable and not sock.closed and watch.state is not DeviceState.OFFLINE:
            relays.detach(watch, sock)
            return
        sock.closed = True
        sock.stop_writer()
        relays.history.forget(sock.id)
        watch.remove(sock)
        await relays.hub.release(watch)
