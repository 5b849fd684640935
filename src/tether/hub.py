"""This pod's live sockets: device links, relay watches, and the fan-out between them.

The hub is the only owner of both registries; everything else asks it. A device frame travels:
device socket edge -> `DeviceSession` -> `Hub.device_frame` (reorder) -> `Hub.publish` -> this pod's
`Watch.deliver` and, through the bus, every other watching pod's `Hub.on_device_event` -> relay
socket queue. A command travels the other way: `RelaySession` -> `Hub.send_to_device` -> the control
socket here, or the bus to the pod holding it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tether.bus.base import Bus
from tether.clock import now_ms
from tether.livestate.base import LiveState
from tether.protocol import closes
from tether.protocol.events import DeviceEvent, DeviceState, Position
from tether.protocol.fanout import Fanout
from tether.protocol.frames import Frame
from tether.protocol.lease import Lease
from tether.protocol.ordering import ReorderBuffer
from tether.protocol.pairing import Close, Send
from tether.protocol.presence import is_online
from tether.protocol.trace import Trace, frame_type
from tether.sockets import ClientSocket, DeviceSocket
from tether.tasks import TaskSet

log = logging.getLogger("tether.hub")

# How long a watching pod trusts the owner it last looked up for a device held elsewhere. Any state
# news for the device (away, online, offline) forgets it sooner, and a refused write makes the
# next send ask again, so a moved device costs one extra lookup, never a lost command.
OWNER_CACHE_MS = 5_000


@dataclass(eq=False, slots=True)  # one per device for hours: no per-instance dict
class DeviceLink:
    """One lease held on this pod: its lifecycle machine, frame ordering and timers."""

    connection_id: str
    org_id: str
    device_id: str
    connection_name: str
    reorder: ReorderBuffer[Frame]
    lease: Lease[DeviceSocket]
    away_timer: asyncio.TimerHandle | None = None
    reorder_timer: asyncio.TimerHandle | None = None
    slot: str = ""  # the environment's history key (ops/fleet.py `slot_key`)
    pending_approval: bool = False  # the frames show a conversation waiting for an approval
    trace: Trace | None = None  # set only while a poll keeps it armed (ops/fleet.py)

    @property
    def ready(self) -> bool:
        return self.lease.ready

    def traced(self, direction: str, channel: str, kind: str, text: str) -> None:
        """Record a frame in the armed trace; an expired one is dropped here."""
        trace, now = self.trace, now_ms()
        if trace is None:
            return
        if not trace.armed(now):
            self.trace = None
            return
        trace.record(now, direction, channel, kind, text)


class FrameListener(Protocol):
    """An in-process watcher of a connection's device frames (the teleport orchestrator)."""

    def on_device_frame(self, connection_id: str, frame: Frame) -> None: ...
    def on_device_state(self, connection_id: str, state: DeviceState) -> None: ...


