"""Node health and issued certificates: what heartbeats report (tunnels, active flows, the
configuration version a node runs, and edge addresses) and a record of every certificate
signed for a node, so renewed certificates stay attributable and revocable.

Existing nodes' current certificates are copied into ``issued_certificates``.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("connectors", "edges"):
        with op.batch_alter_table(table) as batch:
            if table == "edges":
                batch.add_column(sa.Column("external_addr", sa.String(255), nullable=False, server_default=""))
                batch.add_column(sa.Column("internal_addr", sa.String(255), nullable=False, server_default=""))
            batch.add_column(sa.Column("tunnels", sa.Integer(), nullable=False, server_default="0"))
            batch.add_column(sa.Column("active_flows", sa.Integer(), nullable=False, server_default="0"))
            batch.add_column(sa.Column("config_version", sa.Integer(), nullable=True))

    op.create_table(
        "issued_certificates",
        sa.Column("serial", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("node_id", sa.String(36), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("serial", name="pk_issued_certificates"),
        sa.CheckConstraint("role IN ('connector', 'edge')", name="ck_issued_certificates_role"),
    )
    op.create_index("ix_issued_certificates_node_id", "issued_certificates", ["node_id"])

    for role, table in (("connector", "connectors"), ("edge", "edges")):
        op.execute(
            f"INSERT INTO issued_certificates (serial, role, node_id, issued_at, not_after) "  # noqa: S608
            f"SELECT cert_serial, '{role}', id, created_at, cert_not_after FROM {table} "
            "WHERE cert_serial IS NOT NULL AND cert_not_after IS NOT NULL"
        )


def downgrade() -> None:
    op.drop_index("ix_issued_certificates_node_id", table_name="issued_certificates")
    op.drop_table("issued_certificates")
    for table in ("connectors", "edges"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("config_version")
            batch.drop_column("active_flows")
            batch.drop_column("tunnels")
            if table == "edges":
                batch.drop_column("internal_addr")
                batch.drop_column("external_addr")
