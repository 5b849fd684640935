"""Tether-keys mode: the Letta user each Tether user acts as upstream, so organizations stay apart there.

A Letta server acts for the user its `user_id` header names (its default user when there is none).
Every Tether organization gets a Letta organization of its own and every Tether user a Letta user in
it, created through the upstream's admin API on first use and recorded in Tether's database. The
gateway sends that `user_id` (and the upstream credential) on each forwarded request and drops any
the client sent.

A Letta server silently falls back to its default user for an unknown `user_id`, which would put
every organization in one. So a recorded user is used only once this process has seen it in the
upstream's user list; one lost upstream (a new server behind the same URL) is provisioned anew.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tether.clock import now_ms
from tether.gateway.headers import Header
from tether.gateway.upstream import Upstream, UpstreamFailure
from tether.store.base import Principal, Store

_USERS_PAGE = 100
# The upstream's user list is read again on a miss at most this often.
_RELIST_MS = 10_000


class Actors:
    def __init__(self, upstream: Upstream, store: Store, credential: str | None) -> None:
        self.upstream = upstream
        self.store = store
        self._admin = {"authorization": f"Bearer {credential}"} if credential else {}
        self._auth: list[Header] = [(b"authorization", f"Bearer {credential}".encode())] if credential else []
        self._known: dict[tuple[str, str], list[Header]] = {}
        self._making: dict[tuple[str, str], asyncio.Task[list[Header]]] = {}
        self._upstream_users: set[str] = set()
        self._listed_at = -_RELIST_MS

    async def identity(self, principal: Principal) -> list[Header]:
        """Headers that make the upstream act for this principal's Letta user."""
        key = (principal.org_id, principal.user_id)
        known = self._known.get(key)
        if known is not None:
            return known
        making = self._making.get(key)
        if making is None:
            making = asyncio.get_running_loop().create_task(self._resolve(*key))
            self._making[key] = making
            making.add_done_callback(lambda _: self._making.pop(key, None))
        # Shielded: a client that goes away must not abandon provisioning others wait for.
        headers = await asyncio.shield(making)
        self._known[key] = headers
        return headers

    async def _resolve(self, org_id: str, user_id: str) -> list[Header]:
        recorded = await self.store.upstream_actor(org_id, user_id)
        if recorded is not None and recorded[1] is not None and await self._exists(recorded[1]):
            return self._headers(recorded[1])
        letta_org = recorded[0] if recorded is not None else None
        letta_user = await self._create_user(org_id, user_id, letta_org)
        if letta_user is None:  # the recorded organization is gone upstream too
            letta_org = None
            letta_user = await self._create_user(org_id, user_id, None)
            if letta_user is None:
                raise UpstreamFailure(
                    502, "UPSTREAM_PROVISIONING_FAILED", "the Letta server refused a new user", True
                )
        replace = recorded is not None and recorded[1] is not None
        _, saved = await self.store.save_upstream_actor(
            org_id, user_id, letta_user[0], letta_user[1], now_ms(), replace=replace
        )
        return self._headers(saved)

    def _headers(self, letta_user_id: str) -> list[Header]:
        return [*self._auth, (b"user_id", letta_user_id.encode())]

    async def _exists(self, letta_user_id: str) -> bool:
        if letta_user_id in self._upstream_users:
            return True
        if now_ms() - self._listed_at < _RELIST_MS:
            return False
        self._upstream_users = await self._list_users()
        self._listed_at = now_ms()
        return letta_user_id in self._upstream_users

    async def _list_users(self) -> set[str]:
        seen: set[str] = set()
        after: str | None = None
        while True:
            query = f"?limit={_USERS_PAGE}" + (f"&after={after}" if after else "")
            page = self._json(await self.upstream.call("GET", "/v1/admin/users/" + query, self._admin))
            ids = [u["id"] for u in page if isinstance(u, dict) and isinstance(u.get("id"), str)]
            seen.update(ids)
            if len(ids) < _USERS_PAGE or ids[-1] == after:
                return seen
            after = ids[-1]

    async def _create_user(self, org_id: str, user_id: str, letta_org: str | None) -> tuple[str, str] | None:
        """(Letta organization, Letta user) for a new user; None if `letta_org` no longer exists upstream."""
        if letta_org is None:
            org = self._json(
                await self.upstream.call("POST", "/v1/admin/orgs/", self._admin, {"name": f"tether {org_id}"})
            )
            letta_org = str(org["id"])
        response = await self.upstream.call(
            "POST",
            "/v1/admin/users/",
            self._admin,
            {"name": f"tether {user_id}", "organization_id": letta_org},
        )
        if response.status_code >= 400 and response.status_code != 503:
            return None
        letta_user = str(self._json(response)["id"])
        # A new Letta organization has none of the base tools its agents are created with.
        tools = await self.upstream.call(
            "POST", "/v1/tools/add-base-tools", {**self._admin, "user_id": letta_user}
        )
        self._json(tools)
        self._upstream_users.add(letta_user)
        return letta_org, letta_user

    @staticmethod
    def _json(response: Any) -> Any:
        if response.status_code >= 400:
            raise UpstreamFailure(
                502,
                "UPSTREAM_PROVISIONING_FAILED",
                f"the Letta server answered {response.status_code} while setting up this organization "
                f"({response.request.method} {response.request.url.path}): {response.text[:200]}",
                response.status_code >= 500,
            )
        return response.json()
