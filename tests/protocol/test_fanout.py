"""Fan-out of one connection's device frames to its relay sockets (client-protocol §2.4).

A reply goes to the pair that asked and only to it; the router's own requests' replies to no one;
events to every scope they match. Members are plain tokens: no sockets, no loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from tether.protocol.fanout import REQUEST_ROUTES_PER_CONNECTION, Fanout
from tether.protocol.feeds import Scope
from tether.protocol.frames import Frame, decode


@dataclass(eq=False)
class Member:
    name: str
    scope: Scope
    channel: str | None = None
    key_id: str = "key-1"

    def __repr__(self) -> str:
        return self.name


ALL = Scope(None, None)
CONV_A = Scope("agent-1", "conv-a")
CONV_B = Scope("agent-1", "conv-b")


def reply(request_id: str) -> Frame:
    return decode(orjson.dumps({"type": "sync_response", "request_id": request_id}))


def delta(seq: int, conversation: str) -> Frame:
    body = {
        "type": "stream_delta",
        "event_seq": seq,
        "runtime": {"agent_id": "agent-1", "conversation_id": conversation},
    }
    return decode(orjson.dumps(body))


def receivers(routed: list[tuple[Member, str]]) -> list[str]:
    return sorted(member.name for member, _ in routed)


def test_a_reply_goes_to_the_pair_that_asked_and_no_one_else() -> None:
    fanout: Fanout[Member] = Fanout()
    control, stream = Member("control", CONV_A, "control"), Member("stream", CONV_A, "stream")
    other = Member("other", CONV_A, "control", key_id="key-2")  # another client: never paired
    for member in (control, stream, other):
        fanout.add(member)
    fanout.remember_request("req-1", control)
    assert receivers(fanout.route(reply("req-1"), gap_before=False)) == ["control", "stream"]
    assert fanout.partner(other) is None


def test_the_routers_own_requests_are_answered_to_no_one() -> None:
    fanout: Fanout[Member] = Fanout()
    fanout.add(Member("watcher", ALL))
    fanout.internal_request("tether-sub-1")
    assert fanout.route(reply("tether-sub-1"), gap_before=False) == []
    # An unknown request's reply is an event like any other: every unscoped watcher sees it.
    assert receivers(fanout.route(reply("someone-elses"), gap_before=False)) == ["watcher"]


def test_events_reach_each_matching_scope_renumbered_per_feed() -> None:
    fanout: Fanout[Member] = Fanout()
    for member in (Member("all", ALL), Member("a", CONV_A), Member("b", CONV_B)):
        fanout.add(member)
    routed = fanout.route(delta(7, "conv-a"), gap_before=False)
    assert receivers(routed) == ["a", "all"]
    texts = {member.name: orjson.loads(text) for member, text in routed}
    assert texts["all"]["event_seq"] == 7  # unscoped: the device's number
    assert texts["a"]["event_seq"] == 1 and texts["a"]["device_event_seq"] == 7


def test_a_loss_upstream_leaves_one_hole_in_a_feed_that_has_carried_frames() -> None:
    fanout: Fanout[Member] = Fanout()
    fanout.add(Member("a", CONV_A))
    first = fanout.route(delta(1, "conv-a"), gap_before=False)
    after_loss = fanout.route(delta(5, "conv-a"), gap_before=True)
    assert [orjson.loads(t)["event_seq"] for _, t in first + after_loss] == [1, 3]


def test_removing_the_last_member_of_a_scope_drops_its_feed_and_unpairs() -> None:
    fanout: Fanout[Member] = Fanout()
    control, stream = Member("control", CONV_A, "control"), Member("stream", CONV_A, "stream")
    assert fanout.add(control) is True  # a new scope: the device should be subscribed
    assert fanout.add(stream) is False
    fanout.remove(control)
    assert fanout.partner(stream) is None and fanout.scopes() == [CONV_A]
    fanout.remove(stream)
    assert fanout.scopes() == [] and len(fanout) == 0


def test_a_reply_whose_asker_is_gone_is_news_for_everyone_and_routes_are_bounded() -> None:
    fanout: Fanout[Member] = Fanout()
    gone, asker, bystander = Member("gone", CONV_A), Member("asker", CONV_A), Member("bystander", CONV_A)
    for member in (gone, asker, bystander):
        fanout.add(member)
    fanout.remember_request("req-1", gone)
    fanout.remove(gone)
    # Its asker left: nobody's private answer any more, so every socket the frame matches sees it.
    assert receivers(fanout.route(reply("req-1"), gap_before=False)) == ["asker", "bystander"]
    for i in range(REQUEST_ROUTES_PER_CONNECTION + 1):
        fanout.remember_request(f"r{i}", asker)
    assert receivers(fanout.route(reply("r0"), gap_before=False)) == ["asker", "bystander"]  # forgotten
    last = f"r{REQUEST_ROUTES_PER_CONNECTION}"
    assert receivers(fanout.route(reply(last), gap_before=False)) == ["asker"]
