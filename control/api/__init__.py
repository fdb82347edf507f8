"""The control plane's REST API: admin resources under ``/v1`` and node registration.

- ``app``: ``create_app(store, ca, edges_public=..., token_signer=...)``, the Litestar application.
- ``admin``: the admin routes (applications, connector groups, connectors, edges, DNS
  suffixes, registration tokens, admin keys, revocations, audit, configuration version).
- ``policies``: application assignments, named locations, conditional-access policies
  (bodies in ``policy_schemas``).
- ``identity``: users, user groups, devices, sign-in sessions (admin; bodies in ``identity_schemas``).
- ``auth``: ``/v1/auth``: user sign-in, refresh, TOTP enrolment, sign-out, token keys (no admin key).
- ``register``: ``POST /v1/register``, a node's one-time token + CSR → its certificate.
- ``deps``: the shared context and admin-key authentication.
- ``schemas``: request/response bodies (msgspec Structs).
- ``errors``: one JSON error shape; store error codes → HTTP statuses.

``control.server.serve`` runs it under uvicorn on uvloop.
"""

from .app import create_app

__all__ = ["create_app"]
