"""Environments as REST sees them: register, list, get, delete, and the rows rendered with live state."""

from __future__ import annotations

import uuid
from typing import Any

from tether.bus.base import Bus
from tether.clock import now_ms
from tether.config import Settings
from tether.hub import Hub
from tether.livestate.base import LiveState
from tether.metrics import Counters
from tether.protocol import closes
from tether.protocol.fleetstate import history_event, slot_key
from tether.protocol.presence import Liveness, is_online
from tether.store.base import EnvironmentRow, ListQuery, Principal, Registration, Store


class Environments:
    def __init__(
        self, settings: Settings, store: Store, live: LiveState, hub: Hub, bus: Bus, counters: Counters
    ) -> None:
        self.settings = settings
        self.store = store
        self.live = live
        self.hub = hub
        self.bus = bus
        self.counters = counters
        self.offline_after_ms = int(settings.offline_after_seconds * 1000)

    async def register(self, principal: Principal, body: dict[str, Any], ws_base: str) -> dict[str, Any]:
        connection_id = f"conn-{uuid.uuid4().hex}"
        self.counters.registrations += 1
        try:
            result = await self.store.register(
                Registration(
                    org_id=principal.org_id,
                    user_id=principal.user_id,
                    device_id=body["deviceId"],
                    listener_instance_id=body.get("listenerInstanceId"),
                    connection_name=body["connectionName"],
                    metadata=body.get("metadata") or {},
                    connection_id=connection_id,
                    now_ms=now_ms(),
                )
            )
        except Exception:
            self.counters.registrations_failed += 1  # the database: the REST edge answers 503
            raise
        row = result.row
        self.live.fleet.note_history(
            slot_key(row.org_id, row.device_id, row.listener_instance_id),
            history_event(row.last_seen_at, "registered", self.settings.pod_id),
        )
        previous = result.previous_connection_id
        if previous is not None:
            self.counters.registrations_replacing += 1
            # A newer registration took the slot: the old process must stop (device-protocol §4.2).
            await self._end_lease(previous, closes.REPLACED, closes.REPLACED_REASON)
        split = self.settings.split_channels
        return {
            "connectionId": connection_id,
            "wsUrl": f"{ws_base}/v1/environments/ws/{connection_id}",
            "supportsSplitStatusChannels": split,
            "supportsPairedListenerGenerations": split,
        }

    async def delete(self, org_id: str, environment_id: str) -> bool:
        """Forget a row; a device still connected with its lease is told to re-register (1008)."""
        row = await self.store.delete_environment(org_id, environment_id)
        if row is None:
            return False
        self.live.fleet.note_history(
            slot_key(row.org_id, row.device_id, row.listener_instance_id),
            history_event(now_ms(), "forgotten", self.settings.pod_id),
        )
        if row.connection_id is not None:
            await self._end_lease(row.connection_id, closes.LEASE_UNKNOWN, "environment deleted")
        return True

    async def _end_lease(self, connection_id: str, code: int, reason: str) -> None:
        """No pod may let this lease in again from memory, and the pod holding it closes it."""
        link = self.hub.device(connection_id)
        if link is not None:
            link.lease.revoke()
        await self.live.revoke(connection_id)
        owner = (await self.live.lookup([connection_id])).get(connection_id)
        if owner is not None:
            await self.bus.close_device(connection_id, owner.pod_id, code, reason)

    async def in_org(self, principal: Principal, connection_id: str) -> EnvironmentRow | None:
        """The row holding `connection_id`, if it belongs to the caller's organization."""
        row = await self.store.get_by_connection(connection_id)
        if row is None or row.org_id != principal.org_id:
            return None
        return row

    async def as_json(self, rows: list[EnvironmentRow]) -> list[dict[str, Any]]:
        leases = [r.connection_id for r in rows if r.connection_id]
        live = await self.live.lookup(leases) if leases else {}
        pods = await self.live.live_pods() if live else set()
        now = now_ms()
        return [self._row_json(row, live.get(row.connection_id or ""), pods, now) for row in rows]

    def _row_json(
        self, row: EnvironmentRow, live: Liveness | None, pods: set[str], now: int
    ) -> dict[str, Any]:
        online = is_online(live, now, self.offline_after_ms, live is not None and live.pod_id in pods)
        last_heartbeat = live.last_heartbeat if live is not None else row.last_heartbeat
        last_seen = max(row.last_seen_at, last_heartbeat or 0)
        return {
            "id": row.id,
            "connectionId": row.connection_id if online else None,
            "connectionName": row.connection_name,
            "deviceId": row.device_id,
            "listenerInstanceId": row.listener_instance_id,
            "organizationId": row.org_id,
            "userId": row.user_id,
            "apiKeyOwner": row.api_key_owner,
            "podId": live.pod_id if online and live else None,
            "connectedAt": live.connected_at if online and live else None,
            "lastHeartbeat": last_heartbeat,
            "lastSeenAt": last_seen,
            "firstSeenAt": row.first_seen_at,
            "currentMode": row.current_mode,
            "metadata": row.metadata,
        }

    async def page(
        self, org_id: str, limit: int, after: str | None, user_id: str | None, online_only: bool
    ) -> tuple[list[dict[str, Any]], bool]:
        if not online_only:
            rows = await self.store.list_environments(ListQuery(org_id, limit + 1, after, user_id))
            rendered = await self.as_json(rows[:limit])
            return rendered, len(rows) > limit
        # Rows a pod claims are candidates; the exact online rule (heartbeat age, pod alive) is
        # applied here, fetching further batches when some candidates turn out stale.
        found: list[dict[str, Any]] = []
        cursor = after
        while len(found) <= limit:
            batch = await self.store.list_environments(
                ListQuery(org_id, limit + 1, cursor, user_id, only_connected=True)
            )
            if not batch:
                break
            found.extend(r for r in await self.as_json(batch) if r["connectionId"] is not None)
            cursor = batch[-1].id
            if len(batch) <= limit:
                break
        return found[:limit], len(found) > limit

    async def get(self, org_id: str, device_id: str) -> dict[str, Any] | None:
        rows = await self.store.get_by_device(org_id, device_id)
        if not rows:
            return None
        rendered = await self.as_json(rows)
        # Several listener slots may share a device: prefer the online one with the freshest heartbeat.
        return max(
            rendered,
            key=lambda r: (r["connectionId"] is not None, r["lastHeartbeat"] or 0, r["lastSeenAt"]),
        )
