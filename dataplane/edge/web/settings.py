"""Every limit and knob of the edge's HTTPS front door, as one typed settings struct.

``WebSettings`` is what ``FrontDoor`` is built with; each field becomes a ``FERRYMAN_WEB_*``
variable in the edge's settings (the README table). Every limit here is enforced and answers
with its own status code and page:

============================  ==========  ==================================================
field                         default     answer when exceeded / meaning
============================  ==========  ==================================================
auth_host                     ""          external ``host[:port]`` of the central sign-in origin
max_header_block              16384       431: request line + header lines, bytes
max_headers                   100         431: header lines in one request
max_url_length                8192        414: request target, bytes
max_body_size                 104857600   413: request body, bytes (declared or streamed)
backend_timeout               85.0        504: seconds waiting for the backend (per read)
backend_timeout_long          180.0       504: the same for apps with ``backend_timeout="long"``
backend_connect_timeout       15.0        502/503/504: dialing and the backend TLS handshake
app_rate                      500.0       429: requests per second per web app (token bucket)
edge_rate                     750.0       429: requests per second for this edge, all apps
sign_in_rate                  10.0        429: sign-in attempts per minute per source address
header_timeout                10.0        408: seconds to receive a request head (and TLS)
idle_timeout                  60.0        seconds a keep-alive connection may idle; 408 for a
                                          stalled request body; cut for a stalled reader
h2_max_streams                100         concurrent HTTP/2 streams per connection
h2_stream_window              262144      HTTP/2 receive window per stream, bytes
h2_connection_window          1048576     HTTP/2 receive window per connection, bytes
h2_max_resets                 200         stream resets per 10 s before GOAWAY (rapid reset)
max_connections               10000       client connections at once; more are closed
pipeline_depth                8           HTTP/1.1 pipelined requests queued per connection
websocket_idle_timeout        300.0       seconds a WebSocket may carry nothing either way
websocket_recheck             2.0         seconds between re-authorizations of live WebSockets
sign_in_lifetime              300.0       seconds a started sign-in (state, form) stays valid
code_lifetime                 60.0        seconds a one-time sign-in code is valid
code_cache                    100000      one-time codes remembered against replay; full = 503
revoked_sessions              100000      signed-out sessions this edge refuses before the
                                          snapshot says so
sso_persistent                False       the sign-in host's cookie outlives the browser
assertion_lifetime            60          seconds an ``X-Ferryman-Jwt-Assertion`` is valid
assertion_issuer              ""          ``iss`` of assertions (default ``https://<auth_host>``)
pool_idle_per_key             64          idle backend connections per (app, session)
pool_idle_total               2048        idle backend connections in all
pool_idle_timeout             15.0        seconds an idle backend connection is kept
translate_max_carry           16384       bytes of an HTML tag / CSS url() the body
                                          translation looks ahead; longer ones stay as sent
buffer_size                   262144      bytes buffered per direction before back-pressure
============================  ==========  ==================================================
"""

from __future__ import annotations

import msgspec


class WebSettings(msgspec.Struct, kw_only=True, frozen=True):
    auth_host: str = ""
    max_header_block: int = 16384
    max_headers: int = 100
    max_url_length: int = 8192
    max_body_size: int = 100 * 1024 * 1024
    backend_timeout: float = 85.0
    backend_timeout_long: float = 180.0
    backend_connect_timeout: float = 15.0
    app_rate: float = 500.0
    edge_rate: float = 750.0
    sign_in_rate: float = 10.0
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    h2_max_streams: int = 100
    h2_stream_window: int = 262144
    h2_connection_window: int = 1048576
    h2_max_resets: int = 200
    max_connections: int = 10000
    pipeline_depth: int = 8
    websocket_idle_timeout: float = 300.0
    websocket_recheck: float = 2.0
    sign_in_lifetime: float = 300.0
    code_lifetime: float = 60.0
    code_cache: int = 100000
    revoked_sessions: int = 100000
    sso_persistent: bool = False
    assertion_lifetime: int = 60
    assertion_issuer: str = ""
    pool_idle_per_key: int = 64
    pool_idle_total: int = 2048
    pool_idle_timeout: float = 15.0
    translate_max_carry: int = 16384
    buffer_size: int = 262144

    def __post_init__(self) -> None:
        positive = ("max_header_block", "max_headers", "max_url_length", "max_body_size", "backend_timeout",
                    "backend_timeout_long", "backend_connect_timeout", "app_rate", "edge_rate", "sign_in_rate",
                    "header_timeout", "idle_timeout", "h2_max_streams", "h2_max_resets", "max_connections",
                    "pipeline_depth", "websocket_idle_timeout", "websocket_recheck", "sign_in_lifetime",
                    "code_lifetime", "code_cache", "revoked_sessions", "assertion_lifetime", "pool_idle_timeout",
                    "translate_max_carry", "buffer_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"web setting {name} must be greater than 0, not {getattr(self, name)!r}")
        for name in ("pool_idle_per_key", "pool_idle_total"):
            if getattr(self, name) < 0:
                raise ValueError(f"web setting {name} must not be negative")
        if not 65535 <= self.h2_stream_window <= 2**31 - 1:
            raise ValueError("web setting h2_stream_window must be between 65535 and 2147483647 bytes")
        if not self.h2_stream_window <= self.h2_connection_window <= 2**31 - 1:
            raise ValueError("web setting h2_connection_window must be at least h2_stream_window and below 2 GiB")
        if self.max_header_block < 1024:
            raise ValueError("web setting max_header_block must be at least 1024 bytes")
        if self.translate_max_carry < 1024:
            raise ValueError("web setting translate_max_carry must be at least 1024 bytes")

    def timeout_for(self, kind: str) -> float:
        """The backend timeout of an app whose ``backend_timeout`` is ``kind``."""
        return self.backend_timeout_long if kind == "long" else self.backend_timeout
