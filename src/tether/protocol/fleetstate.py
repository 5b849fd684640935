"""An environment's state as the fleet API shows it, and the frames that show a waiting approval.

online: the Letta-compatible `isOnline` rule (`presence.is_online`: a ready pair whose lease is live).
Otherwise the pod holding the lease says what it knows (a "hint"): connecting (a socket is up, the
pair is not ready) or away (dropped, inside the grace window). Everything else is offline.
"""

from __future__ import annotations

from typing import Any

from tether.protocol.presence import Liveness, is_online

ONLINE = "online"
CONNECTING = "connecting"
AWAY = "away"
OFFLINE = "offline"
STATES = (ONLINE, CONNECTING, AWAY, OFFLINE)
# Sort order of sort=state (ascending).
STATE_RANK = {state: rank for rank, state in enumerate(STATES)}


def link_hint(ready: bool, has_sockets: bool) -> str:
    """What the pod holding a lease says of it when live state does not show it online: a ready pair
    not yet (or no longer) in live state, or sockets still pairing, is connecting; none is away."""
    return CONNECTING if ready or has_sockets else AWAY


def env_state(
    live: Liveness | None, pod_alive: bool, now_ms: int, offline_after_ms: int, hint: str | None
) -> str:
    if is_online(live, now_ms, offline_after_ms, pod_alive):
        return ONLINE
    return hint if hint in (CONNECTING, AWAY) else OFFLINE


def parse_states(text: str | None) -> frozenset[str]:
    """`state=online,away`: the states asked for (all when absent); ValueError for an unknown one."""
    if text is None or not text.strip():
        return frozenset(STATES)
    asked = {part.strip().lower() for part in text.split(",") if part.strip()}
    unknown = asked - set(STATES)
    if unknown or not asked:
        raise ValueError(f"state must be one or more of {', '.join(STATES)}, got {text!r}")
    return frozenset(asked)


def approval_news(kind: str, body: dict[str, Any]) -> bool | None:
    """Whether a device frame shows a conversation waiting for an approval: True, False, or None
    when the frame says nothing about it. Statuses are snapshots (device-protocol §3.3), so the
    latest one wins."""
    if kind == "control_request":
        request = body.get("request")
        return True if isinstance(request, dict) and request.get("subtype") == "can_use_tool" else None
    if kind == "update_loop_status":
        status = body.get("loop_status")
        if isinstance(status, dict) and isinstance(status.get("status"), str):
            return bool(status["status"] == "WAITING_ON_APPROVAL")
        return None
    if kind == "update_device_status":
        device = body.get("device_status")
        if isinstance(device, dict) and isinstance(device.get("pending_control_requests"), list):
            return bool(device["pending_control_requests"])
    return None


def slot_key(org_id: str, device_id: str, listener_instance_id: str | None) -> str:
    """An environment's history key: its registration slot, which outlives leases and re-registration."""
    return f"{org_id}\x1f{device_id}\x1f{listener_instance_id or ''}"


def history_event(
    at: int, event: str, pod_id: str, code: int | None = None, reason: str | None = None
) -> dict[str, Any]:
    """registered | connected | disconnected (with close code and reason) | forgotten."""
    return {"at": at, "event": event, "code": code, "reason": reason, "podId": pod_id}
