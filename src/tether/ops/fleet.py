"""The fleet API's operations (issue 15): the listing with state, one environment with its history,
the frame trace, disconnect and mode change, pods and teleports. README "Fleet API and roles".

A state-dependent listing never loads the fleet: the store answers search, counts and pages in SQL,
and only the rows that may be other than offline (claimed by a pod, or held by one) are read from
live state, at most `MAX_CANDIDATES` of them per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tether.bus.base import Bus
from tether.clock import now_ms
from tether.config import Settings
from tether.hub import Hub
from tether.livestate.base import LiveState
from tether.ops.podstats import Held, PodStats
from tether.protocol import closes
from tether.protocol.fleetstate import (
    CONNECTING,
    OFFLINE,
    ONLINE,
    STATE_RANK,
    STATES,
    env_state,
    slot_key,
)
from tether.protocol.frames import encode
from tether.protocol.presence import Liveness
from tether.protocol.trace import Trace
from tether.store.base import EnvironmentRow, FleetFilter, FleetKey, Store

# Rows a listing reads live state for (those a pod claims or holds); beyond, they read offline.
MAX_CANDIDATES = 50_000
PERMISSION_MODES = ("standard", "acceptEdits", "unrestricted", "strict")
LEGACY_MODES = {"default": "standard", "bypassPermissions": "unrestricted", "fullAccess": "unrestricted"}


class FleetError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True, slots=True)
class ListRequest:
    filter: FleetFilter
    states: frozenset[str]
    sort: str
    desc: bool
    offset: int
    limit: int


@dataclass(slots=True)
class Overlay:
    """What live state and the pods say of the rows that may not be offline."""

    live: dict[str, Liveness]
    pods: set[str]
    held: dict[str, Held]
    relays: dict[str, int]
    now: int


class Fleet:
    def __init__(
        self, settings: Settings, store: Store, live: LiveState, hub: Hub, bus: Bus, stats: PodStats
    ) -> None:
        self.settings = settings
        self.store = store
        self.live = live
        self.hub = hub
        self.bus = bus
        self.stats = stats
        self.offline_after_ms = int(settings.offline_after_seconds * 1000)

    # ---- state ---------------------------------------------------------------------------

    async def _pods_view(self) -> tuple[set[str], dict[str, Held], dict[str, int]]:
        """Live pods, and what each says of the leases it holds and the relays it serves (this
        pod's own, exact and current; the others' as last published)."""
        pods = await self.live.live_pods()
        held: dict[str, Held] = {}
        relays: dict[str, int] = {}
        others = await self.live.fleet.pod_stats(pods - {self.stats.pod_id})
        for pod_id, stats in others.items():
            for conn, (hint, pending) in (stats.get("held") or {}).items():
                held[conn] = Held(hint, bool(pending), pod_id)
            for conn, n in (stats.get("relays") or {}).items():
                relays[conn] = relays.get(conn, 0) + int(n)
        held.update(self.stats.held())
        for conn, n in self.stats.relays().items():
            relays[conn] = relays.get(conn, 0) + n
        return pods, held, relays

    async def _overlay(
        self, connection_ids: list[str], pods_view: tuple[set[str], dict[str, Held], dict[str, int]]
    ) -> Overlay:
        pods, held, relays = pods_view
        live = await self.live.lookup(connection_ids) if connection_ids else {}
        return Overlay(live, pods, held, relays, now_ms())

    def _state(self, connection_id: str | None, o: Overlay) -> str:
        if connection_id is None:
            return OFFLINE
        live = o.live.get(connection_id)
        held = o.held.get(connection_id)
        pod_alive = live is not None and live.pod_id in o.pods
        return env_state(live, pod_alive, o.now, self.offline_after_ms, held.hint if held else None)

    # ---- listing -------------------------------------------------------------------------

    async def page(self, req: ListRequest) -> dict[str, Any]:
        view = await self._pods_view()
        candidates = await self.store.fleet_candidates(req.filter, list(view[1]), MAX_CANDIDATES)
        overlay = await self._overlay([c.connection_id for c in candidates if c.connection_id], view)
        states = {c.id: self._state(c.connection_id, overlay) for c in candidates}
        total_all = await self.store.fleet_count(req.filter)
        counts = dict.fromkeys(STATES, 0)
        for state in states.values():
            counts[state] += 1
        counts[OFFLINE] = max(0, total_all - sum(counts[s] for s in STATES if s != OFFLINE))
        total = sum(counts[s] for s in req.states)
        rows = await self._rows(req, candidates, states)
        return {
            "items": [self._row_json(r, overlay) for r in rows],
            "total": total,
            "offset": req.offset,
            "limit": req.limit,
            "hasNextPage": req.offset + len(rows) < total,
            "counts": counts,
            "asOf": overlay.now,
        }

    async def _rows(
        self, req: ListRequest, candidates: list[FleetKey], states: dict[str, str]
    ) -> list[EnvironmentRow]:
        f, offset, limit = req.filter, req.offset, req.limit
        if OFFLINE not in req.states:
            # Only rows that may be other than offline: sorted here, on their keys, bounded.
            chosen = [c for c in candidates if states[c.id] in req.states]
            chosen.sort(key=lambda c: _sort_key(c, req.sort, states), reverse=req.desc)
            if req.desc:  # NULLs last in either direction, as in SQL
                chosen = [c for c in chosen if not _sort_key(c, req.sort, states)[0]] + [
                    c for c in chosen if _sort_key(c, req.sort, states)[0]
                ]
            return await self.store.environments_by_ids(
                f.org_id, [c.id for c in chosen[offset : offset + limit]]
            )
        if req.sort != "state":
            excluded = [i for i, s in states.items() if s not in req.states]
            return await self.store.fleet_page(f, req.sort, req.desc, offset, limit, excluded)
        # sort=state with offline rows asked for: the non-offline rows in memory, then the offline
        # ones from SQL (oldest first); descending is the same sequence reversed.
        live_rows = [c for c in candidates if states[c.id] != OFFLINE and states[c.id] in req.states]
        live_rows.sort(key=lambda c: _sort_key(c, "state", states))
        not_offline = [i for i, s in states.items() if s != OFFLINE]
        offline_total = await self.store.fleet_count(f) - len(not_offline)
        n_live = len(live_rows)
        if req.desc:
            live_rows.reverse()
            head = await self.store.fleet_page(f, "firstSeenAt", True, offset, limit, not_offline)
            rest = limit - len(head)
            tail_start = max(0, offset - offline_total)
            tail_ids = [c.id for c in live_rows[tail_start : tail_start + rest]] if rest > 0 else []
            return head + await self.store.environments_by_ids(f.org_id, tail_ids)
        head_ids = [c.id for c in live_rows[offset : offset + limit]]
        head = await self.store.environments_by_ids(f.org_id, head_ids)
        rest = limit - len(head)
        if rest <= 0:
            return head
        tail = await self.store.fleet_page(
            f, "firstSeenAt", False, max(0, offset - n_live), rest, not_offline
        )
        return head + tail

    def _row_json(self, row: EnvironmentRow, o: Overlay) -> dict[str, Any]:
        conn = row.connection_id
        state = self._state(conn, o)
        live = o.live.get(conn) if conn else None
        held = o.held.get(conn) if conn else None
        heartbeat = live.last_heartbeat if live is not None else row.last_heartbeat
        meta = row.metadata
        pod = live.pod_id if state == ONLINE and live else held.pod_id if held and state != OFFLINE else None
        return {
            "id": row.id,
            "deviceId": row.device_id,
            "connectionId": conn,
            "connectionName": row.connection_name,
            "userId": row.user_id,
            "state": state,
            "heartbeatAgeMs": max(0, o.now - heartbeat) if heartbeat else None,
            "os": _text(meta.get("os")),
            "lettaCodeVersion": _text(meta.get("lettaCodeVersion")),
            "workingDirectory": _text(meta.get("workingDirectory")),
            "gitBranch": _text(meta.get("gitBranch")),
            "permissionMode": _text(meta.get("permissionMode")) or row.current_mode,
            "podId": pod,
            "connectedAt": live.connected_at if state == ONLINE and live else None,
            "firstSeenAt": row.first_seen_at,
            "lastSeenAt": max(row.last_seen_at, heartbeat or 0),
            "relaySockets": o.relays.get(conn, 0) if conn else 0,
            "pendingApproval": bool(held and held.pending_approval),
        }

    # ---- one environment -----------------------------------------------------------------

    async def row(self, org_id: str, environment_id: str) -> EnvironmentRow:
        row = await self.store.get_environment(org_id, environment_id)
        if row is None:
            raise FleetError(
                404, "ENVIRONMENT_NOT_FOUND", f"no environment {environment_id!r} in this organization"
            )
        return row

    async def detail(self, org_id: str, environment_id: str) -> dict[str, Any]:
        row = await self.row(org_id, environment_id)
        view = await self._pods_view()
        overlay = await self._overlay([row.connection_id] if row.connection_id else [], view)
        out = self._row_json(row, overlay)
        out["metadata"] = row.metadata
        out["history"] = await self.live.fleet.history(
            slot_key(row.org_id, row.device_id, row.listener_instance_id)
        )
        return out

    def trace(self, row: EnvironmentRow, after: int, contents: bool) -> dict[str, Any]:
        """Arm (or keep armed) the trace of a device held here and return what it recorded since
        `after`. A device held by another pod is traced there: this pod answers tracing false."""
        link = self.hub.device(row.connection_id) if row.connection_id else None
        if link is None:
            return {"frames": [], "next": after, "tracing": False}
        now = now_ms()
        trace = link.trace
        if trace is None or not trace.armed(now):
            trace = link.trace = Trace()
        trace.arm(now, contents)
        watch = self.hub.watch_of(link.connection_id)
        if watch is not None:
            watch.trace = trace
        frames = trace.since(after, contents)
        return {"frames": frames, "next": frames[-1]["seq"] if frames else max(after, 0), "tracing": True}

    # ---- actions -------------------------------------------------------------------------

    async def _connected(self, row: EnvironmentRow) -> str:
        conn = row.connection_id
        if conn is not None:
            view = await self._pods_view()
            state = self._state(conn, await self._overlay([conn], view))
            if state in (ONLINE, CONNECTING):
                return conn
        raise FleetError(409, "NOT_CONNECTED", "no socket holds this environment's lease")

    async def disconnect(self, row: EnvironmentRow) -> None:
        """A transient close: the device reconnects to the same lease (not 1008, not "Replaced")."""
        conn = await self._connected(row)
        code, reason = closes.OPERATOR_DISCONNECT, "disconnected by an operator"
        link = self.hub.device(conn)
        if link is not None and link.lease.sockets():
            await self.hub.close_device(conn, code, reason)
            return
        owner = (await self.live.lookup([conn])).get(conn)
        if owner is None or not await self.bus.close_device(conn, owner.pod_id, code, reason):
            raise FleetError(409, "NOT_CONNECTED", "no socket holds this environment's lease")

    async def change_mode(self, row: EnvironmentRow, body: dict[str, Any]) -> None:
        mode = body.get("mode")
        if not isinstance(mode, str) or LEGACY_MODES.get(mode, mode) not in PERMISSION_MODES:
            raise FleetError(400, "INVALID_MODE", f"mode must be one of {', '.join(PERMISSION_MODES)}")
        agent_id, conversation_id = body.get("agentId"), body.get("conversationId")
        for name, value in (("agentId", agent_id), ("conversationId", conversation_id)):
            if value is not None and (not isinstance(value, str) or not value):
                raise FleetError(400, "INVALID_BODY", f"{name} must be a non-empty string")
        conn = await self._connected(row)
        frame = encode(
            {
                "type": "change_device_state",
                "runtime": {"agent_id": agent_id, "conversation_id": conversation_id or "default"},
                "payload": {"mode": mode},
            }
        )
        if not await self.hub.send_to_device(conn, frame):
            raise FleetError(409, "NOT_CONNECTED", "the device did not take the command")

    # ---- cluster and teleports -----------------------------------------------------------

    async def pods(self) -> list[dict[str, Any]]:
        pods = await self.live.live_pods()
        stats = await self.live.fleet.pod_stats(pods - {self.stats.pod_id})
        if not self.stats.last:
            await self.stats.publish()
        stats[self.stats.pod_id] = self.stats.last
        now = now_ms()
        out = []
        for pod_id in sorted(stats):
            s = {k: v for k, v in stats[pod_id].items() if k not in ("held", "relays", "at")}
            s["uptimeSeconds"] = round(max(0, now - int(s.get("startedAt") or now)) / 1000, 1)
            s["self"] = pod_id == self.stats.pod_id
            out.append(s)
        return out


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _sort_key(c: FleetKey, sort: str, states: dict[str, str]) -> tuple[Any, ...]:
    """In-memory order of candidate rows, as SQL would order them (NULLs last, then id)."""
    value: Any
    if sort == "state":
        return (STATE_RANK[states[c.id]], c.first_seen_at, c.id)
    if sort == "name":
        value = c.name.lower()
    elif sort == "heartbeat":
        value = -c.last_heartbeat if c.last_heartbeat is not None else None
    elif sort == "connectedAt":
        value = c.connected_at
    elif sort == "version":
        value = c.version
    elif sort == "pod":
        value = c.pod_id
    else:
        value = c.first_seen_at
    return (value is None, value if value is not None else 0, c.id)
