"""Typed settings of every Ferryman process, grouped by role, read from ``FERRYMAN_*`` variables.

Each role's settings object holds what that role reads: ``ControlSettings`` (the control
plane, and the admin CLI that finds it), ``EdgeSettings``, ``ConnectorSettings`` and
``ClientSettings`` (the nodes; what every node reads is ``NodeSettings``, what the connector
and the client agent read to dial edges ``DialerSettings``), and ``CommonSettings`` (what
every process reads: the other commands). Each field maps to the variable
``FERRYMAN_<FIELD NAME IN CAPITALS>``; the same names (with or without the prefix, any case)
may also be given in a TOML file named by ``FERRYMAN_CONFIG``. Precedence: command-line flag
> environment > config file > default. ``load(role, ...)`` checks every variable that is set,
whichever role reads it, and returns that role's settings. ``VARIABLES`` documents each
variable and is the source of the README table (``ferryman config vars`` prints it, with the
roles that read each).
"""

from __future__ import annotations

import os
import tomllib
from typing import Any, TypeVar

import msgspec

PREFIX = "FERRYMAN_"


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


class CommonSettings(msgspec.Struct, kw_only=True):
    """What every Ferryman process reads."""

    data_dir: str = ".ferryman"
    log_level: str = "info"
    log_format: str = "text"
    control_ca: str = ""
    control_insecure_http: int = 0


class ControlSettings(CommonSettings, kw_only=True):
    """The control plane's settings (and those the admin CLI finds it with)."""

    control_listen: str = "127.0.0.1:8080"
    control_hosts: str = ""
    database_url: str = ""
    secrets_key_file: str = ""
    cert_lifetime_days: int = 180
    node_certificates_per_day: int = 4
    superseded_cert_grace: float = 86400.0
    traffic_retention_days: int = 30
    heartbeat_interval: float = 30.0
    access_token_minutes: int = 60
    oidc_issuer: str = ""
    oidc_client_id: str = ""
    oidc_client_secret: str = ""
    oidc_redirect_uri: str = ""
    oidc_upn_claim: str = "email"
    oidc_mfa_amr: str = "mfa,otp,hwk,swk"
    oidc_starts_per_minute: int = 20
    sign_in_window: float = 300.0
    sign_in_max_failures: int = 10
    sign_in_max_source_failures: int = 100
    sign_in_max_account_failures: int = 50
    sign_in_max_total_failures: int = 1000
    sign_in_known_source_days: float = 30.0
    refresh_grace: float = 30.0
    console_idle_minutes: int = 30
    console_session_hours: int = 12
    # limits of the HTTP server (control plane API; a node's metrics server)
    control_max_connections: int = 4096
    control_max_waiting_per_source: int = 128
    control_request_timeout: float = 20.0
    control_keepalive_timeout: float = 5.0
    control_max_head: int = 65536
    log_limit: int = 50
    log_limit_interval: float = 10.0


class NodeSettings(CommonSettings, kw_only=True):
    """What every node (edge, connector, client agent) reads: its TLS files, metrics, wire limits."""

    metrics_addr: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    max_frame: int = 262144
    flow_window: int = 524288
    max_flows: int = 16384
    max_pending_opens: int = 1024
    keepalive_interval: float = 10.0
    handshake_timeout: float = 10.0
    write_buffer_high: int = 1048576
    udp_backlog: int = 32768
    quic_packet_size: int = 1350
    quic_engine: str = "auto"
    quic_max_pending_datagrams: int = 512
    quic_socket_buffer: int = 4194304
    quic_offload: str = "on"
    # limits of the HTTP server (control plane API; a node's metrics server)
    control_max_connections: int = 4096
    control_max_waiting_per_source: int = 128
    control_request_timeout: float = 20.0
    control_keepalive_timeout: float = 5.0
    control_max_head: int = 65536
    log_limit: int = 50
    log_limit_interval: float = 10.0


class EdgeSettings(NodeSettings, kw_only=True):
    """The edge's settings."""

    edge_listen: str = "0.0.0.0:8443"
    apps_file: str = ""
    # worker processes sharing the edge's ports (``edge.workers``)
    edge_workers: int = 0
    edge_worker_steering: str = "hash"
    edge_worker_restart_max: float = 30.0
    drain_grace: float = 30.0
    edge_quic: str = "on"
    quic_retry_threshold: int = 64
    traffic_queue: int = 100000
    open_timeout: float = 15.0
    pending_opens_share: float = 0.25
    max_tunnels_per_client: int = 16
    max_tunnels_per_connector: int = 128
    max_handshakes: int = 1024
    max_handshakes_per_source: int = 128
    # following the control plane (a registered edge)
    control_url: str = ""
    config_wait: float = 25.0
    renew_at: float = 0.3333
    renewal_spread: float = 600.0
    heartbeat_interval: float = 30.0
    presence_interval: float = 1.0
    # the HTTPS front door for published web apps (off while edge_https_listen is empty)
    edge_https_listen: str = ""
    edge_https_cert: str = ""
    edge_https_key: str = ""
    web_auth_host: str = ""
    web_cookie_keys: str = ""
    web_oidc_label: str = ""
    web_assertion_key: str = ""
    web_max_header_block: int = 16384
    web_max_headers: int = 100
    web_max_url_length: int = 8192
    web_max_body_size: int = 104857600
    web_backend_timeout: float = 85.0
    web_backend_timeout_long: float = 180.0
    web_backend_connect_timeout: float = 15.0
    web_app_rate: float = 500.0
    web_edge_rate: float = 750.0
    web_sign_in_rate: float = 10.0
    web_header_timeout: float = 10.0
    web_idle_timeout: float = 60.0
    web_websocket_idle_timeout: float = 300.0
    web_max_connections: int = 10000
    web_admit_cache: float = 1.0


