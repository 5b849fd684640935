"""Gateway mode's rows: upstream credentials as organizations, and each user's identity upstream."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from tether.store.base import Principal
from tether.store.keys import KeysSql
from tether.store.tables import upstream_actors


class UpstreamSql(KeysSql):
    """Built on the key store: an upstream credential's organization is created as a key's is."""

    async def ensure_principal(self, org_name: str, user_name: str, key_id: str, now_ms: int) -> Principal:
        """The principal of a credential Tether does not issue (upstream-keys mode), created on first use."""
        for attempt in range(3):
            try:
                async with self.engine.begin() as conn:
                    org_id, user_id = await self._ensure_org_user(conn, org_name, user_name, now_ms)
                return Principal(key_id=key_id, org_id=org_id, user_id=user_id)
            except IntegrityError:
                if attempt == 2:  # another pod created the same organization or user first: use theirs
                    raise
        raise AssertionError("unreachable")

    async def upstream_actor(self, org_id: str, user_id: str) -> tuple[str, str | None] | None:
        """(upstream organization, upstream user or None) known for this organization and user.

        With no row for the user, the organization's upstream organization from any of its users.
        """
        t = upstream_actors
        q = sa.select(t.c.user_id, t.c.letta_org_id, t.c.letta_user_id).where(t.c.org_id == org_id)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(q.limit(1000))).all()
        for row in rows:
            if row.user_id == user_id:
                return row.letta_org_id, row.letta_user_id
        return (rows[0].letta_org_id, None) if rows else None

    async def save_upstream_actor(
        self, org_id: str, user_id: str, letta_org_id: str, letta_user_id: str, now_ms: int, replace: bool
    ) -> tuple[str, str]:
        """Record the user's upstream identity: the first writer wins, unless `replace` (lost upstream)."""
        t = upstream_actors
        async with self.engine.begin() as conn:
            if replace:
                await conn.execute(t.delete().where(t.c.org_id == org_id, t.c.user_id == user_id))
            try:
                async with conn.begin_nested():
                    await conn.execute(
                        t.insert().values(
                            org_id=org_id,
                            user_id=user_id,
                            letta_org_id=letta_org_id,
                            letta_user_id=letta_user_id,
                            created_at=now_ms,
                        )
                    )
                return letta_org_id, letta_user_id
            except IntegrityError:
                q = sa.select(t.c.letta_org_id, t.c.letta_user_id).where(
                    t.c.org_id == org_id, t.c.user_id == user_id
                )
                row = (await conn.execute(q)).one()
                return row.letta_org_id, row.letta_user_id
