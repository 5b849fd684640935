"""Start-up waits until Redis answers: a pod without it cannot route anything."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from tether.redisconn.backoff import Backoff
from tether.redisconn.cancel import cancel_requested_since, cancels_pending
from tether.redisconn.health import REDIS_ERRORS, describe

log = logging.getLogger("tether.redisconn")

# While waiting, say so at once and then this often (each attempt is 0.1-1 s apart: one line per
# attempt would flood the log of a pod whose Redis is down for minutes).
WAITING_LOG_SECONDS = 5.0


async def wait_for_redis(
    ping: Callable[[], Awaitable[object]],
    shown_url: str,
    what: str,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Ping until Redis answers, logging what waits, for which Redis (`shown_url`: no password) and
    for how long so far.

    A cancellation ends the wait at once (the pod is being stopped): it is never caught here, and one
    that redis-py's connect swallowed (see `cancel.stop_tasks`) is raised again after the attempt."""
    started = clock()
    cancels_before = cancels_pending()
    backoff = Backoff()
    logged_at: float | None = None
    while True:
        error: Exception | None = None
        try:
            await ping()
        except REDIS_ERRORS as exc:
            error = exc
        if cancel_requested_since(cancels_before):
            raise asyncio.CancelledError
        if error is None:
            if logged_at is not None:
                log.info("%s: Redis at %s answers after %.1fs", what, shown_url, clock() - started)
            return
        now = clock()
        if logged_at is None or now - logged_at >= WAITING_LOG_SECONDS:
            log.warning(
                "%s: waiting for Redis at %s for %.1fs so far (%s)",
                what,
                shown_url,
                now - started,
                describe(error),
            )
            logged_at = now
        await backoff.sleep()
