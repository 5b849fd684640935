"""What each output format shows of an environment or a pod: the rows' columns and their text.

Pure functions of the router's JSON and the current time; printing is commands.py's job.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

# `letta environments list -o json` prints these fields of each connection, in this order.
LETTA_FIELDS = ("deviceId", "connectionName", "connectionId", "lettaCodeVersion", "isOnline")

Row = Mapping[str, Any]
Column = tuple[str, Callable[[Row, int], str]]


def letta_row(connection: Row) -> dict[str, Any]:
    """A `GET /v1/environments` connection as `letta environments list` shows it."""
    metadata = connection.get("metadata") or {}
    return {
        "deviceId": connection.get("deviceId"),
        "connectionName": connection.get("connectionName"),
        "connectionId": connection.get("connectionId"),
        "lettaCodeVersion": metadata.get("lettaCodeVersion") if isinstance(metadata, dict) else None,
        "isOnline": connection.get("connectionId") is not None,
    }


def from_connection(connection: Row, now: int) -> dict[str, Any]:
    """A Letta-compatible connection in the shape of the fleet API's rows (for tables when the router
    has no `/v1/tether` routes): what the Letta row does not say stays null."""
    metadata = connection.get("metadata") or {}
    meta = metadata if isinstance(metadata, dict) else {}
    heartbeat = connection.get("lastHeartbeat")
    online = connection.get("connectionId") is not None
    return {
        "id": connection.get("id"),
        "deviceId": connection.get("deviceId"),
        "connectionId": connection.get("connectionId"),
        "connectionName": connection.get("connectionName"),
        "userId": connection.get("userId"),
        "state": "online" if online else "offline",
        "heartbeatAgeMs": now - heartbeat if isinstance(heartbeat, int) and online else None,
        "os": meta.get("os"),
        "lettaCodeVersion": meta.get("lettaCodeVersion"),
        "workingDirectory": meta.get("workingDirectory"),
        "gitBranch": meta.get("gitBranch"),
        "permissionMode": meta.get("permissionMode") or connection.get("currentMode"),
        "podId": connection.get("podId"),
        "connectedAt": connection.get("connectedAt"),
        "firstSeenAt": connection.get("firstSeenAt"),
        "lastSeenAt": connection.get("lastSeenAt"),
        "relaySockets": None,
        "pendingApproval": None,
    }


def matches(connection: Row, needle: str) -> bool:
    """`--search` on Letta rows: the fields the fleet API's `q` searches, case-insensitively."""
    metadata = connection.get("metadata") or {}
    meta = metadata if isinstance(metadata, dict) else {}
    haystack = [connection.get("connectionName"), connection.get("deviceId")]
    haystack += [meta.get(k) for k in ("workingDirectory", "gitBranch", "os", "lettaCodeVersion")]
    lowered = needle.lower()
    return any(isinstance(v, str) and lowered in v.lower() for v in haystack)


def age(ms: int | None) -> str:
    """A duration as kubectl prints ages: 42s, 5m, 3h, 2d."""
    if ms is None:
        return "-"
    seconds = max(0, ms // 1000)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def since(at: int | None, now: int) -> str:
    return age(now - at) if isinstance(at, int) else "-"


def text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _field(name: str) -> Callable[[Row, int], str]:
    return lambda row, _now: text(row.get(name))


ENV_COLUMNS: list[Column] = [
    ("NAME", _field("connectionName")),
    ("DEVICE ID", _field("deviceId")),
    ("STATE", _field("state")),
    ("HEARTBEAT", lambda row, _now: age(row.get("heartbeatAgeMs"))),
    ("VERSION", _field("lettaCodeVersion")),
    ("POD", _field("podId")),
]
ENV_WIDE_COLUMNS: list[Column] = [
    *ENV_COLUMNS,
    ("CONNECTION ID", _field("connectionId")),
    ("USER", _field("userId")),
    ("OS", _field("os")),
    ("DIRECTORY", _field("workingDirectory")),
    ("BRANCH", _field("gitBranch")),
    ("MODE", _field("permissionMode")),
    ("CONNECTED", lambda row, now: since(row.get("connectedAt"), now)),
    ("RELAY", _field("relaySockets")),
    ("APPROVAL", _field("pendingApproval")),
]
POD_COLUMNS: list[Column] = [
    ("POD", lambda row, _now: text(row.get("podId")) + (" (this)" if row.get("self") else "")),
    ("VERSION", _field("version")),
    ("UPTIME", lambda row, _now: age(int(row["uptimeSeconds"] * 1000)) if row.get("uptimeSeconds") else "-"),
    ("DEVICES", _field("devices")),
    ("RELAY", _field("relaySockets")),
    ("IN/S", lambda row, _now: _rate(row.get("framesInPerSecond"))),
    ("OUT/S", lambda row, _now: _rate(row.get("framesOutPerSecond"))),
    ("CPU", lambda row, _now: _percent(row.get("cpuPercent"))),
    ("RSS", lambda row, _now: _bytes(row.get("rssBytes"))),
    ("DATABASE", _field("database")),
    ("REDIS", _field("redis")),
]


def _rate(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, int | float) else "-"


def _percent(value: Any) -> str:
    return f"{value:.1f}%" if isinstance(value, int | float) else "-"


def _bytes(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value / (1024 * 1024):.0f}Mi"


def cells(columns: list[Column], row: Row, now: int) -> list[str]:
    return [render(row, now) for _, render in columns]


# What makes a watched row "changed": its state and facts, not the clock (heartbeat ages move on
# every poll, so they are shown but not compared).
WATCHED_FIELDS = (
    "connectionId",
    "connectionName",
    "state",
    "podId",
    "lettaCodeVersion",
    "workingDirectory",
    "gitBranch",
    "permissionMode",
    "relaySockets",
    "pendingApproval",
)


def changes(
    seen: dict[str, tuple[tuple[Any, ...], Row]], rows: Sequence[Row]
) -> tuple[list[tuple[str, Row]], list[Row]]:
    """One poll of `watch`: the rows added or modified since the last (with "ADDED"/"MODIFIED"), and
    the rows gone. Updates `seen` (row id -> its watched facts and last row) in place."""
    changed: list[tuple[str, Row]] = []
    current: set[str] = set()
    for row in rows:
        row_id = str(row.get("id"))
        current.add(row_id)
        facts = tuple(row.get(f) for f in WATCHED_FIELDS)
        before = seen.get(row_id)
        if before is None or before[0] != facts:
            changed.append(("ADDED" if before is None else "MODIFIED", row))
        seen[row_id] = (facts, row)
    gone = [seen.pop(row_id)[1] for row_id in [r for r in seen if r not in current]]
    return changed, gone
