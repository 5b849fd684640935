"""The WebSocket's lean inbound queue and write-ready flag (api/inbox.py): asyncio.Queue's and
asyncio.Event's behaviour as uvicorn's protocol uses them, without sockets or sleeps."""

from __future__ import annotations

import asyncio

import pytest

from tether.api.inbox import Flag, Inbox


async def test_messages_come_out_in_order_whether_or_not_the_reader_waits() -> None:
    inbox: Inbox[int] = Inbox()
    waiting = inbox.get()  # the reader waits first: the next message goes straight to it
    assert inbox.hand(1) is True
    assert inbox.hand(2) is False  # the reader has not taken 1 yet: 2 waits in the inbox
    inbox.put_nowait(3)
    assert inbox.qsize() == 2 and not inbox.empty()
    assert await waiting == 1
    assert await inbox.get() == 2
    assert inbox.get_nowait() == 3
    assert inbox.empty() and inbox.qsize() == 0
    with pytest.raises(IndexError):
        inbox.get_nowait()


async def test_a_cancelled_reader_loses_no_message() -> None:
    inbox: Inbox[str] = Inbox()
    reader = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    reader.cancel()
    await asyncio.sleep(0)
    assert inbox.hand("kept") is False  # the cancelled get does not swallow it
    assert await inbox.get() == "kept"


async def test_an_inbox_has_one_reader() -> None:
    inbox: Inbox[int] = Inbox()
    inbox.get()
    with pytest.raises(RuntimeError):
        inbox.get()


async def test_flag_wakes_every_waiter_and_a_set_flag_does_not_block() -> None:
    flag = Flag()
    assert not flag.is_set()
    waiters = [asyncio.ensure_future(flag.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    flag.set()
    flag.clear()  # woken by the set, as with asyncio.Event, even if cleared before they run
    assert await asyncio.gather(*waiters) == [True, True, True]
    flag.set()
    assert await flag.wait() is True


async def test_a_cancelled_flag_waiter_is_forgotten() -> None:
    flag = Flag(False)
    waiter = asyncio.ensure_future(flag.wait())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    flag.set()  # nothing left to wake, nothing raised
    assert flag.is_set()
