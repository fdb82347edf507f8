"""The control plane's own HTTPS certificate, issued from its CA (``control.ca``).

``server_certificate(ca, data_dir, hosts, lifetime_days)`` makes sure ``<data_dir>/tls``
holds ``control.pem`` (the certificate, then the CA) and ``control.key`` (0600) for exactly
``hosts`` (``FERRYMAN_CONTROL_HOSTS``; ``default_hosts()`` when empty: ``localhost``,
``127.0.0.1``, ``::1`` and this host's name), signed by the current CA and with more than a
third of its lifetime left. Otherwise (first start, hosts changed, CA replaced, nearly
expired, unreadable) a new key and certificate replace the old ones. Checked at every start.
``ca.pem`` next to them is the CA it chains to (written at every start), for the admin CLI on
this host.

Several control-plane nodes on one PostgreSQL database sign with the one CA they share
(``control.shared_keys.open_ca``): each issues its own certificate, for its own
``FERRYMAN_CONTROL_HOSTS``, into its own data directory, and they all have the same CA hash
(``pin``), so one pin and one URL list reach any of them. A certificate a node issued from
another CA (its own, before it joined the database) is replaced at its next start.

Clients trust the CA, not this certificate: a new one needs nothing from them.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from control.ca import CaError, CertificateAuthority
from dataplane.basics import pki, statefile
from dataplane.basics.controltls import ca_pin

TLS_DIR = "tls"
CERT_FILE = "control.pem"
CA_FILE = "ca.pem"
KEY_FILE = "control.key"
RENEW_SHARE = 1 / 3  # a certificate with less than this share of its lifetime left is replaced at start


def default_hosts() -> list[str]:
    """Loopback by name and address, and this host's name when it is a usable DNS name."""
    hosts = ["localhost", "127.0.0.1", "::1"]
    name = socket.gethostname().strip().lower()
    if name and name not in hosts:
        try:
            pki.general_name(name)
            hosts.append(name)
        except pki.PkiError:
            pass
    return hosts


def parse_hosts(text: str) -> list[str]:
    """``FERRYMAN_CONTROL_HOSTS`` as a list (normalized, in order, without repeats); empty text: the defaults."""
    hosts: list[str] = []
    for item in text.split(","):
        host = item.strip().strip("[]").lower().rstrip(".")
        if not host:
            continue
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            pass
        try:
            pki.general_name(host)
        except pki.PkiError:
            raise CaError(f"FERRYMAN_CONTROL_HOSTS: {item.strip()!r} is neither an IP address nor a DNS name") from None
        if host not in hosts:
            hosts.append(host)
    return hosts or default_hosts()


def _names(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))}


def _usable(cert_path: str, key_path: str, ca: CertificateAuthority, hosts: list[str],
            now: datetime.datetime) -> bool:
    try:
        cert = pki.read_certificates(cert_path)[0]
        with open(key_path, "rb") as fh:
            key = serialization.load_pem_private_key(fh.read(), password=None)
    except (pki.PkiError, OSError, ValueError, TypeError):
        return False
    if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
            != cert.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo):
        return False
    if not pki.issued_by(cert, ca.certificate) or _names(cert) != set(hosts):
        return False
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_after_utc - now > lifetime * RENEW_SHARE


def server_certificate(ca: CertificateAuthority, data_dir: str, hosts: list[str], lifetime_days: int,
                       now: datetime.datetime | None = None) -> tuple[str, str, bool]:
    """(certificate file, key file, whether a new one was issued) for HTTPS on ``hosts``."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    directory = os.path.join(data_dir, TLS_DIR)
    cert_path, key_path = os.path.join(directory, CERT_FILE), os.path.join(directory, KEY_FILE)
    issued = False
    try:
        if not _usable(cert_path, key_path, ca, hosts, now):
            cert, key_pem = ca.issue_server(hosts, lifetime_days)
            os.makedirs(directory, mode=0o700, exist_ok=True)
            statefile.write_private(key_path, key_pem)
            statefile.write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM) + ca.bundle())
            issued = True
        ca_path = os.path.join(directory, CA_FILE)
        if _read(ca_path) != ca.bundle():
            statefile.write_file(ca_path, ca.bundle(), 0o644)
    except statefile.StateFileError as exc:
        raise CaError(f"cannot store the control plane's HTTPS certificate: {exc}") from None
    return cert_path, key_path, issued


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return None


def pin(ca: CertificateAuthority) -> str:
    """The CA hash clients pin (``sha256:<hex>``)."""
    return ca_pin(ca.certificate)
