"""The lease lifecycle machine: ready -> away -> offline, replaced, draining, and the write races.

No sockets, no clock, no sleeps: sockets are tokens, time is a number, and the I/O side's work is
simulated by feeding `written` back when the test decides the write has finished. The races are
the ones a quick reconnect makes: a disconnect's write and a connect's write in flight together.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from tether.protocol import closes
from tether.protocol.events import DeviceState
from tether.protocol.lease import (
    Action,
    ArmTimer,
    Greet,
    Lease,
    Publish,
    Step,
    WriteAway,
    WriteOnline,
    WriteRowOffline,
)
from tether.protocol.pairing import Channel, Close, Hello, Ready, Send

GRACE = 30.0


@dataclass(eq=False)
class Sock:
    name: str

    def __repr__(self) -> str:
        return self.name


def control(attempt: int = 1) -> Hello:
    return Hello(Channel.CONTROL, "g1", attempt)


def stream(attempt: int = 1) -> Hello:
    return Hello(Channel.STREAM, "g1", attempt)


def of(kind: type, actions: list[Action[Sock]]) -> list[Action[Sock]]:
    return [a for a in actions if isinstance(a, kind)]


def published(actions: list[Action[Sock]]) -> list[DeviceState]:
    return [a.state for a in actions if isinstance(a, Publish)]


def connect(lease: Lease[Sock], now: int = 1_000, attempt: int = 1) -> tuple[Sock, Sock, list[Action[Sock]]]:
    """Open a control and a stream socket; return them and every action up to the online write."""
    c, s = Sock(f"c{attempt}"), Sock(f"s{attempt}")
    actions = lease.opened(c, control(attempt), now) + lease.opened(s, stream(attempt), now)
    return c, s, actions


def online(lease: Lease[Sock], now: int = 1_000) -> tuple[Sock, Sock]:
    c, s, _ = connect(lease, now)
    lease.written(True, now)
    return c, s


def test_ready_pair_writes_the_row_then_greets_and_publishes_online() -> None:
    lease: Lease[Sock] = Lease(GRACE)
    c, s, actions = connect(lease)
    # The control's listener_ready goes out at once (the pair is not ready yet); the stream's is
    # held until the row and live state say online.
    assert [a.socket for a in of(Send, actions)] == [c]
    assert of(Ready, actions) == [Ready()]
    assert of(WriteOnline, actions) == [WriteOnline(write_row=True, at=1_000)]
    assert published(actions) == []
    settled = lease.written(True, 1_050)
    assert [type(a) for a in settled] == [Greet, Publish]
    greet = settled[0]
    assert isinstance(greet, Greet) and [send.socket for send in greet.sends] == [s]
    assert published(settled) == [DeviceState.ONLINE]
    assert lease.ready and lease.row_connected


def test_single_socket_device_is_announced_online_without_greetings() -> None:
    lease: Lease[Sock] = Lease(GRACE)
    actions = lease.opened(Sock("one"), Hello(Channel.SINGLE), 5)
    assert of(WriteOnline, actions) == [WriteOnline(write_row=True, at=5)]
    assert published(lease.written(True, 6)) == [DeviceState.ONLINE]


def test_lost_pair_publishes_away_after_live_state_hears_it_and_arms_the_grace_timer() -> None:
    lease: Lease[Sock] = Lease(GRACE)
    c, s = online(lease)
    actions = lease.closed(c, 2_000)
    assert of(Close, actions) == [Close(s, closes.PARTNER_LOST, "partner socket closed")]
    assert Step.FLUSH_REORDER in actions
    assert of(WriteAway, actions) == [WriteAway(2_000)]
    assert published(actions) == []  # not before live state says so
    settled = lease.written(False, 2_010)
    assert published(settled) == [DeviceState.AWAY]
    assert of(ArmTimer, settled) == [ArmTimer(GRACE)]
    assert of(WriteRowOffline, settled) == []  # the row keeps "connected here" through the grace window


def test_grace_timer_with_nobody_back_declares_offline_and_writes_the_row_as_of_the_drop() -> None:
    lease: Lease[Sock] = Lease(GRACE)
    c, _ = online(lease)
    lease.closed(c, 2_000)
    lease.written(False, 2_010)
    actions = lease.timer_fired(32_000)
    assert actions == [Step.FORGET, WriteRowOffline(2_000), Publish(DeviceState.OFFLINE)]
    assert lease.timer_fired(33_000) == []  # a late second firing changes nothing


def test_reconnect_within_grace_cancels_the_timer_and_writes_no_row() -> None:
    lease: Lease[Sock] = Lease(GRACE)
    c, _ = online(lease)
    lease.closed(c, 2_000)
    lease.written(False, 2_010)
    _, _, actions = connect(lease, 3_000, attempt=2)
    assert Step.CANCEL_TIMER in actions
    assert of(WriteOnline, actions) == [WriteOnline(write_row=False, at=3_000)]
    assert published(lease.written(True, 3_010)) == [DeviceState.ONLINE]


def test_timer_firing_while_the_control_socket_is_back_waits_for_its_stream() -> None:
    lease: Lease[Sock] = Lease(GRACE)
    c, _ = online(lease)
    lease.closed(c, 2_000)
    lease.written(False, 2_010)
    lease.opened(Sock("c2"), control(2), 31_000)
    assert lease.timer_fired(32_000) == []
    actions = lease.opened(Sock("s2"), stream(2), 32_500)
    assert of(WriteOnline, actions) == [WriteOnline(write_row=False, at=32_500)]


def test_race_reconnect_while_the_disconnect_is_being_written() -> None:
    """Lost, then ready again before live state heard the loss: AWAY then ONLINE, ONLINE last."""
    lease: Lease[Sock] = Lease(GRACE)
    c, _ = online(lease)
    assert of(WriteAway, lease.closed(c, 2_000)) == [WriteAway(2_000)]
    _, _, reconnect = connect(lease, 2_001, attempt=2)
    assert of(WriteOnline, reconnect) == []  # one write in flight at a time
    after_away = lease.written(False, 2_005)
    assert after_away == [WriteOnline(write_row=False, at=2_005)]
    settled = lease.written(True, 2_009)
    assert published(settled) == [DeviceState.AWAY, DeviceState.ONLINE]
    assert of(ArmTimer, settled) == []


def test_race_disconnect_while_the_connect_is_being_written() -> None:
    """Ready, then lost before live state heard it: never ONLINE, and AWAY is the last word."""
    lease: Lease[Sock] = Lease(GRACE)
    c, _, actions = connect(lease)
    assert of(WriteOnline, actions)
    assert of(WriteAway, lease.closed(c, 1_001)) == []  # waits for the connect's write
    after_online = lease.written(True, 1_010)
    assert after_online == [WriteAway(1_010)]
    settled = lease.written(False, 1_020)
    assert published(settled) == [DeviceState.AWAY]
    assert of(Greet, settled) == []
    assert of(ArmTimer, settled) == [ArmTimer(GRACE)]


def test_replaced_while_connected_closes_every_socket_and_goes_offline_on_the_drop() -> None:
    lease: Lease[Sock] = Lease(GRACE)
    c, s = online(lease)
    assert lease.close_all(closes.REPLACED, closes.REPLACED_REASON) == [
        Close(c, closes.REPLACED, closes.REPLACED_REASON),
        Close(s, closes.REPLACED, closes.REPLACED_REASON),
    ]
    lease.closed(c, 2_000)
    settled = lease.written(False, 2_001)
    assert settled == [WriteRowOffline(2_000), Step.FORGET, Publish(DeviceState.OFFLINE)]
    assert lease.replaced


def test_replaced_while_the_connect_is_being_written_ends_offline_not_online() -> None:
    lease: Lease[Sock] = Lease(GRACE)
    c, _, _ = connect(lease)
    lease.revoke()  # a newer registration landed during the write
    lease.close_all(closes.REPLACED, closes.REPLACED_REASON)
    lease.closed(c, 1_002)
    assert lease.written(True, 1_005) == [WriteAway(1_005)]
    settled = lease.written(False, 1_006)
    assert published(settled) == [DeviceState.OFFLINE]
    assert DeviceState.ONLINE not in published(settled)


def test_draining_drop_writes_the_row_at_once_and_arms_no_timer() -> None:
    lease: Lease[Sock] = Lease(GRACE)
    c, s = online(lease)
    assert lease.drain() == [
        Close(c, closes.DRAIN, "router pod shutting down"),
        Close(s, closes.DRAIN, "router pod shutting down"),
    ]
    lease.closed(c, 2_000)
    settled = lease.written(False, 2_001)
    assert settled == [WriteRowOffline(2_000), Publish(DeviceState.AWAY)]


def test_silent_ready_device_is_closed_with_heartbeat_timeout() -> None:
    lease: Lease[Sock] = Lease(GRACE)
    c, s = online(lease, now=1_000)
    assert lease.check_silence(100_000, offline_after_ms=120_000) == []
    lease.heartbeat(100_000)
    assert lease.check_silence(200_000, offline_after_ms=120_000) == []
    assert lease.check_silence(221_000, offline_after_ms=120_000) == [
        Close(c, closes.HEARTBEAT_TIMEOUT, "no heartbeat"),
        Close(s, closes.HEARTBEAT_TIMEOUT, "no heartbeat"),
    ]


def test_failed_write_is_tried_again_with_the_state_as_it_is_then() -> None:
    lease: Lease[Sock] = Lease(GRACE)
    c, _, _ = connect(lease)
    lease.closed(c, 1_001)
    # The connect's write failed and the device is gone meanwhile: nothing to write, nothing said.
    assert lease.write_failed(1_500) == [Publish(DeviceState.AWAY), ArmTimer(GRACE)]
    lease2: Lease[Sock] = Lease(GRACE)
    connect(lease2)
    assert lease2.write_failed(1_500) == [WriteOnline(write_row=False, at=1_500)]


def test_a_newer_control_socket_supersedes_a_ready_pair() -> None:
    lease: Lease[Sock] = Lease(GRACE)
    c, s = online(lease)
    c2 = Sock("c2")
    actions = lease.opened(c2, control(2), 5_000)
    assert of(Close, actions) == [
        Close(c, closes.SUPERSEDED, "superseded by a newer connection attempt"),
        Close(s, closes.SUPERSEDED, "superseded by a newer connection attempt"),
    ]
    assert [a.socket for a in of(Send, actions)] == [c2]  # not held: this opening made no pair
    assert of(WriteAway, actions) == [WriteAway(5_000)]


EVENTS = st.lists(
    st.sampled_from(["connect", "drop", "written", "fail", "timer", "replace"]), min_size=1, max_size=40
)


@settings(max_examples=300, deadline=None)
@given(EVENTS)
def test_whatever_the_order_the_last_word_matches_the_pair(events: list[str]) -> None:
    """Once every write has landed, the last state published is the pair's state (or OFFLINE)."""
    lease: Lease[Sock] = Lease(GRACE)
    in_flight: list[bool] = []
    armed: list[bool] = []
    said: list[DeviceState] = []
    attempt = 0
    now = 0

    def feed(actions: list[Action[Sock]]) -> None:
        for action in actions:
            if isinstance(action, WriteOnline | WriteAway):
                assert not in_flight, "two presence writes in flight"
                in_flight.append(isinstance(action, WriteOnline))
            elif isinstance(action, Publish):
                said.append(action.state)
            elif isinstance(action, ArmTimer):
                armed[:] = [True]
            elif action is Step.CANCEL_TIMER:
                armed.clear()

    for event in events:
        now += 10
        if event == "connect" and not lease.offline and not lease.replaced:
            attempt += 1
            feed(lease.opened(Sock(f"c{attempt}"), control(attempt), now))
            feed(lease.opened(Sock(f"s{attempt}"), stream(attempt), now))
        elif event == "drop" and lease.sockets():
            feed(lease.closed(lease.sockets()[0], now))
        elif event == "written" and in_flight:
            feed(lease.written(in_flight.pop(), now))
        elif event == "fail" and in_flight:
            in_flight.pop()
            feed(lease.write_failed(now))
        elif event == "timer" and armed:
            armed.clear()
            feed(lease.timer_fired(now))
        elif event == "replace":
            feed(lease.close_all(closes.REPLACED, closes.REPLACED_REASON))
    while in_flight:
        now += 10
        feed(lease.written(in_flight.pop(), now))
    if lease.offline:
        assert said[-1] is DeviceState.OFFLINE
    elif lease.ready:
        assert said and said[-1] is DeviceState.ONLINE
    elif said:
        assert said[-1] is DeviceState.AWAY
