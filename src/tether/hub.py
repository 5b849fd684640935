"""This pod's live sockets: device links, relay sockets, and the fan-out between them.

A device frame travels: device socket edge -> `Hub.device_frame` (reorder) -> bus -> the watching
pod's `Hub.on_device_event` -> `Watch.deliver` (scope, request routing, seq) -> relay socket queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tether.bus.base import Bus
from tether.clock import now_ms
from tether.protocol import closes
from tether.protocol.events import DeviceEvent, DeviceState
from tether.protocol.feeds import Feed, Scope
from tether.protocol.frames import Frame, error_frame, with_seq
from tether.protocol.history import History
from tether.protocol.ordering import ReorderBuffer
from tether.protocol.pairing import Close, Pairing, Send

log = logging.getLogger("tether.hub")

# Close codes for relay sockets (documented in README "Close codes").
# The router's own requests (scope subscriptions) remembered per connection; their answers are
# not relayed. Bounded: a device that never answers cannot grow it.
INTERNAL_REQUESTS_PER_CONNECTION = 1024
REQUEST_ROUTES_PER_CONNECTION = 10_000
# A relay socket writes what queued up during one turn of the loop in writes of at most this much.
WRITE_BATCH_FRAMES = 128
WRITE_BATCH_BYTES = 256 * 1024


class Transport(Protocol):
    """The socket edge as the hub sees it."""

    async def send(self, text: str) -> None: ...
    def send_now(self, texts: list[str]) -> bool: ...
    async def send_many(self, texts: list[str]) -> None: ...
    async def close(self, code: int, reason: str) -> None: ...


class DeviceSocket:
    """One device WebSocket. Writes are serialised; the device reads promptly (it drops us otherwise)."""

    __slots__ = ("_lock", "_waiting", "closed", "max_waiting", "transport")

    def __init__(self, transport: Transport, max_waiting: int) -> None:
        self.transport = transport
        self.max_waiting = max_waiting
        self._lock = asyncio.Lock()
        self._waiting = 0
        self.closed = False

    async def send(self, text: str) -> bool:
        """Write one frame; False when the socket is gone or too many writes already wait on it."""
        if self.closed or self._waiting >= self.max_waiting:
            return False
        if self.send_nowait(text):
            return True
        self._waiting += 1
        try:
            async with self._lock:
                await self.transport.send(text)
        except Exception:  # the peer went away mid-write; the receive loop will notice
            return False
        finally:
            self._waiting -= 1
        return True

    def send_nowait(self, text: str) -> bool:
        """Write one frame at once if nothing is queued ahead of it and the socket takes it."""
        return not self.closed and self._waiting == 0 and self.transport.send_now([text])

    async def close(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            await self.transport.close(code, reason)


@dataclass(eq=False)
class DeviceLink:
    """One lease held on this pod: its pairing, ordering and heartbeat."""

    connection_id: str
    org_id: str
    device_id: str
    connection_name: str
    reorder: ReorderBuffer[Frame]
    pairing: Pairing[DeviceSocket] = field(default_factory=Pairing)
    last_heartbeat: int = 0
    away_timer: asyncio.TimerHandle | None = None
    reorder_timer: asyncio.TimerHandle | None = None
    replaced: bool = False
    presence_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    presence_written: bool = False  # what live state last said: connected or not
    row_connected: bool = False  # whether this pod last wrote the row as connected here
    away_since: int | None = None  # when live state last heard the device went away

    @property
    def ready(self) -> bool:
        return self.pairing.ready


class ClientSocket:
    """One relay socket: its scope, its `seq`, a bounded outbound queue and its resume history."""

    def __init__(
        self,
        socket_id: str,
        transport: Transport,
        connection_id: str,
        key_id: str,
        scope: Scope,
        channel: str | None,
        history: History,
        max_frames: int,
        max_bytes: int,
    ) -> None:
        self.id = socket_id
        self.transport: Transport | None = transport
        self.connection_id = connection_id
        self.key_id = key_id
        self.scope = scope
        self.channel = channel
        self.history = history
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.seq = 0
        self.partner: ClientSocket | None = None
        self.closed = False
        self.detached_at: int | None = None
        self._queue: deque[str] = deque()
        self._queued_bytes = 0
        self._started = False
        self._flush_scheduled = False
        self._gathered = False
        self._waiting: asyncio.Task[None] | None = None  # a write waiting for the socket's buffer
        self.on_overflow: Callable[[ClientSocket], None] | None = None

    def start(self) -> None:
        """The socket is accepted: from now on what is queued goes out."""
        self._started = True
        self._schedule()

    def deliver(self, text: str) -> None:
        """Number a relayed frame for this socket and queue it (or only record it while detached)."""
        self.seq += 1
        out = with_seq(text, self.seq)
        self.history.append(self.seq, out)
        if self.transport is not None and not self.closed:
            self.push(out)

    def push(self, text: str) -> None:
        """Queue text as-is (pongs and replays carry no new `seq`)."""
        if self.closed:
            return
        self._queue.append(text)
        self._queued_bytes += len(text)
        if len(self._queue) > self.max_frames or self._queued_bytes > self.max_bytes:
            if self.on_overflow is not None:
                self.on_overflow(self)
            return
        self._schedule()

    def _schedule(self) -> None:
        # At the end of this turn of the loop, not at once: the frames of one device read go out
        # in one write; and without a task switch, a lone answer goes out as soon as possible.
        if self._started and not self._flush_scheduled and self._waiting is None:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if len(self._queue) > 1 and not self._gathered:
            # A burst is arriving (a stream of deltas): one more turn of the loop gathers more of it
            # into the same write. A lone frame (an answer) goes out now.
            self._gathered = True
            self._schedule()
            return
        self._gathered = False
        while self._queue and not self.closed and self.transport is not None and self._waiting is None:
            batch = self._take_batch()
            if not self.transport.send_now(batch):
                # The socket's buffer is full (or this transport only writes by awaiting): a task
                # waits for it and writes this batch and the rest, in order.
                self._waiting = asyncio.get_running_loop().create_task(self._write_waiting(batch))

    async def _write_waiting(self, batch: list[str]) -> None:
        try:
            while self.transport is not None and not self.closed:
                await self.transport.send_many(batch)
                if not self._queue:
                    break
                batch = self._take_batch()
        except Exception:
            self.closed = True
        finally:
            self._waiting = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    def _take_batch(self) -> list[str]:
        """What is queued, up to WRITE_BATCH_FRAMES / WRITE_BATCH_BYTES: one write to the kernel."""
        queue = self._queue
        batch = [queue.popleft()]
        size = len(batch[0])
        while queue and len(batch) < WRITE_BATCH_FRAMES and size < WRITE_BATCH_BYTES:
            text = queue.popleft()
            batch.append(text)
            size += len(text)
        self._queued_bytes -= size
        return batch

    async def close(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self._queue.clear()
        transport, self.transport = self.transport, None
        if transport is not None:
            with contextlib.suppress(Exception):
                await transport.close(code, reason)

    def detach(self, at_ms: int) -> None:
        """The client went away: keep numbering into history so it can resume."""
        self.transport = None
        self.detached_at = at_ms
        self._queue.clear()
        self._queued_bytes = 0
        self._started = False  # a resumed socket starts again once accepted
        self.stop_writer()

    def attach(self, transport: Transport, replay: list[str]) -> None:
        self.transport = transport
        self.detached_at = None
        self.closed = False
        for text in replay:
            self.push(text)

    def stop_writer(self) -> None:
        if self._waiting is not None:
            self._waiting.cancel()
            self._waiting = None


class FrameListener(Protocol):
    """An in-process watcher of a connection's device frames (the teleport orchestrator)."""

    def on_device_frame(self, connection_id: str, frame: Frame) -> None: ...
    def on_device_state(self, connection_id: str, state: DeviceState) -> None: ...


