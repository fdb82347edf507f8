"""Connector groups' dial lists: the networks the group's connectors may dial (``allowed_addresses``;
empty: any) and must never dial (``denied_addresses``), comma-separated canonical CIDR text.

Revision ID: 0007
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


# Plain ALTER TABLE (SQLite 3.35+ drops columns itself): a batch copy of the table could not
# drop connector_groups while applications and connectors refer to it.


def upgrade() -> None:
    op.add_column("connector_groups", sa.Column("allowed_addresses", sa.Text(), nullable=False, server_default=""))
    op.add_column("connector_groups", sa.Column("denied_addresses", sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    op.drop_column("connector_groups", "denied_addresses")
    op.drop_column("connector_groups", "allowed_addresses")
