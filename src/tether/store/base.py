"""The storage interface: environments, teleports, organizations, users and API keys.

Rows hold what must survive a restart. Liveness (heartbeats, which socket is where) lives in
`tether.livestate` and is only flushed here on a bounded interval, so a ping never costs a write.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class StoreError(Exception):
    """Base class for storage failures a caller can act on."""


class SchemaTooNew(StoreError):
    """The database was migrated by a newer Tether than this one."""


class UnknownCursor(StoreError):
    """`after` named a row the caller cannot see."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: resolved from an API key."""

    key_id: str
    org_id: str
    user_id: str
    role: str = "member"  # protocol/roles.py


@dataclass(frozen=True, slots=True)
class ApiKeyInfo:
    key_id: str
    name: str
    org_id: str
    org_name: str
    user_id: str
    user_name: str
    created_at: int
    revoked_at: int | None
    role: str = "member"


@dataclass(slots=True)
class EnvironmentRow:
    id: str
    org_id: str
    device_id: str
    listener_instance_id: str | None
    connection_name: str
    metadata: dict[str, Any]
    user_id: str | None
    api_key_owner: str | None
    current_mode: str | None
    first_seen_at: int
    last_seen_at: int
    connection_id: str | None  # the current lease, whether or not a socket holds it
    lease_issued_at: int | None
    connected_at: int | None
    pod_id: str | None
    last_heartbeat: int | None


@dataclass(frozen=True, slots=True)
class Registration:
    org_id: str
    user_id: str
    device_id: str
    listener_instance_id: str | None
    connection_name: str
    metadata: dict[str, Any]
    connection_id: str
    now_ms: int


@dataclass(frozen=True, slots=True)
class RegisterResult:
    row: EnvironmentRow
    previous_connection_id: str | None


@dataclass(frozen=True, slots=True)
class ListQuery:
    org_id: str
    limit: int
    after: str | None = None
    user_id: str | None = None
    only_connected: bool = False  # coarse SQL filter; the caller applies the exact online rule


@dataclass(frozen=True, slots=True)
class FleetFilter:
    org_id: str
    q: str | None = None
    user_id: str | None = None


@dataclass(frozen=True, slots=True)
class FleetKey:
    """A row's identity and sort keys: what a state-dependent page is sorted on in memory."""

    id: str
    connection_id: str | None
    pod_id: str | None
    name: str
    first_seen_at: int
    last_heartbeat: int | None
    connected_at: int | None
    version: str | None


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    current_mode: str | None = None
    set_mode: bool = False
    metadata_patch: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PresenceChange:
    """A lease's socket came up (connected) or went down on `pod_id`, at `at_ms`."""

    connection_id: str
    pod_id: str
    connected: bool
    at_ms: int


@dataclass(frozen=True, slots=True)
class Heartbeat:
    connection_id: str
    last_heartbeat: int


@dataclass(slots=True)
class TeleportRow:
    id: str
    org_id: str
    agent_id: str
    conversation_id: str
    source_connection_id: str
    target_connection_id: str
    target_device_id: str
    target_connection_name: str
    status: str
    error: str | None
    idempotency_key: str | None
    created_at: int
    updated_at: int


class Store(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None: ...

    # keys, organizations, users
    async def create_key(
        self, org_name: str, user_name: str, key_name: str, now_ms: int, role: str = "member"
    ) -> str: ...
    async def create_first_key(self, org_name: str, user_name: str, key_name: str, now_ms: int) -> str | None:
        """Create a key only if the database holds none (atomic across pods); None when one exists."""
        ...

    async def list_keys(self) -> list[ApiKeyInfo]: ...
    async def revoke_key(self, key_id: str, now_ms: int) -> bool: ...
    async def count_keys(self) -> int: ...
    async def authenticate(self, secret: str) -> Principal | None: ...

    # environments
    async def register(self, reg: Registration) -> RegisterResult: ...
    async def list_environments(self, query: ListQuery) -> list[EnvironmentRow]: ...
    async def get_by_device(self, org_id: str, device_id: str) -> list[EnvironmentRow]: ...
    async def get_by_connection(self, connection_id: str) -> EnvironmentRow | None: ...
    async def delete_environment(self, org_id: str, environment_id: str) -> EnvironmentRow | None: ...
    async def mark_connected(self, connection_id: str, pod_id: str, now_ms: int) -> None: ...
    async def mark_disconnected(self, connection_id: str, pod_id: str, now_ms: int) -> None: ...
    async def write_presence(self, changes: Sequence[PresenceChange]) -> None:
        """Apply many presence changes in one transaction (at most one per connection)."""
        ...

    async def flush_heartbeats(self, beats: Sequence[Heartbeat]) -> None: ...
    async def update_status(self, connection_id: str, update: StatusUpdate, now_ms: int) -> None: ...
    async def clear_dead_pods(self, live_pods: set[str], now_ms: int) -> int: ...
    async def reclaim(self, pod_id: str, connection_ids: Sequence[str], now_ms: int) -> int:
        """Mark these connections connected on `pod_id` where another pod cleared them (pod_id
        null) while this pod's liveness had lapsed; rows already claimed are left alone."""
        ...

    # the fleet API (store/fleet.py)
    async def principal_names(self, org_id: str, user_id: str) -> tuple[str | None, str | None]: ...
    async def fleet_count(self, f: FleetFilter) -> int: ...
    async def fleet_candidates(
        self, f: FleetFilter, connection_ids: Sequence[str], limit: int
    ) -> list[FleetKey]: ...
    async def fleet_page(
        self, f: FleetFilter, sort: str, desc: bool, offset: int, limit: int, exclude: Sequence[str]
    ) -> list[EnvironmentRow]: ...
    async def environments_by_ids(self, org_id: str, ids: Sequence[str]) -> list[EnvironmentRow]: ...
    async def get_environment(self, org_id: str, environment_id: str) -> EnvironmentRow | None: ...
    async def list_teleports(self, org_id: str, limit: int) -> list[TeleportRow]: ...

    # teleports
    async def create_teleport(self, row: TeleportRow) -> TeleportRow: ...
    async def get_teleport(self, org_id: str, teleport_id: str) -> TeleportRow | None: ...
    async def find_teleport_by_key(self, org_id: str, idempotency_key: str) -> TeleportRow | None: ...
    async def update_teleport(
        self, teleport_id: str, status: str, error: str | None, now_ms: int
    ) -> None: ...

    # gateway mode
    async def ensure_principal(self, org_name: str, user_name: str, key_id: str, now_ms: int) -> Principal:
        """The principal of a credential Tether does not issue (upstream keys), created on first use."""
        ...

    async def upstream_actor(self, org_id: str, user_id: str) -> tuple[str, str | None] | None: ...
    async def save_upstream_actor(
        self, org_id: str, user_id: str, letta_org_id: str, letta_user_id: str, now_ms: int, replace: bool
    ) -> tuple[str, str]: ...
