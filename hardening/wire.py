"""Raw WebSocket client frames (RFC 6455 §5), for input no well-behaved library will send.

The fuzzer needs frames a client library refuses to build: invalid UTF-8 in a text frame, a
continuation with no start, a control frame over 125 bytes, reserved bits and opcodes, unmasked
client frames. `frame` builds the bytes; `RawSocket` does the upgrade over a plain TCP socket and
reads the server's frames back until it closes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import struct
from dataclasses import dataclass
from urllib.parse import urlsplit

TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


def frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True, rsv: int = 0) -> bytes:
    """One frame's bytes as a client sends it (masked unless told otherwise)."""
    head = bytearray([(0x80 if fin else 0) | (rsv & 0x7) << 4 | (opcode & 0xF)])
    mask_bit = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        head.append(mask_bit | n)
    elif n < 1 << 16:
        head.append(mask_bit | 126)
        head += struct.pack("!H", n)
    else:
        head.append(mask_bit | 127)
        head += struct.pack("!Q", n)
    if not masked:
        return bytes(head) + payload
    key = os.urandom(4)
    # XOR by whole 4-byte words through int arithmetic: megabyte payloads stay quick.
    padded = payload + b"\0" * (-n % 4)
    word = int.from_bytes(key * (len(padded) // 4), "big") if padded else 0
    body = (int.from_bytes(padded, "big") ^ word).to_bytes(len(padded), "big")[:n] if n else b""
    return bytes(head) + key + body


def close_code_of(payload: bytes) -> int:
    """The status code of a close frame's payload; 1005 (none) when it carries none."""
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005


@dataclass
class Received:
    opcode: int
    payload: bytes


class RawSocket:
    """A WebSocket client over a bare non-blocking TCP socket: upgrade, write any bytes, read frames.

    Not an asyncio stream: a stream transport that fails a write (the router closed the socket while
    input was still going out, as it does on a violation) drops what was already received, the close
    frame included. Here a failed write leaves the read side alone, so the close code is still read.
    `rcvbuf` sets SO_RCVBUF before the connect (so the TCP window really is that small): a client that
    never reads then pushes back on the router after that many bytes, not after megabytes.
    """

    def __init__(self, sock: socket.socket, status: int, buffered: bytes) -> None:
        self.sock = sock
        self.status = status  # of the upgrade response: 101 when the socket opened
        self._buffer = bytearray(buffered)  # received but not yet parsed
        self._reading: asyncio.Task[bytes] | None = None  # the read in flight, if any
        self.header = b""  # the upgrade response's status line and headers
        self.closed_with: int | None = None  # the code of a close frame `until` ran into

    @classmethod
    async def open(
        cls, url: str, headers: dict[str, str], *, rcvbuf: int | None = None, timeout: float = 10
    ) -> RawSocket:
        loop = asyncio.get_running_loop()
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            lines = [
                f"GET {target} HTTP/1.1",
                f"Host: {host}:{port}",
                "Upgrade: websocket",
                "Connection: Upgrade",
                f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
                "Sec-WebSocket-Version: 13",
                *(f"{k}: {v}" for k, v in headers.items()),
            ]
            await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode())
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout)
                if not chunk:
                    raise ConnectionError("the upgrade got no response")
                data += chunk
        except BaseException:
            sock.close()
            raise
        head, _, rest = data.partition(b"\r\n\r\n")
        raw = cls(sock, int(head.split(b" ", 2)[1]), rest)
        raw.header = head
        return raw

    async def send(self, data: bytes) -> None:
        """Write bytes; ConnectionError once the router closed or reset the socket."""
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def _fill(self, n: int, deadline: float) -> bool:
        """Have at least `n` bytes buffered; False when the stream ended first. TimeoutError past deadline.

        The read in flight is never cancelled (a timeout or a cancelled caller leaves it to the next
        call): cancelling a read that had just completed would drop its bytes and break the framing."""
        loop = asyncio.get_running_loop()
        while len(self._buffer) < n:
            if self._reading is None:
                self._reading = loop.create_task(loop.sock_recv(self.sock, 1 << 20))
            left = deadline - loop.time()
            if left <= 0 or not (await asyncio.wait({self._reading}, timeout=left))[0]:
                raise TimeoutError
            reading, self._reading = self._reading, None
            try:
                chunk = reading.result()
            except (ConnectionError, OSError):
                return False
            if not chunk:
                return False
            self._buffer += chunk
        return True

    async def receive(self, timeout: float) -> Received | None:
        """The server's next frame; None when the stream ended without one. TimeoutError after `timeout`."""
        deadline = asyncio.get_running_loop().time() + timeout
        if not await self._fill(2, deadline):
            return None
        n, at = self._buffer[1] & 0x7F, 2
        if n == 126:
            if not await self._fill(4, deadline):
                return None
            n, at = struct.unpack_from("!H", self._buffer, 2)[0], 4
        elif n == 127:
            if not await self._fill(10, deadline):
                return None
            n, at = struct.unpack_from("!Q", self._buffer, 2)[0], 10
        if not await self._fill(at + n, deadline):
            return None
        got = Received(self._buffer[0] & 0xF, bytes(self._buffer[at : at + n]))
        del self._buffer[: at + n]
        return got

    async def close_code(self, timeout: float) -> int | None:
        """Read until the server's close frame and return its code (answering it, as a client must);
        None when the stream ended with no close frame or nothing came within `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (left := deadline - loop.time()) > 0:
            try:
                got = await self.receive(left)
            except TimeoutError:
                return None
            if got is None:
                return None
            if got.opcode == CLOSE:
                code = close_code_of(got.payload)
                with contextlib.suppress(ConnectionError):
                    await self.send(frame(CLOSE, got.payload[:2]))
                return code
        return None

    async def until(self, wanted: bytes, timeout: float) -> bool:
        """Read until a text frame containing `wanted` arrives; False on close, end or timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (left := deadline - loop.time()) > 0:
            try:
                got = await self.receive(left)
            except TimeoutError:
                return False
            if got is None:
                return False
            if got.opcode == CLOSE:
                self.closed_with = close_code_of(got.payload)
                return False
            if got.opcode == TEXT and wanted in got.payload:
                return True
        return False

    def abort(self) -> None:
        """Drop the connection at once (a reset, no closing handshake)."""
        if self._reading is not None:
            self._reading.cancel()
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()
