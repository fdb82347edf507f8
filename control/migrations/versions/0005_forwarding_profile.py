"""Forwarding profile: what client agents do with private destinations while no edge is
reachable (fail closed or open), one row, starting fail-closed.

Revision ID: 0005
Revises: 0004
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "forwarding_profile",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("fail_mode", sa.String(8), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("fail_mode IN ('closed', 'open')", name="ck_forwarding_profile_fail_mode"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.bulk_insert(table, [{"id": 1, "fail_mode": "closed", "updated_at": datetime.now(UTC)}])


def downgrade() -> None:
    op.drop_table("forwarding_profile")
