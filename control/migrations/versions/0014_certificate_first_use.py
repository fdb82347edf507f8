"""Node certificates: when the node first authenticated with each (``issued_certificates.first_used_at``),
so that the certificates a renewal replaced are revoked only once the node is seen using the new one.

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("issued_certificates", sa.Column("first_used_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("issued_certificates", "first_used_at")
