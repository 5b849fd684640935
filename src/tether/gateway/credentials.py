"""Upstream-keys mode (`TETHER_AUTH=upstream`): the credentials the Letta server accepts, as principals.

A credential is accepted exactly when the upstream accepts it on an authenticated route; each distinct
credential is an organization of its own, named by a hash of it (never the credential itself), so two
keys' devices never meet. The caller (`ops.auth.AuthCache`) caches acceptances for a short while and
never caches a refusal.
"""

from __future__ import annotations

import hashlib

from tether.clock import now_ms
from tether.gateway.upstream import Upstream, UpstreamFailure
from tether.store.base import Principal, Store

# Cheap, and refused by a Letta server that requires a credential (its health route is exempt).
CHECK_PATH = "/v1/agents/?limit=1"
ORG_PREFIX = "upstream-"
USER_NAME = "upstream"


def fingerprint(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()[:32]


class UpstreamKeys:
    def __init__(self, upstream: Upstream, store: Store) -> None:
        self.upstream = upstream
        self.store = store

    async def verify(self, secret: str) -> Principal | None:
        """The credential's principal, None if the upstream refuses it; UpstreamFailure if it cannot say."""
        response = await self.upstream.call("GET", CHECK_PATH, {"authorization": f"Bearer {secret}"})
        if response.status_code in (401, 403):
            return None
        if not 200 <= response.status_code < 300:
            raise UpstreamFailure(
                502,
                "UPSTREAM_AUTH_CHECK_FAILED",
                f"the Letta server answered {response.status_code} when checking the API key",
                True,
            )
        digest = fingerprint(secret)
        return await self.store.ensure_principal(
            ORG_PREFIX + digest, USER_NAME, f"upstream:{digest[:16]}", now_ms()
        )
