"""Traffic logs: one row per flow or refused attempt, as edges report them.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    def text(name: str, length: int) -> sa.Column:  # type: ignore[type-arg]
        return sa.Column(name, sa.String(length), nullable=False)

    def number(name: str, kind: type = sa.Integer) -> sa.Column:  # type: ignore[type-arg]
        return sa.Column(name, kind(), nullable=False)

    op.create_table(
        "traffic_logs",
        sa.Column("id", sa.Integer(), nullable=False),
        text("connection_id", 64),
        text("transaction_id", 64),
        sa.Column("start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("end", sa.DateTime(timezone=True), nullable=True),
        number("duration_ms"),
        text("user_id", 36),
        text("upn", 255),
        text("device_id", 64),
        text("device_os", 64),
        text("process", 255),
        text("source_ip", 64),
        number("source_port"),
        text("destination_ip", 64),
        number("destination_port"),
        text("destination_fqdn", 255),
        text("transport", 8),
        text("network", 8),
        text("application", 200),
        text("application_kind", 20),
        text("segment", 300),
        text("policy", 200),
        text("rule", 64),
        text("action", 8),
        text("reason_code", 64),
        text("connector_id", 64),
        text("connector_name", 200),
        text("connector_address", 64),
        text("edge", 200),
        number("bytes_sent", sa.BigInteger),
        number("bytes_received", sa.BigInteger),
        text("close_reason", 1024),
        sa.PrimaryKeyConstraint("id", name="pk_traffic_logs"),
        sa.CheckConstraint("action IN ('allow', 'deny', 'report')", name="ck_traffic_logs_action"),
    )
    op.create_index("ix_traffic_logs_connection_id", "traffic_logs", ["connection_id"])
    op.create_index("ix_traffic_logs_start", "traffic_logs", ["start"])
    op.create_index("ix_traffic_logs_user_id_start", "traffic_logs", ["user_id", "start"])
    op.create_index("ix_traffic_logs_application_start", "traffic_logs", ["application", "start"])


def downgrade() -> None:
    op.drop_table("traffic_logs")
