"""A relay socket's outbound side: ordering, coalesced writes and waiting for a full buffer.

The socket edge is replaced by a recording transport: what is under test is the order and grouping
of writes the hub asks for, which a real socket would only blur.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode

from tether.api.transport import _text_header
from tether.protocol.feeds import Scope
from tether.protocol.history import History
from tether.sockets import WRITE_BATCH_FRAMES, ClientSocket


class Recording:
    """Takes writes at once while `open`, else only by awaiting (a full kernel buffer)."""

    def __init__(self) -> None:
        self.open = True
        self.writes: list[list[str]] = []
        self.drained = asyncio.Event()

    def send_now(self, texts: list[str]) -> bool:
        if not self.open:
            return False
        self.writes.append(list(texts))
        return True

    async def send(self, text: str) -> None:
        await self.send_many([text])

    async def send_many(self, texts: list[str]) -> None:
        await self.drained.wait()
        self.writes.append(list(texts))

    async def close(self, code: int, reason: str) -> None:
        self.open = False


def relay_socket(transport: Recording) -> ClientSocket:
    return ClientSocket(
        "s-1", transport, "conn-1", "key-1", Scope(None, None), "stream", History(100, 1 << 20), 4096, 1 << 24
    )


def frame(n: int) -> str:
    return json.dumps({"type": "stream_delta", "event_seq": n})


def seqs(writes: list[list[str]]) -> list[int]:
    return [json.loads(text)["seq"] for write in writes for text in write]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_nothing_is_written_before_the_socket_is_accepted() -> None:
    transport = Recording()
    sock = relay_socket(transport)
    sock.deliver(frame(1))
    await settle()
    assert transport.writes == []
    sock.start()
    await settle()
    assert seqs(transport.writes) == [1]


async def test_a_lone_answer_goes_out_alone_and_a_burst_in_few_writes_in_order() -> None:
    transport = Recording()
    sock = relay_socket(transport)
    sock.start()
    sock.deliver(frame(1))
    await settle()
    assert transport.writes and len(transport.writes[0]) == 1
    for n in range(2, 2 + 3 * WRITE_BATCH_FRAMES):
        sock.deliver(frame(n))
    await settle()
    assert seqs(transport.writes) == list(range(1, 2 + 3 * WRITE_BATCH_FRAMES))
    assert max(len(w) for w in transport.writes) == WRITE_BATCH_FRAMES
    assert len(transport.writes) == 1 + 3  # one write per batch bound, not one per frame


async def test_a_full_buffer_holds_the_writes_back_and_keeps_their_order() -> None:
    transport = Recording()
    sock = relay_socket(transport)
    sock.start()
    transport.open = False
    for n in range(1, 4):
        sock.deliver(frame(n))
    await settle()
    assert transport.writes == []
    transport.open = True
    sock.deliver(frame(4))  # must not overtake the three waiting ones
    await settle()
    assert transport.writes == []
    transport.drained.set()
    await settle()
    assert seqs(transport.writes) == [1, 2, 3, 4]
    sock.deliver(frame(5))
    await settle()
    assert seqs(transport.writes) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("length", [0, 125, 126, 65_535, 65_536, 70_000])
def test_relay_frames_are_framed_exactly_as_websockets_frames_them(length: int) -> None:
    data = b"x" * length
    expected = WsFrame(Opcode.TEXT, data).serialize(mask=False, extensions=[])
    assert _text_header(length) + data == expected
