"""Edge to edge relay: the connectors each edge holds tunnels to (``edges.presence``, JSON, from
its heartbeats) and the peer edge that carried a relayed flow (``traffic_logs.relay_edge``).

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("edges", sa.Column("presence", sa.Text(), nullable=False, server_default=""))
    op.add_column("traffic_logs", sa.Column("relay_edge", sa.String(200), nullable=False, server_default=""))


def downgrade() -> None:
    op.drop_column("traffic_logs", "relay_edge")
    op.drop_column("edges", "presence")
