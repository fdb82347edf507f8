"""Traffic records: the address the app used on the user's device (``traffic_logs.local_source_ip``
and ``local_source_port``), as the client agent reported it in the flow's OPEN, beside the
client's public address the edge saw (``source_ip``/``source_port``).

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("traffic_logs", sa.Column("local_source_ip", sa.String(64), nullable=False, server_default=""))
    op.add_column("traffic_logs", sa.Column("local_source_port", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    op.drop_column("traffic_logs", "local_source_port")
    op.drop_column("traffic_logs", "local_source_ip")
