"""Gateway mode: each Tether user's identity on the upstream Letta server.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "upstream_actors",
        sa.Column("org_id", sa.String(64), sa.ForeignKey("organizations.id"), primary_key=True),
        sa.Column("user_id", sa.String(64), sa.ForeignKey("users.id"), primary_key=True),
        sa.Column("letta_org_id", sa.String(128), nullable=False),
        sa.Column("letta_user_id", sa.String(128), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("upstream_actors")
