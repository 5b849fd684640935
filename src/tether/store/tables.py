"""Table definitions (SQLAlchemy Core), shared by the store and the migrations."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

organizations = sa.Table(
    "organizations",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
)

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("org_id", sa.String(64), sa.ForeignKey("organizations.id"), nullable=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("org_id", "name", name="uq_users_org_name"),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("org_id", sa.String(64), sa.ForeignKey("organizations.id"), nullable=False),
    sa.Column("user_id", sa.String(64), sa.ForeignKey("users.id"), nullable=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("secret_hash", sa.String(128), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("revoked_at", sa.BigInteger, nullable=True),
    # admin | member | readonly (issue 15); migration 0002
    sa.Column("role", sa.String(16), nullable=False, server_default="member"),
)

environments = sa.Table(
    "environments",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("org_id", sa.String(64), sa.ForeignKey("organizations.id"), nullable=False),
    sa.Column("device_id", sa.String(512), nullable=False),
    # '' stands for "no listener instance" so that the slot's unique constraint holds on every backend.
    sa.Column("listener_instance_id", sa.String(512), nullable=False, server_default=""),
    sa.Column("connection_name", sa.String(1024), nullable=False),
    sa.Column("metadata", sa.JSON, nullable=False),
    sa.Column("user_id", sa.String(64), nullable=True),
    sa.Column("api_key_owner", sa.String(64), nullable=True),
    sa.Column("current_mode", sa.String(32), nullable=True),
    sa.Column("first_seen_at", sa.BigInteger, nullable=False),
    sa.Column("last_seen_at", sa.BigInteger, nullable=False),
    sa.Column("connection_id", sa.String(64), nullable=True, unique=True),
    sa.Column("lease_issued_at", sa.BigInteger, nullable=True),
    sa.Column("connected_at", sa.BigInteger, nullable=True),
    sa.Column("pod_id", sa.String(256), nullable=True),
    sa.Column("last_heartbeat", sa.BigInteger, nullable=True),
    sa.UniqueConstraint("org_id", "device_id", "listener_instance_id", name="uq_environments_slot"),
    sa.Index("ix_environments_org_order", "org_id", "first_seen_at", "id"),
    sa.Index("ix_environments_pod", "pod_id"),
    # The list's filters (migration 0004): by user, and only rows a pod claims (onlineOnly).
    sa.Index("ix_environments_org_user_order", "org_id", "user_id", "first_seen_at", "id"),
    sa.Index(
        "ix_environments_org_online_order",
        "org_id",
        "first_seen_at",
        "id",
        postgresql_where=sa.text("pod_id IS NOT NULL"),
        sqlite_where=sa.text("pod_id IS NOT NULL"),
    ),
)

teleports = sa.Table(
    "teleports",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("org_id", sa.String(64), sa.ForeignKey("organizations.id"), nullable=False),
    sa.Column("agent_id", sa.String(512), nullable=False),
    sa.Column("conversation_id", sa.String(512), nullable=False),
    sa.Column("source_connection_id", sa.String(64), nullable=False),
    sa.Column("target_connection_id", sa.String(64), nullable=False),
    sa.Column("target_device_id", sa.String(512), nullable=False),
    sa.Column("target_connection_name", sa.String(1024), nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("idempotency_key", sa.String(256), nullable=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("org_id", "idempotency_key", name="uq_teleports_idempotency"),
)

# Gateway mode (Tether keys): the upstream Letta user each Tether user acts as, so that organizations
# stay apart upstream as they do here.
upstream_actors = sa.Table(
    "upstream_actors",
    metadata,
    sa.Column("org_id", sa.String(64), sa.ForeignKey("organizations.id"), primary_key=True),
    sa.Column("user_id", sa.String(64), sa.ForeignKey("users.id"), primary_key=True),
    sa.Column("letta_org_id", sa.String(128), nullable=False),
    sa.Column("letta_user_id", sa.String(128), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
)
