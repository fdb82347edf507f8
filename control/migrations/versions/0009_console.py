"""Web console: a user's console role (``users.console_role``: ``admin``, ``reader`` or NULL for
none) and the console's sign-in sessions (``console_sessions``: the SHA-256 of the cookie's
token, its CSRF token, its idle and absolute expiry); traffic records gain the user's display name, the device's
OS version and the client agent's version.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# A plain ADD COLUMN (no batch copy of ``users``: its rows and the tables referring to it stay
# as they are on SQLite) and a new table.


def upgrade() -> None:
    op.add_column("users", sa.Column("console_role", sa.String(length=16), nullable=True))
    op.create_table(
        "console_sessions",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.String(length=36), nullable=False),
        sa.Column("csrf_token", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_console_sessions_user_id_users"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_console_sessions")),
    )
    op.create_index(op.f("ix_console_sessions_user_id"), "console_sessions", ["user_id"], unique=False)
    for name, length in (("display_name", 200), ("device_os_version", 64), ("client_version", 64)):
        op.add_column("traffic_logs", sa.Column(name, sa.String(length=length), nullable=False, server_default=""))


def downgrade() -> None:
    for name in ("client_version", "device_os_version", "display_name"):
        op.drop_column("traffic_logs", name)
    op.drop_index(op.f("ix_console_sessions_user_id"), table_name="console_sessions")
    op.drop_table("console_sessions")
    op.drop_column("users", "console_role")
