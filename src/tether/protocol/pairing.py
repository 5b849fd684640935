"""Which device sockets are the current pair of one lease (device-protocol §4.5, §4.6).

Pure: sockets are opaque tokens, and every decision comes back as a list of actions for the
socket edge to carry out. The state is small on purpose: the current control socket, the
current stream socket, and the generation they were opened with.

    event                      | paired (generation + attempt)            | split, unpaired | single
    control opens              | older or equal attempt supersedes; newer | supersedes      | supersedes
                               | current keeps it -> new one refused      |                 |
    stream opens               | must match current control's G/A         | bound           | n/a
    current socket closes      | partner closed, pair lost                | same            | lost
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

from tether.protocol import closes
from tether.protocol.frames import listener_ready

S = TypeVar("S")


class Channel(StrEnum):
    CONTROL = "control"
    STREAM = "stream"
    SINGLE = "single"  # one socket carries both channels


@dataclass(frozen=True, slots=True)
class Send(Generic[S]):
    socket: S
    text: str


@dataclass(frozen=True, slots=True)
class Close(Generic[S]):
    socket: S
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Ready:
    """The pair is complete: the device is connected and may be sent commands."""


@dataclass(frozen=True, slots=True)
class Lost:
    """The current pair broke: the device is away until it reconnects."""


Action = Send[S] | Close[S] | Ready | Lost


@dataclass(frozen=True, slots=True)
class Hello:
    """What a device socket said about itself in its upgrade query."""

    channel: Channel
    generation: str | None = None
    attempt: int | None = None

    @property
    def paired(self) -> bool:
        return self.generation is not None and self.attempt is not None


class Pairing(Generic[S]):
    def __init__(self) -> None:
        self.control: S | None = None
        self.stream: S | None = None
        self.hello: Hello | None = None
        self.ready = False

    @property
    def split(self) -> bool:
        return self.hello is not None and self.hello.channel is not Channel.SINGLE

    def opened(self, socket: S, hello: Hello) -> list[Action[S]]:
        if hello.channel is Channel.STREAM:
            return self._stream_opened(socket, hello)
        return self._control_opened(socket, hello)

    def _control_opened(self, socket: S, hello: Hello) -> list[Action[S]]:
        actions: list[Action[S]] = []
        current = self.hello
        if (
            self.control is not None
            and current is not None
            and hello.paired
            and current.paired
            and current.attempt is not None
            and hello.attempt is not None
            and current.attempt > hello.attempt
        ):
            # A delayed socket from an earlier attempt must never become current (LET-11074).
            return [Close(socket, closes.STALE_GENERATION, "stale connection attempt")]
        actions.extend(self._drop_pair(closes.SUPERSEDED, "superseded by a newer connection attempt"))
        self.control = socket
        self.hello = hello
        if hello.paired:
            assert hello.generation is not None and hello.attempt is not None
            actions.append(Send(socket, listener_ready(hello.generation, hello.attempt)))
        if hello.channel is Channel.SINGLE:
            self.ready = True
            actions.append(Ready())
        return actions

    def _stream_opened(self, socket: S, hello: Hello) -> list[Action[S]]:
        current = self.hello
        if self.control is None or current is None or current.channel is not Channel.CONTROL:
            return [Close(socket, closes.GENERATION_MISMATCH, "no current control socket for this stream")]
        if current.paired and (hello.generation, hello.attempt) != (current.generation, current.attempt):
            return [Close(socket, closes.GENERATION_MISMATCH, "generation does not match the control socket")]
        actions: list[Action[S]] = []
        if self.stream is not None:
            actions.append(Close(self.stream, closes.SUPERSEDED, "superseded by a newer stream socket"))
        self.stream = socket
        if hello.paired:
            assert hello.generation is not None and hello.attempt is not None
            actions.append(Send(socket, listener_ready(hello.generation, hello.attempt)))
        if not self.ready:
            self.ready = True
            actions.append(Ready())
        return actions

    def closed(self, socket: S) -> list[Action[S]]:
        if socket is not self.control and socket is not self.stream:
            return []
        partner = self.stream if socket is self.control else self.control
        self.control = self.stream = None
        self.hello = None
        actions: list[Action[S]] = []
        if partner is not None:
            actions.append(Close(partner, closes.PARTNER_LOST, "partner socket closed"))
        actions.append(Lost())
        self.ready = False
        return actions

    def _drop_pair(self, code: int, reason: str) -> list[Action[S]]:
        actions: list[Action[S]] = [
            Close(s, code, reason) for s in (self.control, self.stream) if s is not None
        ]
        was_ready = self.ready
        self.control = self.stream = None
        self.hello = None
        self.ready = False
        if was_ready:
            actions.append(Lost())
        return actions

    def sockets(self) -> list[S]:
        return [s for s in (self.control, self.stream) if s is not None]
