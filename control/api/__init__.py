"""The control plane's REST API: admin resources under ``/v1``, sign-in, node registration and node routes.

Imports point one way: ``app`` → the route modules → ``guards`` (→ ``throttle``), ``longpoll``,
``signin``, the bodies and ``errors`` → ``control.store``.

- ``app``: ``create_app(store, ca, edges_public=..., token_signer=...)``, the Litestar application.
- Route modules: ``admin`` (applications, connector groups, connectors, edges, DNS
  suffixes, forwarding profile, registration tokens, admin keys, revocations, client
  certificates, audit, configuration version); ``policies`` (application assignments,
  named locations, conditional-access policies); ``identity`` (users, user groups,
  devices, sign-in sessions); ``traffic`` (traffic logs, discovery); ``auth``
  (``/v1/auth``: sign-in, refresh, TOTP enrolment, sign-out, token keys); ``oidc``
  (``/v1/auth/oidc``: sign-in through an OIDC provider); ``client`` (``/v1/client``: the
  forwarding profile); ``register`` (``POST /v1/register``: one-time token + CSR → a
  node's certificate); ``nodes`` (``/v1/node``: configuration, heartbeat, renewal,
  traffic logs).
- ``guards``: the ``Api`` state behind every handler, the bearer-token parser and the
  three guards (admin key, node request token, user access token), with the state they
  keep (replay cache, failed sign-ins, TOTP steps used).
- ``throttle``: failed sign-ins per account, source and in all, and OIDC starts per
  source (``SignInLimiter``, ``SourceRate``), held by ``guards.Api``.
- ``longpoll``: the configuration long-poll of nodes and client agents.
- ``signin``: what every sign-in hands out (device certificate, session, tokens).
- ``schemas``, ``identity_schemas``, ``policy_schemas``: request/response bodies (msgspec Structs).
- ``errors``: one JSON error shape; store error codes → HTTP statuses.

``control.server.serve`` runs it under uvicorn on uvloop.
"""

from .app import create_app

__all__ = ["create_app"]
