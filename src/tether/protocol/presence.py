"""When a device counts as online, and when its lease has expired.

The rule is the clients' own (`isEnvironmentOnline`): a lease with a live control socket whose last
heartbeat is younger than 120 s. Time is always passed in, in epoch milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Liveness:
    """A connected lease: which pod holds its socket, since when, and its freshest heartbeat."""

    pod_id: str
    connected_at: int
    last_heartbeat: int


def is_online(liveness: Liveness | None, now_ms: int, offline_after_ms: int, pod_alive: bool = True) -> bool:
    return liveness is not None and pod_alive and now_ms - liveness.last_heartbeat < offline_after_ms


def is_silent(last_heartbeat: int, now_ms: int, offline_after_ms: int) -> bool:
    """A socket that has not pinged within the online window is dead to clients: drop it."""
    return now_ms - last_heartbeat >= offline_after_ms


def lease_expired(last_activity_ms: int, now_ms: int, lease_ttl_ms: int) -> bool:
    """An unconnected lease with no activity for the TTL is gone; the device must re-register."""
    return now_ms - last_activity_ms > lease_ttl_ms
