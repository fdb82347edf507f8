"""Target ``frames``: the msgspec codec of every control-frame body, and the preamble check.

Contract: a body either decodes (and then encodes back to a body that decodes to the same value,
within the field limits) or raises msgspec's ``DecodeError``/``ValidationError`` (which the tunnel
turns into ``ProtocolError("bad_frame")``); a preamble is accepted or refused with ``ProtocolError``.
"""

from __future__ import annotations

import msgspec

from dataplane.wire.frames import BODY_TYPES, DECODERS, MAX_CONTROL_BODY, PREAMBLE_SIZE, encode_control
from dataplane.wire.reader import ProtocolError, check_preamble

from . import Finding

_TYPES = sorted(BODY_TYPES)


def one_input(data: bytes) -> None:
    if not data:
        return
    selector, body = data[0], data[1:MAX_CONTROL_BODY + 1]
    if selector == 0xFF:
        if len(body) >= PREAMBLE_SIZE:
            try:
                check_preamble(body, 0)
            except ProtocolError as exc:
                if exc.code not in ("bad_preamble", "unsupported_version"):
                    raise Finding(f"preamble refused with code {exc.code!r}") from exc
        return
    ftype = _TYPES[selector % len(_TYPES)]
    try:
        value = DECODERS[ftype].decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return
    if type(value) is not BODY_TYPES[ftype]:
        raise Finding(f"decoder of frame type {ftype} returned {type(value).__name__}")
    frame = encode_control(1, value)
    again = DECODERS[ftype].decode(frame[10:])
    if again != value:
        raise Finding(f"frame type {ftype}: {value!r} encodes to a body that decodes to {again!r}")
