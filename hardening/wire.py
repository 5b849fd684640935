"""Raw WebSocket client frames (RFC 6455 §5), for input no well-behaved library will send.

The fuzzer needs frames a client library refuses to build: invalid UTF-8 in a text frame, a
continuation with no start, a control frame over 125 bytes, reserved bits and opcodes, unmasked
client frames. `frame` builds the bytes; `RawSocket` does the upgrade over a plain TCP stream and
reads the server's frames back until it closes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
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
    """A WebSocket client over a bare TCP stream: upgrade, write any bytes, read the server's frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int) -> None:
        self.reader = reader
        self.writer = writer
        self.status = status  # of the upgrade response: 101 when the socket opened

    @classmethod
    async def open(cls, url: str, headers: dict[str, str]) -> RawSocket:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        reader, writer = await asyncio.open_connection(host, port, limit=64 * 1024 * 1024)
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
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status = int(head.split(b" ", 2)[1])
        return cls(reader, writer, status)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def receive(self, timeout: float) -> Received | None:
        """The server's next frame; None when the stream ended without one."""
        try:
            head = await asyncio.wait_for(self.reader.readexactly(2), timeout)
            n = head[1] & 0x7F
            if n == 126:
                n = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            payload = await self.reader.readexactly(n)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        return Received(head[0] & 0xF, payload)

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
            if got is None or got.opcode == CLOSE:
                return False
            if got.opcode == TEXT and wanted in got.payload:
                return True
        return False

    def abort(self) -> None:
        self.writer.transport.abort()
