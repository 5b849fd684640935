"""The reference device's I/O: registration, the listener sockets, heartbeats and reconnects.

This is the device side of device-protocol.md §1, §2 and §4, behaving like `letta server` 0.32.18. What
the device *says* in answer to commands lives in `behaviour.py`; this module owns everything with a socket
or a clock in it. The decisions that do not need I/O (backoff schedules, close classification, socket
URLs, registration error text) are plain functions at the top so they can be tested without a router.

A `Device` costs a handful of tasks and no threads, so thousands can share one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import random
import ssl
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import Enum
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from tether.device.behaviour import (
    DEVICE_SCOPE,
    LETTA_CODE_VERSION,
    SUPPORTED_COMMANDS,
    Behaviour,
    DeviceSettings,
    Event,
    Frame,
    Job,
    Output,
    Pause,
    Reply,
    Scope,
    arrived_message,
    iso_now,
)

log = logging.getLogger("tether.device")

T = TypeVar("T")

MiB = 1024 * 1024
# The real device sends base64 file reads and memory dumps; the router must take 16 MiB, so must we.
MAX_FRAME_BYTES = 32 * MiB
NODE_VERSION = "v22.19.0"
CONTROL = "control"
STREAM = "stream"
REPLACED_REASON = "Replaced by new connection"
STREAM_CLASS_TYPES = frozenset(
    {"stream_delta", "update_device_status", "update_loop_status", "update_queue", "update_subagent_state"}
)
# Yield to other devices on the loop every so many frames of a job that never pauses (bench_stream).
FRAMES_PER_YIELD = 64


# -- pure decisions -----------------------------------------------------------------------------------


def default_listener_instance_id(connection_name: str) -> str:
    return "server-" + hashlib.sha256(connection_name.encode()).hexdigest()[:16]


def register_delay(
    attempt: int, retry_after: float | None, rand: float, *, base: float = 1.0, cap: float = 30.0
) -> float:
    """Seconds before registration attempt `attempt + 1` (§1.3), jitter included, at millisecond grain."""
    backoff = min(base * 2.0 ** (attempt - 1), cap)
    delay = max(retry_after, backoff) if retry_after is not None else backoff
    jitter_window_ms = math.floor(min(1000.0, delay * 1000 * 0.25))
    return delay + math.floor(rand * jitter_window_ms) / 1000 if jitter_window_ms > 0 else delay


def reconnect_delay(attempt: int, *, base: float = 1.0, cap: float = 30.0) -> float:
    """Seconds before socket reconnect attempt `attempt` (§4.3); attempt 0 follows a ready socket."""
    return 0.0 if attempt <= 0 else min(base * 2.0 ** (attempt - 1), cap)


def parse_retry_after(value: str | None, now: float) -> float | None:
    if not value:
        return None
    with contextlib.suppress(ValueError):
        seconds = float(value)
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    with contextlib.suppress(TypeError, ValueError, IndexError, OverflowError):
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    return None


def registration_error_text(status: int, body: bytes) -> str:
    text = body.decode("utf-8", "replace")
    detail = f"HTTP {status}"
    if not text:
        return detail
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return f"{detail}: {text[:200]}"
    if isinstance(parsed, dict) and parsed.get("message"):
        return str(parsed["message"])
    if isinstance(parsed, dict) and parsed.get("error"):
        detail = f"{detail}: {parsed['error']}"
        return f"{detail} ({parsed['errorCode']})" if parsed.get("errorCode") else detail
    return f"{detail}: {text[:200]}"


def listener_url(
    ws_url: str,
    *,
    device_id: str,
    connection_name: str,
    channel: str | None = None,
    generation: str | None = None,
    attempt: int | None = None,
) -> str:
    """`wsUrl` with the device's query parameters set, keeping any others the router put there (§2.1)."""
    ours: dict[str, str] = {"deviceId": device_id, "connectionName": connection_name}
    if channel is not None:
        ours["channel"] = channel
    if generation is not None and attempt is not None:
        ours["connectionGeneration"] = generation
        ours["connectionAttempt"] = str(attempt)
    parts = urlsplit(ws_url)
    kept = [(key, value) for key, value in parse_qsl(parts.query, keep_blank_values=True) if key not in ours]
    return urlunsplit(parts._replace(query=urlencode([*kept, *ours.items()])))


