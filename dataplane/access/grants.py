"""Flow grants: the edge's authenticated permission for one flow, checked by the connector before it dials.

Defense in depth: an edge decides every flow, and a connector dials only what an edge has
signed for exactly that flow. A grant names the edge and the connector, the destination
(host, port, protocol), the traffic-log connection id, the user and device, an expiry
a few seconds ahead, and the application the edge matched (the connector lets only that
application's segments name special addresses: ``access.destinations``).

A grant is authenticated in one of two ways, named by its claims' ``version``:

- **2, a MAC** (HMAC-SHA256) under the tunnel's grant key: ``KEY_SIZE`` random bytes the
  connector makes for each tunnel and sends in its HELLO, inside the mutually authenticated
  TLS (or QUIC) tunnel to the edge whose certificate it has checked. Only that connector and
  the edge at the other end of that one tunnel know the key, so a grant cannot be made
  without it, and a grant taken from one tunnel is worthless on any other. This is what an
  edge sends when the connector's HELLO carries a key: about a microsecond per flow on each
  side instead of an ECDSA signature and its verification.
- **1, a signature** (ECDSA P-256, SHA-256) with the edge's certificate key, verified with the
  public key of the certificate the edge presented on this very tunnel: what an edge sends a
  connector that announces no grant key.

Either way a grant cannot be moved to another
destination, replayed after it expires, or used twice (the connector remembers the
connection ids it has honoured, by deciding edge, until their grants expire, and never
forgets one sooner: when that memory, or the deciding edge's half of it, is full, a new grant
is refused, ``grant_cache_full``, rather than an unexpired one forgotten). A grant claiming
to live longer than edges issue them (``GRANT_LIFETIME``, plus ``CLOCK_SKEW``) is refused:
it would only hold its place in that memory longer.

Encoding: msgpack array ``[claims, tag]`` where ``claims`` is the msgpack encoding of
``GrantClaims`` (array-like) and ``tag`` the DER ECDSA signature over those bytes (version 1)
or the HMAC-SHA256 of ``MAC_LABEL`` followed by those bytes (version 2).
Pure: no I/O, the caller passes the clock.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict
from typing import Annotated

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

GRANT_LIFETIME = 30  # seconds from signing to expiry
CLOCK_SKEW = 5  # seconds of clock difference between edge and connector tolerated
# A grant claiming to live longer is refused: every grant honoured is remembered until it
# expires, so a longer one only takes a place in the connector's replay memory for longer.
MAX_LIFETIME = GRANT_LIFETIME + CLOCK_SKEW
_ALGORITHM = ec.ECDSA(hashes.SHA256())
KEY_SIZE = 32  # bytes of a tunnel's grant key (a connector sends one in its HELLO)
MAC_LABEL = b"ferryman flow grant 2\x00"  # what the MAC covers before the claims: keys serve grants only
SIGNED, MACED = 1, 2  # claims versions: an ECDSA-signed grant, a MAC'd grant


class GrantError(ValueError):
    """A grant is missing, malformed, forged, expired, replayed or for another flow; ``code`` says which."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# Claims longer than these are not an edge's (``grant_invalid``): names and the destination as
# long as the OPEN fields they repeat may be (the wire's ``Short``); a connection id is 24 hex
# digits (``contract.flowrecord.new_connection_id``), 64 leave room for another form.
_Name = Annotated[str, msgspec.Meta(max_length=255)]
_ConnectionId = Annotated[str, msgspec.Meta(max_length=64)]


class GrantClaims(msgspec.Struct, array_like=True, frozen=True, gc=False):
    version: int
    edge: _Name
    connector: _Name
    host: _Name
    port: int
    protocol: _Name
    connection: _ConnectionId
    user: _Name
    device: _Name
    issued: int
    expires: int
    app: _Name = ""  # the application the edge matched ("" for a private DNS flow)


