"""Indexes that match the list endpoint's filters: by user, and online rows only.

`GET /v1/environments` pages in (first_seen_at, id) order within an organization. With `userId=` or
`onlineOnly=true` the (org, order) index alone makes the database walk every row of the organization
before the first match; these give each filter its own ordered index (the online one partial: only
rows a pod claims, a small share of a fleet that is mostly offline).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

CLAIMED = sa.text("pod_id IS NOT NULL")


def upgrade() -> None:
    op.create_index(
        "ix_environments_org_user_order", "environments", ["org_id", "user_id", "first_seen_at", "id"]
    )
    op.create_index(
        "ix_environments_org_online_order",
        "environments",
        ["org_id", "first_seen_at", "id"],
        postgresql_where=CLAIMED,
        sqlite_where=CLAIMED,
    )


def downgrade() -> None:
    op.drop_index("ix_environments_org_online_order", "environments")
    op.drop_index("ix_environments_org_user_order", "environments")
