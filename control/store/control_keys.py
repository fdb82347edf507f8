"""Keys every control-plane node sharing one database must hold alike (the CA, the access-token
signing key, and any other), stored sealed with the secrets key (``secretbox.SecretBox``).

``shared_key(store, name, make)``: the bytes stored under ``name``; when there are none yet,
``make()`` is called and its result stored, unless another node stored one meanwhile (then
that one is returned: all nodes end with the same bytes). A value is sealed with context
``control-key:<name>``, so a sealed value moved to another name does not open. A stored key
that does not open with this node's secrets key is a ``StoreError`` ("invalid") naming the
key and the secrets key's id: every node must be given the same secrets key
(``FERRYMAN_SECRETS_KEY_FILE``). ``key_names`` lists what is stored (no values).
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from .db import Store
from .errors import StoreError
from .models import ControlKey, utcnow
from .secretbox import SecretBox, SecretBoxError

NAME_MAX = 64


def _context(name: str) -> str:
    return f"control-key:{name}"


def _box(store: Store) -> SecretBox:
    if store.box is None:
        raise StoreError("invalid", "shared keys need the store opened with the secrets key")
    return store.box


def _unseal(box: SecretBox, name: str, sealed: str) -> bytes:
    try:
        return box.unseal(sealed, _context(name))
    except SecretBoxError as exc:
        raise StoreError("invalid", f"the shared key {name!r} in the database does not open ({exc}): every "
                                    f"control-plane node on one database needs the same secrets key "
                                    f"(FERRYMAN_SECRETS_KEY_FILE)") from None


def read_key(store: Store, name: str) -> bytes | None:
    """The key stored under ``name``, or None."""
    with store.read() as session:
        sealed = session.scalar(select(ControlKey.sealed).where(ControlKey.name == name))
    return None if sealed is None else _unseal(_box(store), name, sealed)


def shared_key(store: Store, name: str, make: Callable[[], bytes]) -> tuple[bytes, bool]:
    """(the key stored under ``name``, whether this call stored it), storing ``make()`` if none is."""
    if not name or len(name) > NAME_MAX:
        raise StoreError("invalid", f"a shared key's name must be 1 to {NAME_MAX} characters")
    box = _box(store)
    found = read_key(store, name)
    if found is not None:
        return found, False
    value = make()
    try:
        with store.begin() as session:
            session.add(ControlKey(name=name, sealed=box.seal(value, _context(name)), created_at=utcnow()))
    except IntegrityError:  # another node stored it first: everyone uses that one
        found = read_key(store, name)
        if found is None:
            raise StoreError("conflict", f"the shared key {name!r} could neither be stored nor read") from None
        return found, False
    return value, True


def key_names(store: Store) -> list[str]:
    with store.read() as session:
        return list(session.scalars(select(ControlKey.name).order_by(ControlKey.name)))
