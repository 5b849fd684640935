"""A pod's inbox (`pod:{pod}:inbox`): the requests other pods make of it and the replies to the
requests it made, the bus's request/reply ("ask") machinery.

Each request carries a correlation id, the requester's pod id and a deadline; the owner answers with
a boolean in the requester's inbox. A request past its deadline is not carried out, so a sender that
gave up (and told its client "not delivered") is never contradicted later. A "watch" notice (someone
now watches connection X) travels the same way and is not answered.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable

from tether.bus.base import BoundBus
from tether.clock import now_ms
from tether.redisconn.health import REDIS_ERRORS
from tether.redisconn.link import PodLink
from tether.redisconn.resp import RespConnection, script_sha
from tether.redisconn.streams import Fields, xadd
from tether.tasks import TaskSet

log = logging.getLogger("tether.bus.redis")

# A pod's inbox keeps about this many entries (MAXLEN ~): requests only wait there while the owner's
# reader catches up, so this bounds memory, not delivery.
INBOX_MAXLEN = 10_000
# An inbox nobody writes to for this long disappears (its pod is gone).
INBOX_TTL_SECONDS = 300.0
# Asking another pod to close a device's sockets waits at most this long for its answer.
CLOSE_TIMEOUT_SECONDS = 2.0
# A request's deadline is this much before the requester gives up, so a frame written just before
# the deadline is still acknowledged (the sender never reports "not delivered" for a written frame,
# short of a reply lost in a Redis outage).
DEADLINE_MARGIN_SECONDS = 1.0

# XADD to a pod's inbox only while that pod is alive: a request to a dead pod fails at once instead
# of waiting out the timeout, and never lingers to be carried out by nobody.
_REQUEST = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return false
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return id
"""
_REQUEST_SHA = script_sha(_REQUEST)


class Inbox:
    """This pod's requests to others and its answers to theirs. `heard_from(connection, pod)` learns
    that `pod` watches (or is about to watch) `connection`."""

    def __init__(
        self, link: PodLink, writes: RespConnection, bus: BoundBus, heard_from: Callable[[str, str], None]
    ) -> None:
        self._link = link
        self._writes = writes
        self._bus = bus
        self._heard_from = heard_from
        # One task per request carried out for another pod (bounded by the inbox's READ_COUNT per
        # read times the requesters' deadlines); cancelled by `stop`.
        self._tasks = TaskSet("bus requests")
        # Requests waiting for their reply; each is removed when its `ask` returns, so at most one
        # per caller waiting (bounded by the callers' own timeouts).
        self._replies: dict[str, asyncio.Future[bool]] = {}

    async def ask(self, owner_pod: str, request: Fields, wait_s: float) -> bool:
        """Put a request in the owner's inbox and wait for its answer; False on any failure."""
        correlation = uuid.uuid4().hex
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._replies[correlation] = future
        # The owner starts no write after this: its answer must still find us waiting.
        deadline = now_ms() + int(max(wait_s / 2, wait_s - DEADLINE_MARGIN_SECONDS) * 1000)
        fields = {**request, "id": correlation, "from": self._link.pod_id, "dl": str(deadline)}
        what = f"{request['k']} for {request['cid']}"
        try:
            async with asyncio.timeout(wait_s):
                if await self.put(owner_pod, fields) is None:
                    log.info("%s not sent: pod %s is not alive", what, owner_pod)
                    return False
                return await future
        except TimeoutError:
            log.warning("%s: pod %s did not answer within %.1fs", what, owner_pod, wait_s)
            return False
        except REDIS_ERRORS as exc:
            log.warning("%s via Redis failed: %r", what, exc)
            return False
        finally:
            self._replies.pop(correlation, None)

    async def put(self, owner_pod: str, fields: Fields) -> str | None:
        """Append an entry to the owner's inbox; None when that pod is not alive."""
        keys = [self._link.keys.pod(owner_pod), self._link.keys.inbox(owner_pod)]
        args: list[str | int] = [INBOX_MAXLEN, int(INBOX_TTL_SECONDS * 1000)]
        for name, value in fields.items():
            args += [name, value]
        answer: str | None = await self._writes.script(_REQUEST_SHA, _REQUEST, keys, args)
        return answer

    async def stop(self) -> None:
        """Stopping: no more requests are carried out, and every one still waiting for its reply is
        answered "not delivered"."""
        await self._tasks.cancel()
        for future in self._replies.values():
            if not future.done():
                future.set_result(False)

    def on_entry(self, fields: Fields) -> None:
        kind = fields.get("k")
        if kind == "reply":
            future = self._replies.get(fields.get("id", ""))
            if future is not None and not future.done():
                future.set_result(fields.get("ok") == "1")
            return
        connection_id = fields.get("cid", "")
        requester = fields.get("from", "")
        # The sender watches (or is about to): publish to it without waiting for the cache to expire.
        self._heard_from(connection_id, requester)
        if kind == "watch":
            return
        if int(fields.get("dl", "0")) < now_ms():
            log.info("dropped a %s for %s from pod %s: past its deadline", kind, connection_id, requester)
            return  # the requester already answered its caller
        work = self._work(kind, connection_id, fields)
        if work is not None:
            # One task per request: a slow device must not hold up the others. Tasks start in inbox
            # order and the device socket's lock is fair, so frames to one device keep their order
            # (a frame is written at once in `_work` only while no write waits on that socket).
            self._tasks.spawn(self._answer(work, requester, fields.get("id", "")))

    def _work(self, kind: str | None, connection_id: str, fields: Fields) -> Awaitable[bool] | None:
        handler = self._bus.handler
        if kind == "send":
            text = fields.get("text", "")
            if handler.write_to_device_now(connection_id, text):
                # Written in this turn of the loop: only the reply waits for Redis.
                return _done(True)
            return handler.write_to_device(connection_id, text)
        if kind == "close":
            code = int(fields.get("code", "1000"))
            return handler.close_device(connection_id, code, fields.get("reason", ""))
        log.warning("unknown inbox entry kind %r", kind)
        return None

    async def _answer(self, work: Awaitable[bool], requester: str, correlation: str) -> None:
        try:
            ok = await work
        except Exception:
            log.exception("carrying out a request from pod %s failed", requester)
            ok = False
        inbox = self._link.keys.inbox(requester)
        reply = {"k": "reply", "id": correlation, "ok": "1" if ok else "0"}
        try:
            await self._writes.pipeline(
                [xadd(inbox, INBOX_MAXLEN, reply), ("PEXPIRE", inbox, int(INBOX_TTL_SECONDS * 1000))]
            )
        except REDIS_ERRORS as exc:
            log.warning("could not answer pod %s: %r", requester, exc)


async def _done(ok: bool) -> bool:
    return ok