class DialerSettings(NodeSettings, kw_only=True):
    """What the nodes that dial edges (connector, client agent) read: edges, transport, proxy
    egress, reconnecting, and their UDP flows."""

    edges: str = "127.0.0.1:8443"
    transport: str = "tcp"
    quic_timeout: float = 3.0
    quic_probe_interval: float = 300.0
    https_proxy: str = ""
    no_proxy: str = ""
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    drain_grace: float = 30.0
    dial_timeout: float = 10.0
    udp_idle_timeout: float = 120.0
    max_udp_flows: int = 4096
    udp_queue: int = 256
    udp_buffer: int = 4194304
    flow_buffer_budget: int = 536870912


class ConnectorSettings(DialerSettings, kw_only=True):
    """The connector's settings."""

    connector_tunnels: int = 2
    connector_edges: int = 4
    connector_group: str = "default"
    dns_server: str = ""
    grant_cache: int = 262144
    # what a flow's destination name resolves to, and which of its addresses are dialed
    resolve_timeout: float = 5.0
    resolve_threads: int = 32
    dial_addresses: int = 8
    apps_file: str = ""
    # following the control plane (a registered connector)
    control_url: str = ""
    config_wait: float = 25.0
    renew_at: float = 0.3333
    heartbeat_interval: float = 30.0


class ClientSettings(DialerSettings, kw_only=True):
    """The client agent's settings."""

    open_timeout: float = 15.0
    socks_listen: str = ""
    http_listen: str = ""
    dns_listen: str = ""
    dns_upstream: str = ""
    dns_cache: int = 10000
    dns_rebind_allow: str = ""
    process_lookup: str = "on"
    process_lookup_wait: float = 0.004
    local_users: str = ""
    transparent: str = "off"


ROLES: dict[str, type[CommonSettings]] = {
    "control": ControlSettings, "edge": EdgeSettings, "connector": ConnectorSettings, "client": ClientSettings,
}
S = TypeVar("S", bound=CommonSettings)


def _types_and_defaults() -> tuple[dict[str, type], dict[str, Any]]:
    """Each variable's type and default, from the role structs (a variable several roles read
    has the same in each: checked here)."""
    types: dict[str, type] = {}
    defaults: dict[str, Any] = {}
    for cls in ROLES.values():
        instance = cls()
        for field in msgspec.structs.fields(cls):
            default = getattr(instance, field.name)
            if field.name in defaults and defaults[field.name] != default:
                raise AssertionError(f"{field.name}: default {default!r} in {cls.__name__} differs")
            types[field.name] = type(default)
            defaults[field.name] = default
    return types, defaults


_TYPES, _DEFAULTS = _types_and_defaults()


