"""A node's credentials: its certificate-backed name, the TLS contexts of its tunnels and
the wire limits it announces in HELLO (``NodeCredentials``, built from the node's settings)."""

from __future__ import annotations

import ssl

from ..basics import pki
from ..basics.settings import NodeSettings, SettingsError
from ..basics.version import SOFTWARE
from ..wire.connection import WireConfig


class NodeCredentials:
    """This node's certificate (its role and name), the TLS contexts made from it, and its wire limits."""

    def __init__(self, settings: NodeSettings, role: str) -> None:
        missing = [name for name, value in (("FERRYMAN_TLS_CA", settings.tls_ca),
                                            ("FERRYMAN_TLS_CERT", settings.tls_cert),
                                            ("FERRYMAN_TLS_KEY", settings.tls_key)) if not value]
        if missing:
            register = (f"register it (`ferryman {role} register --control URL --token T`), or "
                        if role in ("edge", "connector") else "")
            raise SettingsError(
                f"{', '.join(missing)} not set: {register}run `ferryman pki init DIR` and point the "
                f"FERRYMAN_TLS_* variables (or --ca/--cert/--key) at its files"
            )
        me = pki.read_node_certificate(settings.tls_cert)
        if me.role != role:
            raise SettingsError(f"{settings.tls_cert} is a {me.role} certificate; a {role} needs a {role} certificate")
        self.role = role
        self.name = me.name
        self.settings = settings

    def server_context(self) -> ssl.SSLContext:
        s = self.settings
        return pki.server_context(s.tls_cert, s.tls_key, s.tls_ca)

    def client_context(self) -> ssl.SSLContext:
        s = self.settings
        return pki.client_context(s.tls_cert, s.tls_key, s.tls_ca)

    def wire_config(self, group: str = "", grant_key_size: int = 0) -> WireConfig:
        s = self.settings
        return WireConfig(
            role=self.role, node=self.name, group=group, max_frame=s.max_frame, window=s.flow_window,
            max_flows=s.max_flows, max_pending_opens=s.max_pending_opens, software=SOFTWARE,
            grant_key_size=grant_key_size,
        )
