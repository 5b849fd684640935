"""Property-based fuzzing of what parses device and client input (issue 16, row 2).

Arbitrary bytes, text and JSON-ish values go into the frame decoder, the parts of the socket edges
that read a query string, the readers of frame bodies, and a connection's relay path (fan-out, feeds,
the per-socket `seq`). Each may only accept or reject as documented (`FrameError`, `None`), and what
it accepts stays consistent: the same object as JSON reads it, one `seq` per delivered frame, +1 each.

`FRAME_FUZZ_EXAMPLES` sets the examples per property: a bounded number in `make test`; the hardening
row (`python -m hardening --only socket_fuzz`) runs the same properties with many more.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.api.device_socket import _hello
from tether.api.relay_socket import _resume_point
from tether.protocol.fanout import Fanout
from tether.protocol.feeds import Scope
from tether.protocol.fleetstate import approval_news
from tether.protocol.frames import Frame, FrameError, decode, rest_mode, status_fields, with_seq
from tether.protocol.pairing import Channel
from tether.protocol.trace import frame_type

EXAMPLES = int(os.environ.get("FRAME_FUZZ_EXAMPLES", "150"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- strategies ------------------------------------------------------------------------------

# Any code point, lone surrogates included: a text frame's payload is already decoded UTF-8, but an
# edge handing text over may not be (and `str` allows them).
any_text = st.text(st.characters(exclude_categories=()), max_size=40)
words = st.sampled_from(
    ["type", "seq", "request_id", "runtime", "agent_id", "conversation_id", "event_seq", "device_status",
     "current_permission_mode", "git_context", "branch", "loop_status", "status", "request", "subtype",
     "pending_control_requests", "ping", "stream_delta", "update_device_status", "control_request",
     "update_loop_status", "WAITING_ON_APPROVAL", "can_use_tool", "default", "strict", ""]
)  # fmt: skip
keys = words | st.text(max_size=8)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | words
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=12,
)


@st.composite
def frame_like(draw: st.DrawFn) -> dict[str, Any]:
    """An object that is often a frame the router reads (a type, routing fields), sometimes not."""
    body: dict[str, Any] = draw(st.dictionaries(keys, json_values, max_size=5))
    if draw(st.booleans()):
        body["type"] = draw(words | json_values)
    if draw(st.booleans()):
        body["runtime"] = draw(
            st.fixed_dictionaries({"agent_id": words | json_values, "conversation_id": words | json_values})
            | json_values
        )
    for field in ("request_id", "event_seq", "seq", "device_status"):
        if draw(st.integers(0, 3)) == 0:
            body[field] = draw(json_values | st.integers(1, 50))
    return body


def _mutate(data: bytes, cuts: list[tuple[int, int, bytes]]) -> bytes:
    out = bytearray(data)
    for at, n, insert in cuts:
        at %= len(out) + 1
        out[at : at + n] = insert
    return bytes(out)


wire_input = st.one_of(
    st.binary(max_size=200),
    any_text,
    json_values.map(orjson.dumps),
    frame_like().map(orjson.dumps),
    frame_like().map(lambda b: orjson.dumps(b).decode()),
    st.tuples(
        frame_like().map(orjson.dumps),
        st.lists(st.tuples(st.integers(0, 500), st.integers(0, 4), st.binary(max_size=3)), max_size=4),
    ).map(lambda t: _mutate(*t)),
)

# ---- the decoder -----------------------------------------------------------------------------


@fuzz
@given(wire_input)
def test_decode_accepts_exactly_objects_with_a_string_type_and_reads_them_faithfully(
    data: str | bytes,
) -> None:
    try:
        frame = decode(data)
    except FrameError:
        try:
            body = orjson.loads(data)
        except orjson.JSONDecodeError:
            return  # not JSON: rejected as documented
        assert not (isinstance(body, dict) and isinstance(body.get("type"), str))
        return
    body = orjson.loads(data)
    assert frame.body == body and frame.type == body["type"]
    if isinstance(data, str):
        assert frame.text == data, "text frames are relayed as the device sent them"
    assert orjson.loads(frame.text) == body
    assert frame.request_id is None or (isinstance(frame.request_id, str) and frame.request_id)
    assert frame.agent_id is None or isinstance(frame.agent_id, str)
    assert frame.conversation_id is None or isinstance(frame.conversation_id, str)
    assert frame.event_seq is None or (type(frame.event_seq) is int)
    assert frame.scoped == (frame.agent_id is not None or frame.conversation_id is not None)


@fuzz
@given(frame_like(), st.integers(1, 2**53), st.sampled_from(["", " ", "\n\t "]))
def test_with_seq_always_leaves_exactly_the_routers_seq(body: dict[str, Any], seq: int, pad: str) -> None:
    body["type"] = "x"
    text = pad + orjson.dumps(body).decode() + pad
    out = with_seq(decode(text).text, seq)
    got = orjson.loads(out)
    # A device's own top-level `seq` never reaches the client in place of the router's.
    assert got == {**{k: v for k, v in body.items() if k != "seq"}, "seq": seq}
    assert out.startswith(f'{{"seq":{seq}'), "the router's number comes first"


# ---- readers of frame bodies -----------------------------------------------------------------


@fuzz
@given(frame_like(), words | st.text(max_size=12))
def test_body_readers_answer_or_say_nothing_on_any_body(body: dict[str, Any], kind: str) -> None:
    news = approval_news(kind, body)
    assert news is None or isinstance(news, bool)
    fields = status_fields(body)
    if fields is not None:
        mode, patch = fields
        assert mode is None or mode in ("standard", "acceptEdits", "unrestricted")
        assert set(patch) <= {"permissionMode", "workingDirectory", "gitBranch"}
        assert all(v is None or isinstance(v, str) for v in patch.values())
        orjson.dumps(patch)  # what is written to the row serialises
    assert rest_mode(body.get("type")) in (None, "standard", "acceptEdits", "unrestricted")


@fuzz
@given(any_text)
def test_frame_type_of_any_text_is_short_or_unknown(text: str) -> None:
    kind = frame_type(text)
    assert kind == "?" or (len(kind) <= 64 and '"' not in kind)


# ---- what the socket edges read from the upgrade ---------------------------------------------

query_values = (
    st.none() | st.sampled_from(["", "0", "1", "-1", "2", " 3", "+4", "1_0", "٣", "x", "9" * 5000]) | any_text
)


@fuzz
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "channel": st.sampled_from(["control", "stream", "", "single", "CONTROL"]) | any_text,
            "connectionGeneration": query_values,
            "connectionAttempt": query_values,
        },
    ).map(lambda d: {k: v for k, v in d.items() if v is not None})
)
def test_device_hello_is_valid_or_refused(params: dict[str, str]) -> None:
    hello = _hello(params)
    if hello is None:
        return  # the edge closes with BAD_HELLO (4400)
    channels = {"control": Channel.CONTROL, "stream": Channel.STREAM, None: Channel.SINGLE}
    assert params.get("channel") in channels and hello.channel is channels[params.get("channel")]
    assert (hello.generation is None) == (hello.attempt is None)
    assert hello.generation is None or (isinstance(hello.generation, str) and hello.generation)
    assert hello.attempt is None or hello.attempt >= 1


@fuzz
@given(query_values, query_values)
def test_resume_point_is_a_socket_and_a_count_or_nothing(socket_id: str | None, after: str | None) -> None:
    point = _resume_point(socket_id, after)
    if not socket_id:
        assert point is None
        return
    assert point is not None and point[0] == socket_id and point[1] >= 0


# ---- one connection's relay path, fed any frames ---------------------------------------------


@dataclass(eq=False)
class Socket:
    """A relay socket as the hub numbers it: fan-out member, per-socket `seq`."""

    scope: Scope
    channel: str | None
    key_id: str = "key-1"
    seq: int = 0

    def deliver(self, text: str) -> dict[str, Any]:
        self.seq += 1
        out: dict[str, Any] = orjson.loads(with_seq(text, self.seq))
        return out


scopes = st.sampled_from(
    [Scope(None, None), Scope("agent-1", None), Scope("agent-1", "conv-a"), Scope("agent-2", "conv-a")]
)


@st.composite
def device_frames(draw: st.DrawFn) -> Frame:
    # Routing fields of any shape; the rest of the body is the decoder's business, fuzzed above.
    body: dict[str, Any] = {"type": draw(words)}
    for field in ("request_id", "event_seq", "seq"):
        if draw(st.booleans()):
            body[field] = draw(scalars | st.integers(1, 40) | st.sampled_from(["r-1", "r-2"]))
    if draw(st.booleans()):
        body["runtime"] = {
            "agent_id": draw(st.sampled_from(["agent-1", "agent-2"])),
            "conversation_id": draw(st.sampled_from(["conv-a", "conv-b"])),
        }
    return decode(orjson.dumps(body))


@fuzz
@given(
    st.lists(st.tuples(scopes, st.sampled_from([None, "control", "stream"])), min_size=1, max_size=5),
    st.lists(st.tuples(device_frames(), st.booleans()), max_size=30),
)
def test_any_device_frames_reach_each_socket_numbered_and_in_scope(
    members: list[tuple[Scope, str | None]], frames: list[tuple[Frame, bool]]
) -> None:
    fanout: Fanout[Socket] = Fanout()
    sockets = [Socket(scope, channel) for scope, channel in members]
    for sock in sockets:
        fanout.add(sock)
    seen: dict[int, list[dict[str, Any]]] = {id(s): [] for s in sockets}
    for frame, gap in frames:
        routed = fanout.route(frame, gap)
        assert len({id(m) for m, _ in routed}) == len(routed), "one copy per socket"
        for member, text in routed:
            assert member.scope.matches(frame)
            got = member.deliver(text)
            assert got["type"] == frame.type
            seen[id(member)].append(got)
    for sock in sockets:
        delivered = seen[id(sock)]
        assert [f["seq"] for f in delivered] == list(range(1, len(delivered) + 1))
        numbers = [f["event_seq"] for f in delivered if "device_event_seq" in f]
        if not sock.scope.unscoped:
            assert numbers == sorted(set(numbers)), "a scoped feed numbers its events strictly upward"