VARIABLES: dict[str, str] = {
    "data_dir": "Directory for node state (certificates written by `ferryman pki init`, fabric files).",
    "log_level": "Log level: debug, info, warning, error.",
    "log_format": "`text` for humans, `json` for one JSON object per line.",
    "metrics_addr": "HOST:PORT serving Prometheus `/metrics` and `/ready`; empty disables it.",
    "control_listen": "Control plane: HOST:PORT of its HTTPS API (admin API, registration).",
    "control_hosts": "Control plane: comma-separated host names and IP addresses its HTTPS certificate (issued from its own CA, in FERRYMAN_DATA_DIR/tls) names; empty means `localhost`, `127.0.0.1`, `::1` and this host's name. A change issues a new certificate at the next start.",
    "control_ca": "Nodes, clients, admin CLI: the control plane's CA certificate (PEM file) that its HTTPS certificate must chain to; empty means the CA pinned at registration or sign-in (`--ca-hash`, or the hash inside the registration token), or for the admin CLI `FERRYMAN_DATA_DIR/ca/ca.pem` when it exists.",
    "control_insecure_http": "`1` lets the control plane serve, and nodes, clients and the admin CLI use, plain `http://` (no TLS; warned in the log at every start); `0` refuses `http://` control-plane URLs.",
    "database_url": "Control plane: SQLAlchemy database URL (e.g. `postgresql://user:pw@host/db`); empty means an SQLite file `control.db` in FERRYMAN_DATA_DIR.",
    "secrets_key_file": "Control plane: file holding the secrets key (32 bytes, base64) that seals stored secrets and the keys control-plane nodes share (CA, token signing); every node on one database needs the same file. Empty: `secrets.key` in FERRYMAN_DATA_DIR, created on first start.",
    "cert_lifetime_days": "Control plane: lifetime in days of the node certificates it signs (registration and renewal), and of its own HTTPS certificate (issued again at a start once less than a third is left).",
    "superseded_cert_grace": "Control plane: seconds a node certificate stays good once a renewal replaced it and the node has used the new one (its first heartbeat on it); then it is revoked (as `ferryman admin certs revoke` would, audited as `control-plane`), so a key copied before the renewal does not outlive it. A node that never uses its new certificate (its renewal answer was lost) keeps the old one. Connectors move their tunnels to the renewed certificate at once (draining the old ones, slot by slot), and a renewed edge has its dialers move within FERRYMAN_RENEWAL_SPREAD; tunnels still on the old certificate when it is revoked are cut.",
    "node_certificates_per_day": "Control plane: most certificates one edge or connector may be issued in any 24 hours, its registration included; a renewal beyond is refused (429). A connector's renewal is a configuration change for every node.",
    "traffic_retention_days": "Control plane: traffic log records older than this many days are deleted (checked hourly).",
    "heartbeat_interval": "Seconds between node heartbeats to the control plane; a node missing 3 in a row is shown inactive (set the same on nodes and control plane).",
    "access_token_minutes": "Control plane: lifetime in minutes of the access tokens it signs at sign-in and refresh (edges accept a token until it expires).",
    "oidc_issuer": "Control plane: issuer URL of an OpenID Connect provider users may sign in with (`ferryman client login --oidc`); its `/.well-known/openid-configuration` must name exactly this issuer. Empty: OIDC sign-in is off.",
    "oidc_client_id": "Control plane: the client id registered for Ferryman at the OIDC provider.",
    "oidc_client_secret": "Control plane: the client secret at the OIDC provider; empty for a public client (PKCE only).",
    "oidc_redirect_uri": "Control plane: its callback URL as registered at the OIDC provider, e.g. `https://control.example/v1/auth/oidc/callback`.",
    "oidc_upn_claim": "Control plane: the ID token claim (lower-cased) that links an OIDC account to the user with that UPN at its first sign-in: only `email`, and only with `email_verified: true`; with another claim an admin links each account (`ferryman admin users update UPN --oidc-subject SUB`). Signed-in users are then found by the token's `iss` and `sub`; users are not created at sign-in.",
    "oidc_mfa_amr": "Control plane: comma-separated ID token `amr` values that count as multi-factor (the session's amr is then `pwd,mfa`).",
    "oidc_starts_per_minute": "Control plane: most OIDC sign-ins one source address may start per minute (`POST /v1/auth/oidc/start`; IPv6 counted per /64); beyond that 429.",
    "sign_in_window": "Control plane: seconds over which failed sign-ins (wrong password or second factor) are counted for the FERRYMAN_SIGN_IN_MAX_* limits.",
    "sign_in_max_failures": "Control plane: failed sign-ins allowed for one account from one source address (IPv6: /64) within the window; then that pair gets 429 until the oldest failure ages out.",
    "sign_in_max_source_failures": "Control plane: failed sign-ins allowed from one source address, all accounts together, within the window (not applied to an account's known sources).",
    "sign_in_max_account_failures": "Control plane: failed sign-ins allowed for one account from all addresses within the window; beyond that only the account's known sources (where it signed in lately) may try.",
    "sign_in_max_total_failures": "Control plane: failed sign-ins allowed in all within the window (per control-plane process); beyond that only known sources may try.",
    "sign_in_known_source_days": "Control plane: days a source address where an account signed in stays known for it: held only to FERRYMAN_SIGN_IN_MAX_FAILURES, so failures from elsewhere never lock the user out there.",
    "refresh_grace": "Control plane: seconds after a refresh during which the same refresh token may be sent again (its answer was lost) and gets the same new refresh token; later it counts as reuse and revokes the session. 0 disables.",
    "console_idle_minutes": "Control plane: a web console session ends after this many minutes without a request (sign in again).",
    "console_session_hours": "Control plane: a web console session ends this many hours after sign-in, however active.",
    "control_url": "Edge/connector: control plane URL to follow, or several comma-separated (control-plane nodes sharing one database: tried in turn, the one that answered kept); empty means the one recorded at registration.",
    "config_wait": "Edge/connector: seconds one configuration long-poll waits for a change before asking again.",
    "renew_at": "Edge/connector: renew the certificate once less than this share of its lifetime is left.",
    "renewal_spread": "Edge: seconds over which a renewed edge asks the client agents, connectors and peer edges whose tunnels present its old certificate to dial again (GOAWAY `renewed`, one tunnel after another, a connector's tunnels far apart; each old tunnel closes once its flows ended, however long they run). Keep it well below the control plane's FERRYMAN_SUPERSEDED_CERT_GRACE, which revokes the old certificate and cuts what still uses it. 0: all at once.",
    "traffic_queue": "Edge: traffic log records held while the control plane is unreachable (the oldest are dropped and counted beyond).",
    "tls_ca": "CA bundle (PEM) that peer certificates must chain to.",
    "tls_cert": "This node's certificate (PEM).",
    "tls_key": "This node's private key (PEM, mode 0600).",
    "edge_listen": "Edge: HOST:PORT on which client and connector tunnels are accepted.",
    "edge_workers": "Edge: worker processes sharing the FERRYMAN_EDGE_LISTEN ports (TCP and UDP, SO_REUSEPORT) under one supervisor that restarts them and serves the edge's one metrics endpoint (`--workers`); 0 means one per core; 1 runs the edge in a single process, without a supervisor. `ferryman up` and the tests' fabric pin 1 unless told otherwise.",
    "edge_worker_steering": "Edge with workers: which worker takes a new TCP connection: `hash` (the kernel's hash of the addresses and ports) or `cpu` (the worker numbered CPU modulo FERRYMAN_EDGE_WORKERS, for the CPU that received the connection: keeps a connection on the core its NIC queue interrupts; only with a multi-queue NIC or RPS). QUIC datagrams always go by hash.",
    "edge_worker_restart_max": "Edge with workers: longest wait in seconds before a dead worker is started again (the wait doubles from 0.25 s with each death that follows a short life, and starts over after a minute of work).",
    "edge_https_listen": "Edge: HOST:PORT of the HTTPS front door serving published web apps to browsers (`--https`); empty turns it off.",
    "edge_https_cert": "Edge: certificate chain (PEM) the HTTPS front door presents for the sign-in host and every web app's external host.",
    "edge_https_key": "Edge: private key (PEM) of FERRYMAN_EDGE_HTTPS_CERT.",
    "web_auth_host": "Edge: external HOST[:PORT] of the sign-in site every web app redirects to (single sign-on across web apps); required with FERRYMAN_EDGE_HTTPS_LISTEN.",
    "web_oidc_label": "Edge: the text of the sign-in page's button for the control plane's external OIDC provider (e.g. `Sign in with Contoso`); empty means no such button. The control plane must have FERRYMAN_OIDC_ISSUER set.",
    "web_cookie_keys": "Edge: keys that seal web session cookies, `kid:base64url-32-bytes[,kid:key...]` (the first seals, all open; every edge needs the same); empty means a random key per edge, shared by its workers (one edge only: cookies stop working when it restarts).",
    "web_assertion_key": "Edge: EC P-256 private key (PEM file) signing `X-Ferryman-Jwt-Assertion` (published at `https://<auth host>/.ferryman/jwks`); empty means a random key per edge, shared by its workers.",
    "web_max_header_block": "Edge: largest request head (request line + headers) of a web request, bytes; larger ones get 431.",
    "web_max_headers": "Edge: most header lines in one web request; more get 431.",
    "web_max_url_length": "Edge: longest request target of a web request, bytes; longer ones get 414.",
    "web_max_body_size": "Edge: largest web request body, bytes (declared or streamed); larger ones get 413.",
    "web_backend_timeout": "Edge: seconds a web app's backend may take to answer (per read) before 504 (apps with backend timeout `default`).",
    "web_backend_timeout_long": "Edge: the same for web apps with backend timeout `long`.",
    "web_backend_connect_timeout": "Edge: seconds to reach a web app's backend through a connector (flow and TLS) before 502/503/504.",
    "web_app_rate": "Edge: web requests per second per web app (token bucket); beyond, 429 with `Retry-After`.",
    "web_edge_rate": "Edge: web requests per second for this edge, all web apps together; beyond, 429 with `Retry-After`.",
    "web_sign_in_rate": "Edge: sign-in attempts (password posts and OIDC starts) per minute per source address at the sign-in site; beyond, 429.",
    "web_header_timeout": "Edge: seconds a browser has for the TLS handshake and each request head; then 408.",
    "web_idle_timeout": "Edge: seconds a keep-alive web connection may idle (and a request body may stall: 408).",
    "web_websocket_idle_timeout": "Edge: seconds a WebSocket may carry nothing either way before it is closed.",
    "web_max_connections": "Edge: most browser connections at once on the HTTPS front door; more are closed at once.",
    "web_admit_cache": "Edge: seconds an allowing decision of a web request is reused for the same session, web app, source address and configuration version (at most 100,000 remembered; a new configuration, e.g. an assignment removed or the session revoked, applies to the very next request); 0 decides every request anew.",
    "apps_file": "Edge without a control plane: application file (JSON or TOML) mapping segments to connector groups, and optionally connectors to their groups (a registered edge refuses it). Connector: the applications whose IP/CIDR/range segments may name loopback, link-local, metadata or its own addresses (when it does not follow a control plane, or to override its applications).",
    "edges": "Connector/client: comma-separated HOST:PORT list of edges to dial.",
    "connector_edges": "Connector: most edges it holds tunnels to, chosen from the control plane's edge list (or FERRYMAN_EDGES) by rendezvous hashing of its name, so connectors spread over the edges and move only when edges come or go; flows landing on other edges are relayed to these.",
    "connector_tunnels": "Connector: outbound tunnels kept open, spread over the edges it chose (at least one per edge: FERRYMAN_CONNECTOR_EDGES).",
    "connector_group": "Connector: connector group it names in its HELLO (a registered connector: the one it was registered into). An edge with a control plane, or whose application file lists connectors, serves it under the group recorded there and refuses it when this names another.",
    "drain_grace": "Connector and edge: seconds running flows (an edge: and web requests) may take to finish after SIGTERM; meanwhile the node sends GOAWAY `draining` and takes no new flows (an edge: no new tunnels, `/ready` 503), then what still runs is cut. Edge with workers: the supervisor kills workers still running one second later. Client agent: seconds a tunnel replaced by another (its edge drains, or QUIC came back) may keep its flows.",
    "dial_timeout": "Connector: seconds to wait for a backend TCP connect.",
    "resolve_timeout": "Connector: seconds to resolve a flow's destination name (system resolver); then the OPEN fails with `dns_timeout`.",
    "resolve_threads": "Connector: threads resolving flows' destination names (the system resolver), so most lookups at once; a lookup that stalls holds its thread until the system resolver gives up. One device or user may hold a quarter of them; a lookup beyond, or finding none free, fails at once (`too_many_lookups`).",
    "dial_addresses": "Connector: most addresses of a resolved name that are checked and tried, in the resolver's order (the rest are ignored).",
    "reconnect_min": "Connector/client: first reconnect delay in seconds (doubles, with jitter). A client agent also dials at most one replacement for a draining tunnel per this many seconds.",
    "reconnect_max": "Connector/client: ceiling of the reconnect delay in seconds.",
    "open_timeout": "Client: seconds to wait for the edge's OPEN_OK before failing a flow. Edge: seconds a flow waits for the connector's answer; then the client gets OPEN_FAIL `open_timeout` and the connector an RST (every OPEN is answered).",
    "pending_opens_share": "Edge: share of FERRYMAN_MAX_PENDING_OPENS that one user (or, without sign-in, one device) may have waiting for answers on one connector tunnel; further OPENs of theirs are refused (`too_many_pending`) so others keep opening flows.",
    "socks_listen": "Client: HOST:PORT for the SOCKS5 listener (localhost only); empty disables it.",
    "http_listen": "Client: HOST:PORT for the HTTP CONNECT proxy listener (localhost only); empty disables it.",
    "dns_listen": "Client: HOST:PORT of the local DNS resolver (UDP and TCP; localhost only): names under the private DNS suffixes are resolved by a connector through the tunnel, others by the system resolver. Empty disables it.",
    "dns_server": "Connector: HOST[:PORT] of the DNS server that resolves private names for clients; empty means the first `nameserver` of /etc/resolv.conf.",
    "grant_cache": "Connector: most flow grants remembered until they expire (replay protection, about 30 s each; 42 to 50 MiB when full), at most half of them from any one edge; a flow beyond it, or beyond its edge's half, is refused (`grant_cache_full`), an unexpired grant is never forgotten.",
    "dns_upstream": "Client: HOST[:PORT] of the DNS server its resolver asks for names that are not private; empty means the first `nameserver` of /etc/resolv.conf (other than the resolver itself).",
    "dns_rebind_allow": "Client agent: DNS suffixes (comma-separated) whose answers from the system resolver may point into private applications' address segments. Any other public name's A/AAAA records in those segments are withheld (DNS rebinding: a web page's own name pointed at a private address would make the browser reach the private app through the tunnel with the page's origin) and counted (`ferryman_dial_refused_total{rule=\"dns_rebinding\"}`).",
    "dns_cache": "Client: most DNS answers kept in the resolver's cache (each for its TTL).",
    "process_lookup_wait": "Client: seconds an OPEN waits at most for the process lookup (then it goes without the process name).",
    "transparent": "Client: `on` captures TCP to the forwarding profile's private addresses (and the addresses the private DNS resolver answered) transparently with nftables redirect rules on Linux (root); `off` captures only what forwards, SOCKS5 and HTTP CONNECT are given.",
    "local_users": "Client: local accounts (user names or uids, comma-separated) that may use the agent's SOCKS5, HTTP CONNECT and forward listeners besides the agent's own user and root; `*` lets every account in. Linux: another account's connection is closed (HTTP CONNECT answers 403), counted as `local_user_refused` in `ferryman_open_failures_total` (a connection its application closed before its owner was looked up: `local_closed_early`, refused too). Transparent capture and the DNS resolver serve every account.",
    "process_lookup": "Client: `on` finds the process (name, pid) behind each captured connection on Linux and sends it for the traffic log; `off` skips it.",
    "transport": "Connector/client: tunnel transport to the edges: `tcp` (TLS 1.3 over TCP), `quic`, or `auto` (QUIC, falling back to TLS/TCP when UDP is blocked and trying QUIC again later).",
    "edge_quic": "Edge: `on` also serves QUIC tunnels on UDP at the FERRYMAN_EDGE_LISTEN port; `off` serves TLS/TCP only.",
    "quic_timeout": "Connector/client: seconds a QUIC handshake may take before `auto` falls back to TLS/TCP.",
    "quic_probe_interval": "Connector/client: with `auto` on a TCP fallback, seconds before QUIC is tried again.",
    "quic_packet_size": "Largest UDP payload of a QUIC packet, bytes (1200 to 1452).",
    "quic_engine": "QUIC implementation: `qh3` (native packet core, fast), `aioquic` (pure Python), or `auto` (qh3 when installed, else aioquic, logged).",
    "quic_offload": "`on`: QUIC sockets send with UDP segmentation offload (GSO) and receive coalesced (GRO) where the kernel has them, else one datagram per system call; `off`: always one per call.",
    "quic_socket_buffer": "Receive and send buffer in bytes asked for on each QUIC UDP socket, so bursts are not dropped by the kernel (capped at net.core.rmem_max/wmem_max).",
    "quic_max_pending_datagrams": "UDP datagrams a QUIC tunnel queues for sending; at the bound it sends them at once and refuses more (`datagram_queue_full`) only while the congestion window holds them back.",
    "quic_retry_threshold": "Edge: with more QUIC handshakes than this in progress, new clients must first prove their address (QUIC Retry).",
    "https_proxy": "Connector/client: HTTP CONNECT proxy URL for TLS/TCP tunnels (`http://[user:password@]host:port`); empty means the `HTTPS_PROXY`/`https_proxy` variable.",
    "no_proxy": "Connector/client: comma-separated hosts, domains (`.corp.example`) or CIDRs dialed without the proxy; empty means the `NO_PROXY`/`no_proxy` variable.",
    "udp_idle_timeout": "Seconds without a datagram either way after which a UDP flow ends.",
    "max_udp_flows": "Client/connector: most UDP flows at once (per UDP forward at the client; at the connector UDP and private DNS flows in all, a quarter of them at most for one device).",
    "udp_queue": "Datagrams held per UDP flow while it opens or its tunnel is busy; beyond that they are dropped and counted.",
    "udp_buffer": "Client/connector: receive and send buffer in bytes asked for on each UDP socket (the kernel caps it at net.core.rmem_max/wmem_max).",
    "max_frame": "Largest frame payload accepted or sent, bytes.",
    "flow_window": "Initial per-flow credit window, bytes (per direction).",
    "flow_buffer_budget": "Connector/client: most bytes all flows together may hold for local sockets that have not taken them yet (backends at the connector, apps at the client; one flow holds at most 256 KiB plus FERRYMAN_FLOW_WINDOW). Past it the flows whose sockets have held bytes the longest are reset (`buffer_budget`), so a peer cannot park a window in each of thousands of flows toward sockets that read nothing.",
    "max_flows": "Most concurrent flows per tunnel; further OPENs are refused.",
    "max_pending_opens": "Most OPENs awaiting an answer per tunnel; further OPENs are refused.",
    "keepalive_interval": "Seconds between PINGs; a tunnel silent for 3 intervals is dead.",
    "handshake_timeout": "Seconds allowed for the TLS handshake plus HELLO exchange; on the client agent also for a SOCKS5 or HTTP CONNECT front end's handshake (greeting and request, or the request head): a local connection that has not finished it by then is closed (HTTP CONNECT answers 408).",
    "write_buffer_high": "Transport write-buffer high-water mark in bytes (back-pressure point): above it a tunnel takes no more data from flows, and an edge stops reading a TLS/TCP tunnel's peer until the peer has read enough of what was sent to it (`ferryman_tunnel_read_pauses_total`).",
    "udp_backlog": "Bytes waiting to be written to a TLS/TCP tunnel above which a datagram is dropped (`tunnel_busy`) rather than queued behind them, at every hop: bounds how long a datagram waits (32 KiB is about 9 ms of 64-byte datagrams at 50,000/s).",
    "max_tunnels_per_client": "Edge: most tunnels one client identity (its certificate's name) may hold at once; one more is refused at HELLO (GOAWAY `too_many_tunnels`).",
    "presence_interval": "Edge: fewest seconds between two reports to the control plane of the connectors it holds tunnels to (a change is reported this soon, not at the next heartbeat); the presence map edges relay flows by (`GET /v1/node/presence`) is kept apart from the configuration version.",
    "max_tunnels_per_connector": "Edge: most tunnels one connector identity (its certificate's name) may hold at once; one more is refused at HELLO (GOAWAY `too_many_tunnels`).",
    "max_handshakes": "Edge: most tunnel handshakes (TCP accepted, TLS and HELLO not done yet; each bounded by FERRYMAN_HANDSHAKE_TIMEOUT) in progress at once; a connection beyond is closed at once. QUIC handshakes (Initial taken, HELLO not done yet) are counted apart with the same cap; a new QUIC client beyond is dropped.",
    "max_handshakes_per_source": "Edge: most tunnel handshakes in progress from one source address (IPv6: /64); a connection beyond is closed at once. The same applies to QUIC handshakes, counted apart.",
    "control_max_connections": "Control plane API and each node's metrics server: most connections open at once; one more is answered 503 and closed. Every node and signed-in client agent holds one configuration or profile long-poll: keep this above the fleet (and below the process's open-file limit).",
    "control_max_waiting_per_source": "Control plane API and each node's metrics server: most connections of one source address (IPv6: /64) waiting for a request head; one more is answered 503 and closed.",
    "control_request_timeout": "Control plane API and each node's metrics server: seconds a request head may take from the connection (or the request's first byte) until complete; then the connection is closed (408). The metrics server allows at most 5 s. On the control plane a request body must then be complete within this plus one second per 64 KiB of it (else 408), and counts as waiting for its source until it is.",
    "control_keepalive_timeout": "Control plane API: seconds an idle connection is kept open between requests.",
    "control_max_head": "Control plane API and each node's metrics server: most bytes of a request line and headers; beyond that 431 and the connection is closed. The metrics server allows at most 8192.",
    "log_limit": "Most log lines about refused tunnels, handshakes, connections and OPENs per peer or source address in each FERRYMAN_LOG_LIMIT_INTERVAL; the rest are dropped and counted (`ferryman_log_lines_suppressed_total`), and the next line says how many.",
    "log_limit_interval": "Seconds of each FERRYMAN_LOG_LIMIT window.",
}

