"""What the store's query modules share: row conversion, ids, and values that cannot be stored."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa

from tether.store.base import EnvironmentRow, TeleportRow
from tether.store.tables import environments, teleports

# `select(environments)` yields the columns in EnvironmentRow's field order: rows convert by position
# (the list endpoint converts hundreds per call). Checked here, so a new column cannot shift them.
if [c.name for c in environments.columns] != [f.name for f in dataclasses.fields(EnvironmentRow)]:
    raise RuntimeError("environments columns and EnvironmentRow fields differ in name or order")


def storable(text: str) -> bool:
    """Whether `text` can be stored at all: PostgreSQL text cannot hold NUL, so no row has one.

    Lookups by such a value answer "not found" instead of sending it to the database, which would fail.
    """
    return "\x00" not in text


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def environment_row(m: sa.RowMapping) -> EnvironmentRow:
    return EnvironmentRow(
        id=m["id"],
        org_id=m["org_id"],
        device_id=m["device_id"],
        listener_instance_id=m["listener_instance_id"] or None,
        connection_name=m["connection_name"],
        metadata=dict(m["metadata"] or {}),
        user_id=m["user_id"],
        api_key_owner=m["api_key_owner"],
        current_mode=m["current_mode"],
        first_seen_at=m["first_seen_at"],
        last_seen_at=m["last_seen_at"],
        connection_id=m["connection_id"],
        lease_issued_at=m["lease_issued_at"],
        connected_at=m["connected_at"],
        pod_id=m["pod_id"],
        last_heartbeat=m["last_heartbeat"],
    )


def environment_rows(rows: Iterable[sa.Row[Any]]) -> list[EnvironmentRow]:
    """Whole `environments` rows, as `select(environments)` returns them, converted by position."""
    out = []
    for r in rows:
        values: tuple[Any, ...] = tuple(r)
        row = EnvironmentRow(*values)
        row.listener_instance_id = row.listener_instance_id or None
        row.metadata = row.metadata or {}  # a fresh dict per row already (decoded just now)
        out.append(row)
    return out


def teleport_row(m: sa.RowMapping) -> TeleportRow:
    return TeleportRow(**{c.name: m[c.name] for c in teleports.columns})