@dataclass(eq=False)
class Watch:
    """Everything this pod holds for one connection's clients."""

    connection_id: str
    sockets: set[ClientSocket] = field(default_factory=set)  # attached relay sockets
    detached: dict[str, ClientSocket] = field(default_factory=dict)  # dropped, kept for resume
    fanout: Fanout[ClientSocket] = field(default_factory=Fanout)
    listeners: set[FrameListener] = field(default_factory=set)
    state: DeviceState | None = None  # None: no change seen since this pod started watching
    ownerless_since: int | None = None  # first sweep that found no pod holding the device
    _owner: str | None = None  # the pod last found holding the device, trusted until _owner_until
    _owner_until: int = 0
    trace: Trace | None = None  # the device's armed trace, when it is held on this pod
    held: list[DeviceEvent] | None = None  # frames kept while a resume catches up (bounded by it)
    holds: int = 0

    def cached_owner(self, now: int) -> str | None:
        return self._owner if now < self._owner_until else None

    def cache_owner(self, owner: str | None, until: int) -> None:
        self._owner, self._owner_until = owner, until

    @property
    def device_away(self) -> bool:
        return self.state is DeviceState.AWAY or self.state is DeviceState.OFFLINE

    @property
    def attended(self) -> bool:
        """Someone is watching right now (detached sockets wait for their client, they do not watch)."""
        return bool(self.sockets or self.listeners)

    @property
    def empty(self) -> bool:
        return not self.sockets and not self.detached and not self.listeners

    def add(self, sock: ClientSocket) -> bool:
        """Add a socket; True when its scope is new here (the device should be subscribed to it)."""
        self.sockets.add(sock)
        return self.fanout.add(sock)

    def remove(self, sock: ClientSocket) -> None:
        self.sockets.discard(sock)
        self.detached.pop(sock.id, None)
        self.fanout.remove(sock)

    def detach(self, sock: ClientSocket, at: int) -> None:
        """Keep numbering into the socket's history so its client can resume."""
        self.sockets.discard(sock)
        sock.detach(at)
        self.detached[sock.id] = sock

    def resumable(self, socket_id: str, key_id: str) -> ClientSocket | None:
        old = self.detached.get(socket_id)
        return old if old is not None and old.key_id == key_id else None

    def resume(self, sock: ClientSocket) -> None:
        del self.detached[sock.id]
        self.sockets.add(sock)

    def deliver(self, frame: Frame, gap_before: bool, position: Position | None = None) -> None:
        if self.held is not None:
            self.held.append(DeviceEvent(frame=frame, gap_before=gap_before, position=position))
            return
        if self.trace is not None and self.sockets:
            self._traced(frame)
        for listener in list(self.listeners):
            listener.on_device_frame(self.connection_id, frame)
        for sock, text in self.fanout.route(frame, gap_before):
            sock.deliver(text, position)

    def hold(self) -> None:
        """Keep the frames that arrive from now on, in order, until `unhold` (a resume catching up)."""
        self.holds += 1
        if self.held is None:
            self.held = []

    def unhold(self) -> list[DeviceEvent]:
        """What was held, for the caller to deliver once the last hold ends (else nothing)."""
        self.holds -= 1
        if self.holds > 0 or self.held is None:
            return []
        held, self.held = self.held, None
        return held

    def _traced(self, frame: Frame) -> None:
        trace, now = self.trace, now_ms()
        if trace is not None and trace.armed(now):
            trace.record(now, "out", "relay", frame.type, frame.text)
        else:
            self.trace = None

    def owner_checked(self, owner: str | None, now: int, grace_ms: float) -> DeviceState | None:
        """A sweep found `owner` holding the device (None: no pod): the state news that implies.

        Repairs the order of state news from two pods (a draining pod's AWAY arriving after the new
        pod's ONLINE) and notices a pod that died without a word."""
        if owner is not None:
            self.ownerless_since = None
            return DeviceState.ONLINE if self.device_away else None
        if self.ownerless_since is None:
            self.ownerless_since = now
        elif now - self.ownerless_since >= grace_ms and self.state is not DeviceState.OFFLINE:
            return DeviceState.OFFLINE
        return None

    def clear(self) -> list[ClientSocket]:
        """Forget every socket (the device is offline); the attached ones, to close."""
        attached = list(self.sockets)
        for sock in self.detached.values():
            sock.stop_writer()
        self.sockets.clear()
        self.detached.clear()
        self.fanout.clear()
        return attached


