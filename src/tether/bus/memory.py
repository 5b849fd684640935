"""The one-pod bus: every call lands on this pod's hub directly."""

from __future__ import annotations

from tether.bus.base import BoundBus
from tether.clock import now_ms
from tether.protocol.events import DeviceEvent, Position, Positions


class MemoryBus(BoundBus):
    def __init__(self) -> None:
        self.positions = Positions()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def send_to_device(self, connection_id: str, owner_pod: str, text: str) -> bool:
        return await self.handler.write_to_device(connection_id, text)

    def publish(self, connection_id: str, event: DeviceEvent) -> None:
        self.positions.stamp(connection_id, event, now_ms())  # no other pod, no log to write

    async def flushed(self) -> None:
        return None

    def expect(self, connection_id: str, position: Position) -> None:
        return None  # every event reaches the hub directly

    async def watch(self, connection_id: str) -> None:
        return None

    async def unwatch(self, connection_id: str) -> None:
        return None

    async def close_device(self, connection_id: str, owner_pod: str, code: int, reason: str) -> bool:
        return await self.handler.close_device(connection_id, code, reason)

    @property
    def healthy(self) -> bool:
        return True

    async def readiness(self) -> str | None:
        return None
