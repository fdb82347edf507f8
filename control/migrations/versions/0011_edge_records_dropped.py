"""Edges: the traffic records their queues dropped (``edges.records_dropped``, summed from their
heartbeats) and when the latest heartbeat reporting some came in (``edges.records_dropped_at``),
for the console's "traffic records dropped" alert.

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("edges", sa.Column("records_dropped", sa.BigInteger(), nullable=False, server_default="0"))
    op.add_column("edges", sa.Column("records_dropped_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("edges", "records_dropped_at")
    op.drop_column("edges", "records_dropped")
