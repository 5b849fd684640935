"""The node wires storage, live state, the bus and the hub, and holds the router's operations.

The edges (REST routes, device socket, relay socket) call into the node; the node calls the store
for durable rows, live state for presence, the hub for this pod's sockets and the bus for others.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from tether.bus.base import Bus
from tether.clock import now_ms
from tether.config import Settings
from tether.hub import ClientSocket, DeviceLink, DeviceSocket, Hub, Transport, Watch
from tether.livestate.base import LiveState, LiveStateUnavailable
from tether.metrics import Counters
from tether.protocol import closes
from tether.protocol.events import DeviceEvent, DeviceState
from tether.protocol.feeds import Scope
from tether.protocol.frames import PONG, Frame, encode, error_frame, scoped_sync, status_fields
from tether.protocol.history import History
from tether.protocol.pairing import Channel, Hello, Lost, Ready, Send
from tether.protocol.presence import Liveness, is_online, is_silent, lease_expired
from tether.store.base import (
    EnvironmentRow,
    Heartbeat,
    ListQuery,
    PresenceChange,
    Principal,
    Registration,
    StatusUpdate,
    Store,
)
from tether.teleports import Teleports

log = logging.getLogger("tether.node")

# Presence rows are written in batches at most this far behind live state.
PRESENCE_BATCH_SECONDS = 0.1
# A device coming online waits at most this long for its row (the database may be slow or down:
# live state, which reads trust, then goes first).
PRESENCE_WAIT_SECONDS = 2.0
# How long a watching pod trusts the owner it last looked up for a device held elsewhere. Any state
# news for the device (away, online, offline) forgets it sooner, and a refused write makes the
# next send ask again, so a moved device costs one extra lookup, never a lost command.
OWNER_CACHE_MS = 5_000
# Frames whose runtime tells which device runs a conversation (for teleport's source lookup).
_RUNTIME_MARKERS = frozenset(
    {"update_loop_status", "turn_finished", "input_accepted", "runtime_start_response"}
)


class LeaseRefused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SendOutcome:
    delivered: bool
    duplicate: bool = False
    reason: str = ""


class AuthCache:
    """Verified keys for a short while, so the hot paths do not hit the database per request.

    Concurrent misses for one key share one database read: when the entry expires in the middle of a
    reconnect storm, thousands of handshakes carrying the same key would otherwise queue a query each
    for the connection pool."""

    def __init__(self, store: Store, ttl_ms: float, max_entries: int = 10_000) -> None:
        self.store = store
        self.ttl_ms = ttl_ms
        self.max_entries = max_entries
        self._cache: dict[str, tuple[float, Principal]] = {}
        self._reading: dict[str, asyncio.Task[Principal | None]] = {}

    async def resolve(self, secret: str) -> Principal | None:
        hit = self._cache.get(secret)
        if hit is not None and now_ms() - hit[0] < self.ttl_ms:
            return hit[1]
        reading = self._reading.get(secret)
        if reading is None:
            reading = asyncio.get_running_loop().create_task(self._read(secret))
            self._reading[secret] = reading
            reading.add_done_callback(lambda _: self._reading.pop(secret, None))
        # Shielded: one waiter giving up (its socket closed) must not cancel the others' read.
        return await asyncio.shield(reading)

    async def _read(self, secret: str) -> Principal | None:
        now = now_ms()
        principal = await self.store.authenticate(secret)
        if principal is None:
            return None  # not cached: a key created a moment later must work at once
        if len(self._cache) >= self.max_entries:
            self._cache.clear()
        self._cache[secret] = (now, principal)
        return principal


class Node:
    def __init__(self, settings: Settings, store: Store, live: LiveState, bus: Bus) -> None:
        self.settings = settings
        self.pod_id = settings.pod_id
        self.store = store
        self.live = live
        self.bus = bus
        self.hub = Hub(bus, settings.reorder_wait_ms)
        bus.bind(self.hub)
        self.hub.on_watch_online = self._resubscribe
        self.auth = AuthCache(store, settings.auth_cache_seconds * 1000)
        self.offline_after_ms = int(settings.offline_after_seconds * 1000)
        self._tasks: list[asyncio.Task[None]] = []
        self._status_pending: dict[str, StatusUpdate] = {}
        # Statuses are written by one task, one at a time: a reconnect storm re-sends thousands, and
        # as concurrent transactions they queue for SQLite's write lock holding every pool connection,
        # so lease lookups time out (QueuePool limit reached). Unchanged ones are not written at all.
        # The last status written per device, as a digest: a device re-sends the same status on
        # every reconnect, and keeping the status itself cost ~3.6 KiB per device (bench/analysis.md).
        self._status_written: dict[str, bytes] = {}
        self._status_writer: asyncio.Task[None] | None = None
        self.draining = False
        self.counters = Counters()
        self._presence_pending: dict[str, PresenceChange] = {}
        self._presence_writer: asyncio.Task[None] | None = None
        self._presence_waiters: list[asyncio.Future[None]] = []
        self._announcing: set[asyncio.Task[None]] = set()
        self.teleports = Teleports(self)

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await self.store.start()
        await self.live.start()
        await self.bus.start()
        await self.store.clear_dead_pods(await self.live.live_pods(), now_ms())
        loops = [self._flush_loop(), self._sweep_loop()]
        self._tasks = [asyncio.get_running_loop().create_task(loop) for loop in loops]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for writer in (self._presence_writer, self._status_writer):
            if writer is not None:
                writer.cancel()
        await self._flush_heartbeats()
        now = now_ms()
        for link in self.hub.devices.values():
            if link.ready or link.row_connected:
                self._presence_pending[link.connection_id] = PresenceChange(
                    link.connection_id, self.pod_id, False, now
                )
        with contextlib.suppress(Exception):
            await self.store.write_presence(list(self._presence_pending.values()))
        await self.bus.close()
        await self.live.close()
        await self.store.close()

    async def drain(self, window_s: float) -> None:
        """Close device sockets spread over the window so devices reconnect to other pods gradually."""
        self.draining = True
        links = [link for link in self.hub.devices.values() if link.pairing.sockets()]
        if not links:
            return
        random.shuffle(links)
        slot = window_s / len(links)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i, link in enumerate(links):
            # One jittered instant per equal slot: spread is guaranteed, lockstep is not possible.
            await asyncio.sleep(max(0.0, start + (i + random.random()) * slot - loop.time()))
            for sock in link.pairing.sockets():
                await sock.close(closes.DRAIN, "router pod shutting down")

    async def ready(self) -> tuple[bool, str]:
        try:
            await self.store.ping()
        except Exception as exc:
            return False, f"database unreachable: {exc.__class__.__name__}"
        if not self.live.healthy:
            return False, "live state (Redis) unavailable"
        if not self.bus.healthy:
            return False, "bus (Redis) subscription not running"
        if self.draining:
            return False, "draining"
        return True, "ok"

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_flush_seconds)
            try:
                await self._flush_heartbeats()
                if self.settings.redis_url:
                    # Only Redis knows which other pods are alive; one pod clears stale rows at start.
                    await self.store.clear_dead_pods(await self.live.live_pods(), now_ms())
            except Exception as exc:
                log.warning("heartbeat flush failed: %r", exc)

    async def _flush_heartbeats(self) -> None:
        dirty = self.live.take_dirty()
        if dirty:
            await self.store.flush_heartbeats([Heartbeat(c, hb) for c, hb in dirty.items()])

    async def _sweep_loop(self) -> None:
        interval = min(5.0, max(0.05, self.settings.offline_after_seconds / 10))
        while True:
            await asyncio.sleep(interval)
            try:
                await self._sweep(now_ms())
            except Exception as exc:
                log.warning("sweep failed: %r", exc)

    async def _sweep(self, now: int) -> None:
        """Drop silent devices, time out teleports, notice devices whose pod went away."""
        for link in list(self.hub.devices.values()):
            if link.ready and is_silent(link.last_heartbeat, now, self.offline_after_ms):
                log.info(
                    "device %s silent for %ss: dropping it",
                    link.connection_id,
                    self.settings.offline_after_seconds,
                )
                for sock in link.pairing.sockets():
                    await sock.close(closes.HEARTBEAT_TIMEOUT, "no heartbeat")
        self.teleports.tick(now)
        await self._check_remote_owners(now)

    # ---- REST: environments --------------------------------------------------------------

    async def register(self, principal: Principal, body: dict[str, Any], ws_base: str) -> dict[str, Any]:
        connection_id = f"conn-{uuid.uuid4().hex}"
        self.counters.registrations += 1
        now = now_ms()
        result = await self.store.register(
            Registration(
                org_id=principal.org_id,
                user_id=principal.user_id,
                device_id=body["deviceId"],
                listener_instance_id=body.get("listenerInstanceId"),
                connection_name=body["connectionName"],
                metadata=body.get("metadata") or {},
                connection_id=connection_id,
                now_ms=now,
            )
        )
        previous = result.previous_connection_id
        if previous is not None:
            # A newer registration took the slot: the old process must stop (device-protocol §4.2).
            await self._revoke(previous)
            owner = (await self.live.lookup([previous])).get(previous)
            if owner is not None:
                await self.bus.close_device(previous, owner.pod_id, closes.REPLACED, closes.REPLACED_REASON)
        split = self.settings.split_channels
        return {
            "connectionId": connection_id,
            "wsUrl": f"{ws_base}/v1/environments/ws/{connection_id}",
            "supportsSplitStatusChannels": split,
            "supportsPairedListenerGenerations": split,
        }

    async def render(self, rows: list[EnvironmentRow]) -> list[dict[str, Any]]:
        leases = [r.connection_id for r in rows if r.connection_id]
        live = await self.live.lookup(leases) if leases else {}
        pods = await self.live.live_pods() if live else set()
        now = now_ms()
        return [self._render(row, live.get(row.connection_id or ""), pods, now) for row in rows]

    def _render(self, row: EnvironmentRow, live: Liveness | None, pods: set[str], now: int) -> dict[str, Any]:
        online = is_online(live, now, self.offline_after_ms, live is not None and live.pod_id in pods)
        last_heartbeat = live.last_heartbeat if live is not None else row.last_heartbeat
        last_seen = max(row.last_seen_at, last_heartbeat or 0)
        return {
            "id": row.id,
            "connectionId": row.connection_id if online else None,
            "connectionName": row.connection_name,
            "deviceId": row.device_id,
            "listenerInstanceId": row.listener_instance_id,
            "organizationId": row.org_id,
            "userId": row.user_id,
            "apiKeyOwner": row.api_key_owner,
            "podId": live.pod_id if online and live else None,
            "connectedAt": live.connected_at if online and live else None,
            "lastHeartbeat": last_heartbeat,
            "lastSeenAt": last_seen,
            "firstSeenAt": row.first_seen_at,
            "currentMode": row.current_mode,
            "metadata": row.metadata,
        }

    async def list_environments(
        self, org_id: str, limit: int, after: str | None, user_id: str | None, online_only: bool
    ) -> tuple[list[dict[str, Any]], bool]:
        if not online_only:
            rows = await self.store.list_environments(ListQuery(org_id, limit + 1, after, user_id))
            rendered = await self.render(rows[:limit])
            return rendered, len(rows) > limit
        # Rows a pod claims are candidates; the exact online rule (heartbeat age, pod alive) is
        # applied here, fetching further batches when some candidates turn out stale.
        found: list[dict[str, Any]] = []
        cursor = after
        while len(found) <= limit:
            batch = await self.store.list_environments(
                ListQuery(org_id, limit + 1, cursor, user_id, only_connected=True)
            )
            if not batch:
                break
            found.extend(r for r in await self.render(batch) if r["connectionId"] is not None)
            cursor = batch[-1].id
            if len(batch) <= limit:
                break
        return found[:limit], len(found) > limit

    async def get_environment(self, org_id: str, device_id: str) -> dict[str, Any] | None:
        rows = await self.store.get_by_device(org_id, device_id)
        if not rows:
            return None
        rendered = await self.render(rows)
        # Several listener slots may share a device: prefer the online one with the freshest heartbeat.
        return max(
            rendered,
            key=lambda r: (r["connectionId"] is not None, r["lastHeartbeat"] or 0, r["lastSeenAt"]),
        )

    async def _revoke(self, connection_id: str) -> None:
        """No pod may let this lease in again from memory (`open_lease` trusts known links)."""
        link = self.hub.devices.get(connection_id)
        if link is not None:
            link.replaced = True
        await self.live.revoke(connection_id)

    async def delete_environment(self, org_id: str, environment_id: str) -> bool:
        """Forget a row; a device still connected with its lease is told to re-register (1008)."""
        row = await self.store.delete_environment(org_id, environment_id)
        if row is None:
            return False
        if row.connection_id is not None:
            await self._revoke(row.connection_id)
            owner = (await self.live.lookup([row.connection_id])).get(row.connection_id)
            if owner is not None:
                await self.bus.close_device(
                    row.connection_id, owner.pod_id, closes.LEASE_UNKNOWN, "environment deleted"
                )
        return True

    # ---- sending to a device -------------------------------------------------------------

    async def owner_of(self, connection_id: str) -> str | None:
        live = (await self.live.lookup([connection_id])).get(connection_id)
        if live is None or not is_online(live, now_ms(), self.offline_after_ms):
            return None
        return live.pod_id

    async def send_to_device(self, connection_id: str, text: str) -> bool:
        """Write `text` to the device's control socket, wherever it is held; True once written.

        The owner comes from this pod's own links first, then from the watch's cached answer, and
        only then from live state (a Redis round trip in a cluster). A cached owner that no longer
        holds the device refuses the write; the send then asks live state once more."""
        if self.hub.write_to_device_now(connection_id, text):
            return True  # held here and written at once: the common case, without a timer
        try:
            async with asyncio.timeout(self.settings.send_timeout_seconds):
                link = self.hub.devices.get(connection_id)
                if link is not None and link.ready:
                    return await self.bus.send_to_device(connection_id, self.pod_id, text)
                watch = self.hub.watches.get(connection_id)
                cached = watch.cached_owner(now_ms()) if watch is not None else None
                if cached is not None:
                    if await self.bus.send_to_device(connection_id, cached, text):
                        return True
                    assert watch is not None
                    watch.cache_owner(None, 0)
                owner = await self.owner_of(connection_id)
                if owner is None or owner == cached:
                    return False
                if watch is not None:
                    watch.cache_owner(owner, now_ms() + OWNER_CACHE_MS)
                return await self.bus.send_to_device(connection_id, owner, text)
        except TimeoutError:
            return False

    async def send_message(
        self, principal: Principal, row: EnvironmentRow, body: dict[str, Any]
    ) -> SendOutcome:
        assert row.connection_id is not None
        frame: dict[str, Any] = {"type": "message", **body}
        key = _dedupe_key(row.connection_id, body)
        if key is not None and not await self.live.claim(key):
            self.counters.messages_deduplicated += 1
            return SendOutcome(delivered=True, duplicate=True)
        delivered = await self.send_to_device(row.connection_id, encode(frame))
        if not delivered and key is not None:
            await self.live.release(key)
        if not delivered:
            self.counters.messages_offline += 1
        if delivered:
            self.counters.messages_delivered += 1
            agent = body.get("agentId")
            conv = body.get("conversationId") or "default"
            if isinstance(agent, str):
                self.live.note_runtime(principal.org_id, agent, conv, row.connection_id)
        return SendOutcome(delivered=delivered, reason="" if delivered else "Environment is offline")

    # ---- device sockets ------------------------------------------------------------------

    async def open_lease(self, principal: Principal | None, connection_id: str, hello: Hello) -> DeviceLink:
        """The link a device socket joins, or LeaseRefused (the edge closes with 1008)."""
        if principal is None:
            raise LeaseRefused("invalid API key")
        link = self.hub.devices.get(connection_id)
        if link is not None and link.org_id == principal.org_id and not link.replaced:
            if hello.channel is Channel.STREAM and link.pairing.control is not None:
                return link  # the lease was checked moments ago, for this pair's control socket
            # A link this pod still holds (connected, or dropped within the grace window) is the
            # lease cache: a reconnect storm then costs no database read per device. Replacement and
            # deletion mark local links at once and other pods' through live state.
            try:
                if not await self.live.revoked(connection_id):
                    return link
                link.replaced = True
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
        return self.hub.link(row.connection_id, row.org_id, row.device_id, row.connection_name)

    async def device_opened(self, link: DeviceLink, sock: DeviceSocket, hello: Hello) -> None:
        await self._pairing_actions(link, link.pairing.opened(sock, hello))

    async def device_closed(self, link: DeviceLink, sock: DeviceSocket) -> None:
        sock.closed = True
        await self._pairing_actions(link, link.pairing.closed(sock))

    async def _pairing_actions(self, link: DeviceLink, actions: list[Any]) -> None:
        # When the pair becomes ready, the device hears listener_ready only once the row and live
        # state say it is online: whatever it or anyone else does next (a message, a teleport, a
        # listing) finds it online.
        ready = any(isinstance(action, Ready) for action in actions)
        greetings = [a for a in actions if isinstance(a, Send)] if ready else []
        await self.hub.apply([a for a in actions if not (ready and isinstance(a, Send))])
        if any(isinstance(action, Lost) for action in actions):
            await self._device_lost(link)  # the pair this one replaced
        if ready:
            self._device_ready(link, greetings)

    def _device_ready(self, link: DeviceLink, greetings: list[Send[DeviceSocket]]) -> None:
        now = now_ms()
        link.last_heartbeat = now
        self.counters.device_connects += 1
        if link.away_timer is not None:
            link.away_timer.cancel()
            link.away_timer = None
        # In its own task: the socket whose opening made the pair ready must start reading at once
        # (its frames are already in flight), not after the row and live state are written.
        task = asyncio.get_running_loop().create_task(self._announce_online(link, greetings))
        self._announcing.add(task)
        task.add_done_callback(self._announcing.discard)

    async def _announce_online(self, link: DeviceLink, greetings: list[Send[DeviceSocket]]) -> None:
        await self._sync_presence(link)
        await self.hub.apply(greetings)
        if not link.ready:
            return  # gone again while this ran: its loss publishes AWAY, and must stay the last word
        self.hub.publish(link.connection_id, DeviceEvent(state=DeviceState.ONLINE))
        log.info("device %s (%s) online", link.connection_id, link.connection_name)

    async def _sync_presence(self, link: DeviceLink) -> None:
        """Make live state (and the row, see below) say what the link is now, one writer per link.

        A quick reconnect makes a disconnect and a connect overlap; writing the current state under
        a lock, until what was written matches it, keeps the last word with the latest event.

        The row hears of a disconnect only when the device is declared offline (or replaced, or the
        pod drains): a device back within the grace window finds its row still saying "connected
        here", so a reconnect storm writes no rows at all. Reads never trust the row's claim alone:
        they overlay live state, which is updated at once."""
        async with link.presence_lock:
            while link.presence_written is not link.ready:
                connected = link.ready
                now = now_ms()
                if connected:
                    if not link.row_connected:
                        # The row first, then live state: whoever sees the device online (in live
                        # state) also finds its row among the onlineOnly candidates.
                        link.row_connected = True
                        written = self._queue_presence(
                            PresenceChange(link.connection_id, self.pod_id, True, now)
                        )
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(asyncio.shield(written), PRESENCE_WAIT_SECONDS)
                    previous = (await self.live.lookup([link.connection_id])).get(link.connection_id)
                    await self.live.device_connected(link.connection_id, self.pod_id, now)
                    if await self._revoked_meanwhile(link):
                        # Re-registered while connecting: the registration found no owner to tell.
                        await self.hub.close_device(
                            link.connection_id, closes.REPLACED, closes.REPLACED_REASON
                        )
                    if previous is not None and previous.pod_id != self.pod_id:
                        # Back through another pod, which may still hold a half-open socket.
                        await self.bus.close_device(
                            link.connection_id,
                            previous.pod_id,
                            closes.SUPERSEDED,
                            "device reconnected elsewhere",
                        )
                else:
                    await self.live.device_disconnected(link.connection_id, self.pod_id)
                    link.away_since = now
                    if self.draining or link.replaced:
                        self._row_disconnected(link)
                link.presence_written = connected

    async def _revoked_meanwhile(self, link: DeviceLink) -> bool:
        if link.replaced:
            return True
        try:
            return await self.live.revoked(link.connection_id)
        except LiveStateUnavailable:
            return False  # decided again at the next connect; a registration closes it if live

    def _row_disconnected(self, link: DeviceLink) -> None:
        if link.row_connected and link.away_since is not None:
            self._queue_presence(PresenceChange(link.connection_id, self.pod_id, False, link.away_since))
            link.row_connected = False

    def _queue_presence(self, change: PresenceChange) -> asyncio.Future[None]:
        """Rows are written in batches: a storm of connects becomes a few transactions, not
        thousands queueing for the database while sockets wait. Resolves once the row is written."""
        loop = asyncio.get_running_loop()
        self._presence_pending[change.connection_id] = change
        written = loop.create_future()
        self._presence_waiters.append(written)
        if self._presence_writer is None or self._presence_writer.done():
            self._presence_writer = loop.create_task(self._write_presence())
        return written

    async def _write_presence(self) -> None:
        while self._presence_pending:
            await asyncio.sleep(PRESENCE_BATCH_SECONDS)
            batch, self._presence_pending = self._presence_pending, {}
            waiters, self._presence_waiters = self._presence_waiters, []
            try:
                await self.store.write_presence(list(batch.values()))
            except Exception as exc:
                log.warning("presence write of %d rows failed, retrying: %r", len(batch), exc)
                for conn, change in batch.items():
                    self._presence_pending.setdefault(conn, change)
                self._presence_waiters[:0] = waiters
                await asyncio.sleep(1.0)
                continue
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def _device_lost(self, link: DeviceLink) -> None:
        self.hub.flush_reorder(link)
        await self._sync_presence(link)
        if link.replaced:
            self._declare_offline(link)
            return
        self.hub.publish(link.connection_id, DeviceEvent(state=DeviceState.AWAY))
        if self.draining:
            # The device is reconnecting to another pod; that pod announces it. Should it never
            # come back, the watching pods' sweeps notice the missing owner and close their sockets.
            return
        loop = asyncio.get_running_loop()
        if link.away_timer is not None:
            link.away_timer.cancel()
        link.away_timer = loop.call_later(self.settings.reconnect_grace_seconds, self._declare_offline, link)

    async def _check_remote_owners(self, now: int) -> None:
        """Watched devices held by other pods: their pod may have died without a word.

        Also repairs the order of state news from two pods (a draining pod's AWAY arriving after
        the new pod's ONLINE): the owner recorded in live state is the truth."""
        grace_ms = self.settings.reconnect_grace_seconds * 1000
        for watch in list(self.hub.watches.values()):
            conn = watch.connection_id
            if conn in self.hub.devices or not (watch.sockets or watch.listeners):
                continue
            try:
                owner = await self.owner_of(conn)
            except Exception:  # live state unreachable: decide nothing on missing information
                continue
            if owner is not None:
                if watch.device_away:
                    self.hub.on_device_event(conn, DeviceEvent(state=DeviceState.ONLINE))
                watch.ownerless_since = None
            elif watch.ownerless_since is None:
                watch.ownerless_since = now
            elif now - watch.ownerless_since >= grace_ms and watch.state is not DeviceState.OFFLINE:
                self.hub.on_device_event(conn, DeviceEvent(state=DeviceState.OFFLINE))

    def _declare_offline(self, link: DeviceLink) -> None:
        link.away_timer = None
        if link.ready or link.pairing.control is not None:
            return  # back, or coming back: its stream socket is on the way
        if self.hub.devices.get(link.connection_id) is link:
            del self.hub.devices[link.connection_id]
            self._status_written.pop(link.connection_id, None)
        self._row_disconnected(link)
        self.hub.publish(link.connection_id, DeviceEvent(state=DeviceState.OFFLINE))
        log.info("device %s (%s) offline", link.connection_id, link.connection_name)

    async def device_frame(self, link: DeviceLink, sock: DeviceSocket, frame: Frame) -> None:
        kind = frame.type
        if kind == "ping":
            await self.device_ping(link, sock)
            return
        if kind in ("pong", "listener_ready"):
            return
        self.counters.device_frames += 1
        if kind == "update_device_status":
            self._queue_status(link.connection_id, frame)
        if kind in _RUNTIME_MARKERS and frame.agent_id and frame.conversation_id:
            self.live.note_runtime(link.org_id, frame.agent_id, frame.conversation_id, link.connection_id)
        self.hub.device_frame(link, frame)

    async def device_ping(self, link: DeviceLink, sock: DeviceSocket) -> None:
        """Answer on the socket that pinged and refresh liveness: in memory, no database write."""
        self.counters.device_heartbeats += 1
        await sock.send(PONG)
        now = now_ms()
        link.last_heartbeat = now
        self.live.heartbeat(link.connection_id, now)

    def _queue_status(self, connection_id: str, frame: Frame) -> None:
        fields = status_fields(frame.body)
        if fields is None:
            return
        mode, patch = fields
        pending = self._status_pending.get(connection_id)
        merged = dict(pending.metadata_patch) if pending else {}
        merged.update(patch)
        # A status without a permission mode leaves currentMode as it was.
        keep_mode = "permissionMode" not in patch
        if keep_mode and pending is not None and pending.set_mode:
            mode, keep_mode = pending.current_mode, False
        update = StatusUpdate(current_mode=mode, set_mode=not keep_mode, metadata_patch=merged)
        if pending is None and self._status_written.get(connection_id) == _digest(update):
            return  # a device re-sends its unchanged status on every reconnect
        self._status_pending[connection_id] = update
        if self._status_writer is None or self._status_writer.done():
            self._status_writer = asyncio.get_running_loop().create_task(self._write_statuses())

    async def _write_statuses(self) -> None:
        """Oldest first; a burst of status frames from one device coalesces into its latest."""
        while self._status_pending:
            connection_id = next(iter(self._status_pending))
            update = self._status_pending.pop(connection_id)
            try:
                await self.store.update_status(connection_id, update, now_ms())
                self._status_written[connection_id] = _digest(update)
            except Exception as exc:
                log.warning("status update for %s failed: %r", connection_id, exc)

    # ---- relay sockets -------------------------------------------------------------------

    async def relay_target(self, principal: Principal, connection_id: str) -> EnvironmentRow | None:
        row = await self.store.get_by_connection(connection_id)
        if row is None or row.org_id != principal.org_id:
            return None
        return row

    async def device_reachable(self, connection_id: str) -> bool:
        link = self.hub.devices.get(connection_id)
        if link is not None:
            return True  # online, or away within its grace window
        return await self.owner_of(connection_id) is not None

    async def relay_opened(
        self,
        principal: Principal,
        connection_id: str,
        transport: Transport,
        scope: Scope,
        channel: str | None,
        resume: tuple[str, int] | None,
        socket_id: str,
    ) -> ClientSocket:
        watch, created = self.hub.watch(connection_id)
        if created:
            await self.bus.watch(connection_id)
            link = self.hub.devices.get(connection_id)
            if link is not None and not link.ready:
                watch.state = DeviceState.AWAY  # so its return re-subscribes this watch's scopes
        if resume is not None:
            old = watch.detached.pop(resume[0], None)
            if old is not None and old.key_id == principal.key_id:
                missed = old.history.since(resume[1])
                old.attach(transport, missed or [])
                watch.sockets.add(old)
                if missed is None:
                    old.deliver(
                        encode({"type": "resync_required", "reason": "resume point is no longer in history"})
                    )
                return old
        sock = ClientSocket(
            socket_id,
            transport,
            connection_id,
            principal.key_id,
            scope,
            channel,
            History(self.settings.history_frames, self.settings.history_bytes),
            self.settings.client_queue_frames,
            self.settings.client_queue_bytes,
        )
        sock.on_overflow = self._slow_client
        fresh_scope = watch.add(sock)
        if resume is not None:
            sock.deliver(encode({"type": "resync_required", "reason": "unknown or expired resume token"}))
        if fresh_scope and scope.agent_id is not None and not watch.device_away:
            await self.subscribe_scope(connection_id, scope)
        return sock

    def can_resume(self, connection_id: str, socket_id: str, key_id: str) -> bool:
        watch = self.hub.watches.get(connection_id)
        old = watch.detached.get(socket_id) if watch is not None else None
        return old is not None and old.key_id == key_id

    async def subscribe_scope(self, connection_id: str, scope: Scope) -> None:
        """Subscribe the device connection to a scope: it emits scoped events only for subscribers."""
        if scope.agent_id is None:
            return
        request_id = f"tether-sub-{uuid.uuid4().hex}"
        watch = self.hub.watches.get(connection_id)
        if watch is not None:
            watch.internal_requests.add(request_id)
        sync = scoped_sync(scope.agent_id, scope.conversation_id or "default", request_id)
        await self.send_to_device(connection_id, sync)

    def _resubscribe(self, watch: Watch) -> None:
        """The device (re)connected: subscriptions may be gone (re-registration, router restart)."""
        for scope in list(watch.feeds):
            if scope.agent_id is not None:
                asyncio.get_running_loop().create_task(self.subscribe_scope(watch.connection_id, scope))

    def _slow_client(self, sock: ClientSocket) -> None:
        self.counters.relay_slow_consumer_closes += 1
        log.info("relay socket %s cannot keep up (%d frames queued): closing it", sock.id, sock.queued)
        asyncio.get_running_loop().create_task(
            self._drop_client(sock, closes.SLOW_CONSUMER, "slow consumer: outbound queue full")
        )

    async def _drop_client(self, sock: ClientSocket, code: int, reason: str) -> None:
        watch = self.hub.watches.get(sock.connection_id)
        await sock.close(code, reason)
        if watch is not None:
            watch.remove(sock)
            await self.unwatch_if_idle(watch)

    async def relay_command(self, sock: ClientSocket, frame: Frame) -> None:
        watch = self.hub.watches.get(sock.connection_id)
        if watch is None:
            return
        if frame.request_id is not None:
            watch.remember_request(frame.request_id, sock)
        # No shortcut on watch.device_away: across pods, state news can arrive out of order, and
        # the send itself asks live state who holds the device now.
        if not await self.send_to_device(sock.connection_id, frame.text):
            self.counters.relay_commands_refused += 1
            self.hub.refuse(sock, frame.request_id, "environment offline")
            return
        self.counters.relay_commands += 1

    async def relay_closed(self, sock: ClientSocket, resumable: bool) -> None:
        watch = self.hub.watches.get(sock.connection_id)
        if watch is None:
            return
        if resumable and not sock.closed and watch.state is not DeviceState.OFFLINE:
            watch.sockets.discard(sock)
            detached_at = now_ms()
            sock.detach(detached_at)
            watch.detached[sock.id] = sock
            asyncio.get_running_loop().call_later(
                self.settings.history_seconds,
                lambda: asyncio.ensure_future(self._expire_detached(watch, sock, detached_at)),
            )
            return
        sock.closed = True
        sock.stop_writer()
        watch.remove(sock)
        await self.unwatch_if_idle(watch)

    async def _expire_detached(self, watch: Watch, sock: ClientSocket, detached_at: int) -> None:
        # Only if it is still the same detachment: a resumed-then-dropped socket has a later one.
        if watch.detached.get(sock.id) is sock and sock.detached_at == detached_at:
            watch.remove(sock)
            await self.unwatch_if_idle(watch)

    async def unwatch_if_idle(self, watch: Watch) -> None:
        if watch.empty and self.hub.watches.get(watch.connection_id) is watch:
            del self.hub.watches[watch.connection_id]
            await self.bus.unwatch(watch.connection_id)

    def relay_ping(self, sock: ClientSocket) -> None:
        sock.push(PONG)

    def relay_error(self, sock: ClientSocket, request_id: str | None, message: str, code: str) -> None:
        if code == "malformed_frame":
            self.counters.relay_malformed_frames += 1
        sock.push(error_frame(request_id, message, code))

    def gauges(self) -> dict[str, tuple[str, float]]:
        links = self.hub.devices.values()
        watches = self.hub.watches.values()
        return {
            "devices_ready": (
                "Device leases with a ready socket pair on this pod.",
                sum(1 for k in links if k.ready),
            ),
            "devices_away": (
                "Device leases in their reconnect grace window.",
                sum(1 for k in links if not k.ready),
            ),
            "relay_sockets": ("Open relay sockets.", sum(len(w.sockets) for w in watches)),
            "relay_sockets_detached": (
                "Dropped relay sockets kept for resume.",
                sum(len(w.detached) for w in watches),
            ),
            "watched_connections": (
                "Connections with relay sockets or watchers here.",
                len(self.hub.watches),
            ),
            "teleports_active": ("Teleports this pod is orchestrating.", len(self.teleports.active)),
        }


def _dedupe_key(connection_id: str, body: dict[str, Any]) -> str | None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    first = messages[0]
    if isinstance(first, dict) and isinstance(first.get("client_message_id"), str):
        return f"msg:{connection_id}:{first['client_message_id']}"
    return None


def _digest(update: StatusUpdate) -> bytes:
    """Equal for equal statuses (keys in any order); 16 bytes, so a collision is not a concern."""
    text = orjson.dumps(
        [update.current_mode, update.set_mode, update.metadata_patch],
        option=orjson.OPT_SORT_KEYS,
        default=repr,
    )
    return hashlib.blake2b(text, digest_size=16).digest()
