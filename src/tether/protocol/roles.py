"""What each API-key role may do (issue 15): the one table every edge asks (README "Fleet API and roles").

`readonly` sees everything in its organization and acts on nothing; `member` acts on its
organization's devices and traces the ones its own user registered; `admin` also sees the cluster
and traces every device of the organization. Nothing ever crosses organizations.
"""

from __future__ import annotations

ADMIN = "admin"
MEMBER = "member"
READONLY = "readonly"
ROLES = (ADMIN, MEMBER, READONLY)
DEFAULT_ROLE = MEMBER


def parse_role(text: str) -> str:
    value = text.strip().lower()
    if value not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {text!r}")
    return value


def may_act(role: str) -> bool:
    """REST writes, device sockets and relay commands."""
    return role in (ADMIN, MEMBER)


def may_see_pods(role: str) -> bool:
    return role == ADMIN


def may_trace(role: str, caller_user_id: str, device_user_id: str | None) -> bool:
    """A member traces only devices its own user registered; an admin traces any in the org."""
    return role == ADMIN or (role == MEMBER and device_user_id == caller_user_id)