class BoundedSet:
    """A set that forgets its oldest members past `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: OrderedDict[str, None] = OrderedDict()

    def add(self, item: str) -> None:
        self._items[item] = None
        if len(self._items) > self.limit:
            self._items.popitem(last=False)

    def __contains__(self, item: object) -> bool:
        return item in self._items


@dataclass(eq=False)
class Watch:
    """Everything this pod holds for one connection's clients."""

    connection_id: str
    sockets: set[ClientSocket] = field(default_factory=set)
    detached: dict[str, ClientSocket] = field(default_factory=dict)
    feeds: dict[Scope, Feed] = field(default_factory=dict)
    members: dict[Scope, set[ClientSocket]] = field(default_factory=dict)
    requests: OrderedDict[str, ClientSocket] = field(default_factory=OrderedDict)
    listeners: set[FrameListener] = field(default_factory=set)
    internal_requests: BoundedSet = field(
        default_factory=lambda: BoundedSet(INTERNAL_REQUESTS_PER_CONNECTION)
    )
    losses: int = 0
    state: DeviceState | None = None  # None: no change seen since this pod started watching
    ownerless_since: int | None = None  # first sweep that found no pod holding the device
    _owner: str | None = None  # the pod last found holding the device, trusted until _owner_until
    _owner_until: int = 0

    def cached_owner(self, now: int) -> str | None:
        return self._owner if now < self._owner_until else None

    def cache_owner(self, owner: str | None, until: int) -> None:
        self._owner, self._owner_until = owner, until

    @property
    def device_away(self) -> bool:
        return self.state is DeviceState.AWAY or self.state is DeviceState.OFFLINE

    @property
    def empty(self) -> bool:
        return not self.sockets and not self.detached and not self.listeners

    def add(self, sock: ClientSocket) -> bool:
        """Add a socket; True when its scope is new here (the device should be subscribed to it)."""
        self.sockets.add(sock)
        fresh = sock.scope not in self.feeds
        if fresh:
            self.feeds[sock.scope] = Feed(sock.scope)
            self.members[sock.scope] = set()
        self.members[sock.scope].add(sock)
        self._pair(sock)
        return fresh

    def remove(self, sock: ClientSocket) -> None:
        self.sockets.discard(sock)
        self.detached.pop(sock.id, None)
        members = self.members.get(sock.scope)
        if members is not None:
            members.discard(sock)
            if not members:
                del self.members[sock.scope]
                del self.feeds[sock.scope]
        if sock.partner is not None:
            sock.partner.partner = None
            sock.partner = None

    def _pair(self, sock: ClientSocket) -> None:
        """Agent-SDK clients open a control and a stream socket with the same scope: bind them."""
        if sock.channel not in ("control", "stream"):
            return
        wanted = "stream" if sock.channel == "control" else "control"
        for other in self.members[sock.scope]:
            if other.partner is None and other.channel == wanted and other.key_id == sock.key_id:
                other.partner, sock.partner = sock, other
                return

    def remember_request(self, request_id: str, sock: ClientSocket) -> None:
        self.requests[request_id] = sock
        self.requests.move_to_end(request_id)
        while len(self.requests) > REQUEST_ROUTES_PER_CONNECTION:
            self.requests.popitem(last=False)

    def deliver(self, frame: Frame, gap_before: bool) -> None:
        if gap_before:
            self.losses += 1
        for listener in list(self.listeners):
            listener.on_device_frame(self.connection_id, frame)
        if frame.request_id is not None and frame.event_seq is None:
            if frame.request_id in self.internal_requests:
                return
            sender = self.requests.get(frame.request_id)
            if sender is not None and (sender in self.sockets or sender.id in self.detached):
                # The pair that asked gets the answer, and only it (client-protocol §2.4).
                sender.deliver(frame.text)
                if sender.partner is not None:
                    sender.partner.deliver(frame.text)
                return
        for scope, feed in self.feeds.items():
            if scope.matches(frame):
                text = feed.render(frame, self.losses)
                for sock in self.members[scope]:
                    sock.deliver(text)


