"""What a device's pod tells the pods watching its connection: its frames and its state changes."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from tether.protocol.frames import Frame


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
