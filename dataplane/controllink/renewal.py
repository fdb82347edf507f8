"""When a node certificate is due for renewal: less than a given share of its lifetime is left.

``renewal_due`` / ``renew_after`` answer for PEM bytes, a PEM file or a loaded certificate.
No network and no clock of its own: callers pass ``now``. (The key and CSR of a renewal are
made, and the signed certificate stored, by ``basics.pki``.)
"""

from __future__ import annotations

import datetime
import os

from cryptography import x509

from ..basics import pki
from ..basics.pki import PkiError

DEFAULT_RENEW_AT_FRACTION = 1 / 3

CertSource = bytes | str | os.PathLike[str] | x509.Certificate


def renew_after(cert: CertSource, renew_at_fraction: float = DEFAULT_RENEW_AT_FRACTION) -> datetime.datetime:
    """The moment (UTC) after which less than ``renew_at_fraction`` of the certificate's lifetime is left.

    ``cert`` is PEM bytes, a path to a PEM file, or a loaded certificate.
    """
    if not 0 < renew_at_fraction < 1:
        raise ValueError(f"renew_at_fraction must be between 0 and 1, exclusive, not {renew_at_fraction!r}")
    c = _load(cert)
    lifetime = c.not_valid_after_utc - c.not_valid_before_utc
    return c.not_valid_after_utc - lifetime * renew_at_fraction


def renewal_due(
    cert: CertSource, now: datetime.datetime, renew_at_fraction: float = DEFAULT_RENEW_AT_FRACTION
) -> bool:
    """True when less than ``renew_at_fraction`` of the lifetime is left at ``now`` (or it has expired)."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware, e.g. datetime.now(timezone.utc)")
    return now > renew_after(cert, renew_at_fraction)


def _load(cert: CertSource) -> x509.Certificate:
    if isinstance(cert, x509.Certificate):
        return cert
    if isinstance(cert, bytes):
        try:
            return x509.load_pem_x509_certificate(cert)
        except ValueError:
            raise PkiError("certificate: not a PEM certificate") from None
    return pki.read_certificates(os.fspath(cert))[0]
