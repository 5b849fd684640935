"""Shared ephemeral state: which pod holds each lease's socket, heartbeats, live pods, dedupe claims.

In-process for one pod (`memory`), Redis for many (`redis`). Nothing here is durable: rows in the
store are, and heartbeats are flushed to them on a bounded interval by the node.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from tether.livestate.fleet import FleetNotes
from tether.protocol.presence import Liveness


class LiveStateUnavailable(Exception):
    """The shared state cannot be read right now (Redis down); nothing was written to any device.

    Reads (`lookup`, `live_pods`, `claim`, `claim_state`, `runtime_location`) raise it; writes that only
    refresh what this pod owns (`device_connected`, `device_disconnected`, `heartbeat`, `note_runtime`,
    `confirm`, `release`) never raise: the implementation keeps them and re-asserts them when it can.
    """


class LiveState(Protocol):
    fleet: FleetNotes  # connection history and pod stats, for the fleet API

    async def start(self) -> None: ...
    async def close(self) -> None: ...

    async def device_connected(self, connection_id: str, pod_id: str, now_ms: int) -> None: ...
    def heartbeat(self, connection_id: str, now_ms: int) -> None:
        """Record a ping. Never blocks and never does I/O inline: the hot path of every device."""
        ...

    async def device_disconnected(self, connection_id: str, pod_id: str) -> None: ...
    async def lookup(self, connection_ids: Iterable[str]) -> dict[str, Liveness]: ...
    async def revoke(self, connection_id: str) -> None:
        """The lease was replaced or deleted: other pods that still hold a link for it in memory
        must refuse it (`revoked`) instead of trusting the link. A pod marks its own links itself."""
        ...

    async def revoked(self, connection_id: str) -> bool:
        """Whether another pod revoked the lease within the lease TTL (no database read)."""
        ...

    async def live_pods(self) -> set[str]: ...
    async def claim(self, key: str) -> bool:
        """True for the first claimant of `key` within the dedupe window, across all pods."""
        ...

    async def confirm(self, key: str) -> None:
        """The claimant delivered `key`: a repeat is a duplicate from now on (until then it waits)."""
        ...

    async def claim_state(self, key: str) -> bool | None:
        """True: delivered; False: its claimant is still delivering; None: no claim (released or
        expired: the caller may claim it)."""
        ...

    async def release(self, key: str) -> None: ...
    def note_runtime(self, org_id: str, agent_id: str, conversation_id: str, connection_id: str) -> None:
        """Remember which connection last ran a conversation (the teleport source). Never blocks."""
        ...

    async def runtime_location(self, org_id: str, agent_id: str, conversation_id: str) -> str | None: ...
    def take_dirty(self) -> dict[str, int]:
        """Heartbeats of this pod's devices recorded since the last call (for the database flush)."""
        ...

    def take_lost(self) -> bool:
        """True once after the live state lost this pod's entries (a Redis restart, or a partition
        longer than the pod TTL): other pods may have cleared this pod's rows meanwhile, so the node
        writes its ready devices' rows again."""
        ...

    @property
    def healthy(self) -> bool: ...
