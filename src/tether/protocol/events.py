"""What a device's pod tells the pods watching its connection: its frames and its state changes.

Each event of a connection gets a `Position` where it enters the router (the device's pod, in
`Bus.publish`): `(epoch, n)`, `n` counting the connection's events on that pod from 1, `epoch` the
time that count started. Positions only grow for a connection (a device that moves pods or comes
back starts a later epoch), so they order its event log (`bus.publishing`), tell a watcher of a hole
(`follows`), and let a resumed relay socket skip what it already had (`ops.relays`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from tether.protocol.frames import Frame

Position = tuple[int, int]  # (epoch ms, event number within the epoch)


class DeviceState(StrEnum):
    ONLINE = "online"  # the pair is ready: commands may flow
    AWAY = "away"  # the socket dropped; the device may come back within the grace window
    OFFLINE = "offline"  # declared gone: relay sockets close


@dataclass(slots=True)  # built per relayed frame; not frozen for speed (see protocol.frames.Frame)
class DeviceEvent:
    """What a device's pod publishes to the pods watching that connection."""

    frame: Frame | None = None
    gap_before: bool = False  # device frames were lost just before this one
    state: DeviceState | None = None
    position: Position | None = None  # set by the device's pod as it publishes


def follows(previous: Position, position: Position) -> bool:
    """Whether `position` is the event right after `previous` (nothing between them was lost)."""
    if position[0] == previous[0]:
        return position[1] == previous[1] + 1
    return position[0] > previous[0] and position[1] == 1


class Positions:
    """Numbers the events of the connections held on one pod. Bounded by them: a connection's count
    is dropped when it goes offline (its next event starts a new epoch)."""

    def __init__(self) -> None:
        self._last: dict[str, Position] = {}
        self._epoch = 0  # the latest epoch started here

    def stamp(self, connection_id: str, event: DeviceEvent, now_ms: int) -> Position:
        last = self._last.get(connection_id)
        if last is None:
            # Above any epoch before it, even one started within the same millisecond.
            self._epoch = max(now_ms, self._epoch + 1)
            position = (self._epoch, 1)
        else:
            position = (last[0], last[1] + 1)
        if event.state is DeviceState.OFFLINE:
            self._last.pop(connection_id, None)
        else:
            self._last[connection_id] = position
        event.position = position
        return position

    def last(self, connection_id: str) -> Position | None:
        return self._last.get(connection_id)
