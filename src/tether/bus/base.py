"""Cross-pod routing. A device's sockets live on one pod; its clients may sit on any pod.

Three kinds of traffic cross pods: commands to a device (request/reply: the sender learns whether
the frame was written), device events to the pods watching that connection, and control of a
device's sockets (close it: a newer registration took the slot). `memory` is the one-pod loopback;
`redis` carries the same calls between pods.
"""

from __future__ import annotations

from typing import Protocol

from tether.protocol.events import DeviceEvent, Position


class BusHandler(Protocol):
    """This pod's side of the bus: implemented by the hub."""

    async def write_to_device(self, connection_id: str, text: str) -> bool: ...
    def write_to_device_now(self, connection_id: str, text: str) -> bool: ...
    def on_device_event(self, connection_id: str, event: DeviceEvent) -> None: ...
    async def close_device(self, connection_id: str, code: int, reason: str) -> bool: ...


class BoundBus:
    """The hub a bus delivers to; both implementations are bound to it once, at start."""

    _handler: BusHandler | None = None

    def bind(self, handler: BusHandler) -> None:
        self._handler = handler

    @property
    def handler(self) -> BusHandler:
        assert self._handler is not None, "bus used before the hub was bound"
        return self._handler


class Bus(Protocol):
    def bind(self, handler: BusHandler) -> None: ...
    async def start(self) -> None: ...
    async def close(self) -> None: ...

    async def send_to_device(self, connection_id: str, owner_pod: str, text: str) -> bool:
        """Write `text` to the device's control socket on `owner_pod`; True once written."""
        ...

    def publish(self, connection_id: str, event: DeviceEvent) -> None:
        """Stamp the event's position, and queue it for the *other* pods watching `connection_id`
        and the connection's event log; never blocks."""
        ...

    async def flushed(self) -> None:
        """Once every event published here so far is in the event log (or lost, as a hole)."""
        ...

    def expect(self, connection_id: str, position: Position) -> None:
        """A resume caught up to `position` in the connection's log: the next event from another
        pod must follow it, or it is flagged `gap_before`."""
        ...

    async def watch(self, connection_id: str) -> None: ...
    async def unwatch(self, connection_id: str) -> None: ...
    async def close_device(self, connection_id: str, owner_pod: str, code: int, reason: str) -> bool: ...
    @property
    def healthy(self) -> bool:
        """Readiness: this pod is receiving other pods' requests and the events it watches right now
        (not merely able to ping)."""
        ...

    async def readiness(self) -> str | None:
        """Why this pod cannot route right now (checked afresh, for /readyz), or None."""
        ...
