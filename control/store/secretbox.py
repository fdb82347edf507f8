"""The key the control plane seals stored secrets with, and the sealing: AES-256-GCM.

What the control plane must read back in the clear (TOTP secrets: it computes the codes) is
stored sealed, so a copy of the database alone (a backup, a PostgreSQL dump, a stolen
``control.db``) does not hand out second factors. The key is 32 random bytes in
``<data_dir>/secrets.key`` (base64, mode 0600, created on first start next to
``token-signing.key``), or the file ``FERRYMAN_SECRETS_KEY_FILE`` names (never created:
``open_file``); every control-plane node sharing one database needs the same key, which
also seals the keys they share (``control.shared_keys``). Losing it loses the sealed TOTP secrets: users then
have their TOTP reset by an admin and enrol again.

``SecretBox.seal(plaintext, context)`` → ``"fmsb1." + base64url(nonce ‖ ciphertext ‖ tag)``,
a fresh 96-bit nonce each time; ``context`` (e.g. ``"totp:<user id>"``) is authenticated
data, so a sealed value moved to another row does not open. ``unseal`` reverses it or raises
``SecretBoxError``. ``mac(purpose, data)`` is HMAC-SHA256 under a key derived for that
purpose (HKDF-SHA256), e.g. the deterministic successor of a refresh token
(``control.store.sessions``). The sealing key and each MAC key are different HKDF outputs,
never the file's bytes themselves.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import stat

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_FILE = "secrets.key"
KEY_BYTES = 32
PREFIX = "fmsb1."
_NONCE = 12

log = logging.getLogger("ferryman.control.secrets")


class SecretBoxError(ValueError):
    """A key file that cannot be used, or a sealed value that does not open; the message says which."""


def _derive(key: bytes, info: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info.encode()).derive(key)


class SecretBox:
    """Seals and opens stored secrets with one key (module doc)."""

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise SecretBoxError(f"the secrets key must be {KEY_BYTES} bytes")
        self._aead = AESGCM(_derive(key, "ferryman seal v1"))
        self._root = key
        # Not secret: names the key in messages, so an operator can tell two files apart.
        self.key_id = hashlib.sha256(_derive(key, "ferryman key id")).hexdigest()[:16]

    @classmethod
    def generate(cls) -> SecretBox:
        """A box with a new random key (tests, and first start via ``open``)."""
        return cls(os.urandom(KEY_BYTES))

    @classmethod
    def open(cls, data_dir: str) -> SecretBox:
        """The box whose key is ``<data_dir>/secrets.key``, created (0600) if there is none."""
        path = os.path.join(data_dir, KEY_FILE)
        if not os.path.exists(path):
            try:
                os.makedirs(data_dir, mode=0o700, exist_ok=True)
                _create_key_file(path)
            except OSError as exc:
                raise SecretBoxError(f"cannot create the secrets key {path}: {exc.strerror}") from None
            log.info("created secrets key %s", path)
        return cls(_load_key_file(path))

    @classmethod
    def open_file(cls, path: str) -> SecretBox:
        """The box whose key is the file ``path`` (``FERRYMAN_SECRETS_KEY_FILE``: the key every
        control-plane node sharing one database is given); never created here."""
        if not os.path.exists(path):
            raise SecretBoxError(f"secrets key {path} (FERRYMAN_SECRETS_KEY_FILE): file not found; make one with "
                                 f"`head -c 32 /dev/urandom | base64 > {path}` and give every control-plane node "
                                 f"the same file")
        return cls(_load_key_file(path))

    def seal(self, plaintext: bytes, context: str) -> str:
        nonce = os.urandom(_NONCE)
        sealed = self._aead.encrypt(nonce, plaintext, context.encode())
        return PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")

    def unseal(self, value: str, context: str) -> bytes:
        """The plaintext ``seal`` sealed for ``context``; ``SecretBoxError`` when it does not open."""
        if not isinstance(value, str) or not value.startswith(PREFIX):
            raise SecretBoxError("the stored value is not sealed")
        body = value[len(PREFIX):]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (binascii.Error, ValueError):
            raise SecretBoxError("the sealed value is not base64url") from None
        if len(raw) < _NONCE + 16:
            raise SecretBoxError("the sealed value is too short")
        try:
            return self._aead.decrypt(raw[:_NONCE], raw[_NONCE:], context.encode())
        except InvalidTag:
            raise SecretBoxError(f"the sealed value does not open with secrets key {self.key_id} (another "
                                 f"key's, or altered)") from None

    def mac(self, purpose: str, data: bytes) -> bytes:
        """HMAC-SHA256 of ``data`` under this box's key for ``purpose``."""
        return hmac.new(_derive(self._root, f"ferryman mac {purpose}"), data, hashlib.sha256).digest()


def is_sealed(value: object) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def _create_key_file(path: str) -> None:
    """Write a new key to ``path`` (0600 from the start); keep the file of a concurrent starter if it won."""
    tmp = f"{path}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(base64.b64encode(os.urandom(KEY_BYTES)) + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # fails if the file appeared meanwhile: never replace a key
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)


def _load_key_file(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError as exc:
        raise SecretBoxError(f"secrets key {path}: {exc.strerror}") from None
    try:
        key = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SecretBoxError(f"secrets key {path}: not base64") from None
    if len(key) != KEY_BYTES:
        raise SecretBoxError(f"secrets key {path}: must hold {KEY_BYTES} bytes (base64), not {len(key)}")
    if mode & 0o077:
        log.warning("secrets key %s has mode %o: other users may read it (chmod 600 it)", path, mode)
    return key
