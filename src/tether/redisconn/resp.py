"""A lean Redis connection for the bus's hot path: commands to a device and events from it.

redis-py's asyncio client spends about 125 µs of CPU per command on this machine (its connection
pool, retry and timeout wrappers, observability hooks) against about 20 µs for the same command
written to a socket and parsed by hiredis; a cross-pod round trip makes four to six such calls
(`make bench`, BENCHMARKS.md). This connection writes each command as soon as it is called and hands
replies back in order, so concurrent callers share one socket and pipeline naturally. It speaks only
what the bus needs (RESP2 commands, scripts by SHA); the rest of Tether keeps using redis-py. Both
reach Redis from the same `RedisAddress` (credentials, database, TLS context).

Failures surface as redis-py's exception types, so callers handle both clients alike: a lost
connection fails every call in flight with `ConnectionError`, and the next call connects again.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Coroutine
from typing import Any, cast

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tether.protocol.readiness import CallWatch
from tether.redisconn.address import RedisAddress

# Calls waiting for their reply on one connection; beyond this a call fails at once (Redis is not
# keeping up, and queueing more would only grow memory).
MAX_PENDING = 10_000
# How often a connection checks that Redis still answers what it was sent.
STALL_CHECK_SECONDS = 1.0
# A call unanswered this long past what it may take by design makes the connection report that Redis
# is not answering (readiness), long before the stall timeout drops it.
NOT_ANSWERING_SECONDS = 1.0
# What a call raises when Redis itself is away (as opposed to an error reply from a Redis that is there).
_AWAY = (RedisConnectionError, RedisTimeoutError, OSError)


class _Protocol(asyncio.Protocol):
    def __init__(self, stall_timeout: float) -> None:
        self.reader = hiredis.Reader(encoding="utf-8")
        self.pending: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None
        # A connection with calls in flight and no reply for this long is dropped: one timer per
        # connection, where a timeout per call would cost as much as the call.
        self.stall_timeout = stall_timeout
        self.progress_at = 0.0
        self._watchdog: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self._watchdog = asyncio.get_running_loop().call_later(STALL_CHECK_SECONDS, self._check)

    def sent(self, futures: list[asyncio.Future[Any]], now: float) -> None:
        if not self.pending:
            self.progress_at = now  # the wait starts with the first call in flight
        self.pending.extend(futures)

    def _check(self) -> None:
        loop = asyncio.get_running_loop()
        if self.pending and loop.time() - self.progress_at > self.stall_timeout:
            self._fail(RedisTimeoutError(f"Redis sent no reply for {self.stall_timeout:.0f}s"))
            return
        self._watchdog = loop.call_later(STALL_CHECK_SECONDS, self._check)

    def data_received(self, data: bytes) -> None:
        self.progress_at = asyncio.get_running_loop().time()
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if not self.pending:  # a reply nobody asked for: the stream is out of step
                self._fail(RedisConnectionError("unexpected reply from Redis"))
                return
            future = self.pending.popleft()
            if future.done():  # its caller gave up (timeout, cancellation)
                continue
            if isinstance(reply, hiredis.ReplyError):
                text = str(reply)
                error = NoScriptError(text) if text.startswith("NOSCRIPT") else ResponseError(text)
                future.set_exception(error)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"Redis connection lost: {exc!r}" if exc else "Redis closed"))

    def _fail(self, error: Exception) -> None:
        self.lost = self.lost or error
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.transport is not None:
            self.transport.abort()
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_exception(error)


class RespConnection:
    """One connection to the Redis at `address` (redis://, rediss:// or unix://), opened on first use.

    `stall_timeout` bounds how long calls in flight may go without any reply (a blocking read's
    own wait included) before the connection is dropped and they fail. `waits_up_to`: how long a
    call may block in Redis by design; `watch` tells from the calls in flight whether Redis answers
    (readiness)."""

    def __init__(
        self, address: RedisAddress, *, connect_timeout: float, stall_timeout: float, waits_up_to: float = 0.0
    ) -> None:
        self._address = address
        self._connect_timeout = connect_timeout
        self._stall_timeout = stall_timeout
        self._protocol: _Protocol | None = None
        self._connecting = asyncio.Lock()
        self.watch = CallWatch(NOT_ANSWERING_SECONDS, waits_up_to)

    async def call(self, *args: str | int) -> Any:
        """Send one command and wait for its reply."""
        return await self._watched(self._call(args))

    async def _call(self, args: tuple[str | int, ...]) -> Any:
        protocol = self._protocol
        if protocol is None or protocol.lost is not None:
            protocol = await self._connect()
        return await self._send(protocol, [args])[0]

    async def pipeline(self, commands: list[tuple[str | int, ...]]) -> list[Any]:
        """Send several commands in one write; their replies, in order (the first error raises)."""
        result: list[Any] = await self._watched(self._pipeline(commands))
        return result

    async def _watched(self, work: Coroutine[Any, Any, Any]) -> Any:
        """Run one exchange, telling the readiness watch whether Redis answered: an error reply is an
        answer; a lost or refused connection is not; a cancelled caller says nothing."""
        token = self.watch.began(asyncio.get_running_loop().time())
        try:
            reply = await work
        except _AWAY:
            self.watch.failed(token)
            raise
        except RedisError:
            self.watch.answered(token, asyncio.get_running_loop().time())
            raise
        except BaseException:
            self.watch.abandoned(token)
            raise
        self.watch.answered(token, asyncio.get_running_loop().time())
        return reply

    async def _pipeline(self, commands: list[tuple[str | int, ...]]) -> list[Any]:
        protocol = self._protocol
        if protocol is None or protocol.lost is not None:
            protocol = await self._connect()
        futures = self._send(protocol, commands)
        replies: list[Any] = []
        error: RedisError | None = None
        try:
            # The replies come in one read: the first await waits, the others find theirs done.
            for future in futures:
                try:
                    replies.append(await future)
                except RedisError as exc:  # every future is awaited, so no error goes unretrieved
                    error = error or exc
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise
        if error is not None:
            raise error
        return replies

    async def script(self, sha: str, source: str, keys: list[str], args: list[str | int]) -> Any:
        """Run a Lua script by its SHA, loading it on the first NOSCRIPT (after a Redis restart)."""
        try:
            return await self.call("EVALSHA", sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self.call("EVAL", source, len(keys), *keys, *args)

    def close(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()

    def _send(self, protocol: _Protocol, commands: list[tuple[str | int, ...]]) -> list[asyncio.Future[Any]]:
        if len(protocol.pending) + len(commands) > MAX_PENDING:
            raise RedisConnectionError(f"more than {MAX_PENDING} Redis calls waiting on one connection")
        assert protocol.transport is not None
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        protocol.sent(futures, loop.time())
        protocol.transport.write(b"".join(hiredis.pack_command(cast(Any, command)) for command in commands))
        return futures

    async def _connect(self) -> _Protocol:
        async with self._connecting:
            if self._protocol is not None and self._protocol.lost is None:
                return self._protocol
            self.close()
            try:
                async with asyncio.timeout(self._connect_timeout):
                    protocol = await self._open()
            except TimeoutError as exc:
                raise RedisTimeoutError("connecting to Redis timed out") from exc
            except OSError as exc:
                raise RedisConnectionError(f"cannot connect to Redis: {exc!r}") from exc
            hello: list[tuple[str | int, ...]] = []
            address = self._address
            if address.password is not None:
                user = address.username
                hello.append(("AUTH", user, address.password) if user else ("AUTH", address.password))
            if address.db:
                hello.append(("SELECT", address.db))
            if hello:
                try:
                    await asyncio.gather(*self._send(protocol, hello))
                except BaseException:
                    assert protocol.transport is not None
                    protocol.transport.abort()
                    raise
            self._protocol = protocol
            return protocol

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        address = self._address

        def factory() -> _Protocol:
            return _Protocol(self._stall_timeout)

        if address.path is not None:
            _, protocol = await loop.create_unix_connection(factory, address.path)
        else:
            _, protocol = await loop.create_connection(factory, address.host, address.port, ssl=address.tls)
        return protocol


def script_sha(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()
