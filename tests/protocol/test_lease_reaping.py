"""`Lease.reap`: a silent pair, or a control socket whose pair never completes, is closed and counted
lost at once (a frozen or cut-off peer never answers the close), then goes away -> offline as any loss.

Pure: sockets are tokens and time is a number (see test_lease.py for the helpers' conventions).
"""

from __future__ import annotations

from tests.protocol.test_lease import GRACE, Sock, connect, control, of, online, published
from tether.protocol import closes
from tether.protocol.events import DeviceState
from tether.protocol.lease import ArmTimer, Lease, Step, WriteAway, WriteRowOffline
from tether.protocol.pairing import Channel, Close, Hello

OFFLINE_MS = 6_000
READY_MS = 5_000


def test_a_silent_pair_is_closed_and_lost_without_waiting_for_the_peer() -> None:
    lease: Lease[Sock] = Lease(GRACE)
    c, s = online(lease, now=1_000)
    assert lease.reap(6_999, OFFLINE_MS, READY_MS) == []
    actions = lease.reap(7_000, OFFLINE_MS, READY_MS)
    assert of(Close, actions) == [
        Close(c, closes.HEARTBEAT_TIMEOUT, "no heartbeat"),
        Close(s, closes.HEARTBEAT_TIMEOUT, "no heartbeat"),
    ]
    assert Step.FLUSH_REORDER in actions
    assert of(WriteAway, actions) == [WriteAway(7_000)]
    assert not lease.ready and lease.sockets() == []
    # The edge's close callbacks come later (or never, for a frozen peer): nothing more happens.
    assert lease.closed(c, 17_000) == [] and lease.closed(s, 17_000) == []
    settled = lease.written(False, 7_010)
    assert published(settled) == [DeviceState.AWAY] and of(ArmTimer, settled) == [ArmTimer(GRACE)]
    offline = lease.timer_fired(7_010 + int(GRACE * 1000))
    assert Step.FORGET in offline and of(WriteRowOffline, offline) == [WriteRowOffline(7_000)]
    assert published(offline) == [DeviceState.OFFLINE]


def test_a_heartbeat_keeps_a_pair_from_being_reaped() -> None:
    lease: Lease[Sock] = Lease(GRACE)
    online(lease, now=1_000)
    lease.heartbeat(5_000)
    assert lease.reap(10_999, OFFLINE_MS, READY_MS) == []
    assert lease.ready


def test_a_control_socket_whose_stream_never_comes_is_closed_after_the_ready_timeout() -> None:
    lease: Lease[Sock] = Lease(GRACE)
    c = Sock("c")
    lease.opened(c, control(), 1_000)
    assert lease.reap(5_999, OFFLINE_MS, READY_MS) == []  # still within the bound
    actions = lease.reap(6_000, OFFLINE_MS, READY_MS)
    assert of(Close, actions) == [Close(c, closes.READY_TIMEOUT, "not ready in time")]
    # Never online: nothing to write, it is simply away until the grace window ends.
    assert of(WriteAway, actions) == []
    assert published(actions) == [DeviceState.AWAY] and of(ArmTimer, actions) == [ArmTimer(GRACE)]
    assert lease.sockets() == []


def test_the_ready_timeout_counts_from_the_current_control_socket() -> None:
    lease: Lease[Sock] = Lease(GRACE)
    lease.opened(Sock("c1"), control(1), 1_000)
    c2 = Sock("c2")
    lease.opened(c2, control(2), 5_000)  # a newer attempt supersedes the first
    assert lease.reap(9_999, OFFLINE_MS, READY_MS) == []
    assert of(Close, lease.reap(10_000, OFFLINE_MS, READY_MS)) == [
        Close(c2, closes.READY_TIMEOUT, "not ready in time")
    ]


def test_a_pair_that_became_ready_is_not_reaped_for_readiness() -> None:
    lease: Lease[Sock] = Lease(GRACE)
    connect(lease, now=1_000)
    lease.heartbeat(20_000)
    assert lease.reap(20_000, 120_000, READY_MS) == []
    single: Lease[Sock] = Lease(GRACE)
    single.opened(Sock("one"), Hello(Channel.SINGLE), 1_000)  # a single socket is ready on open
    assert single.reap(20_000, 120_000, READY_MS) == []