_LIMITS: dict[str, tuple[float, float]] = {
    "connector_tunnels": (1, 64),
    "connector_edges": (1, 64),
    "max_frame": (1024, 16 * 1024 * 1024),
    "flow_window": (16384, 1 << 30),
    "flow_buffer_budget": (1 << 20, 1 << 40),
    "max_flows": (1, 1 << 20),
    "max_pending_opens": (1, 1 << 20),
    "keepalive_interval": (0.05, 3600),
    "handshake_timeout": (0.1, 600),
    "write_buffer_high": (4096, 1 << 30),
    "udp_backlog": (1024, 1 << 30),
    "drain_grace": (0, 86400),
    "edge_workers": (0, 1024),
    "edge_worker_restart_max": (0.25, 3600),
    "dial_timeout": (0.01, 600),
    "resolve_timeout": (0.01, 600),
    "resolve_threads": (1, 1024),
    "dial_addresses": (1, 64),
    "open_timeout": (0.01, 600),
    "pending_opens_share": (0.001, 1),
    "reconnect_min": (0.01, 3600),
    "reconnect_max": (0.01, 86400),
    "cert_lifetime_days": (1, 3650),
    "node_certificates_per_day": (2, 1000),
    "superseded_cert_grace": (60.0, 180 * 86400.0),
    "traffic_retention_days": (1, 3650),
    "heartbeat_interval": (0.1, 3600),
    "presence_interval": (0.05, 3600),
    "access_token_minutes": (1, 1440),
    "oidc_starts_per_minute": (1, 100_000),
    "sign_in_window": (1, 86400),
    "sign_in_max_failures": (1, 1_000_000),
    "sign_in_max_source_failures": (1, 1_000_000),
    "sign_in_max_account_failures": (1, 1_000_000),
    "sign_in_max_total_failures": (1, 10_000_000),
    "sign_in_known_source_days": (0, 3650),
    "refresh_grace": (0, 300),
    "console_idle_minutes": (1, 1440),
    "console_session_hours": (1, 168),
    "control_insecure_http": (0, 1),
    "config_wait": (0.1, 300),
    "renew_at": (0.01, 0.99),
    "renewal_spread": (0, 86400),
    "traffic_queue": (1, 10_000_000),
    "web_max_header_block": (1024, 1 << 20),
    "web_max_headers": (1, 10_000),
    "web_max_url_length": (64, 1 << 20),
    "web_max_body_size": (1, 1 << 40),
    "web_backend_timeout": (0.1, 86400),
    "web_backend_timeout_long": (0.1, 86400),
    "web_backend_connect_timeout": (0.1, 600),
    "web_app_rate": (0.1, 1e9),
    "web_edge_rate": (0.1, 1e9),
    "web_sign_in_rate": (0.1, 1e6),
    "web_header_timeout": (0.1, 600),
    "web_idle_timeout": (0.1, 86400),
    "web_websocket_idle_timeout": (0.1, 86400),
    "web_max_connections": (1, 1_000_000),
    "web_admit_cache": (0, 60),
    "quic_timeout": (0.1, 600),
    "quic_probe_interval": (1, 86400),
    "quic_packet_size": (1200, 1452),
    "quic_max_pending_datagrams": (1, 1 << 20),
    "quic_socket_buffer": (4096, 1 << 30),
    "quic_retry_threshold": (0, 1 << 20),
    "udp_idle_timeout": (0.1, 86400),
    "max_udp_flows": (1, 1 << 20),
    "udp_queue": (1, 1 << 16),
    "udp_buffer": (4096, 1 << 30),
    "dns_cache": (0, 10_000_000),
    "grant_cache": (1, 1 << 24),
    "process_lookup_wait": (0, 1),
    "max_tunnels_per_client": (1, 1 << 20),
    "max_tunnels_per_connector": (1, 1 << 20),
    "max_handshakes": (1, 1 << 20),
    "max_handshakes_per_source": (1, 1 << 20),
    "control_max_connections": (1, 1 << 20),
    "control_max_waiting_per_source": (1, 1 << 20),
    "control_request_timeout": (0.1, 3600),
    "control_keepalive_timeout": (0.1, 3600),
    "control_max_head": (1024, 1 << 24),
    "log_limit": (1, 1_000_000),
    "log_limit_interval": (0.1, 86400),
}


