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
connection ids it has honoured until their grants expire, and never forgets one sooner: when
that memory is full, a new grant is refused, ``grant_cache_full``, rather than an unexpired
one forgotten).

Encoding: msgpack array ``[claims, tag]`` where ``claims`` is the msgpack encoding of
``GrantClaims`` (array-like) and ``tag`` the DER ECDSA signature over those bytes (version 1)
or the HMAC-SHA256 of ``MAC_LABEL`` followed by those bytes (version 2).
Pure: no I/O, the caller passes the clock.
"""

from __future__ import annotations

import hmac
from collections import OrderedDict

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

GRANT_LIFETIME = 30  # seconds from signing to expiry
MAX_LIFETIME = 300  # a grant claiming to live longer is refused
CLOCK_SKEW = 5  # seconds of clock difference between edge and connector tolerated
_ALGORITHM = ec.ECDSA(hashes.SHA256())
KEY_SIZE = 32  # bytes of a tunnel's grant key (a connector sends one in its HELLO)
MAC_LABEL = b"ferryman flow grant 2\x00"  # what the MAC covers before the claims: keys serve grants only
SIGNED, MACED = 1, 2  # claims versions: an ECDSA-signed grant, a MAC'd grant


class GrantError(ValueError):
    """A grant is missing, malformed, forged, expired, replayed or for another flow; ``code`` says which."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class GrantClaims(msgspec.Struct, array_like=True, frozen=True, gc=False):
    version: int
    edge: str
    connector: str
    host: str
    port: int
    protocol: str
    connection: str
    user: str
    device: str
    issued: int
    expires: int
    app: str = ""  # the application the edge matched ("" for a private DNS flow)


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

    ``seen`` holds the connection ids of grants honoured and not yet expired, at most
    ``limit``: a grant is forgotten only once it has expired (with the clock skew allowed), and
    a valid grant that finds the memory full of unexpired ones is refused (``grant_cache_full``:
    the connector is opening more flows than it can remember grants for; the edge may try
    another connector).
    """

    def __init__(self, connector: str, limit: int = 262_144) -> None:
        self.connector = connector
        self.limit = limit
        self._seen: OrderedDict[str, int] = OrderedDict()
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
        seen = self._seen
        self._forget(now)
        key = f"{claims.edge}/{claims.connection}"
        if key in seen:
            raise GrantError("grant_replayed", f"the grant for connection {claims.connection} was already used")
        if len(seen) >= self.limit:
            if now - self._swept >= 1.0:  # grants from edges whose clocks differ expire out of order
                self._swept = now
                self._forget(now, everywhere=True)
            if len(seen) >= self.limit:
                raise GrantError("grant_cache_full", f"this connector remembers {len(seen)} unexpired grants, the "
                                                     f"most it may (FERRYMAN_GRANT_CACHE): it opens no more flows "
                                                     f"until some expire")
        seen[key] = claims.expires
        return claims

    @property
    def remembered(self) -> int:
        """How many grants are remembered now (honoured, not yet forgotten)."""
        return len(self._seen)

    def _forget(self, now: float, everywhere: bool = False) -> None:
        """Forget expired grants: from the oldest on until an unexpired one, or (``everywhere``) all of them."""
        seen = self._seen
        if everywhere:
            for key in [key for key, expires in seen.items() if expires + CLOCK_SKEW < now]:
                del seen[key]
            return
        while seen:
            key, expires = next(iter(seen.items()))
            if expires + CLOCK_SKEW >= now:
                return
            del seen[key]