class Hub:
    """Live sockets on this pod, the routing of commands to devices, and the BusHandler side of the bus."""

    def __init__(
        self,
        bus: Bus,
        live: LiveState,
        tasks: TaskSet,
        reorder_wait_ms: float,
        offline_after_ms: int,
        grace_seconds: float,
        send_timeout_seconds: float,
    ) -> None:
        self.bus = bus
        self.live = live
        self.tasks = tasks
        self.reorder_wait_ms = reorder_wait_ms
        self.offline_after_ms = offline_after_ms
        self.grace_seconds = grace_seconds
        self.send_timeout_seconds = send_timeout_seconds
        self._devices: dict[str, DeviceLink] = {}
        self._watches: dict[str, Watch] = {}
        self.on_watch_online: Callable[[Watch], None] | None = None
        bus.bind(self)

    # ---- devices -------------------------------------------------------------------------

    def device(self, connection_id: str) -> DeviceLink | None:
        return self._devices.get(connection_id)

    def links(self) -> list[DeviceLink]:
        return list(self._devices.values())

    def link(
        self, connection_id: str, org_id: str, device_id: str, connection_name: str, slot: str = ""
    ) -> DeviceLink:
        link = self._devices.get(connection_id)
        if link is None:
            link = DeviceLink(
                connection_id=connection_id,
                org_id=org_id,
                device_id=device_id,
                connection_name=connection_name,
                reorder=ReorderBuffer(self.reorder_wait_ms),
                lease=Lease(self.grace_seconds),
                slot=slot,
            )
            self._devices[connection_id] = link
        return link

    def forget(self, link: DeviceLink) -> bool:
        if self._devices.get(link.connection_id) is not link:
            return False
        del self._devices[link.connection_id]
        return True

    async def apply(self, actions: Sequence[object]) -> None:
        """Carry out the socket actions the pairing decided (sends and closes, in order)."""
        for action in actions:
            if isinstance(action, Send):
                await action.socket.send(action.text)
            elif isinstance(action, Close):
                await action.socket.close(action.code, action.reason)

    def device_frame(self, link: DeviceLink, frame: Frame) -> None:
        """A non-transport frame from a device: put it in order and publish it."""
        if frame.event_seq is None:
            self.publish(link.connection_id, DeviceEvent(frame=frame))
            return
        for released in link.reorder.push(frame.event_seq, frame, now_ms()):
            self.publish(link.connection_id, DeviceEvent(frame=released.item, gap_before=released.gap_before))
        self._arm_reorder(link)

    def _arm_reorder(self, link: DeviceLink) -> None:
        deadline = link.reorder.deadline()
        if deadline is None or link.reorder_timer is not None:
            return
        delay = max(0.0, (deadline - now_ms()) / 1000)
        link.reorder_timer = asyncio.get_running_loop().call_later(delay, self._reorder_due, link)

    def _reorder_due(self, link: DeviceLink, until: float | None = None) -> None:
        link.reorder_timer = None
        for released in link.reorder.expire(now_ms() if until is None else until):
            self.publish(link.connection_id, DeviceEvent(frame=released.item, gap_before=released.gap_before))
        if until is None:
            self._arm_reorder(link)

    def flush_reorder(self, link: DeviceLink) -> None:
        """Release everything held (the device dropped: nothing more will fill the holes)."""
        if link.reorder_timer is not None:
            link.reorder_timer.cancel()
        self._reorder_due(link, until=float("inf"))

    def publish(self, connection_id: str, event: DeviceEvent) -> None:
        """To this pod's watchers directly, and through the bus to every other pod's."""
        self.bus.publish(connection_id, event)  # first: it stamps the event's position
        self.on_device_event(connection_id, event)

    # ---- commands to devices -------------------------------------------------------------

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
        if self.write_to_device_now(connection_id, text):
            return True  # held here and written at once: the common case, without a timer
        try:
            async with asyncio.timeout(self.send_timeout_seconds):
                return await self._route(connection_id, text)
        except TimeoutError:
            return False

    async def _route(self, connection_id: str, text: str) -> bool:
        link = self._devices.get(connection_id)
        if link is not None and link.ready:
            return await self.write_to_device(connection_id, text)
        watch = self._watches.get(connection_id)
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

    # ---- BusHandler ----------------------------------------------------------------------

    async def write_to_device(self, connection_id: str, text: str) -> bool:
        link = self._devices.get(connection_id)
        control = link.lease.pairing.control if link is not None and link.ready else None
        if control is None or not await control.send(text):
            return False
        if link is not None and link.trace is not None:
            link.traced("out", "control", frame_type(text), text)
        return True

    def write_to_device_now(self, connection_id: str, text: str) -> bool:
        """`write_to_device` without awaiting, for a device held here whose socket takes it at once."""
        link = self._devices.get(connection_id)
        control = link.lease.pairing.control if link is not None and link.ready else None
        if control is None or not control.send_nowait(text):
            return False
        if link is not None and link.trace is not None:
            link.traced("out", "control", frame_type(text), text)
        return True

    def on_device_event(self, connection_id: str, event: DeviceEvent) -> None:
        watch = self._watches.get(connection_id)
        if watch is None:
            return
        if event.frame is not None:
            watch.deliver(event.frame, event.gap_before, event.position)
        if event.state is not None:
            watch.cache_owner(None, 0)  # the device moved or dropped: ask live state next time
            came_back = watch.device_away and event.state is DeviceState.ONLINE
            watch.state = event.state
            for listener in list(watch.listeners):
                listener.on_device_state(connection_id, event.state)
            if event.state is DeviceState.OFFLINE:
                self.tasks.spawn(self.close_watch(watch, "environment offline"))
            elif came_back and self.on_watch_online is not None:
                self.on_watch_online(watch)

    async def close_device(self, connection_id: str, code: int, reason: str) -> bool:
        link = self._devices.get(connection_id)
        if link is None:
            return False
        await self.apply(link.lease.close_all(code, reason))
        return True

    # ---- watches -------------------------------------------------------------------------

    def watch_of(self, connection_id: str) -> Watch | None:
        return self._watches.get(connection_id)

    def watches(self) -> list[Watch]:
        return list(self._watches.values())

    async def watch(self, connection_id: str) -> Watch:
        """The connection's watch, subscribing this pod to its events on the bus when new."""
        watch = self._watches.get(connection_id)
        if watch is not None:
            return watch
        watch = Watch(connection_id)
        self._watches[connection_id] = watch
        await self.bus.watch(connection_id)
        link = self._devices.get(connection_id)
        if link is not None and not link.ready:
            watch.state = DeviceState.AWAY  # so its return re-subscribes this watch's scopes
        return watch

    async def release(self, watch: Watch) -> None:
        """Drop the watch once nothing uses it, and its bus subscription with it."""
        if watch.empty and self._watches.get(watch.connection_id) is watch:
            del self._watches[watch.connection_id]
            await self.bus.unwatch(watch.connection_id)

    async def listen(self, connection_id: str, listener: FrameListener) -> None:
        (await self.watch(connection_id)).listeners.add(listener)

    async def unlisten(self, connection_id: str, listener: FrameListener) -> None:
        watch = self._watches.get(connection_id)
        if watch is not None:
            watch.listeners.discard(listener)
            await self.release(watch)

    async def close_watch(self, watch: Watch, reason: str) -> None:
        for sock in watch.clear():
            await sock.close(closes.DEVICE_OFFLINE, reason)
        await self.release(watch)
