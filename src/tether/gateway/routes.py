"""Which request paths Tether answers itself in gateway mode; the upstream gets the rest."""

from __future__ import annotations

# Tether's own API and pages: a prefix covers itself and everything below it. `/v1/environments` is
# what Letta Cloud serves beside the agent API and a self-hosted Letta server lacks; the others are
# Tether's operator surfaces.
_OWN_TREES = ("/v1/environments", "/v1/tether", "/ui", "/docs")
_OWN_EXACT = frozenset({"/", "/healthz", "/readyz", "/metrics", "/openapi.json", "/redoc"})

# Administration of the upstream itself (every organization and user it holds): never reachable
# through Tether keys, whose holders may only see their own organization.
_ADMIN_TREE = "/v1/admin"


def _within(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree + "/")


def served_here(path: str) -> bool:
    return path in _OWN_EXACT or any(_within(path, tree) for tree in _OWN_TREES)


def upstream_admin(path: str) -> bool:
    return _within(path.rstrip("/") or "/", _ADMIN_TREE)