class Hub:
    """Live sockets on this pod, and the BusHandler side of the bus."""

    def __init__(self, bus: Bus, reorder_wait_ms: float) -> None:
        self.bus = bus
        self.reorder_wait_ms = reorder_wait_ms
        self.devices: dict[str, DeviceLink] = {}
        self.watches: dict[str, Watch] = {}
        self.on_watch_online: Callable[[Watch], None] | None = None
        self._ids = itertools.count(1)

    # ---- devices -------------------------------------------------------------------------

    def link(self, connection_id: str, org_id: str, device_id: str, connection_name: str) -> DeviceLink:
        link = self.devices.get(connection_id)
        if link is None:
            link = DeviceLink(
                connection_id=connection_id,
                org_id=org_id,
                device_id=device_id,
                connection_name=connection_name,
                reorder=ReorderBuffer(self.reorder_wait_ms),
            )
            self.devices[connection_id] = link
        return link

    async def apply(self, actions: Sequence[object]) -> None:
        """Carry out what the pairing machine decided (sends, then closes)."""
        for action in actions:
            if isinstance(action, Send):
                await action.socket.send(action.text)
            elif isinstance(action, Close):
                await action.socket.close(action.code, action.reason)

    def device_frame(self, link: DeviceLink, frame: Frame) -> None:
        """A non-transport frame from a device: put it in order and publish it."""
        if frame.event_seq is None:
            self._publish(link, frame, gap_before=False)
            return
        now = now_ms()
        for released in link.reorder.push(frame.event_seq, frame, now):
            self._publish(link, released.item, released.gap_before)
        self._arm_reorder(link)

    def _arm_reorder(self, link: DeviceLink) -> None:
        deadline = link.reorder.deadline()
        if deadline is None or link.reorder_timer is not None:
            return
        delay = max(0.0, (deadline - now_ms()) / 1000)
        link.reorder_timer = asyncio.get_running_loop().call_later(delay, self._reorder_due, link)

    def _reorder_due(self, link: DeviceLink) -> None:
        link.reorder_timer = None
        for released in link.reorder.expire(now_ms()):
            self._publish(link, released.item, released.gap_before)
        self._arm_reorder(link)

    def flush_reorder(self, link: DeviceLink) -> None:
        """Release everything held (the device dropped: nothing more will fill the holes)."""
        if link.reorder_timer is not None:
            link.reorder_timer.cancel()
            link.reorder_timer = None
        for released in link.reorder.expire(float("inf")):
            self._publish(link, released.item, released.gap_before)

    def _publish(self, link: DeviceLink, frame: Frame, gap_before: bool) -> None:
        self.publish(link.connection_id, DeviceEvent(frame=frame, gap_before=gap_before))

    def publish(self, connection_id: str, event: DeviceEvent) -> None:
        """To this pod's watchers directly, and through the bus to every other pod's."""
        self.on_device_event(connection_id, event)
        self.bus.publish(connection_id, event)

    # ---- BusHandler ----------------------------------------------------------------------

    async def write_to_device(self, connection_id: str, text: str) -> bool:
        link = self.devices.get(connection_id)
        if link is None or not link.ready or link.pairing.control is None:
            return False
        return await link.pairing.control.send(text)

    def write_to_device_now(self, connection_id: str, text: str) -> bool:
        """`write_to_device` without awaiting, for a device held here whose socket takes it at once."""
        link = self.devices.get(connection_id)
        control = link.pairing.control if link is not None and link.ready else None
        return control is not None and control.send_nowait(text)

    def on_device_event(self, connection_id: str, event: DeviceEvent) -> None:
        watch = self.watches.get(connection_id)
        if watch is None:
            return
        if event.frame is not None:
            watch.deliver(event.frame, event.gap_before)
        if event.state is not None:
            watch.cache_owner(None, 0)  # the device moved or dropped: ask live state next time
            came_back = watch.device_away and event.state is DeviceState.ONLINE
            watch.state = event.state
            for listener in list(watch.listeners):
                listener.on_device_state(connection_id, event.state)
            if event.state is DeviceState.OFFLINE:
                asyncio.get_running_loop().create_task(self.close_watch(watch, "environment offline"))
            elif came_back and self.on_watch_online is not None:
                self.on_watch_online(watch)

    async def close_device(self, connection_id: str, code: int, reason: str) -> bool:
        link = self.devices.get(connection_id)
        if link is None:
            return False
        link.replaced = True
        for sock in link.pairing.sockets():
            await sock.close(code, reason)
        return True

    # ---- relay sockets -------------------------------------------------------------------

    def watch(self, connection_id: str) -> tuple[Watch, bool]:
        watch = self.watches.get(connection_id)
        created = watch is None
        if watch is None:
            watch = Watch(connection_id)
            self.watches[connection_id] = watch
        return watch, created

    async def close_watch(self, watch: Watch, reason: str) -> None:
        for sock in list(watch.sockets):
            await sock.close(closes.DEVICE_OFFLINE, reason)
        for sock in list(watch.detached.values()):
            sock.stop_writer()
        watch.sockets.clear()
        watch.detached.clear()
        watch.members.clear()
        watch.feeds.clear()
        watch.requests.clear()
        if watch.empty and self.watches.get(watch.connection_id) is watch:
            del self.watches[watch.connection_id]
            await self.bus.unwatch(watch.connection_id)

    def refuse(self, sock: ClientSocket, request_id: str | None, message: str) -> None:
        sock.push(error_frame(request_id, message))
