"""Ending tasks that may be inside redis-py when they are cancelled."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("tether.redisconn")

# How long to wait for cancelled tasks before cancelling again the ones still running.
RECANCEL_SECONDS = 0.1


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel and await tasks, cancelling again while one still runs.

    On Python 3.11, `asyncio.wait_for` (used by redis-py to connect) drops a cancellation that
    arrives just as the connection completes, so a single `cancel()` may be lost.
    """
    tasks = list(tasks)
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_SECONDS)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            log.warning("background task %s ended with %r", task.get_name(), task.exception())


def cancel_requested_since(cancels_before: int) -> bool:
    """Whether the running task was asked to stop since it had `cancels_before` requests pending:
    true even when redis-py's `wait_for` swallowed the CancelledError itself (see `stop_tasks`)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > cancels_before


def cancels_pending() -> int:
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0
