"""The fleet listing in SQL: search, counts, sort and paging of one organization's environments.

A row's state is not in the database (it is live state's and the holding pod's); the store answers
the parts SQL can (`q`, `userId`, the sort orders, counts, pages that include or exclude given rows)
and `ops/fleet.py` overlays the state on the few rows that may be other than offline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from tether.store.base import EnvironmentRow, FleetFilter, FleetKey, TeleportRow
from tether.store.rows import environment_row, storable, teleport_row
from tether.store.tables import environments, teleports

t = environments
# Metadata fields `q` searches besides the name and deviceId.
_SEARCHED_METADATA = ("workingDirectory", "gitBranch", "os", "lettaCodeVersion")
SORTS = ("name", "state", "heartbeat", "connectedAt", "firstSeenAt", "version", "pod")


def _version() -> sa.ColumnElement[str]:
    version: sa.ColumnElement[str] = t.c.metadata["lettaCodeVersion"].as_string()
    return version


def _conditions(f: FleetFilter) -> list[sa.ColumnElement[bool]]:
    conds: list[sa.ColumnElement[bool]] = [t.c.org_id == f.org_id]
    if f.user_id is not None:
        conds.append(t.c.user_id == f.user_id)
    if f.q:
        needle = f.q.lower()
        fields: list[sa.ColumnElement[str]] = [t.c.connection_name, t.c.device_id]
        fields += [t.c.metadata[key].as_string() for key in _SEARCHED_METADATA]
        conds.append(sa.or_(*(sa.func.lower(c).contains(needle, autoescape=True) for c in fields)))
    return conds


def _order(sort: str, desc: bool) -> list[sa.ColumnElement[Any]]:
    """NULLs last in either direction, ties broken by id (a stable page order on every backend)."""
    column: sa.ColumnElement[Any]
    if sort == "name":
        column = sa.func.lower(t.c.connection_name)
    elif sort == "heartbeat":
        # Heartbeat age ascending is the freshest heartbeat first.
        column, desc = t.c.last_heartbeat, not desc
    elif sort == "connectedAt":
        column = t.c.connected_at
    elif sort == "version":
        column = _version()
    elif sort == "pod":
        column = t.c.pod_id
    else:
        column = t.c.first_seen_at
    return [column.is_(None), column.desc() if desc else column.asc(), t.c.id.desc() if desc else t.c.id]


def _ids(values: Sequence[str]) -> sa.BindParameter[list[str]]:
    # Rendered into the statement: thousands of ids stay under both backends' parameter limits.
    return sa.bindparam("ids", list(values), expanding=True, literal_execute=True)


class FleetSql:
    engine: AsyncEngine

    async def fleet_count(self, f: FleetFilter) -> int:
        if not _storable_filter(f):
            return 0
        q = sa.select(sa.func.count()).select_from(t).where(*_conditions(f))
        async with self.engine.connect() as conn:
            return int((await conn.execute(q)).scalar() or 0)

    async def fleet_candidates(
        self, f: FleetFilter, connection_ids: Sequence[str], limit: int
    ) -> list[FleetKey]:
        """Rows that may be other than offline: a pod claims them, or a pod holds their lease."""
        if not _storable_filter(f):
            return []
        maybe: sa.ColumnElement[bool] = t.c.pod_id.is_not(None)
        ids = [c for c in connection_ids if storable(c)]
        if ids:
            maybe = sa.or_(maybe, t.c.connection_id.in_(_ids(ids)))
        q = (
            sa.select(
                t.c.id,
                t.c.connection_id,
                t.c.pod_id,
                t.c.connection_name,
                t.c.first_seen_at,
                t.c.last_heartbeat,
                t.c.connected_at,
                _version().label("version"),
            )
            .where(*_conditions(f), maybe)
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(q)).all()
        return [
            FleetKey(
                r.id,
                r.connection_id,
                r.pod_id,
                r.connection_name,
                r.first_seen_at,
                r.last_heartbeat,
                r.connected_at,
                r.version,
            )
            for r in rows
        ]

    async def fleet_page(
        self, f: FleetFilter, sort: str, desc: bool, offset: int, limit: int, exclude: Sequence[str]
    ) -> list[EnvironmentRow]:
        """One page in SQL order, leaving out the rows `exclude` names (their state is not asked for)."""
        if not _storable_filter(f) or limit <= 0:
            return []
        conds = _conditions(f)
        if exclude:
            conds.append(t.c.id.not_in(_ids(exclude)))
        q = sa.select(t).where(*conds).order_by(*_order(sort, desc)).offset(offset).limit(limit)
        async with self.engine.connect() as conn:
            return [environment_row(r) for r in (await conn.execute(q)).mappings().all()]

    async def environments_by_ids(self, org_id: str, ids: Sequence[str]) -> list[EnvironmentRow]:
        wanted = [i for i in ids if storable(i)]
        if not wanted:
            return []
        q = sa.select(t).where(t.c.org_id == org_id, t.c.id.in_(_ids(wanted)))
        async with self.engine.connect() as conn:
            rows = {r["id"]: environment_row(r) for r in (await conn.execute(q)).mappings().all()}
        return [rows[i] for i in wanted if i in rows]

    async def get_environment(self, org_id: str, environment_id: str) -> EnvironmentRow | None:
        found = await self.environments_by_ids(org_id, [environment_id])
        return found[0] if found else None

    async def list_teleports(self, org_id: str, limit: int) -> list[TeleportRow]:
        q = (
            sa.select(teleports)
            .where(teleports.c.org_id == org_id)
            .order_by(teleports.c.created_at.desc(), teleports.c.id.desc())
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            return [teleport_row(r) for r in (await conn.execute(q)).mappings().all()]


def _storable_filter(f: FleetFilter) -> bool:
    return all(storable(v) for v in (f.q or "", f.user_id or ""))
