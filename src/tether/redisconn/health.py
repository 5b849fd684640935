"""The one failure guard: whether Redis has been answering one of its users lately, and what a
failed call does (mark Redis down, log once per outage, and raise or keep going as the caller says)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from redis.exceptions import RedisError

# What a Redis call raises when Redis is unreachable, restarting or refusing: redis-py and the lean
# connection both raise redis-py's types; a socket can still surface a bare OSError.
REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, OSError)


def describe(exc: BaseException) -> str:
    """An error for a log line: redis-py's own repr says only `network:ConnectionError`."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# Turns a Redis failure into the error the caller's own callers expect.
Unavailable = Callable[[Exception], Exception]


class RedisHealth:
    """Redis as one user (the live state, one stream reader of the bus) sees it.

    `on_back` runs when a call succeeds after a failure (or for the first time); `on_failure`
    after every failed call (whatever Redis held may be gone when it answers again)."""

    def __init__(
        self,
        who: str,
        log: logging.Logger,
        *,
        on_back: Callable[[], None] | None = None,
        on_failure: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.who = who
        self.up = False
        self.ok_at = 0.0
        self.failures = 0  # failed calls since start (tether_redis_errors_total)
        self._log = log
        self._on_back = on_back
        self._on_failure = on_failure
        self._clock = clock

    def ok(self) -> bool:
        """Record a successful call; True when Redis was down (or not yet seen) until now."""
        self.ok_at = self._clock()
        if self.up:
            return False
        if self._on_back is not None:
            self._on_back()
        self.up = True
        return True

    def failed(self, during: str, exc: BaseException) -> None:
        self.failures += 1
        if self.up:
            self._log.warning("%s: Redis unavailable during %s: %s", self.who, during, describe(exc))
        self.up = False
        if self._on_failure is not None:
            self._on_failure()

    def fresh(self, within_seconds: float) -> bool:
        """Up, and the last call succeeded within this long."""
        return self.up and self._clock() - self.ok_at < within_seconds

    @contextmanager
    def guard(self, during: str, unavailable: Unavailable | None = None) -> Iterator[None]:
        """Around Redis calls: success records `ok`, a Redis failure records `failed` and then raises
        `unavailable(exc)`, or (without it) ends the block quietly: the caller keeps what it could not
        write and writes it later."""
        try:
            yield
        except REDIS_ERRORS as exc:
            self.failed(during, exc)
            if unavailable is not None:
                raise unavailable(exc) from exc
            return
        self.ok()
