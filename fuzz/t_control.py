"""Target ``control``: the JSON request bodies the control plane reads from nodes, clients and admins.

A body goes the way Litestar takes it: JSON decoded (``DecodeError``: 400), then converted into
the handler's ``data`` annotation by a signature model (``msgspec.convert``, ``strict=False``,
Litestar's deserializer; ``ValidationError``: 400). Then the checks that need no database and
turn a body's values into stored form: segments (``parse_segments``: ``StoreError`` is a 400) and
connector group dial lists (``parse_networks``: ``ValueError`` is a 400). Contract: no other
exception (which would be a 500).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import msgspec
from litestar.serialization import default_deserializer

from control.api import identity_schemas, oidc, policy_schemas, schemas
from control.store.errors import StoreError
from control.store.segments import parse_segments
from dataplane.contract.dialrules import parse_networks

from . import Finding


def _request_types() -> list[type]:
    seen: dict[str, type] = {}
    for module in (schemas, identity_schemas, policy_schemas, oidc):
        for name in sorted(vars(module)):
            value = getattr(module, name)
            if isinstance(value, type) and issubclass(value, schemas._Request) and value is not schemas._Request:
                seen[f"{value.__module__}.{value.__qualname__}"] = value
    return [seen[k] for k in sorted(seen)]


TYPES = _request_types()
# One signature model per body type, as Litestar makes for ``def handler(data: T)``.
MODELS = [msgspec.defstruct(f"Signature_{t.__name__}", [("data", t)]) for t in TYPES]
_deserialize = partial(default_deserializer, type_decoders=None)


def one_input(data: bytes) -> None:
    if not data:
        return
    index = data[0] % len(TYPES)
    body = data[1:]
    try:
        raw = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return
    try:
        value = msgspec.convert({"data": raw}, MODELS[index], strict=False, dec_hook=_deserialize,
                                str_keys=True).data
    except msgspec.ValidationError:
        return
    _after(value)


def _after(value: Any) -> None:
    segments = getattr(value, "segments", None)
    if isinstance(value, schemas.SegmentIn):
        segments = [value]
    if segments:
        try:
            parse_segments("app", [msgspec.structs.asdict(s) for s in segments])
        except StoreError:
            pass
    for field in ("allowed_addresses", "denied_addresses"):
        networks = getattr(value, field, None)
        if networks is not None:
            try:
                parse_networks(networks, field)
            except ValueError:
                pass
