"""State control-plane nodes sharing one database share: their keys (CA, token signing),
sealed with the secrets key (``control_keys``), and the facts their replay guards remember
(``guard_marks``: node-request token ids, TOTP steps used, sources an account signed in
from) and the sign-in attempts their limits count (``sign_in_attempts``).

Revision ID: 0010
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "control_keys",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("sealed", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "guard_marks",
        sa.Column("kind", sa.String(32), primary_key=True),
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_guard_marks_expires_at", "guard_marks", ["expires_at"])
    op.create_table(
        "sign_in_attempts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("account", sa.String(320), nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("state", sa.String(8), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("state IN ('flight', 'failed')", name="ck_sign_in_attempts_state"),
    )
    op.create_index("ix_sign_in_attempts_at", "sign_in_attempts", ["at"])
    op.create_index("ix_sign_in_attempts_account_source", "sign_in_attempts", ["account", "source"])


def downgrade() -> None:
    op.drop_index("ix_sign_in_attempts_account_source", table_name="sign_in_attempts")
    op.drop_index("ix_sign_in_attempts_at", table_name="sign_in_attempts")
    op.drop_table("sign_in_attempts")
    op.drop_index("ix_guard_marks_expires_at", table_name="guard_marks")
    op.drop_table("guard_marks")
    op.drop_table("control_keys")
