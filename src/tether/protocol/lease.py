"""The life of one device lease on a pod: pairing, presence writes, grace window, replacement.

Pure, as `pairing.py` is: sockets are opaque tokens, the time is passed in, and every decision comes
back as a list of actions for the I/O side (`ops/leases.py`) to carry out. Presence writes (the row,
then live state) are one write in flight at a time; the I/O side reports each one's end with
`written`, and the machine then writes again if the device changed meanwhile. So whatever order a
quick disconnect and reconnect overlap in, the last word written and published is the latest.

    state (ready, written)  | input             | actions
    any                     | opened / closed   | the pairing's sends and closes
    pair becomes ready      | (Ready)           | CANCEL_TIMER; WriteOnline (row first if not
                            |                   | connected there); on `written`: Greet, Publish ONLINE
    pair lost               | (Lost)            | FLUSH_REORDER; WriteAway; on `written`: Publish AWAY,
                            |                   | ArmTimer(grace), or, replaced: FORGET + row + OFFLINE,
                            |                   | or, draining: row disconnected, no timer
    away, no socket back    | timer_fired       | FORGET, WriteRowOffline, Publish OFFLINE
    ready, silent           | check_silence     | Close(HEARTBEAT_TIMEOUT) each socket
    silent, or never ready  | reap              | those closes (READY_TIMEOUT for a pair not complete
                            |                   | in time), and the pair is lost at once: a frozen or
                            |                   | cut-off peer never answers the close
    any                     | revoke / close_all| replaced: never let in again from memory
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

from tether.protocol import closes
from tether.protocol.events import DeviceState
from tether.protocol.pairing import Close, Hello, Lost, Pairing, Ready, Send
from tether.protocol.presence import is_silent

S = TypeVar("S")


@dataclass(frozen=True, slots=True)
class WriteOnline:
    """Write the row as connected here (when `write_row`), then live state; then call `written(True)`."""

    write_row: bool
    at: int


@dataclass(frozen=True, slots=True)
class WriteAway:
    """Tell live state the device is away (the row keeps saying connected); then `written(False)`."""

    at: int


@dataclass(frozen=True, slots=True)
class WriteRowOffline:
    """The row stops saying "connected here", as of `at` (when live state first heard it was away)."""

    at: int


@dataclass(frozen=True, slots=True)
class Greet(Generic[S]):
    """Send the held `listener_ready` frames: the device is online everywhere it can be looked up."""

    sends: tuple[Send[S], ...]


@dataclass(frozen=True, slots=True)
class Publish:
    state: DeviceState


@dataclass(frozen=True, slots=True)
class ArmTimer:
    seconds: float


class Step(Enum):
    CANCEL_TIMER = "cancel the grace timer"
    FLUSH_REORDER = "release the frames held for ordering: nothing more will fill their holes"
    FORGET = "the lease is offline: this pod drops it"


Action = (
    Send[S]
    | Close[S]
    | Ready
    | WriteOnline
    | WriteAway
    | WriteRowOffline
    | Greet[S]
    | Publish
    | ArmTimer
    | Step
)


class Lease(Generic[S]):
    def __init__(self, grace_seconds: float) -> None:
        self.grace_seconds = grace_seconds
        self.pairing: Pairing[S] = Pairing()
        self.last_heartbeat = 0
        self.replaced = False  # a newer registration or a deletion: never let in again from memory
        self.draining = False
        self.row_connected = False  # whether the row was last written as connected here
        self.offline = False
        self._written = False  # what live state was last told: connected or not
        self._writing = False
        self._away_since: int | None = None
        self._greetings: list[Send[S]] = []
        self._announce = False  # the pair became ready: announce it once live state agrees
        self._losses = 0
        self._timer = False
        self._control_opened_at = 0  # when the current control socket opened (for `reap`)

    @property
    def ready(self) -> bool:
        return self.pairing.ready

    @property
    def coming_back(self) -> bool:
        """Ready, or a control socket is open and its stream socket is on the way."""
        return self.pairing.ready or self.pairing.control is not None

    def sockets(self) -> list[S]:
        return self.pairing.sockets()

    # ---- inputs --------------------------------------------------------------------------

    def opened(self, socket: S, hello: Hello, now: int) -> list[Action[S]]:
        actions = self._pairing(self.pairing.opened(socket, hello), now)
        if self.pairing.control is socket:
            self._control_opened_at = now
        return actions

    def closed(self, socket: S, now: int) -> list[Action[S]]:
        return self._pairing(self.pairing.closed(socket), now)

    def written(self, connected: bool, now: int) -> list[Action[S]]:
        """The write `WriteOnline` / `WriteAway` asked for is done."""
        self._writing = False
        self._written = connected
        actions: list[Action[S]] = []
        if not connected and (self.draining or self.replaced):
            actions.extend(self._row_offline())
        return actions + self._sync(now)

    def write_failed(self, now: int) -> list[Action[S]]:
        """The write did not happen (live state unreachable): try again with the state as it is now."""
        self._writing = False
        return self._sync(now)

    def timer_fired(self, now: int) -> list[Action[S]]:
        self._timer = False
        if self.coming_back or self.offline:
            return []
        return self._go_offline()

    def heartbeat(self, now: int) -> None:
        self.last_heartbeat = now

    def check_silence(self, now: int, offline_after_ms: int) -> list[Action[S]]:
        if not self.ready or not is_silent(self.last_heartbeat, now, offline_after_ms):
            return []
        return [Close(s, closes.HEARTBEAT_TIMEOUT, "no heartbeat") for s in self.sockets()]

    def reap(self, now: int, offline_after_ms: int, ready_timeout_ms: int) -> list[Action[S]]:
        """Close a silent pair, or one whose control socket opened `ready_timeout_ms` ago and never
        became ready, and count the pair lost now rather than when the close handshake ends: a peer
        that is frozen (SIGSTOP) or cut off never answers it, and until the edge gives up on it the
        device would read connecting instead of away, then offline."""
        sockets = self.sockets()
        if not sockets:
            return []
        if self.ready and is_silent(self.last_heartbeat, now, offline_after_ms):
            code, reason = closes.HEARTBEAT_TIMEOUT, "no heartbeat"
        elif not self.ready and now - self._control_opened_at >= ready_timeout_ms:
            code, reason = closes.READY_TIMEOUT, "not ready in time"
        else:
            return []
        # The pairing's own partner close is left out: each socket gets its close here.
        lost: list[Send[S] | Close[S] | Ready | Lost] = [
            a for a in self.pairing.closed(sockets[0]) if not isinstance(a, Close)
        ]
        return [*(Close(s, code, reason) for s in sockets), *self._pairing(lost, now)]

    def revoke(self) -> None:
        self.replaced = True

    def close_all(self, code: int, reason: str) -> list[Action[S]]:
        """Replaced or deleted: every socket closes with `code`, and none is let in again."""
        self.replaced = True
        return [Close(s, code, reason) for s in self.sockets()]

    def drain(self) -> list[Action[S]]:
        self.draining = True
        return [Close(s, closes.DRAIN, "router pod shutting down") for s in self.sockets()]

    # ---- transitions ---------------------------------------------------------------------

    def _pairing(self, decided: list[Send[S] | Close[S] | Ready | Lost], now: int) -> list[Action[S]]:
        ready = any(isinstance(a, Ready) for a in decided)
        actions: list[Action[S]] = []
        for action in decided:
            if isinstance(action, Send) and ready:
                # Held until the device is online in the row and live state: whatever it or anyone
                # else does next (a message, a teleport, a listing) then finds it online.
                self._greetings.append(action)
            elif isinstance(action, Lost):
                self._losses += 1
                actions.append(Step.FLUSH_REORDER)
            elif not isinstance(action, Ready):
                actions.append(action)
        if ready:
            self.last_heartbeat = now
            self.offline = False
            self._announce = True
            actions.append(Ready())
            if self._timer:
                self._timer = False
                actions.append(Step.CANCEL_TIMER)
        if ready or self._losses:
            actions.extend(self._sync(now))
        return actions

    def _sync(self, now: int) -> list[Action[S]]:
        if self._writing:
            return []  # its `written` looks again
        if self._written != self.ready:
            self._writing = True
            if self.ready:
                write_row = not self.row_connected
                self.row_connected = True
                return [WriteOnline(write_row, now)]
            self._away_since = now
            return [WriteAway(now)]
        return self._settled()

    def _settled(self) -> list[Action[S]]:
        """Live state says what the pair is: tell the device and the watchers, in that order."""
        actions: list[Action[S]] = []
        if self._losses:
            self._losses = 0
            if self.replaced:
                actions.extend(self._go_offline() if not self.coming_back else [])
            else:
                actions.append(Publish(DeviceState.AWAY))
                # Draining: the device is reconnecting to another pod, which announces it. Should it
                # never come back, the watching pods' sweeps notice the missing owner.
                if not self.draining and not self.ready:
                    self._timer = True
                    actions.append(ArmTimer(self.grace_seconds))
        if self.ready and self._announce:
            greetings, self._greetings = self._greetings, []
            self._announce = False
            actions.append(Greet(tuple(greetings)))
            actions.append(Publish(DeviceState.ONLINE))
        elif not self.ready:
            # Gone again before live state agreed: its loss published AWAY, which stays the last word;
            # the held greetings' sockets are closed, and a new pair brings its own.
            self._greetings.clear()
            self._announce = False
        return actions

    def _go_offline(self) -> list[Action[S]]:
        self.offline = True
        return [Step.FORGET, *self._row_offline(), Publish(DeviceState.OFFLINE)]

    def _row_offline(self) -> list[Action[S]]:
        if not self.row_connected or self._away_since is None:
            return []
        self.row_connected = False
        return [WriteRowOffline(self._away_since)]