_claims_encoder = msgspec.msgpack.Encoder()
_claims_decoder = msgspec.msgpack.Decoder(GrantClaims)
_envelope_decoder = msgspec.msgpack.Decoder(tuple[bytes, bytes])


def sign(key: ec.EllipticCurvePrivateKey, *, edge: str, connector: str, host: str, port: int, protocol: str,
         connection: str, user: str, device: str, now: float, app: str = "") -> bytes:
    """A grant for one flow of application ``app``, valid ``GRANT_LIFETIME`` seconds from ``now``."""
    issued = int(now)
    claims = _claims_encoder.encode(GrantClaims(SIGNED, edge, connector, host, port, protocol, connection, user,
                                                device, issued, issued + GRANT_LIFETIME, app))
    return _claims_encoder.encode((claims, key.sign(claims, _ALGORITHM)))


def mac(key: bytes, *, edge: str, connector: str, host: str, port: int, protocol: str, connection: str, user: str,
        device: str, now: float, app: str = "") -> bytes:
    """A grant for one flow of application ``app`` under the tunnel's grant ``key`` (the one the
    connector sent in its HELLO), valid ``GRANT_LIFETIME`` seconds from ``now``."""
    if len(key) < KEY_SIZE:
        raise ValueError(f"a grant key has {KEY_SIZE} bytes, not {len(key)}")
    issued = int(now)
    claims = _claims_encoder.encode(GrantClaims(MACED, edge, connector, host, port, protocol, connection, user,
                                                device, issued, issued + GRANT_LIFETIME, app))
    return _claims_encoder.encode((claims, hmac.digest(key, MAC_LABEL + claims, "sha256")))


