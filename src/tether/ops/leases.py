"""Device leases on this pod: who may connect, and the I/O the lease machine (`protocol/lease.py`) asks for.

Each device socket edge holds one `DeviceSession`; it feeds the machine and hands frames to the hub.
`Leases` carries out the machine's actions: presence writes to the row and live state, timers,
state news for the watchers, and the sockets' sends and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from tether.bus.base import Bus
from tether.clock import now_ms
from tether.config import Settings
from tether.hub import DeviceLink, Hub
from tether.livestate.base import LiveState, LiveStateUnavailable
from tether.metrics import Counters
from tether.ops.writes import PresenceWriter, StatusWriter
from tether.protocol import closes
from tether.protocol.events import DeviceEvent, DeviceState
from tether.protocol.fleetstate import approval_news, history_event, slot_key
from tether.protocol.frames import PONG, Frame
from tether.protocol.lease import (
    Action,
    ArmTimer,
    Greet,
    Publish,
    Step,
    WriteAway,
    WriteOnline,
    WriteRowOffline,
)
from tether.protocol.pairing import Channel, Close, Hello, Ready, Send
from tether.protocol.presence import lease_expired
from tether.protocol.roles import may_act
from tether.sockets import DeviceSocket
from tether.store.base import PresenceChange, Principal, Store
from tether.tasks import TaskSet

log = logging.getLogger("tether.leases")

# A device coming online waits at most this long for its row (the database may be slow or down:
# live state, which reads trust, then goes first).
PRESENCE_WAIT_SECONDS = 2.0
# A presence write that failed (live state unreachable) is tried again after this long.
PRESENCE_RETRY_SECONDS = 1.0
# Frames that may tell whether a conversation waits for an approval (`approval_news`).
_APPROVAL_MARKERS = frozenset({"control_request", "update_loop_status", "update_device_status"})
# Frames whose runtime tells which device runs a conversation (for teleport's source lookup).
_RUNTIME_MARKERS = frozenset(
    {"update_loop_status", "turn_finished", "input_accepted", "runtime_start_response"}
)


class LeaseRefused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Leases:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        live: LiveState,
        hub: Hub,
        bus: Bus,
        counters: Counters,
        tasks: TaskSet,
    ) -> None:
        self.settings = settings
        self.pod_id = settings.pod_id
        self.store = store
        self.live = live
        self.hub = hub
        self.bus = bus
        self.counters = counters
        self.tasks = tasks
        self.presence = PresenceWriter(store, tasks)
        self.statuses = StatusWriter(store, tasks)
        self.offline_after_ms = int(settings.offline_after_seconds * 1000)
        self.ready_timeout_ms = int(settings.ready_timeout_seconds * 1000)
        self.write_failures = 0

    async def open(self, principal: Principal | None, connection_id: str, hello: Hello) -> DeviceLink:
        """The link a device socket joins, or LeaseRefused (the edge closes with 1008)."""
        if principal is None:
            raise LeaseRefused("invalid API key")
        if not may_act(principal.role):
            raise LeaseRefused(f"a {principal.role} key may not hold a device socket")
        link = self.hub.device(connection_id)
        if link is not None and link.org_id == principal.org_id and not link.lease.replaced:
            if hello.channel is Channel.STREAM and link.lease.pairing.control is not None:
                return link  # the lease was checked moments ago, for this pair's control socket
            # A link this pod still holds (connected, or dropped within the grace window) is the
            # lease cache: a reconnect storm then costs no database read per device. Replacement and
            # deletion mark local links at once and other pods' through live state.
            try:
                if not await self.live.revoked(connection_id):
                    return link
                link.lease.revoke()
                raise LeaseRefused("unknown connection")
            except LiveStateUnavailable:
                pass  # decide from the row, as without a link
        row = await self.store.get_by_connection(connection_id)
        if row is None or row.org_id != principal.org_id or row.connection_id is None:
            raise LeaseRefused("unknown connection")
        owner = (await self.live.lookup([connection_id])).get(connection_id)
        last_activity = max(row.last_seen_at, row.lease_issued_at or 0, row.last_heartbeat or 0)
        ttl_ms = int(self.settings.lease_ttl_seconds * 1000)
        if owner is None and link is None and lease_expired(last_activity, now_ms(), ttl_ms):
            raise LeaseRefused("lease expired")
        slot = slot_key(row.org_id, row.device_id, row.listener_instance_id)
        return self.hub.link(row.connection_id, row.org_id, row.device_id, row.connection_name, slot)

    def session(self, link: DeviceLink, sock: DeviceSocket) -> DeviceSession:
        return DeviceSession(self, link, sock)

    # ---- carrying out the machine's actions ----------------------------------------------

    async def run(self, link: DeviceLink, actions: list[Action[DeviceSocket]]) -> None:
        for action in actions:
            if isinstance(action, Send | Close):
                await self.hub.apply([action])
            elif isinstance(action, Ready):
                self.counters.device_connects += 1
                self.live.fleet.note_history(link.slot, history_event(now_ms(), "connected", self.pod_id))
            elif isinstance(action, WriteOnline | WriteAway):
                # In its own task: the socket whose opening made the pair ready must start reading
                # at once (its frames are already in flight), not after the writes.
                self.tasks.spawn(self._write(link, action))
            elif isinstance(action, WriteRowOffline):
                self.presence.queue(PresenceChange(link.connection_id, self.pod_id, False, action.at))
            elif isinstance(action, Greet):
                await self.hub.apply(action.sends)
            elif isinstance(action, Publish):
                self._publish(link, action.state)
            elif isinstance(action, ArmTimer):
                self._cancel_timer(link)
                link.away_timer = asyncio.get_running_loop().call_later(
                    action.seconds, self._timer_fired, link
                )
            elif action is Step.CANCEL_TIMER:
                self._cancel_timer(link)
            elif action is Step.FLUSH_REORDER:
                self.hub.flush_reorder(link)
            elif action is Step.FORGET and self.hub.forget(link):
                self.statuses.forget(link.connection_id)

    def _publish(self, link: DeviceLink, state: DeviceState) -> None:
        self.hub.publish(link.connection_id, DeviceEvent(state=state))
        if state is not DeviceState.AWAY:
            log.info("device %s (%s) %s", link.connection_id, link.connection_name, state.value)

    def _cancel_timer(self, link: DeviceLink) -> None:
        if link.away_timer is not None:
            link.away_timer.cancel()
            link.away_timer = None

    def _timer_fired(self, link: DeviceLink) -> None:
        link.away_timer = None
        self.tasks.spawn(self.run(link, link.lease.timer_fired(now_ms())))

    async def _write(self, link: DeviceLink, action: WriteOnline | WriteAway) -> None:
        connected = isinstance(action, WriteOnline)
        try:
            if isinstance(action, WriteOnline):
                await self._write_online(link, action)
            else:
                await self.live.device_disconnected(link.connection_id, self.pod_id)
        except Exception as exc:
            self.write_failures += 1
            # Live state down fails every lease's write at once: a few lines, not one per device.
            if self.write_failures in (1, 10, 100) or self.write_failures % 1000 == 0:
                log.warning(
                    "presence not written (%d failures so far; %s retries in %ss): %r",
                    self.write_failures,
                    link.connection_id,
                    PRESENCE_RETRY_SECONDS,
                    exc,
                )
            await asyncio.sleep(PRESENCE_RETRY_SECONDS)
            await self.run(link, link.lease.write_failed(now_ms()))
            return
        await self.run(link, link.lease.written(connected, now_ms()))

    async def _write_online(self, link: DeviceLink, action: WriteOnline) -> None:
        """The row first, then live state: whoever sees the device online (in live state) also finds
        its row among the onlineOnly candidates.

        The row hears of a disconnect only when the device is declared offline (or replaced, or the
        pod drains): a device back within the grace window finds its row still saying "connected
        here", so a reconnect storm writes no rows at all. Reads overlay live state on the row."""
        conn = link.connection_id
        if action.write_row:
            written = self.presence.queue(PresenceChange(conn, self.pod_id, True, action.at))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(written), PRESENCE_WAIT_SECONDS)
        previous = (await self.live.lookup([conn])).get(conn)
        await self.live.device_connected(conn, self.pod_id, action.at)
        if await self._revoked_meanwhile(link):
            # Re-registered while connecting: the registration found no owner to tell.
            await self.hub.close_device(conn, closes.REPLACED, closes.REPLACED_REASON)
        if previous is not None and previous.pod_id != self.pod_id:
            # Back through another pod, which may still hold a half-open socket.
            await self.bus.close_device(
                conn, previous.pod_id, closes.SUPERSEDED, "device reconnected elsewhere"
            )

    async def _revoked_meanwhile(self, link: DeviceLink) -> bool:
        if link.lease.replaced:
            return True
        try:
            return await self.live.revoked(link.connection_id)
        except LiveStateUnavailable:
            return False  # decided again at the next connect; a registration closes it if live

    # ---- the whole pod -------------------------------------------------------------------

    async def drop_silent(self, now: int) -> None:
        """Close silent pairs and pairs that never became ready; each reads away at once."""
        for link in self.hub.links():
            closing = link.lease.reap(now, self.offline_after_ms, self.ready_timeout_ms)
            if closing:
                code = next(a.code for a in closing if isinstance(a, Close))
                log.info(
                    "device %s %s: dropping it",
                    link.connection_id,
                    f"silent for {self.settings.offline_after_seconds}s"
                    if code == closes.HEARTBEAT_TIMEOUT
                    else f"not ready within {self.settings.ready_timeout_seconds}s",
                )
                await self.run(link, closing)

    def draining(self) -> list[DeviceLink]:
        """Mark every lease draining; the links whose sockets `drain_one` should close."""
        links = self.hub.links()
        for link in links:
            link.lease.draining = True
        return [link for link in links if link.lease.sockets()]

    async def drain_one(self, link: DeviceLink) -> None:
        await self.run(link, link.lease.drain())

    async def stop(self) -> None:
        """After the pod's tasks are cancelled: rows of devices connected here say they are not."""
        now = now_ms()
        await self.presence.flush_final(
            [
                PresenceChange(link.connection_id, self.pod_id, False, now)
                for link in self.hub.links()
                if link.ready or link.lease.row_connected
            ]
        )