class CloseKind(Enum):
    RECONNECT = "reconnect"
    REREGISTER = "reregister"
    REPLACED = "replaced"


def classify_close(channel: str, code: int, reason: str) -> CloseKind:
    """What a close of one of the current sockets means (§4.2)."""
    if code == 1000 and reason == REPLACED_REASON:
        return CloseKind.REPLACED
    if channel == CONTROL and code == 1008:
        return CloseKind.REREGISTER
    return CloseKind.RECONNECT


def is_transient_status(status: int) -> bool:
    return status == 0 or status == 429 or status >= 500


# -- registration ---------------------------------------------------------------------------------------


class RegistrationError(Exception):
    def __init__(self, message: str, status: int, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after

    @property
    def transient(self) -> bool:
        return is_transient_status(self.status)


@dataclass(frozen=True, slots=True)
class Registration:
    connection_id: str
    ws_url: str
    split: bool
    paired: bool  # only ever true together with `split`, as the device ignores it otherwise


async def post_json(
    url: str, headers: Mapping[str, str], body: bytes, *, time_limit: float
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 POST over a fresh connection; returns (status, lower-cased headers, body)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"unsupported URL {url!r}")
    secure = parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request = [
        f"POST {target} HTTP/1.1",
        f"Host: {parts.netloc.rpartition('@')[2]}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    async with asyncio.timeout(time_limit):
        reader, writer = await asyncio.open_connection(
            parts.hostname, port, ssl=ssl.create_default_context() if secure else None
        )
        try:
            writer.write(("\r\n".join(request) + "\r\n\r\n").encode("latin-1") + body)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
            status = int(status_line.split(" ", 2)[1])
            response_headers: dict[str, str] = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                response_headers[name.strip().lower()] = value.strip()
            if "chunked" in response_headers.get("transfer-encoding", "").lower():
                data = await _read_chunked(reader)
            elif "content-length" in response_headers:
                data = await reader.readexactly(int(response_headers["content-length"]))
            else:
                data = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
    return status, response_headers, data


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
        if size == 0:
            # Trailers, if any, end with an empty line.
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass
            return b"".join(chunks)
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)


def decode_frame(message: str | bytes) -> Frame | None:
    try:
        frame = orjson.loads(message)
    except orjson.JSONDecodeError:
        return None
    return frame if isinstance(frame, dict) else None


# -- one connection attempt --------------------------------------------------------------------------


class _Link:
    """The sockets of one connection attempt and what is known about them.

    `ended` resolves with (channel, code, reason) when the first of its sockets closes; the attempt is over
    then, whatever the other socket is doing.
    """

    __slots__ = (
        "acceptance",
        "attempt",
        "connected",
        "control",
        "device_status",
        "ended",
        "generation",
        "live",
        "pending",
        "stream",
        "tasks",
        "unanswered",
    )

    def __init__(self, generation: str | None, attempt: int | None) -> None:
        loop = asyncio.get_running_loop()
        self.generation = generation
        self.attempt = attempt
        self.control: ClientConnection | None = None
        self.stream: ClientConnection | None = None
        self.connected = False  # outbound frames may be written
        self.live = False  # inbound commands are dispatched as they arrive rather than buffered
        self.pending: list[Frame] = []
        self.unanswered = 0
        self.device_status: dict[
            Scope, Any
        ] = {}  # last `device_status` written per scope, for de-duplication
        self.acceptance: dict[str, asyncio.Future[bool]] = {
            CONTROL: loop.create_future(),
            STREAM: loop.create_future(),
        }
        self.ended: asyncio.Future[tuple[str, int, str]] = loop.create_future()
        self.tasks: list[asyncio.Task[None]] = []

    def accept(self, channel: str, frame: Frame) -> None:
        if self.generation is None:
            return  # listener_ready means nothing outside paired mode
        future = self.acceptance[channel]
        if future.done():
            return
        attempt = frame.get("connection_attempt")
        future.set_result(
            frame.get("connection_generation") == self.generation
            and isinstance(attempt, int)
            and not isinstance(attempt, bool)
            and attempt == self.attempt
        )

    def end(self, channel: str, code: int, reason: str) -> None:
        if not self.ended.done():
            self.ended.set_result((channel, code, reason))

    def sockets(self) -> list[ClientConnection]:
        return [ws for ws in (self.control, self.stream) if ws is not None]

    def terminate(self) -> None:
        """Drop the TCP connections without a close frame, like `ws.terminate()`."""
        for ws in self.sockets():
            ws.transport.abort()

    async def close(self, *, graceful: bool, grace: float = 2.0) -> None:
        self.connected = False
        # Readers and the heartbeat go first: websockets runs the closing handshake without a reader.
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if graceful:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await asyncio.gather(*(ws.close() for ws in self.sockets()), return_exceptions=True)
        self.terminate()


# -- the device ---------------------------------------------------------------------------------------


class Device:
    """A simulated `letta server` process: registers, holds its listener sockets and answers commands.

    `received` and `sent` hold every decoded frame in and out, each with the socket it used under the key
    `"_channel"` (`"control"` or `"stream"`), unless `record=False` (the benchmark runs thousands).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        name: str,
        *,
        device_id: str | None = None,
        listener_instance_id: str | None = None,
        cwd: str | None = None,
        branch: str = "main",
        mode: str = "unrestricted",
        heartbeat_interval: float = 30.0,
        pong_timeout: float | None = None,
        ready_timeout: float = 30.0,
        backoff_base: float = 1.0,
        backoff_cap: float = 30.0,
        reconnect_window: float = 300.0,
        register_window: float = 120.0,
        http_timeout: float = 30.0,
        turn_delay: float = 0.01,
        reply_chunks: int = 4,
        announce_status: bool = True,
        record: bool = True,
        rand: Callable[[], float] = random.random,
    ) -> None:
        scheme = urlsplit(base_url).scheme
        if scheme not in ("http", "https"):
            raise ValueError(f"base_url must be http(s)://…, got {base_url!r}")
        # The real device joins by concatenation; a trailing slash would give `//v1/...`, which helps no one.
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.name = name
        self.device_id = device_id or str(uuid.uuid4())
        self.listener_instance_id = listener_instance_id or default_listener_instance_id(name)
        self.settings = DeviceSettings(name=name, cwd=cwd or os.getcwd(), branch=branch, mode=mode)
        self.heartbeat_interval = heartbeat_interval
        self.max_unanswered_pings = math.ceil((pong_timeout or 3 * heartbeat_interval) / heartbeat_interval)
        self.ready_timeout = ready_timeout
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.reconnect_window = reconnect_window
        self.register_window = register_window
        self.http_timeout = http_timeout
        self.turn_delay = turn_delay
        self.reply_chunks = reply_chunks
        self.announce_status = announce_status
        self.record = record
        self._rand = rand

        # Observable state.
        self.received: list[Frame] = []
        self.sent: list[Frame] = []
        self.connection_id: str | None = None
        self.ws_url: str | None = None
        self.split = False
        self.paired = False
        self.registrations = 0
        self.connects = 0  # times the listener became ready
        self.connect_attempts = 0
        self.closed_codes: list[tuple[int, str]] = []
        self.ready = asyncio.Event()
        self.replaced = False
        self.error: str | None = None

        # Per registration ("runtime" in the real CLI); reset by `_adopt`.
        self._behaviour = Behaviour(self.settings, turn_delay=turn_delay, reply_chunks=reply_chunks)
        self._subscriptions: set[Scope] = set()
        self._event_seq = 0
        self._jobs: set[asyncio.Task[None]] = set()

        self._pair_attempts = 0  # `connectionAttempt`: per process, never reset
        self._link: _Link | None = None
        self._task: asyncio.Task[int] | None = None
        self._stopping = False
        self._waiters: list[tuple[Callable[[Frame], bool], asyncio.Future[Frame]]] = []

    # -- public API -------------------------------------------------------------------------------------

    @property
    def subscriptions(self) -> frozenset[Scope]:
        return frozenset(self._subscriptions)

    @property
    def event_seq(self) -> int:
        return self._event_seq

    async def start(self) -> None:
        """Run the device in a background task; see `wait_ready` and `stop`."""
        if self._task is not None and not self._task.done():
            raise RuntimeError("device already running")
        self._stopping = False
        self._task = asyncio.create_task(self.run(), name=f"tether-device:{self.name}")

    @property
    def task(self) -> asyncio.Task[int] | None:
        return self._task

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until the listener is connected; raise if the device stops first."""
        waiter = asyncio.ensure_future(self.ready.wait())
        watched: set[asyncio.Future[Any]] = {waiter}
        if self._task is not None:
            watched.add(self._task)
        try:
            done, _ = await asyncio.wait(watched, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if waiter in done and self.ready.is_set():
            return
        if self._task is not None and self._task in done:
            raise RuntimeError(f"device {self.name} stopped: {self.error}")
        raise TimeoutError(f"device {self.name} not ready within {timeout}s")

    async def run(self) -> int:
        """Register and serve until replaced, failed or stopped; returns `letta server`'s exit status."""
        current = asyncio.current_task()
        # Called directly rather than through `start`: remember the caller's task so that `stop` can end it.
        adopted = self._task is None and current is not None
        if adopted:
            self._task = cast("asyncio.Task[int]", current)
        try:
            return await self._serve()
        except asyncio.CancelledError:
            if not self._stopping or current is None:
                raise
            current.uncancel()
            return 0
        finally:
            self.ready.clear()
            await self._cancel_jobs()
            if adopted:
                self._task = None

    async def stop(self, timeout: float = 5.0) -> None:
        """Close the sockets with 1000 and end `run`, as SIGTERM would."""
        self._stopping = True
        task = self._task
        if task is None or task.done():
            return
        if task is asyncio.current_task():
            raise RuntimeError("stop() called from inside run()")
        task.cancel()
        await asyncio.wait({task}, timeout=timeout)

    async def emit(self, frame: Frame, runtime: Mapping[str, Any] | None = None) -> Frame | None:
        """Send `frame` as-is on control, or, given a runtime, as an enveloped event on its usual socket.

        Bypasses the subscription filter; returns what was written, or None when not connected.
        """
        if runtime is None:
            return frame if await self._write(CONTROL, frame) else None
        agent_id = runtime.get("agent_id")
        scope = Scope(agent_id if isinstance(agent_id, str) else None, str(runtime.get("conversation_id")))
        return await self._emit_event(frame, scope)

    def sever(self) -> None:
        """Drop the sockets without a close frame, as a network failure would; the device reconnects."""
        if self._link is not None:
            self._link.terminate()

    async def wait_for(
        self,
        predicate: Callable[[Frame], bool],
        timeout: float = 10.0,
        *,
        since: int = 0,
    ) -> Frame:
        """The first received frame, from index `since` on, that satisfies `predicate`.

        Frames already in `received` are checked first; `since=len(device.received)` waits for new ones.
        """
        for frame in self.received[since:]:
            if _matches(predicate, frame):
                return frame
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        waiter = (predicate, future)
        self._waiters.append(waiter)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._waiters.remove(waiter)

    # -- lifecycle --------------------------------------------------------------------------------------

    async def _serve(self) -> int:
        try:
            registration = await self._register(initial=True)
        except RegistrationError as exc:
            self.error = f"Failed to start listener: {exc}"
            log.error("[%s] %s", self.name, self.error)
            return 1
        while True:
            self._adopt(registration)
            outcome = await self._connect_loop(registration)
            if outcome is CloseKind.REPLACED:
                self.replaced = True
                self.error = "Listener disconnected (replaced by new connection)"
                log.info("[%s] %s", self.name, self.error)
                return 1
            if outcome is None:
                self.error = "Failed to connect after 5 minutes of retrying"
                log.error("[%s] %s", self.name, self.error)
                return 1
            log.info("[%s] Computer connection expired, re-registering...", self.name)
            try:
                registration = await self._register(initial=False)
            except RegistrationError as exc:
                self.error = f"Re-registration failed: {exc}"
                log.error("[%s] %s", self.name, self.error)
                return 1

    def _adopt(self, registration: Registration) -> None:
        """Start a fresh runtime: new event_seq counter, no subscriptions, no conversations (§4.4)."""
        for job in self._jobs:
            job.cancel()
        self._jobs.clear()
        self.connection_id = registration.connection_id
        self.ws_url = registration.ws_url
        self.split = registration.split
        self.paired = registration.paired
        self._event_seq = 0
        self._subscriptions = set()
        self._behaviour = Behaviour(
            self.settings,
            connection_id=registration.connection_id,
            turn_delay=self.turn_delay,
            reply_chunks=self.reply_chunks,
        )

    async def _register(self, *, initial: bool) -> Registration:
        url = f"{self.base_url}/v1/environments/register"
        log.info("[%s] Registering with %s", self.name, url)
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                registration = await self._register_once(url)
            except RegistrationError as exc:
                elapsed = time.monotonic() - started
                if not exc.transient or (initial and elapsed >= self.register_window):
                    raise
                attempt += 1
                delay = register_delay(
                    attempt, exc.retry_after, self._rand(), base=self.backoff_base, cap=self.backoff_cap
                )
                log.info(
                    "[%s] %sregistration retry %d in %ds: %s",
                    self.name,
                    "Initial " if initial else "",
                    attempt,
                    round(delay),
                    exc,
                )
                await asyncio.sleep(delay)
                continue
            self.registrations += 1
            log.info(
                "[%s] Registered successfully (connectionId %s, wsUrl %s)",
                self.name,
                registration.connection_id,
                registration.ws_url,
            )
            return registration

    def _registration_body(self) -> Frame:
        return {
            "deviceId": self.device_id,
            "listenerInstanceId": self.listener_instance_id,
            "connectionName": self.name,
            "metadata": {
                "lettaCodeVersion": LETTA_CODE_VERSION,
                "os": sys.platform,
                "nodeVersion": NODE_VERSION,
                "environmentMessageProtocol": "v2-input",
                "supportsPairedListenerGenerations": True,
                "supported_commands": list(SUPPORTED_COMMANDS),
                "self_update": {
                    "supported": False,
                    "writable": False,
                    "reason": "tether reference device",
                    "manual_command": "npm i -g @letta-ai/letta-code",
                },
            },
        }

    async def _register_once(self, url: str) -> Registration:
        headers = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {self.api_key}",
            "X-Letta-Source": "letta-code",
        }
        body = orjson.dumps(self._registration_body())
        try:
            status, response_headers, data = await post_json(url, headers, body, time_limit=self.http_timeout)
        except (OSError, TimeoutError, EOFError, ValueError, IndexError, asyncio.LimitOverrunError) as exc:
            raise RegistrationError(f"Network error: {exc or type(exc).__name__}", 0) from exc
        if not 200 <= status < 300:
            retry_after = parse_retry_after(response_headers.get("retry-after"), time.time())
            raise RegistrationError(registration_error_text(status, data), status, retry_after)
        try:
            parsed = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise RegistrationError(
                "Server returned non-JSON response — is the server running?", status
            ) from None
        if not (
            isinstance(parsed, dict)
            and isinstance(parsed.get("connectionId"), str)
            and isinstance(parsed.get("wsUrl"), str)
        ):
            raise RegistrationError(
                "Server returned unexpected response shape (missing connectionId or wsUrl)", status
            )
        split = parsed.get("supportsSplitStatusChannels") is True
        return Registration(
            connection_id=parsed["connectionId"],
            ws_url=parsed["wsUrl"],
            split=split,
            paired=split and parsed.get("supportsPairedListenerGenerations") is True,
        )

    async def _connect_loop(self, registration: Registration) -> CloseKind | None:
        """Hold the listener for one registration; returns why it ended, None for the 5-minute give-up."""
        loop = asyncio.get_running_loop()
        attempt = 0  # failed attempts since the last ready socket; the first reconnect after one is immediate
        outage_started = loop.time()
        ever_ready = False
        while True:
            if attempt > 0:
                if loop.time() - outage_started >= self.reconnect_window:
                    return CloseKind.REREGISTER if ever_ready else None
                delay = reconnect_delay(attempt, base=self.backoff_base, cap=self.backoff_cap)
                log.info("[%s] Reconnecting (attempt %d, retry in %ds)", self.name, attempt, round(delay))
                await asyncio.sleep(delay)
            kind, reached_ready = await self._session(registration)
            if kind is not CloseKind.RECONNECT:
                return kind
            if reached_ready:
                ever_ready = True
                attempt = 0
                outage_started = loop.time()
            else:
                attempt += 1

    async def _session(self, registration: Registration) -> tuple[CloseKind, bool]:
        """One connection attempt, from opening the sockets until the first of them closes."""
        generation: str | None = None
        attempt: int | None = None
        if registration.paired:
            self._pair_attempts += 1
            generation, attempt = str(uuid.uuid4()), self._pair_attempts
        link = _Link(generation, attempt)
        self._link = link
        self.connect_attempts += 1
        graceful = False
        try:
            kind = await self._hold(registration, link)
            return kind, link.live
        except asyncio.CancelledError:
            graceful = self._stopping
            raise
        finally:
            if self._link is link:
                self._link = None
            self.ready.clear()
            await link.close(graceful=graceful)

    async def _hold(self, registration: Registration, link: _Link) -> CloseKind:
        split, paired = registration.split, registration.paired

        def url(channel: str | None) -> str:
            return listener_url(
                registration.ws_url,
                device_id=self.device_id,
                connection_name=self.name,
                channel=channel,
                generation=link.generation,
                attempt=link.attempt,
            )

        stream_opening = asyncio.ensure_future(self._open(url(STREAM))) if split and not paired else None
        try:
            link.control = await self._open(url(CONTROL if split else None))
        except (OSError, TimeoutError, WebSocketException) as exc:
            log.info("[%s] WebSocket connect failed: %s", self.name, exc or type(exc).__name__)
            if stream_opening is not None:
                await _discard_opening(stream_opening)
            return CloseKind.RECONNECT
        link.tasks.append(asyncio.create_task(self._read(link, CONTROL, link.control)))

        if paired:
            if await self._until(link, link.acceptance[CONTROL]) is not True:
                return self._abandon(link, "control WebSocket was not accepted (listener_ready)")
            stream_opening = asyncio.ensure_future(self._open(url(STREAM)))
        if stream_opening is not None:
            try:
                link.stream = await self._until(link, stream_opening)
            except (OSError, TimeoutError, WebSocketException) as exc:
                return self._abandon(link, f"stream WebSocket failed to open: {exc or type(exc).__name__}")
            finally:
                if not stream_opening.done():
                    await _discard_opening(stream_opening)
            if link.stream is None:
                return self._abandon(link, "stream WebSocket did not open")
            link.tasks.append(asyncio.create_task(self._read(link, STREAM, link.stream)))
            if paired and await self._until(link, link.acceptance[STREAM]) is not True:
                return self._abandon(link, "stream WebSocket was not accepted (listener_ready)")

        await self._become_ready(link)
        channel, code, reason = await link.ended
        self.closed_codes.append((code, reason))
        kind = classify_close(channel, code, reason)
        log.info("[%s] %s socket closed (%d %r): %s", self.name, channel, code, reason, kind.value)
        return kind

    async def _until(self, link: _Link, future: asyncio.Future[T]) -> T | None:
        """`future`'s result, or None if the link ends or `ready_timeout` passes first."""
        watched: set[asyncio.Future[Any]] = {future, link.ended}
        done, _ = await asyncio.wait(watched, timeout=self.ready_timeout, return_when=asyncio.FIRST_COMPLETED)
        return future.result() if future in done else None

    def _abandon(self, link: _Link, why: str) -> CloseKind:
        """The attempt failed before readiness: classify a close if there was one, else just retry."""
        if link.ended.done():
            channel, code, reason = link.ended.result()
            self.closed_codes.append((code, reason))
            log.info("[%s] %s socket closed before ready (%d %r)", self.name, channel, code, reason)
            return classify_close(channel, code, reason)
        log.info("[%s] %s; reconnecting", self.name, why)
        return CloseKind.RECONNECT

    async def _open(self, url: str) -> ClientConnection:
        return await connect(
            url,
            additional_headers={"Authorization": f"Bearer {self.api_key}"},
            user_agent_header=None,  # the `ws` package sends none
            compression=None,
            max_size=MAX_FRAME_BYTES,
            ping_interval=None,  # liveness is the JSON ping/pong of §4.1, not WebSocket pings
            proxy=None,
            open_timeout=self.ready_timeout,
            close_timeout=2.0,
        )

    async def _become_ready(self, link: _Link) -> None:
        link.connected = True
        self.connects += 1
        self.ready.set()
        log.info("[%s] Connected. Awaiting instructions.", self.name)
        link.tasks.append(asyncio.create_task(self._heartbeat(link)))
        if self.announce_status:
            await self._emit_event(self._behaviour.device_status(DEVICE_SCOPE).frame, DEVICE_SCOPE)
        for scope in list(self._subscriptions):
            for output in self._behaviour.snapshot(scope, full=False):
                await self._output(output)
        # Commands that arrived during the handshake run now, in order, before any that arrive later.
        while link.pending:
            await self._dispatch(link.pending.pop(0))
        link.live = True

    async def _read(self, link: _Link, channel: str, ws: ClientConnection) -> None:
        code, reason = 1006, ""
        try:
            while True:
                message = await ws.recv()
                frame = decode_frame(message)
                if frame is None:
                    continue
                self._record_received(channel, frame)
                if channel == CONTROL:
                    await self._on_control(link, frame)
                elif frame.get("type") == "listener_ready":
                    link.accept(STREAM, frame)
                # Anything else on the stream socket is ignored, as the real device does.
        except ConnectionClosed as exc:
            if exc.rcvd is not None:
                code, reason = exc.rcvd.code, exc.rcvd.reason
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("[%s] error handling a frame on %s; dropping the connection", self.name, channel)
        link.end(channel, code, reason)

    async def _on_control(self, link: _Link, frame: Frame) -> None:
        kind = frame.get("type")
        if kind == "pong":
            link.unanswered = 0
        elif kind == "listener_ready":
            link.accept(CONTROL, frame)
        elif not link.live:
            link.pending.append(frame)
        else:
            await self._dispatch(frame)

    async def _heartbeat(self, link: _Link) -> None:
        ping = orjson.dumps({"type": "ping"})
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            if link.unanswered >= self.max_unanswered_pings:
                log.info(
                    "[%s] No pong for %d pings; terminating the control socket", self.name, link.unanswered
                )
                if link.control is not None:
                    link.control.transport.abort()
                return
            link.unanswered += 1
            for channel, ws in ((CONTROL, link.control), (STREAM, link.stream)):
                if ws is not None:
                    with contextlib.suppress(ConnectionClosed):
                        await ws.send(ping, text=True)
                    if self.record:
                        self.sent.append({"type": "ping", "_channel": channel})

    # -- frames -----------------------------------------------------------------------------------------

    async def _dispatch(self, frame: Frame) -> None:
        if log.isEnabledFor(logging.INFO):  # `tether device` logs at INFO; the benchmark does not
            arrived = arrived_message(frame)
            if arrived is not None:
                log.info("[%s] %s", self.name, arrived)
        reaction = self._behaviour.handle(frame)
        if reaction.subscribe is not None:
            self._subscriptions.add(reaction.subscribe)
        for output in reaction.outputs:
            await self._output(output)
        if reaction.job is not None:
            task = asyncio.create_task(self._drive(reaction.job))
            self._jobs.add(task)
            task.add_done_callback(self._jobs.discard)

    async def _drive(self, job: Job) -> None:
        """Play a job's frames; it keeps running across transient reconnects, like a real turn."""
        written = 0
        try:
            for step in job:
                if isinstance(step, Pause):
                    await asyncio.sleep(step.seconds)
                    continue
                await self._output(step)
                written += 1
                if written % FRAMES_PER_YIELD == 0:
                    await asyncio.sleep(0)
        except Exception:
            log.exception("[%s] job failed", self.name)
        finally:
            job.close()

    async def _output(self, output: Output) -> None:
        if isinstance(output, Reply):
            await self._write(CONTROL, output.frame)
        elif isinstance(output, Event) and output.scope in self._subscriptions:
            link = self._link
            if link is not None and output.frame.get("type") == "update_device_status":
                # The real device sends a status a socket already has only when a command forces it.
                status = output.frame.get("device_status")
                if not output.force and link.device_status.get(output.scope) == status:
                    return
                link.device_status[output.scope] = status
            await self._emit_event(output.frame, output.scope)

    async def _emit_event(self, frame: Frame, scope: Scope) -> Frame | None:
        link = self._link
        if link is None or not link.connected:
            return None  # no number is taken for a frame that is never written (§3.3)
        self._event_seq += 1
        seq = self._event_seq
        kind = frame.get("type")
        enveloped = {
            **frame,
            "runtime": scope.wire(),
            "event_seq": seq,
            "emitted_at": iso_now(time.time()),
            "idempotency_key": f"{kind}:{seq}:{uuid.uuid4()}",
        }
        channel = STREAM if link.stream is not None and kind in STREAM_CLASS_TYPES else CONTROL
        return enveloped if await self._write(channel, enveloped) else None

    async def _write(self, channel: str, frame: Frame) -> bool:
        link = self._link
        if link is None or not link.connected:
            return False
        ws = link.stream if channel == STREAM and link.stream is not None else link.control
        if ws is None:
            return False
        data = orjson.dumps(frame)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("[%s] → send (%s)  %s", self.name, channel, data.decode())
        if self.record:
            self.sent.append({**frame, "_channel": channel})
        try:
            await ws.send(data, text=True)
        except ConnectionClosed:
            return False
        return True

    def _record_received(self, channel: str, frame: Frame) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("[%s] ← recv (%s)  %s", self.name, channel, orjson.dumps(frame).decode())
        entry = {**frame, "_channel": channel}
        if self.record:
            self.received.append(entry)
        for predicate, future in self._waiters:
            if not future.done() and _matches(predicate, entry):
                future.set_result(entry)

    async def _cancel_jobs(self) -> None:
        jobs = list(self._jobs)
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)


def _matches(predicate: Callable[[Frame], bool], frame: Frame) -> bool:
    # Lets tests write `f["runtime"]["agent_id"] == ...` without guarding against frames lacking the keys.
    try:
        return bool(predicate(frame))
    except (KeyError, IndexError, TypeError):
        return False


async def _discard_opening(opening: asyncio.Future[ClientConnection]) -> None:
    """Cancel a socket that is still opening, or abort it if it made it."""
    opening.cancel()
    with contextlib.suppress(asyncio.CancelledError, OSError, TimeoutError, WebSocketException):
        ws = await opening
        ws.transport.abort()
