"""The keys of a control plane that must be the same on every node sharing one database: where
they come from.

- SQLite (one control-plane node): the files in the data directory, as always: the CA in
  ``<data_dir>/ca`` (``CertificateAuthority.open``) and the access-token signing key
  ``<data_dir>/token-signing.key`` (``TokenSigner.open``), created on first start.
- PostgreSQL (any number of nodes): the database, sealed with the secrets key
  (``control.store.control_keys``, names ``SHARED_CA`` and ``SHARED_TOKEN_KEY``). The first
  node to start stores them: the files of its data directory when it has them (an existing
  single-node control plane keeps its CA, so registered nodes keep trusting it), else new
  ones; every other node uses the stored ones, and says so when its own files differ
  (they are then not used). A node whose secrets key does not open them refuses to start.

``shared_secret(store, name, make)`` is the same for any other key the nodes must share.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable

from control.ca import CaError, CertificateAuthority
from control.store import Store
from control.store import control_keys
from control.tokens import KEY_FILE as TOKEN_KEY_FILE
from control.tokens import TokenKeyError, TokenSigner, new_key_pem
from dataplane.basics import pki

SHARED_CA = "ca"
SHARED_TOKEN_KEY = "token-signing"

log = logging.getLogger("ferryman.control.keys")


def keys_shared(store: Store) -> bool:
    """Whether ``store``'s database is the home of the shared keys (PostgreSQL)."""
    return store.engine.dialect.name == "postgresql"


def shared_secret(store: Store, name: str, make: Callable[[], bytes]) -> bytes:
    """The key every node uses under ``name``, stored (``make()``) by the first node that needs it."""
    value, stored = control_keys.shared_key(store, name, make)
    if stored:
        log.info("stored the shared key %r in the database, sealed with secrets key %s", name,
                 store.box.key_id if store.box else "?")
    return value


def _read_local(path: str) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CaError(f"{path}: {exc.strerror}") from None


def open_ca(store: Store, ca_dir: str) -> CertificateAuthority:
    """The CA this node signs node certificates with (module doc)."""
    if not keys_shared(store):
        return CertificateAuthority.open(ca_dir)
    local_cert = _read_local(os.path.join(ca_dir, pki.CA_CERT))
    local_key = _read_local(os.path.join(ca_dir, pki.CA_KEY))

    def make() -> bytes:
        if local_cert is not None and local_key is not None:
            CertificateAuthority.from_pem(local_cert, local_key, ca_dir)  # refuse to share a broken CA
            log.info("sharing the CA of %s with every control-plane node on this database", ca_dir)
            cert, key = local_cert, local_key
        else:
            cert, key = pki.new_ca()
        return json.dumps({"cert": cert.decode(), "key": key.decode()}).encode()

    blob = shared_secret(store, SHARED_CA, make)
    try:
        parts = json.loads(blob)
        ca = CertificateAuthority.from_pem(parts["cert"].encode(), parts["key"].encode(), "the database")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CaError(f"the shared CA in the database is not usable: {exc}") from None
    if local_cert is not None and local_cert.strip() != ca.bundle().strip():
        log.warning("the CA in %s is not the one shared through the database; the shared one is used", ca_dir)
    return ca


def open_token_signer(store: Store, data_dir: str, *, lifetime: int) -> TokenSigner:
    """The key this node signs users' access tokens with (module doc)."""
    if not keys_shared(store):
        return TokenSigner.open(data_dir, lifetime=lifetime)
    path = os.path.join(data_dir, TOKEN_KEY_FILE)
    try:
        with open(path, "rb") as fh:
            local: bytes | None = fh.read()
    except FileNotFoundError:
        local = None
    except OSError as exc:
        raise TokenKeyError(f"token signing key {path}: {exc.strerror}") from None

    def make() -> bytes:
        if local is not None:
            TokenSigner.from_pem(local, path, lifetime=lifetime)  # refuse to share a broken key
            log.info("sharing the token signing key %s with every control-plane node on this database", path)
            return local
        return new_key_pem()

    signer = TokenSigner.from_pem(shared_secret(store, SHARED_TOKEN_KEY, make), "the database", lifetime=lifetime)
    if local is not None and TokenSigner.from_pem(local, path, lifetime=lifetime).kid != signer.kid:
        log.warning("the token signing key %s is not the one shared through the database; the shared one is used",
                    path)
    return signer
