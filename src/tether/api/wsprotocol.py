"""uvicorn's sans-I/O WebSocket protocol as `tether serve` runs it: reads held while writes are.

websockets answers every WebSocket ping at once, and uvicorn writes that pong whatever the state of
the socket's write buffer. A peer that sends pings and never reads made the router buffer every pong:
200 MiB of pings, 190 MiB more RSS. Here, while the write buffer is past its high-water mark (the
transport paused writing), the socket stops reading too, so the peer's own input waits in the kernel
(TCP pushes back) and what the router holds for one socket stays bounded by the transport's limits.
Our own writes already wait for the buffer (`WsTransport`, the relay's outbound queue with its 4008).
Our close does not wait for it (uvicorn's would, forever for a peer that never reads), and the socket
ends at most CLOSE_TIMEOUT_S after it, its unsent bytes dropped if it has not drained by then.

uvicorn also logs invalid UTF-8 in a text message as an ERROR with a traceback. That is the peer's
input, not the router's failure (the socket is closed with 1007, RFC 6455 §8.1): one WARNING line.
"""

from __future__ import annotations

import logging
from asyncio import Future
from typing import Any, cast

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from tether.api.inbox import Flag, Inbox

_INVALID_UTF8 = "Invalid UTF-8 sequence received from client."
# From our close frame to the socket's end, at most (uvicorn's own default, now also a bound).
CLOSE_TIMEOUT_S = 10.0


class _PeerInputIsNoError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == _INVALID_UTF8:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = "closed a WebSocket with 1007: invalid UTF-8 in a text message"
            record.exc_info = record.exc_text = None
        return True


_FILTER = _PeerInputIsNoError()


class TetherWebSocketProtocol(WebSocketsSansIOProtocol):
    """The sans-I/O protocol (what `WsTransport` writes through), reading only while writes drain."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logger.addFilter(_FILTER)  # once: a logger keeps one copy of a filter
        self._held = False  # reading paused by us because the write buffer is full
        self._close_bounded = False  # the socket ends at most `close_timeout` after our close
        self.close_timeout = CLOSE_TIMEOUT_S
        # asyncio's Queue and Event reserve 4 KiB per socket in deques (api/inbox.py).
        self.queue = Inbox()  # type: ignore[assignment]
        self.writable = Flag(True)  # type: ignore[assignment]

    def receive(self) -> Future[Any]:  # type: ignore[override]
        """The next message as a future, not a coroutine: two frames fewer that an idle socket's task
        keeps suspended for hours. Reading resumes once the application has taken what waited, as
        uvicorn's `receive` does."""
        inbox = cast("Inbox[Any]", self.queue)
        message = inbox.get()
        if self.read_paused and inbox.empty() and message.done():
            self.read_paused = False
            self.transport.resume_reading()
        return message

    def send_receive_event_to_app(self) -> None:
        """uvicorn's, but reading pauses only when the message has to wait for the application: one
        handed straight to its waiting `receive` is taken already (a ping, most of an idle device's
        traffic, then costs no pause and resume of the transport)."""
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        if self.close_sent:
            return  # past `websocket.close`: read on until the peer's close reply arrives
        inbox = cast("Inbox[Any]", self.queue)
        if self.curr_msg_data_type == "text":
            try:
                taken = inbox.hand({"type": "websocket.receive", "text": data.decode()})
            except UnicodeDecodeError:
                self.logger.exception(_INVALID_UTF8)
                self.conn.send_close(1007)
                self.handle_parser_exception()
                return
        else:
            taken = inbox.hand({"type": "websocket.receive", "bytes": data})
        if not taken and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._hold()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._held:
            self._release()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # uvicorn resumes reading whenever the app has taken its messages, held or not.
        if not self.writable.is_set():
            self._hold()

    async def send(self, message: Any) -> None:
        if message["type"] == "websocket.close" and self._closes_now():
            self._close_past_full_buffer(message.get("code", 1000), message.get("reason", "") or "")
        else:
            await super().send(message)
        if self.close_sent:
            self._bound_close()
            if self._held:
                self._release()

    def handle_parser_exception(self) -> None:
        super().handle_parser_exception()
        self._bound_close()

    def _closes_now(self) -> bool:
        """uvicorn's close waits for the write buffer to drain first, as any send does: for a peer
        that never reads, forever, and the relay's slow consumer (4008) with it. The close frame
        is 30 bytes: it goes into the buffer past its high-water mark, after what waits there."""
        return (
            not self.writable.is_set()
            and self.handshake_complete
            and self.initial_response is None
            and not self.close_sent
            and not self.disconnected
            and not self.transport.is_closing()
        )

    def _close_past_full_buffer(self, code: int, reason: str) -> None:
        """uvicorn's own close (`send` of `websocket.close`), without the wait for the buffer."""
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.conn.send_close(code, reason)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()

    def _bound_close(self) -> None:
        """At most `close_timeout` (uvicorn's, 10 s) from our close frame to the socket's end.

        uvicorn then calls `transport.close()`, which first flushes the write buffer: a peer that
        never reads keeps its socket, its file descriptor and up to the high-water mark of unsent
        bytes (64 KiB) for as long as it stays connected. It cannot read its close code either,
        which waits behind those bytes, so past the timeout what is unsent is dropped (an abort)."""
        if self._close_bounded or self.disconnected:
            return
        self._close_bounded = True
        if self.close_timer is not None:
            self.close_timer.cancel()
        self.close_timer = self.loop.call_later(self.close_timeout, self._close_or_abort)

    def _close_or_abort(self) -> None:
        self.close_timer = None
        if self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()

    def _release(self) -> None:
        """Read again: the buffer drained, or our close went out (the peer's reply completes the
        closing handshake). uvicorn pauses reading on its own too, until the app took the last
        message: that pause stays uvicorn's."""
        self._held = False
        if not self.read_paused and not self.transport.is_closing():
            self.transport.resume_reading()

    def _hold(self) -> None:
        # After our close frame the peer's reply must still be read (uvicorn's closing handshake).
        if not self.close_sent and not self.transport.is_closing():
            self._held = True
            self.transport.pause_reading()
