"""The deciding edge of a relayed flow: whose key must have signed its grant.

A flow relayed between edges (``dataplane.edge.relay``) reaches this connector on a tunnel
from the relaying edge, but was decided, and its grant signed, by another edge, whose
certificate (DER) the OPEN carries (``signer``). ``DecidingEdges.key_of`` accepts that
certificate only if one of this connector's CA certificates issued it, it is an edge's
(role ``edge``), it is within its validity and its serial is not revoked; the grant must then
verify with its key and name that edge (``access.grants``). So a relaying edge cannot make a
grant in another edge's name, nor pass off anything but an edge certificate of this CA.
Certificates checked once are remembered (at most ``CACHE`` of them; revocation and validity
are checked again on every use).
"""

from __future__ import annotations

import datetime
from collections import OrderedDict

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from ..access.grants import GrantError
from ..basics import pki
from ..basics.pki import PeerCertificate

CACHE = 1024  # deciding edges' certificates remembered


class DecidingEdges:
    """Checks the certificates of deciding edges against the CA bundle ``ca_path``."""

    def __init__(self, ca_path: str) -> None:
        self.reload(ca_path)

    def reload(self, ca_path: str) -> None:
        """Read the CA bundle again (a renewal may bring a new one); forget what was checked."""
        self._cas = pki.read_certificates(ca_path)
        self._known: OrderedDict[bytes, tuple[PeerCertificate, x509.Certificate, ec.EllipticCurvePublicKey]] = (
            OrderedDict())

    def key_of(self, der: bytes, revoked: frozenset[int], now: datetime.datetime) -> tuple[str, ec.EllipticCurvePublicKey]:
        """(edge name, public key) of the deciding edge's certificate; ``GrantError`` saying why not."""
        known = self._known.get(der)
        if known is None:
            known = self._check(der)
            self._known[der] = known
            if len(self._known) > CACHE:
                self._known.popitem(last=False)
        identity, cert, key = known
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise GrantError("grant_signer_invalid", f"the certificate of deciding edge {identity.name} is not valid "
                                                     f"now (valid {cert.not_valid_before_utc:%Y-%m-%d %H:%M} to "
                                                     f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)")
        if identity.serial in revoked:
            raise GrantError("grant_signer_revoked", f"the certificate {identity.serial:x} of deciding edge "
                                                     f"{identity.name} is revoked")
        return identity.name, key

    def _check(self, der: bytes) -> tuple[PeerCertificate, x509.Certificate, ec.EllipticCurvePublicKey]:
        try:
            cert = x509.load_der_x509_certificate(der)
            identity = pki.certificate_identity(cert, der, "the deciding edge's certificate")
        except (ValueError, pki.PkiError) as exc:
            raise GrantError("grant_signer_invalid", f"the deciding edge's certificate cannot be read: {exc}") from None
        if identity.role != "edge":
            raise GrantError("grant_signer_invalid", f"the grant's signer {identity.name!r} is a {identity.role}, "
                                                     f"not an edge")
        for ca in self._cas:
            try:
                cert.verify_directly_issued_by(ca)
                break
            except (ValueError, TypeError, InvalidSignature):
                continue
        else:
            raise GrantError("grant_signer_invalid", f"the certificate of deciding edge {identity.name} was not issued "
                                                     f"by this connector's CA")
        key = cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise GrantError("grant_signer_invalid", f"the certificate of deciding edge {identity.name} has no EC key")
        return identity, cert, key