class GrantVerifier:
    """A connector's check of the grants it receives (one per connector process).

    ``_seen`` holds, per deciding edge, a digest of the connection id of each grant honoured
    and not yet expired, at most ``limit`` in all and ``share`` (half of ``limit``) for any one
    edge: a grant is forgotten only once it has expired (with the clock skew allowed), and a
    valid grant that finds the memory, or its edge's share of it, full of unexpired ones is
    refused (``grant_cache_full``: the connector is opening more flows than it can remember
    grants for; the edge may try another connector). The share keeps one edge (compromised,
    or driven by its clients' OPENs) from locking every other edge out: whatever it does, half
    the memory stays for the others. Half, not a fair share of the edges seen: that would
    shrink only once the first edge's grants had expired, too late. The price: with a single
    edge, half of ``limit`` goes unused.
    """

    def __init__(self, connector: str, limit: int = 262_144) -> None:
        self.connector = connector
        self.limit = limit
        self.share = (limit + 1) // 2
        # Per edge, in the order they came: mostly the order they expire in (one edge, one clock).
        self._seen: dict[str, OrderedDict[bytes, int]] = {}
        self._swept = float("-inf")  # when the whole memory was last searched for expired grants

    def verify(self, grant: bytes, edge_key: ec.EllipticCurvePublicKey | None, edge: str, *, host: str, port: int,
               protocol: str, now: float, key: bytes = b"") -> GrantClaims:
        """The grant's claims if it is valid for this flow from ``edge``; ``GrantError`` saying why not.

        ``key`` is the tunnel's grant key (what this connector sent in its HELLO on the tunnel the
        OPEN came on; empty: none), ``edge_key`` the public key of the edge's certificate on it."""
        if not grant:
            raise GrantError("grant_missing", f"the OPEN from edge {edge} carries no grant")
        try:
            claims_bytes, tag = _envelope_decoder.decode(grant)
            claims = _claims_decoder.decode(claims_bytes)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise GrantError("grant_invalid", f"the grant from edge {edge} cannot be decoded") from None
        if claims.version == MACED:
            if len(key) < KEY_SIZE:
                raise GrantError("grant_unverifiable", "this tunnel has no grant key")
            if not hmac.compare_digest(hmac.digest(key, MAC_LABEL + claims_bytes, "sha256"), tag):
                raise GrantError("grant_forged", f"the grant does not verify with this tunnel's grant key from "
                                                 f"edge {edge}")
        elif claims.version == SIGNED:
            if edge_key is None:
                raise GrantError("grant_unverifiable", "the edge's certificate key is unknown on this tunnel")
            try:
                edge_key.verify(tag, claims_bytes, _ALGORITHM)
            except InvalidSignature:
                raise GrantError("grant_forged", f"the grant does not verify with edge {edge}'s certificate "
                                                 f"key") from None
        else:
            raise GrantError("grant_invalid", f"grant version {claims.version} is not supported")
        if claims.edge != edge or claims.connector != self.connector:
            raise GrantError("grant_mismatch", f"the grant is from {claims.edge} for {claims.connector}, not from "
                                               f"{edge} for {self.connector}")
        if (claims.host, claims.port, claims.protocol) != (host, port, protocol):
            raise GrantError("grant_mismatch", f"the grant is for {claims.host}:{claims.port}/{claims.protocol}, not "
                                               f"{host}:{port}/{protocol}")
        if claims.expires - claims.issued > MAX_LIFETIME:
            raise GrantError("grant_invalid", f"the grant claims to live {claims.expires - claims.issued}s "
                                              f"(at most {MAX_LIFETIME}s)")
        if now > claims.expires + CLOCK_SKEW:
            raise GrantError("grant_expired", f"the grant expired {now - claims.expires:.0f}s ago")
        if now < claims.issued - CLOCK_SKEW:
            raise GrantError("grant_invalid", f"the grant is issued {claims.issued - now:.0f}s in the future "
                                              f"(check the clocks of edge and connector)")
        seen = self._seen.get(claims.edge) or OrderedDict()
        _forget(seen, now)
        # The edge is the table, so no edge name and id run together; the key is a fixed-size
        # digest of the id, so the memory's size depends on ``limit`` alone, whatever the ids.
        key = hashlib.blake2b(claims.connection.encode(), digest_size=16).digest()
        if key in seen:
            raise GrantError("grant_replayed", f"the grant for connection {claims.connection} was already used")
        if len(seen) >= self.share or self.remembered >= self.limit:
            if now - self._swept >= 1.0:  # other edges' grants, and those out of order, are forgotten here
                self._swept = now
                self._forget_everywhere(now)
            if len(seen) >= self.share:
                raise GrantError("grant_cache_full", f"this connector remembers {len(seen)} unexpired grants from "
                                                     f"edge {edge}, the most one edge may (half of "
                                                     f"FERRYMAN_GRANT_CACHE): it opens no more flows from that edge "
                                                     f"until some expire")
            if self.remembered >= self.limit:
                raise GrantError("grant_cache_full", f"this connector remembers {self.remembered} unexpired grants, "
                                                     f"the most it may (FERRYMAN_GRANT_CACHE): it opens no more "
                                                     f"flows until some expire")
        seen[key] = claims.expires
        self._seen[claims.edge] = seen  # (again) if new, or swept away while empty
        return claims

    @property
    def remembered(self) -> int:
        """How many grants are remembered now (honoured, not yet forgotten)."""
        return sum(len(seen) for seen in self._seen.values())

    def _forget_everywhere(self, now: float) -> None:
        """Forget every expired grant of every edge (wherever it is in the order: an edge's clock
        may have been set back), and the edges left with none."""
        for edge, seen in list(self._seen.items()):
            for key in [key for key, expires in seen.items() if expires + CLOCK_SKEW < now]:
                del seen[key]
            if not seen:
                del self._seen[edge]


def _forget(seen: OrderedDict[bytes, int], now: float) -> None:
    """Forget one edge's expired grants: from the oldest on until an unexpired one."""
    while seen:
        key, expires = next(iter(seen.items()))
        if expires + CLOCK_SKEW >= now:
            return
        del seen[key]