class DeviceSession:
    """One device socket, as its edge sees it: opened, frames, closed."""

    __slots__ = ("leases", "link", "sock")

    def __init__(self, leases: Leases, link: DeviceLink, sock: DeviceSocket) -> None:
        self.leases = leases
        self.link = link
        self.sock = sock

    async def opened(self, hello: Hello) -> None:
        await self.leases.run(self.link, self.link.lease.opened(self.sock, hello, now_ms()))

    async def ping(self) -> None:
        """Answer on the socket that pinged and refresh liveness: in memory, no database write."""
        leases = self.leases
        leases.counters.device_heartbeats += 1
        await self.sock.send(PONG)
        now = now_ms()
        self.link.lease.heartbeat(now)
        leases.live.heartbeat(self.link.connection_id, now)

    async def receive(self, frame: Frame) -> None:
        kind = frame.type
        if kind == "ping":
            await self.ping()
            return
        if kind in ("pong", "listener_ready"):
            return
        leases, link = self.leases, self.link
        leases.counters.device_frames += 1
        if link.trace is not None:
            channel = "stream" if self.sock is link.lease.pairing.stream else "control"
            link.traced("in", channel, kind, frame.text)
        if kind in _APPROVAL_MARKERS:
            news = approval_news(kind, frame.body)
            if news is not None:
                link.pending_approval = news
        if kind == "update_device_status":
            leases.statuses.queue(link.connection_id, frame)
        if kind in _RUNTIME_MARKERS and frame.agent_id and frame.conversation_id:
            leases.live.note_runtime(link.org_id, frame.agent_id, frame.conversation_id, link.connection_id)
        leases.hub.device_frame(link, frame)

    def malformed(self) -> int:
        self.leases.counters.device_malformed_frames += 1
        return self.leases.counters.device_malformed_frames

    async def closed(self, code: int | None = None) -> None:
        """The socket is gone; `code`: the close code the device sent, if the edge saw one."""
        sock = self.sock
        by_router = sock.close_code
        self.leases.counters.device_disconnects.inc(
            str(by_router if by_router is not None else code if code is not None else "unknown")
        )
        self.sock.closed = True
        at = now_ms()
        self.leases.live.fleet.note_history(
            self.link.slot,
            history_event(
                at,
                "disconnected",
                self.leases.pod_id,
                by_router if by_router is not None else code,
                sock.close_reason if by_router is not None else None,
            ),
        )
        await self.leases.run(self.link, self.link.lease.closed(self.sock, at))
