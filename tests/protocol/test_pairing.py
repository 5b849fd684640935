"""Control/stream pairing with generations (device-protocol §4.5, §4.6; checklist items 9-12).

The device treats a close with 1008 as "re-register" and 1000 "Replaced by new connection" as "exit";
every other close is transient. So a pairing decision may close sockets freely, but never with those.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.protocol.pairing import (
    Action,
    Channel,
    Close,
    Hello,
    Lost,
    Pairing,
    Ready,
    Send,
)

TERMINAL_CODES = (1000, 1008)
REPLACED_REASON = "Replaced by new connection"


@dataclass(eq=False)
class Sock:
    """An opaque socket token: compared by identity, as the pairing machine does."""

    name: str

    def __repr__(self) -> str:
        return self.name


def control(generation: str, attempt: int) -> Hello:
    return Hello(Channel.CONTROL, generation, attempt)


def stream(generation: str, attempt: int) -> Hello:
    return Hello(Channel.STREAM, generation, attempt)


def ready_text(generation: str, attempt: int) -> dict[str, object]:
    return {"type": "listener_ready", "connection_generation": generation, "connection_attempt": attempt}


def transient(action: Action[Sock]) -> bool:
    return (
        isinstance(action, Close) and action.code not in TERMINAL_CODES and action.reason != REPLACED_REASON
    )


def closes(actions: list[Action[Sock]]) -> list[Sock]:
    return [a.socket for a in actions if isinstance(a, Close)]


def ready_pair(p: Pairing[Sock], generation: str, attempt: int) -> tuple[Sock, Sock]:
    c, s = Sock(f"c{attempt}"), Sock(f"s{attempt}")
    p.opened(c, control(generation, attempt))
    p.opened(s, stream(generation, attempt))
    assert p.ready
    return c, s


# ---- single and unpaired split ---------------------------------------------------------------


def test_single_socket_is_ready_at_once_without_listener_ready() -> None:
    p: Pairing[Sock] = Pairing()
    s = Sock("single")
    assert p.opened(s, Hello(Channel.SINGLE)) == [Ready()]
    assert p.ready and not p.split
    assert p.sockets() == [s]


def test_split_unpaired_is_ready_only_after_both_sockets() -> None:
    p: Pairing[Sock] = Pairing()
    c, s = Sock("c"), Sock("s")
    assert p.opened(c, Hello(Channel.CONTROL)) == []
    assert not p.ready and p.split
    assert p.opened(s, Hello(Channel.STREAM)) == [Ready()]
    assert p.ready
    assert p.sockets() == [c, s]


# ---- paired generations ---------------------------------------------------------------------


def test_paired_listener_ready_echoes_generation_and_attempt_on_control_then_stream() -> None:
    p: Pairing[Sock] = Pairing()
    c, s = Sock("c"), Sock("s")
    on_control = p.opened(c, control("gen-a", 7))
    assert len(on_control) == 1
    sent = on_control[0]
    assert isinstance(sent, Send) and sent.socket is c
    assert orjson.loads(sent.text) == ready_text("gen-a", 7)
    assert not p.ready, "the device is not connected until the stream is acknowledged too"

    on_stream = p.opened(s, stream("gen-a", 7))
    assert len(on_stream) == 2
    sent, ready = on_stream
    assert isinstance(sent, Send) and sent.socket is s
    assert orjson.loads(sent.text) == ready_text("gen-a", 7)
    assert ready == Ready()
    assert p.ready


def test_stream_with_wrong_generation_or_attempt_is_closed_and_never_current() -> None:
    for wrong in (stream("gen-other", 1), stream("gen-a", 2), Hello(Channel.STREAM)):
        p: Pairing[Sock] = Pairing()
        c, bad, good = Sock("c"), Sock("bad"), Sock("good")
        p.opened(c, control("gen-a", 1))
        actions = p.opened(bad, wrong)
        assert len(actions) == 1 and closes(actions) == [bad], wrong
        assert transient(actions[0]), actions
        assert p.stream is None and not p.ready
        assert p.closed(bad) == [], "closing the refused stream must not disturb the control socket"
        assert p.control is c
        # The right stream still completes the pair afterwards.
        assert p.opened(good, stream("gen-a", 1))[-1] == Ready()
        assert p.stream is good


def test_stream_without_a_control_socket_is_refused() -> None:
    p: Pairing[Sock] = Pairing()
    s = Sock("s")
    actions = p.opened(s, stream("gen-a", 1))
    assert closes(actions) == [s] and all(transient(a) for a in actions)
    assert p.sockets() == [] and not p.ready

    # Same after the control socket it belonged to has gone.
    c = Sock("c")
    p.opened(c, control("gen-a", 1))
    p.closed(c)
    late = Sock("late")
    actions = p.opened(late, stream("gen-a", 1))
    assert closes(actions) == [late] and all(transient(a) for a in actions)
    assert p.sockets() == []


def test_stream_on_a_single_socket_lease_is_refused() -> None:
    p: Pairing[Sock] = Pairing()
    single, s = Sock("single"), Sock("s")
    p.opened(single, Hello(Channel.SINGLE))
    actions = p.opened(s, Hello(Channel.STREAM))
    assert closes(actions) == [s] and all(transient(a) for a in actions)
    assert p.sockets() == [single] and p.ready


def test_newer_attempt_supersedes_the_pair_with_transient_closes_then_lost_then_ready() -> None:
    p: Pairing[Sock] = Pairing()
    c1, s1 = ready_pair(p, "gen-1", 1)
    c2, s2 = Sock("c2"), Sock("s2")

    actions = p.opened(c2, control("gen-2", 2))
    assert sorted(closes(actions), key=lambda s: s.name) == [c1, s1]
    assert all(transient(a) for a in actions if isinstance(a, Close))
    assert Lost() in actions and Ready() not in actions
    assert actions[-1] == Send(c2, orjson.dumps(ready_text("gen-2", 2)).decode())
    assert actions.index(Lost()) < len(actions) - 1
    assert p.control is c2 and p.stream is None and not p.ready

    # The old stream, still open at the edge, cannot rejoin: its generation is not current.
    late = p.opened(Sock("s1-again"), stream("gen-1", 1))
    assert len(late) == 1 and transient(late[0])
    # Closing the superseded sockets (the edge sees them go) changes nothing.
    assert p.closed(c1) == [] and p.closed(s1) == []
    assert p.control is c2

    assert p.opened(s2, stream("gen-2", 2))[-1] == Ready()
    assert p.sockets() == [c2, s2]


def test_newer_single_socket_supersedes_the_old_one_lost_then_ready() -> None:
    p: Pairing[Sock] = Pairing()
    old, new = Sock("old"), Sock("new")
    p.opened(old, Hello(Channel.SINGLE))
    actions = p.opened(new, Hello(Channel.SINGLE))
    assert closes(actions) == [old] and transient(actions[0])
    assert actions[1:] == [Lost(), Ready()]
    assert p.sockets() == [new] and p.ready
    assert p.closed(old) == []


def test_newer_attempt_before_the_stream_arrived_reports_no_lost() -> None:
    p: Pairing[Sock] = Pairing()
    c1, c2 = Sock("c1"), Sock("c2")
    p.opened(c1, control("gen-1", 1))
    actions = p.opened(c2, control("gen-2", 2))
    assert closes(actions) == [c1]
    assert Lost() not in actions, "the device was never connected on attempt 1"


def test_an_older_attempt_arriving_late_is_refused_and_leaves_the_pair_alone() -> None:
    p: Pairing[Sock] = Pairing()
    c5, s5 = ready_pair(p, "gen-5", 5)
    stale = Sock("c4")
    actions = p.opened(stale, control("gen-4", 4))
    assert actions and closes(actions) == [stale] and all(transient(a) for a in actions)
    assert not any(isinstance(a, Send | Ready | Lost) for a in actions)
    assert p.control is c5 and p.stream is s5 and p.ready
    assert p.closed(stale) == []
    assert p.sockets() == [c5, s5] and p.ready

    # Its stream, arriving even later, is refused too.
    stale_stream = Sock("s4")
    assert closes(p.opened(stale_stream, stream("gen-4", 4))) == [stale_stream]
    assert p.sockets() == [c5, s5]


def test_an_older_attempt_cannot_displace_a_control_still_waiting_for_its_stream() -> None:
    p: Pairing[Sock] = Pairing()
    c5, s5 = Sock("c5"), Sock("s5")
    p.opened(c5, control("gen-5", 5))
    stale = Sock("c4")
    assert closes(p.opened(stale, control("gen-4", 4))) == [stale]
    assert p.control is c5
    assert p.opened(s5, stream("gen-5", 5))[-1] == Ready()


def test_closing_the_current_control_closes_the_stream_and_reports_lost() -> None:
    p: Pairing[Sock] = Pairing()
    c, s = ready_pair(p, "gen-1", 1)
    actions = p.closed(c)
    assert closes(actions) == [s] and transient(actions[0])
    assert actions[-1] == Lost()
    assert p.sockets() == [] and not p.ready
    assert p.closed(s) == [], "the partner's own close, seen later, is not a second loss"


def test_closing_the_current_stream_closes_the_control_and_reports_lost() -> None:
    p: Pairing[Sock] = Pairing()
    c, s = ready_pair(p, "gen-1", 1)
    actions = p.closed(s)
    assert closes(actions) == [c] and transient(actions[0])
    assert actions[-1] == Lost()
    assert p.sockets() == [] and not p.ready
    assert p.closed(c) == []


def test_closing_a_socket_that_was_never_current_does_nothing() -> None:
    p: Pairing[Sock] = Pairing()
    c, s = ready_pair(p, "gen-1", 1)
    assert p.closed(Sock("stranger")) == []
    assert p.sockets() == [c, s] and p.ready


def test_a_second_stream_for_the_same_generation_replaces_the_first_without_a_second_ready() -> None:
    p: Pairing[Sock] = Pairing()
    c, s = ready_pair(p, "gen-1", 1)
    s_again = Sock("s-again")
    actions = p.opened(s_again, stream("gen-1", 1))
    assert closes(actions) == [s] and transient(actions[0])
    assert Ready() not in actions and Lost() not in actions
    assert p.sockets() == [c, s_again]
    assert p.closed(s) == []


# ---- invariants over arbitrary event sequences ------------------------------------------------

_event = st.one_of(
    st.tuples(st.just("control"), st.integers(0, 2), st.integers(1, 4)),
    st.tuples(st.just("stream"), st.integers(0, 2), st.integers(1, 4)),
    st.tuples(st.just("unpaired"), st.sampled_from(list(Channel)), st.just(0)),
    st.tuples(st.just("close"), st.integers(0, 50), st.just(0)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_event, max_size=30))
def test_any_sequence_keeps_the_pair_consistent_and_never_closes_terminally(
    events: list[tuple[object, object, int]],
) -> None:
    p: Pairing[Sock] = Pairing()
    opened: list[tuple[Sock, Hello]] = []
    ever_closed: set[int] = set()
    for n, (kind, arg, attempt) in enumerate(events):
        was_ready = p.ready
        before = (p.control, p.stream)
        if kind == "close":
            if not opened:
                continue
            sock, hello = opened[int(str(arg)) % len(opened)]
            actions = p.closed(sock)
        else:
            if kind == "unpaired":
                assert isinstance(arg, Channel)
                hello = Hello(arg)
            else:
                chan = Channel.CONTROL if kind == "control" else Channel.STREAM
                hello = Hello(chan, f"gen-{arg}-{attempt}", attempt)
            sock = Sock(f"{kind}{n}")
            opened.append((sock, hello))
            actions = p.opened(sock, hello)

        for action in actions:
            if isinstance(action, Close):
                assert transient(action), action
                ever_closed.add(id(action.socket))
            if isinstance(action, Send):
                assert action.socket in p.sockets(), "listener_ready goes only to a current socket"
                sent = orjson.loads(action.text)
                own = next(h for s, h in opened if s is action.socket)
                assert sent == ready_text(str(own.generation), int(own.attempt or 0))
        readies = [a for a in actions if isinstance(a, Ready)]
        assert len(readies) <= 1
        if readies:
            assert not was_ready or Lost() in actions, "Ready twice without a Lost between"
        for current in p.sockets():
            assert id(current) not in ever_closed, "a socket the router closed became current"

        # What is current is always a coherent pair.
        hellos = {id(s): h for s, h in opened}
        if p.stream is not None:
            assert p.control is not None
            c_hello, s_hello = hellos[id(p.control)], hellos[id(p.stream)]
            assert c_hello.channel is Channel.CONTROL and s_hello.channel is Channel.STREAM
            if c_hello.paired:
                assert (s_hello.generation, s_hello.attempt) == (c_hello.generation, c_hello.attempt)
        if p.ready:
            assert p.control is not None
            assert hellos[id(p.control)].channel is Channel.SINGLE or p.stream is not None

        # An older paired attempt never displaces a newer current paired control.
        old_control = before[0]
        if kind == "control" and old_control is not None:
            old_hello = hellos[id(old_control)]
            if old_hello.paired and old_hello.attempt is not None and attempt < old_hello.attempt:
                assert (p.control, p.stream) == before
