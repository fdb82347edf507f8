"""The edge's HTTPS front door: an authenticating reverse proxy for published web apps.

Self-contained: from the rest of ``dataplane`` it imports only ``contract.webapps`` (the one
home of the web-app field rules, pure, shared with the control plane); the edge plugs it in through
the interfaces in ``model`` (``Authorizer``, ``BackendDialer``, ``SignIn``, ``OidcSignIn``,
``WebApp``, ``Principal``, ``TransactionRecord``). Layout:

- ``server``     ``FrontDoor``: TLS + SNI + ALPN listener, app table, continuous-access calls
- ``http1``      HTTP/1.1 server connections (httptools; the parser measurement is there)
- ``http2``      HTTP/2 server connections (h2): flow control, stream limits, resets
- ``exchange``   the request/response abstraction both protocols give the proxy
- ``proxy``      per-request logic: host → app, sign-in, authorization, backend, records
- ``backend``    HTTP/1.1 client over the dialer's stream, TLS (MemoryBIO), keep-alive pool
- ``signin``     ``/.ferryman/`` pages: sign-in, single sign-on, sign-out, who am I
- ``session``    sealed cookies, codes and tickets (AES-256-GCM), replay cache
- ``assertion``  ``X-Ferryman-Jwt-Assertion`` (ES256) and the JWKS document
- ``headers``    hop-by-hop, identity-header stripping, X-Forwarded-*, header SSO
- ``translate``  internal → external URLs in headers and streamed HTML/CSS bodies
- ``websocket``  handshake helpers, byte splice, registry of live WebSockets
- ``limits``     token buckets (429)
- ``routes``     ``WebApp`` → ``Route`` (checked, with TLS contexts)
- ``pages``      Jinja2 pages (``templates/``)
- ``settings``   ``WebSettings``: every limit, with defaults
"""

from .assertion import AssertionSigner, jwks
from .model import (
    Authorizer, BackendDialer, ByteStream, DialError, OidcSignIn, Principal, RequestFacts, SignIn, SignInError,
    SignInResult, TransactionRecord, Verdict, WebApp, WebAppError,
)
from .server import FrontDoor
from .session import KeyRing
from .settings import WebSettings

__all__ = [
    "AssertionSigner", "Authorizer", "BackendDialer", "ByteStream", "DialError", "FrontDoor", "KeyRing",
    "OidcSignIn", "Principal", "RequestFacts", "SignIn", "SignInError", "SignInResult", "TransactionRecord",
    "Verdict", "WebApp", "WebAppError", "WebSettings", "jwks",
]
