"""Sign-in secrets at rest and OIDC accounts: TOTP secrets sealed, recovery codes argon2id,
users linked to their OIDC provider's account (issuer, subject).

- ``users.totp_secret`` (64 → 255 characters) holds the secret sealed with the data
  directory's ``secrets.key`` (AES-256-GCM, bound to the user id: ``control.store.secretbox``);
  every secret stored in the clear is sealed here, with the key ``migrate`` was given.
- ``recovery_codes.code_hash`` (64 → 255): argon2id of the code's SHA-256. Earlier versions
  kept the unsalted SHA-256; the codes themselves are not known, so each unused code's
  SHA-256 is hashed again with argon2id (the codes users hold keep working; about 50 ms
  each) and used codes keep no hash.
- ``users.oidc_issuer`` / ``users.oidc_subject`` (the ID token's ``iss`` and ``sub``), unique
  as a pair: the account a user is linked to (``control.api.oidc``).

SQLite: the ``users`` table is not rebuilt (a rebuild drops it, and with foreign keys on that
deletes every device, session and membership): its column is added, copied, dropped and
renamed in place (SQLite ≥ 3.35). ``recovery_codes`` (nothing refers to it) is rebuilt.

Downgrading opens the TOTP secrets again (it needs the key too) and deletes every recovery
code (their SHA-256 cannot be had back).

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import context, op
from argon2 import PasswordHasher, Type

from control.store.errors import StoreError
from control.store.secretbox import is_sealed

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# argon2id with the OWASP minimum, as users' passwords (control.store.users.PASSWORD_HASHER) at this revision.
_HASHER = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1, hash_len=32, salt_len=16, type=Type.ID)

_users = sa.table("users", sa.column("id", sa.String), sa.column("totp_secret", sa.String))
_codes = sa.table("recovery_codes", sa.column("id", sa.Integer), sa.column("code_hash", sa.String),
                  sa.column("used_at", sa.DateTime))


def _totp_secret_length(length: int) -> None:
    """``users.totp_secret`` (nullable) becomes VARCHAR(``length``), its values kept, the table not rebuilt."""
    if op.get_bind().dialect.name != "sqlite":
        op.alter_column("users", "totp_secret", type_=sa.String(length), existing_nullable=True)
        return
    op.add_column("users", sa.Column("totp_secret_new", sa.String(length), nullable=True))
    op.execute("UPDATE users SET totp_secret_new = totp_secret")
    op.execute("ALTER TABLE users DROP COLUMN totp_secret")
    op.execute("ALTER TABLE users RENAME COLUMN totp_secret_new TO totp_secret")


def _code_hash_length(length: int) -> None:
    with op.batch_alter_table("recovery_codes") as batch:
        batch.alter_column("code_hash", type_=sa.String(length), existing_nullable=False)


def _box(what: str):  # type: ignore[no-untyped-def]
    box = context.config.attributes.get("secret_box")
    if box is None:
        raise StoreError("invalid", f"migration 0006 must {what} and needs the secrets key: open the store with "
                                    f"the data directory's secrets.key (ferryman control does)")
    return box


def upgrade() -> None:
    bind = op.get_bind()
    _totp_secret_length(255)
    _code_hash_length(255)
    op.add_column("users", sa.Column("oidc_issuer", sa.String(255), nullable=True))
    op.add_column("users", sa.Column("oidc_subject", sa.String(255), nullable=True))
    op.create_index("uq_users_oidc_account", "users", ["oidc_issuer", "oidc_subject"], unique=True)

    clear = [(row.id, row.totp_secret) for row in bind.execute(sa.select(_users.c.id, _users.c.totp_secret)
                                                                 .where(_users.c.totp_secret.is_not(None)))
             if not is_sealed(row.totp_secret)]
    if clear:
        box = _box(f"seal the TOTP secrets of {len(clear)} users")
        for user_id, secret in clear:
            bind.execute(_users.update().where(_users.c.id == user_id)
                         .values(totp_secret=box.seal(secret.encode(), f"totp:{user_id}")))
    bind.execute(_codes.update().where(_codes.c.used_at.is_not(None)).values(code_hash=""))
    for row in bind.execute(sa.select(_codes.c.id, _codes.c.code_hash).where(_codes.c.used_at.is_(None))).all():
        if not row.code_hash.startswith("$argon2"):  # the SHA-256 (hex) of the code
            bind.execute(_codes.update().where(_codes.c.id == row.id).values(code_hash=_HASHER.hash(row.code_hash)))


def downgrade() -> None:
    bind = op.get_bind()
    sealed = [(row.id, row.totp_secret) for row in bind.execute(sa.select(_users.c.id, _users.c.totp_secret)
                                                                  .where(_users.c.totp_secret.is_not(None)))
              if is_sealed(row.totp_secret)]
    if sealed:
        box = _box(f"open the TOTP secrets of {len(sealed)} users")
        for user_id, value in sealed:
            bind.execute(_users.update().where(_users.c.id == user_id)
                         .values(totp_secret=box.unseal(value, f"totp:{user_id}").decode()))
    bind.execute(_codes.delete())
    op.drop_index("uq_users_oidc_account", table_name="users")
    op.drop_column("users", "oidc_subject")
    op.drop_column("users", "oidc_issuer")
    _code_hash_length(64)
    _totp_secret_length(64)
