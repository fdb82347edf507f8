"""How a node or a client comes to trust the control plane, and keeps trusting only it.

First contact (``ferryman edge|connector register``, ``ferryman client login``):
``first_contact(control, pin=..., ca_file=..., insecure=...)`` gives the CA (PEM) that the
control plane's HTTPS certificate must chain to:

- ``FERRYMAN_CONTROL_CA`` (``ca_file``): that PEM file (when a pin is given too, the file's CA
  must have that hash);
- else the pin (``--ca-hash``, or the hash a registration token carries):
  ``controltls.fetch_pinned_ca`` learns the CA over TLS and keeps it only when its hash is
  the pin;
- neither: refused, saying what to pass. An ``http://`` control plane is refused unless
  ``FERRYMAN_CONTROL_INSECURE_HTTP=1`` (then there is no CA, and a warning is printed).

``save(directory, pem)`` stores it as ``control-ca.pem`` (the file name goes in ``node.json``
or ``session.json``). Every later connection (``context_for``) verifies the control plane's
certificate, host name included, against ``FERRYMAN_CONTROL_CA`` when set, else that file.
"""

from __future__ import annotations

import os
import ssl
import urllib.parse

from ..basics import statefile
from ..basics.controltls import (
    CA_VARIABLE,
    ControlTlsError,
    ca_pin,
    check_scheme,
    control_urls,
    fetch_pinned_ca,
    load_ca_pem,
    parse_pin,
    read_ca_file,
    trust_hint,
    verifying_context,
)

CONTROL_CA_FILE = "control-ca.pem"


def first_contact(control: str, *, pin: str | None, ca_file: str = "", insecure: bool = False,
                  timeout: float = 15.0) -> bytes | None:
    """The CA (PEM) to verify the control plane at ``control`` with, or None for allowed plain HTTP."""
    if check_scheme(control, insecure) == "http":
        return None
    if ca_file:
        pem = read_ca_file(ca_file)
        if pin is not None and ca_pin(load_ca_pem(pem, ca_file)) != parse_pin(pin):
            raise ControlTlsError(f"{CA_VARIABLE}={ca_file} holds a CA with hash {ca_pin(load_ca_pem(pem, ca_file))}, "
                                  f"not {parse_pin(pin)}")
        return pem
    if pin is None:
        raise ControlTlsError(f"no way to check the control plane at {control.strip()}: {trust_hint()}")
    return fetch_pinned_ca(control, pin, timeout)


def save(directory: str, pem: bytes | None) -> str:
    """Store the pinned CA in ``directory``; its file name ("" when there is none: plain HTTP)."""
    if pem is None:
        return ""
    statefile.write_file(os.path.join(directory, CONTROL_CA_FILE), pem, 0o644)
    return CONTROL_CA_FILE


def context_for(control: str, directory: str, saved: str, *, ca_file: str = "",
                insecure: bool = False) -> ssl.SSLContext | None:
    """The TLS context of every later call to ``control`` (None for plain HTTP, when allowed):
    ``ca_file`` (``FERRYMAN_CONTROL_CA``) when given, else the CA saved at first contact."""
    if check_scheme(control, insecure, "control plane URL") == "http":
        return None
    if ca_file:
        return verifying_context(read_ca_file(ca_file))
    if not saved:
        hosts = ", ".join(str(urllib.parse.urlsplit(url).hostname) for url in control_urls(control))
        raise ControlTlsError(f"no CA is pinned for the control plane at {hosts} (registered or signed in over "
                              f"plain HTTP, or by an older version): register or sign in again with https://, "
                              f"or set {CA_VARIABLE}")
    path = os.path.join(directory, saved)
    return verifying_context(read_ca_file(path, "pinned control plane CA"))
