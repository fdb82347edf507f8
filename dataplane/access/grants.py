"""Flow grants: the edge's signed permission for one flow, checked by the connector before it dials.

Defense in depth: an edge decides every flow, and a connector dials only what an edge has
signed for exactly that flow. A grant names the edge and the connector, the destination
(host, port, protocol), the traffic-log connection id, the user and device, an expiry
a few seconds ahead, and the application the edge matched (the connector lets only that
application's segments name special addresses: ``access.destinations``). It is signed (ECDSA P-256, SHA-256) with the edge's certificate key,
so the connector verifies it with the public key of the certificate the edge presented on
this very tunnel: a grant cannot be made without the edge's private key, moved to another
destination, replayed after it expires, or used twice (the connector remembers the
connection ids it has honoured until their grants expire, and never forgets one sooner: when
that memory is full, a new grant is refused, ``grant_cache_full``, rather than an unexpired
one forgotten).

Encoding: msgpack array ``[claims, signature]`` where ``claims`` is the msgpack encoding of
``GrantClaims`` (array-like) and ``signature`` the DER ECDSA signature over those bytes.
Pure: no I/O, the caller passes the clock.
"""

from __future__ import annotations

from collections import OrderedDict

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

GRANT_LIFETIME = 30  # seconds from signing to expiry
MAX_LIFETIME = 300  # a grant claiming to live longer is refused
CLOCK_SKEW = 5  # seconds of clock difference between edge and connector tolerated
_ALGORITHM = ec.ECDSA(hashes.SHA256())


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
    claims = _claims_encoder.encode(GrantClaims(1, edge, connector, host, port, protocol, connection, user, device,
                                                issued, issued + GRANT_LIFETIME, app))
    return _claims_encoder.encode((claims, key.sign(claims, _ALGORITHM)))


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

    def verify(self, grant: bytes, edge_key: ec.EllipticCurvePublicKey, edge: str, *, host: str, port: int,
               protocol: str, now: float) -> GrantClaims:
        """The grant's claims if it is valid for this flow from ``edge``; ``GrantError`` saying why not."""
        if not grant:
            raise GrantError("grant_missing", f"the OPEN from edge {edge} carries no grant")
        try:
            claims_bytes, signature = _envelope_decoder.decode(grant)
            claims = _claims_decoder.decode(claims_bytes)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise GrantError("grant_invalid", f"the grant from edge {edge} cannot be decoded") from None
        try:
            edge_key.verify(signature, claims_bytes, _ALGORITHM)
        except InvalidSignature:
            raise GrantError("grant_forged", f"the grant does not verify with edge {edge}'s certificate key") from None
        if claims.version != 1:
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
