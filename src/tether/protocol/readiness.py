"""Whether a dependency is answering, from the calls a pod makes to it: a pure tracker for /readyz.

A restart shows as errors, which the callers see at once. A partition shows as nothing at all: calls
go out and no answer comes back, and no error arrives until some timeout, seconds later (Centrifugo
#1189: health stayed green while nothing was delivered). So each call is noted when it begins, with
how long it may take by design (a blocking read's own wait), and a call still waiting past that
allowance plus `stall_after` means the dependency is not answering now. The current time is passed
in, so the rule is tested without sockets or sleeps.
"""

from __future__ import annotations

import itertools


class CallWatch:
    """The calls in flight on one connection, and the outcome of the last one that ended.

    Calls on one connection share one allowance, so the oldest waiting call is the first one noted
    (a dict keeps insertion order): `problem` is O(1). Bounded by the calls in flight, which the
    connection bounds (`resp.MAX_PENDING`)."""

    def __init__(self, stall_after: float, may_wait: float = 0.0) -> None:
        self.stall_after = stall_after
        self.may_wait = may_wait  # how long a call may wait by design (a blocking read's BLOCK)
        self.answered_at: float | None = None
        self.failures = 0
        self.last_failed = False
        self._waiting: dict[int, float] = {}  # token -> when the call began
        self._tokens = itertools.count()

    def began(self, now: float) -> int:
        token = next(self._tokens)
        self._waiting[token] = now
        return token

    def answered(self, token: int, now: float) -> None:
        """The dependency answered (an error reply from it counts: it is there)."""
        if self._waiting.pop(token, None) is not None:
            self.answered_at = now
            self.last_failed = False

    def failed(self, token: int) -> None:
        """The call failed for want of the dependency (connection lost, refused, timed out)."""
        if self._waiting.pop(token, None) is not None:
            self.failures += 1
            self.last_failed = True

    def abandoned(self, token: int) -> None:
        """The caller gave up (cancelled): says nothing about the dependency."""
        self._waiting.pop(token, None)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def problem(self, now: float) -> str | None:
        """Why the dependency is not answering now, or None: a call waiting past its allowance."""
        oldest = next(iter(self._waiting.values()), None)
        if oldest is None:
            return None
        waited = now - oldest
        if waited > self.may_wait + self.stall_after:
            return f"no answer for {waited:.1f} s"
        return None