def variable_name(field: str) -> str:
    return PREFIX + field.upper()


def _coerce(field: str, raw: Any, kind: type) -> Any:
    name = variable_name(field)
    try:
        if kind is int:
            if isinstance(raw, bool):
                raise ValueError
            value: Any = int(raw)
        elif kind is float:
            value = float(raw)
        else:
            value = str(raw)
    except (TypeError, ValueError):
        raise SettingsError(f"{name}={raw!r}: expected {kind.__name__}") from None
    if field in _LIMITS:
        lo, hi = _LIMITS[field]
        if not lo <= value <= hi:
            raise SettingsError(f"{name}={raw!r}: must be between {lo:g} and {hi:g}")
    if field == "log_format" and value not in ("text", "json"):
        raise SettingsError(f"{name}={raw!r}: must be 'text' or 'json'")
    if field == "transport" and value not in ("auto", "quic", "tcp"):
        raise SettingsError(f"{name}={raw!r}: must be auto, quic or tcp")
    if field == "quic_engine" and value not in ("auto", "qh3", "aioquic"):
        raise SettingsError(f"{name}={raw!r}: must be auto, qh3 or aioquic")
    if field in ("edge_quic", "process_lookup", "transparent", "quic_offload") and value not in ("on", "off"):
        raise SettingsError(f"{name}={raw!r}: must be on or off")
    if field == "edge_worker_steering" and value not in ("hash", "cpu"):
        raise SettingsError(f"{name}={raw!r}: must be hash or cpu")
    if field == "log_level" and value.lower() not in ("debug", "info", "warning", "error"):
        raise SettingsError(f"{name}={raw!r}: must be debug, info, warning or error")
    return value


