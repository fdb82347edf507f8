"""Initial schema: every table of control/store/models.py, the default connector group and
configuration version 0.

Revision ID: 0001
Revises: (none)
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _created_at() -> sa.Column[datetime]:
    return sa.Column("created_at", sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    groups = op.create_table(
        "connector_groups",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("region", sa.String(100), nullable=False),
        sa.Column("is_default", sa.Boolean(), nullable=False),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="pk_connector_groups"),
        sa.UniqueConstraint("name", name="uq_connector_groups_name"),
    )
    op.create_index("uq_connector_groups_one_default", "connector_groups", ["is_default"], unique=True,
                    sqlite_where=sa.text("is_default"), postgresql_where=sa.text("is_default"))

    op.create_table(
        "applications",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("connector_group_id", sa.Integer(), nullable=False),
        _created_at(),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_applications"),
        sa.UniqueConstraint("name", name="uq_applications_name"),
        sa.ForeignKeyConstraint(["connector_group_id"], ["connector_groups.id"],
                                name="fk_applications_connector_group_id"),
        sa.CheckConstraint("kind IN ('per_app', 'quick_access')", name="ck_applications_kind"),
    )
    op.create_index("ix_applications_connector_group_id", "applications", ["connector_group_id"])
    op.create_index("uq_applications_one_quick_access", "applications", ["kind"], unique=True,
                    sqlite_where=sa.text("kind = 'quick_access'"), postgresql_where=sa.text("kind = 'quick_access'"))

    op.create_table(
        "segments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("application_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("ports", sa.Text(), nullable=False),
        sa.Column("protocol", sa.String(3), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_segments"),
        sa.ForeignKeyConstraint(["application_id"], ["applications.id"], name="fk_segments_application_id",
                                ondelete="CASCADE"),
        sa.CheckConstraint("kind IN ('hostname', 'wildcard', 'ip', 'cidr', 'range')", name="ck_segments_kind"),
        sa.CheckConstraint("protocol IN ('tcp', 'udp')", name="ck_segments_protocol"),
    )
    op.create_index("ix_segments_application_id", "segments", ["application_id"])

    op.create_table(
        "connectors",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("group_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("external_addr", sa.String(255), nullable=False),
        sa.Column("internal_addr", sa.String(255), nullable=False),
        _created_at(),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cert_serial", sa.String(64), nullable=True),
        sa.Column("cert_not_after", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_connectors"),
        sa.ForeignKeyConstraint(["group_id"], ["connector_groups.id"], name="fk_connectors_group_id"),
    )
    op.create_index("ix_connectors_group_id", "connectors", ["group_id"])

    op.create_table(
        "edges",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("address", sa.String(255), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        _created_at(),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cert_serial", sa.String(64), nullable=True),
        sa.Column("cert_not_after", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_edges"),
    )

    op.create_table(
        "dns_suffixes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("suffix", sa.String(253), nullable=False),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="pk_dns_suffixes"),
        sa.UniqueConstraint("suffix", name="uq_dns_suffixes_suffix"),
    )

    op.create_table(
        "admin_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        _created_at(),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_admin_keys"),
        sa.UniqueConstraint("name", name="uq_admin_keys_name"),
        sa.UniqueConstraint("key_hash", name="uq_admin_keys_key_hash"),
    )

    op.create_table(
        "audit_records",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("object_type", sa.String(64), nullable=False),
        sa.Column("object_id", sa.String(64), nullable=False),
        sa.Column("before", sa.JSON(), nullable=True),
        sa.Column("after", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_audit_records"),
    )
    op.create_index("ix_audit_records_at", "audit_records", ["at"])

    op.create_table(
        "registration_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("group_id", sa.Integer(), nullable=True),
        _created_at(),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("used_by", sa.String(200), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_registration_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_registration_tokens_token_hash"),
        sa.ForeignKeyConstraint(["group_id"], ["connector_groups.id"], name="fk_registration_tokens_group_id"),
        sa.CheckConstraint("role IN ('connector', 'edge')", name="ck_registration_tokens_role"),
    )

    op.create_table(
        "revocations",
        sa.Column("serial", sa.String(64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.String(200), nullable=False),
        sa.PrimaryKeyConstraint("serial", name="pk_revocations"),
    )

    config_version = op.create_table(
        "config_version",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_config_version"),
        sa.CheckConstraint("id = 1", name="ck_config_version_single_row"),
    )

    now = datetime.now(UTC)
    op.bulk_insert(groups, [{"name": "default", "region": "", "is_default": True, "created_at": now}])
    op.bulk_insert(config_version, [{"id": 1, "version": 0, "changed_at": now}])


def downgrade() -> None:
    for table in ("config_version", "revocations", "registration_tokens", "audit_records", "admin_keys",
                  "dns_suffixes", "edges", "connectors", "segments", "applications", "connector_groups"):
        op.drop_table(table)
