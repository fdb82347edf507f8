"""Web applications: the fields that make an application a published web app (external and
internal URL, pre-authentication, backend timeout, translation, cookie, header SSO, WebSocket,
backend verification and CORS options, a custom-domain certificate with its sealed key),
one row per application; the traffic log's HTTP fields
(one record per HTTP transaction of a web app).

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "web_apps",
        sa.Column("application_id", sa.Integer(), nullable=False),
        sa.Column("external_url", sa.String(2048), nullable=False),
        sa.Column("external_authority", sa.String(300), nullable=False),
        sa.Column("internal_url", sa.String(2048), nullable=False),
        sa.Column("preauth", sa.String(16), nullable=False),
        sa.Column("backend_timeout", sa.String(16), nullable=False),
        sa.Column("translate_headers", sa.Boolean(), nullable=False),
        sa.Column("translate_body", sa.Boolean(), nullable=False),
        sa.Column("cookie_http_only", sa.Boolean(), nullable=False),
        sa.Column("cookie_persistent", sa.Boolean(), nullable=False),
        sa.Column("websocket", sa.Boolean(), nullable=False),
        sa.Column("verify_backend", sa.Boolean(), nullable=False),
        sa.Column("cors_preflight_bypass", sa.Boolean(), nullable=False),
        sa.Column("header_sso", sa.JSON(), nullable=False),
        sa.Column("backend_ca", sa.Text(), nullable=False),
        sa.Column("certificate", sa.Text(), nullable=False),
        sa.Column("certificate_key", sa.Text(), nullable=False),
        sa.CheckConstraint("preauth IN ('ferryman', 'passthrough')", name="ck_web_apps_preauth"),
        sa.CheckConstraint("backend_timeout IN ('default', 'long')", name="ck_web_apps_backend_timeout"),
        sa.ForeignKeyConstraint(["application_id"], ["applications.id"], ondelete="CASCADE",
                                name="fk_web_apps_application_id"),
        sa.PrimaryKeyConstraint("application_id", name="pk_web_apps"),
        sa.UniqueConstraint("external_authority", name="uq_web_apps_external_authority"),
    )
    # Plain ALTER TABLE (no batch copy of the traffic log).
    op.add_column("traffic_logs", sa.Column("http_method", sa.String(16), nullable=False, server_default=""))
    op.add_column("traffic_logs", sa.Column("http_host", sa.String(300), nullable=False, server_default=""))
    op.add_column("traffic_logs", sa.Column("http_path", sa.String(1024), nullable=False, server_default=""))
    op.add_column("traffic_logs", sa.Column("http_status", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("traffic_logs", sa.Column("http_protocol", sa.String(16), nullable=False, server_default=""))
    op.add_column("traffic_logs", sa.Column("user_agent", sa.String(512), nullable=False, server_default=""))


def downgrade() -> None:
    for column in ("user_agent", "http_protocol", "http_status", "http_path", "http_host", "http_method"):
        op.drop_column("traffic_logs", column)
    op.drop_table("web_apps")