def read_config_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise SettingsError(f"FERRYMAN_CONFIG={path!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"FERRYMAN_CONFIG={path!r}: not valid TOML: {exc}") from None
    out: dict[str, Any] = {}
    for key, value in data.items():
        field = key.lower()
        if field.startswith(PREFIX.lower()):
            field = field[len(PREFIX):]
        if field not in VARIABLES:
            raise SettingsError(f"FERRYMAN_CONFIG={path!r}: unknown setting {key!r}")
        out[field] = value
    return out


def load(role: type[S], overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None) -> S:
    """``role``'s settings (e.g. ``EdgeSettings``) from defaults, config file, environment and explicit
    overrides; every variable given is checked, whichever role reads it."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config_path = env.get("FERRYMAN_CONFIG")
    if config_path:
        values.update(read_config_file(config_path))
    known = {variable_name(f) for f in VARIABLES} | {"FERRYMAN_CONFIG"}
    for key in env:
        if key.startswith(PREFIX) and key not in known:
            raise SettingsError(f"{key}: unknown Ferryman setting (see `ferryman config vars`)")
    for field in VARIABLES:
        raw = env.get(variable_name(field))
        if raw is not None and raw != "":
            values[field] = raw
    for field, value in (overrides or {}).items():
        if value is not None:
            values[field] = value
    coerced = {f: _coerce(f, v, _TYPES[f]) for f, v in values.items()}
    every = {**_DEFAULTS, **coerced}
    if every["reconnect_max"] < every["reconnect_min"]:
        raise SettingsError("FERRYMAN_RECONNECT_MAX must not be below FERRYMAN_RECONNECT_MIN")
    fields = {f.name for f in msgspec.structs.fields(role)}
    return role(**{f: v for f, v in coerced.items() if f in fields})


def readers(field: str) -> list[str]:
    """The roles that read ``field`` (``all`` when every process does)."""
    if field in _COMMON:
        return ["all"]
    return [name for name, cls in ROLES.items() if field in {f.name for f in msgspec.structs.fields(cls)}]


_COMMON = {f.name for f in msgspec.structs.fields(CommonSettings)}


def markdown_table() -> str:
    rows = ["| Variable | Default | Read by | Meaning |", "|---|---|---|---|"]
    for field, doc in VARIABLES.items():
        default = _DEFAULTS[field]
        shown = f"`{default}`" if default != "" else "(empty)"
        rows.append(f"| `{variable_name(field)}` | {shown} | {', '.join(readers(field))} | {doc} |")
    rows.append("| `FERRYMAN_CONFIG` | (empty) | all | TOML file with any of these settings (same names). |")
    return "\n".join(rows)
