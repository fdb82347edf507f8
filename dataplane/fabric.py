"""Local fabric: edge, connector(s) and client agent as separate OS processes on loopback.

``Fabric`` is what ``ferryman up``, the tests and the benchmarks use. It starts every node
with ``python -m dataplane ROLE`` exactly as an operator would, and waits until each
node's ``/ready`` answers 200 (for the client that means its tunnel is up and every
forward's destination answered a probe). Two ways to configure the nodes:

- **managed** (``ferryman up``): a control plane process (``ferryman control``, SQLite in
  the work directory) is started first; the fabric creates a user (also the web console's
  admin: ``console_url``, TOTP set up at the first console sign-in) and the forwards'
  applications (``Fabric.applications``) assigned to that user through the admin API, registers the edge and the
  connectors with one-time tokens (``ferryman edge|connector register``), and signs the
  user in on the client (``ferryman client login``: device certificate and tokens), as an
  operator and a user would. Edge and connectors then run from the control plane's
  configuration (access decisions, heartbeats, revocations and renewals included).
- **static** (benchmarks, data-plane tests): certificates from ``pki init`` (made once
  under the work directory) and an application file (given to the edge, and to the
  connectors for the segments that name addresses they may dial).

Web apps (managed only): with ``webapps`` (``{"name", "external_url", "internal_url", ...}``
as for ``POST /v1/webapps``, an external URL without a port gets the front door's; each is
assigned to the user) the edge also runs its HTTPS
front door on ``web_port`` with a certificate for ``*.ferryman.localhost`` from a CA of
its own (``web_ca``), the sign-in site at ``login.ferryman.localhost:<web_port>``.
``wait_configured()`` waits until every node runs the control plane's current
configuration (after an admin change, before testing its effect).

``stop()`` ends the client first, then the connectors (which then drain at once), then
the edge, then the control plane.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator

from .basics import pki
from .basics.controltls import ca_pin, load_ca_pem, verifying_context
from .client.forwards import Forward
from .controllink import http


class FabricError(RuntimeError):
    """A node did not come up; the message carries the tail of its log."""


def free_port(protocol: str = "tcp") -> int:
    """A port on 127.0.0.1 free for ``protocol``: ``tcp``, ``udp`` or ``both`` (an edge listens on
    the TCP and the UDP port of one number)."""
    while True:
        kind = socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM
        with socket.socket(type=kind) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if protocol != "both":
            return port
        with socket.socket(type=socket.SOCK_DGRAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def _http_status(url: str, context: ssl.SSLContext | None = None) -> int:
    try:
        return http.request_blocking(url, "GET", "", timeout=1.0, ssl_context=context).status
    except http.HttpError:
        return 0


class Fabric:
    def __init__(self, workdir: str, forwards: list[tuple], env: dict[str, str] | None = None,
                 connectors: int = 1, *, managed: bool = False, apps: list[dict] | None = None,
                 webapps: list[dict] | None = None, control_port: int = 0, edges: int = 1,
                 connector_edges: dict[str, list[str]] | None = None, client_edges: list[str] | None = None,
                 more_clients: dict[str, list[str]] | None = None, workers: int = 1,
                 prefix: dict[str, list[str]] | None = None) -> None:
        """``forwards``: (listen host, listen port or 0, host, port[, "tcp" | "udp"]) each; ``apps``: more
        applications (``{"name": ..., "segments": [...]}``, for SOCKS5 or HTTP CONNECT) besides the forwards';
        ``control_port``: managed, the control plane's port (0: a free one), when its URL must be known
        beforehand (an OIDC redirect URI).

        ``edges``: how many edges (``edge-1`` ...; more than one only ``managed``: they relay flows
        to each other through the control plane's presence map); ``connector_edges``: the edges a
        connector dials (by name; default every edge of the control plane's list); ``client_edges``:
        the edges the client agent dials (default ``edge-1``); ``more_clients``: further client agents
        (``managed`` only; name -> the edges it dials), signed in as the same user, each with the
        same forwards on listening ports of its own (``client_ports``); ``workers``: worker processes per
        edge (FERRYMAN_EDGE_WORKERS; 1 unless told otherwise, so that every edge is one process whose
        tunnels and metrics a test can count; ``env`` may set the variable instead); ``prefix``: a
        command prefix per node (e.g. ``["taskset", "-c", "1"]``), also used by ``restart``."""
        if edges > 1 and not managed:
            raise ValueError("several edges need a control plane (managed=True): they relay flows through its "
                             "presence map")
        self.workdir = os.path.abspath(workdir)
        self._taken: set[int] = set()  # ports handed out here (none is bound until its node starts)
        self.forwards = [(f[0], f[1] or self._free_port(f[4] if len(f) > 4 else "tcp"), f[2], f[3],
                          f[4] if len(f) > 4 else "tcp") for f in forwards]
        self.env = dict(env or {})
        self.env.setdefault("FERRYMAN_EDGE_WORKERS", str(workers))
        self.connector_names = [f"connector-{i + 1}" for i in range(connectors)]
        self.managed = managed
        self.extra_apps = list(apps or [])
        self.user = "demo@ferryman.local"  # managed: the user the client agent signs in as
        self.password = secrets.token_urlsafe(18)
        self.edge_port = 0  # edge-1's (the others: edge_ports)
        self.edge_names = [f"edge-{i + 1}" for i in range(edges)]
        self.edge_ports: dict[str, int] = {}
        self.connector_edges = dict(connector_edges or {})
        self.client_edges = list(client_edges or ["edge-1"])
        if more_clients and not managed:
            raise ValueError("further client agents need a control plane (managed=True)")
        self.more_clients = dict(more_clients or {})
        self.client_names = ["client-1", *self.more_clients]
        self.client_ports: dict[str, list[int]] = {  # listening port of each forward, per client agent
            name: [self._free_port(f[4]) for f in self.forwards] for name in self.more_clients}
        self.edge_host = "127.0.0.1"  # the address the edge listens on and the other nodes dial
        self.control_port = control_port
        self.control_host = "127.0.0.1"  # managed: the address the control plane listens on (and is dialed at)
        self.control_url = ""  # managed: https://HOST:PORT of the control plane
        self.ca_pem = b""  # managed: its CA (PEM), which its HTTPS certificate chains to
        self.ca_hash = ""  # managed: that CA's pin (sha256:...), as `ferryman control` prints it
        self.control_tls: ssl.SSLContext | None = None  # managed: verifies the control plane's certificate
        self.admin_key = ""
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.metrics: dict[str, str] = {}
        self.logs: dict[str, str] = {}
        self.prefix: dict[str, list[str]] = dict(prefix or {})  # command prefix per node, e.g. ["ip", "netns", "exec", NS]
        self._specs: dict[str, tuple[str, list[str], dict[str, str]]] = {}
        self.webapps = list(webapps or [])
        if self.webapps and not managed:
            raise FabricError("web apps need a managed fabric (they are defined in the control plane)")
        self.web_port = 0  # the edge's HTTPS front door (with webapps)
        self.web_ca = ""  # the CA (PEM file) browsers must trust for the front door's certificate

    def _free_port(self, protocol: str = "tcp") -> int:
        """``free_port``, never one this fabric handed out already: the nodes bind theirs only when
        they start, so the kernel could offer the same free port twice."""
        while True:
            port = free_port(protocol)
            if port not in self._taken:
                self._taken.add(port)
                return port

    @property
    def forward_ports(self) -> list[int]:
        return [lp for _, lp, _, _, _ in self.forwards]

    @property
    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self.procs.items()}

    # ------------------------------------------------------------------ setup
    def _certificates(self) -> str:
        directory = os.path.join(self.workdir, "pki")
        wanted = ["edge-1", "client-1", *self.connector_names]
        if not all(os.path.exists(os.path.join(directory, f"{n}.pem")) for n in wanted):
            pki.init_pki(directory, edge_hosts=["127.0.0.1", "localhost"], edges=["edge-1"],
                         connectors=self.connector_names, clients=["client-1"], force=True)
        return directory

    def applications(self) -> list[tuple[str, list[dict[str, str]]]]:
        """(name, segments) of the applications the forwards need: one per backend port and protocol
        (``forward-N``, numbered in order), with every destination the forwards name for it as a
        segment, so that a name (``localhost``) and the address it resolves to (``127.0.0.1``)
        are one application and the connector may dial that address for the name."""
        apps: dict[tuple[int, str], list[dict[str, str]]] = {}
        for _, _, host, port, protocol in self.forwards:
            segments = apps.setdefault((port, protocol), [])
            segment = {"destination": host, "ports": str(port), "protocol": protocol}
            if segment not in segments:
                segments.append(segment)
        return ([(f"forward-{i + 1}", segments) for i, segments in enumerate(apps.values())]
                + [(app["name"], app["segments"]) for app in self.extra_apps])

    def _apps_file(self) -> str:
        apps = [{"name": name, "connector_group": "default", "segments": segments}
                for name, segments in self.applications()]
        path = os.path.join(self.workdir, "apps.json")
        with open(path, "w") as fh:
            json.dump({"apps": apps}, fh, indent=2)
        return path

    def _pki_env(self, certs: str, name: str) -> dict[str, str]:
        return {"FERRYMAN_TLS_CA": os.path.join(certs, "ca.pem"),
                "FERRYMAN_TLS_CERT": os.path.join(certs, f"{name}.pem"),
                "FERRYMAN_TLS_KEY": os.path.join(certs, f"{name}.key")}

    def _spawn(self, name: str, role: str, args: list[str], node_env: dict[str, str]) -> None:
        """Start ``ferryman ROLE ARGS`` (``control`` included) with ``node_env`` on top of the fabric's."""
        self._specs[name] = (role, args, node_env)
        env = {**os.environ, **self.env, **node_env}
        if role != "control":
            if name not in self.metrics:
                self.metrics[name] = f"127.0.0.1:{self._free_port()}"
            env["FERRYMAN_METRICS_ADDR"] = self.metrics[name]
        log_path = os.path.join(self.workdir, "logs", f"{name}.log")
        self.logs[name] = log_path
        with open(log_path, "ab") as log:
            self.procs[name] = subprocess.Popen(
                [*self.prefix.get(name, []), sys.executable, "-m", "dataplane", role, *args], env=env, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )

    def _ready_url(self, name: str) -> str:
        if name == "control":
            return f"{self.control_url}/health"
        return f"http://{self.metrics[name]}/ready"

    def _ready_status(self, name: str) -> int:
        if name != "control":
            return _http_status(self._ready_url(name))
        if self.control_tls is None:  # the CA is made at the control plane's first start
            try:
                with open(os.path.join(self.workdir, "control", "ca", "ca.pem"), "rb") as fh:
                    pem = fh.read()
                cert = load_ca_pem(pem, "the control plane's CA")
            except (OSError, ValueError):
                return 0
            self.ca_pem, self.ca_hash, self.control_tls = pem, ca_pin(cert), verifying_context(pem)
        return _http_status(self._ready_url(name), self.control_tls)

    def start(self, timeout: float = 30.0) -> None:
        os.makedirs(os.path.join(self.workdir, "logs"), exist_ok=True)
        self.edge_port = self.edge_port or self._free_port("both")  # a test may pick it before start()
        self._taken.add(self.edge_port)
        self.edge_ports = {"edge-1": self.edge_port, **{name: self.edge_ports.get(name) or self._free_port("both")
                                                        for name in self.edge_names[1:]}}
        edge_addr = f"{self.edge_host}:{self.edge_port}"
        fwd_args = [a for lh, lp, h, p, proto in self.forwards
                    for a in ("--forward", f"{lh}:{lp}={h}:{p}" + ("/udp" if proto == "udp" else ""))]
        try:
            if self.managed:
                client_env = self._start_managed(edge_addr, timeout)
                for name in self.edge_names:
                    edge_args, edge_env = ["--listen", self.edge_address(name)], self._node_env(name)
                    if self.webapps and name == "edge-1":
                        edge_args += ["--https", f"127.0.0.1:{self.web_port}"]
                        edge_env.update(self._web_env())
                    self._spawn(name, "edge", edge_args, edge_env)
                if len(self.edge_names) > 1:  # every edge up first: nodes that dial several start on their first
                    for name in self.edge_names:
                        self._wait_for(name, timeout)
                for name in self.connector_names:
                    pinned = self.connector_edges.get(name)
                    self._spawn(name, "connector", ["--edges", ",".join(map(self.edge_address, pinned))]
                                if pinned else [], self._node_env(name))
            else:
                certs = self._certificates()
                apps = self._apps_file()
                client_env = self._pki_env(certs, "client-1")
                self._spawn("edge-1", "edge", ["--listen", edge_addr, "--apps", apps], self._pki_env(certs, "edge-1"))
                for name in self.connector_names:
                    self._spawn(name, "connector", ["--edges", edge_addr, "--apps", apps], self._pki_env(certs, name))
            client_edges = ",".join(map(self.edge_address, self.client_edges)) if self.managed else edge_addr
            self._spawn("client-1", "client", ["--edges", client_edges, *fwd_args], client_env)
            for name, edges in self.more_clients.items():
                args = [a for (lh, _, h, p, proto), lp in zip(self.forwards, self.client_ports[name])
                        for a in ("--forward", f"{lh}:{lp}={h}:{p}" + ("/udp" if proto == "udp" else ""))]
                self._spawn(name, "client", ["--edges", ",".join(map(self.edge_address, edges)), *args],
                            self._node_env(name))
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    # ------------------------------------------------------------------ managed: through the control plane
    def _node_env(self, name: str) -> dict[str, str]:
        """A registered node finds its identity in FERRYMAN_DATA_DIR/identity by itself."""
        return {"FERRYMAN_DATA_DIR": os.path.join(self.workdir, "nodes", name)}

    def _start_managed(self, edge_addr: str, timeout: float) -> dict[str, str]:
        """Control plane up, applications created, edge and connectors registered; returns the client's env."""
        for stale in ("control", "nodes"):  # a fresh control plane and fresh identities on every start
            shutil.rmtree(os.path.join(self.workdir, stale), ignore_errors=True)
        control_dir = os.path.join(self.workdir, "control")
        os.makedirs(control_dir, mode=0o700)
        port = self.control_port or self._free_port()
        self.control_url = f"https://{self.control_host}:{port}"
        self.control_tls = None
        control_env = {"FERRYMAN_DATA_DIR": control_dir}
        if "FERRYMAN_CONTROL_HOSTS" not in self.env:  # its certificate names the address it is dialed at
            control_env["FERRYMAN_CONTROL_HOSTS"] = ",".join(dict.fromkeys([self.control_host, "127.0.0.1",
                                                                            "localhost"]))
        self._spawn("control", "control", ["--listen", f"{self.control_host}:{port}", "--edge", edge_addr],
                    control_env)
        self._wait_for("control", timeout)
        with open(os.path.join(control_dir, "admin.key")) as fh:
            self.admin_key = fh.read().strip()
        self.admin("POST", "/v1/users", {"upn": self.user, "display_name": "Ferryman demo user",
                                          "password": self.password})
        # The demo user is also the web console's admin: TOTP is set up at the first console sign-in.
        self.admin("PATCH", f"/v1/users/{self.user}", {"console_role": "admin"})
        for name, segments in self.applications():
            self.admin("POST", "/v1/applications", {"name": name, "segments": segments})
            self.admin("POST", f"/v1/applications/{name}/assignments", {"user": self.user})
        if self.webapps:
            self.web_port = self.web_port or self._free_port()
            for app in self.webapps:
                url = app["external_url"]
                if url.count(":") == 1:  # no port: the front door's
                    scheme, _, rest = url.partition("://")
                    host, slash, path = rest.partition("/")
                    app = {**app, "external_url": f"{scheme}://{host}:{self.web_port}{slash}{path}"}
                self.admin("POST", "/v1/webapps", app)
                self.admin("POST", f"/v1/webapps/{app['name']}/assignments", {"user": self.user})
        for name in self.edge_names:
            self._register(name, "edge", ["--address", self.edge_address(name)])
        for name in self.connector_names:
            self._register(name, "connector", [])
        for name in self.client_names:
            self._login(name)
        return self._node_env("client-1")

    def edge_address(self, name: str) -> str:
        """HOST:PORT of edge ``name`` (its ports are chosen by ``start``)."""
        return f"{self.edge_host}:{self.edge_ports[name]}"

    @property
    def console_url(self) -> str:
        """Managed: the control plane's web console (sign in as ``user`` with ``password``)."""
        return f"{self.control_url}/console"

    def web_url(self, host: str, path: str = "/") -> str:
        """``https://HOST.ferryman.localhost:<web port>PATH`` (``host`` without the domain)."""
        return f"https://{host}.{WEB_DOMAIN}:{self.web_port}{path}"

    def _web_env(self) -> dict[str, str]:
        directory = os.path.join(self.workdir, "web-pki")
        self.web_ca, cert, key = web_certificate(directory, [WEB_DOMAIN, f"*.{WEB_DOMAIN}"])
        return {"FERRYMAN_EDGE_HTTPS_CERT": cert, "FERRYMAN_EDGE_HTTPS_KEY": key,
                "FERRYMAN_WEB_AUTH_HOST": f"login.{WEB_DOMAIN}:{self.web_port}"}

    def wait_configured(self, timeout: float = 15.0) -> int:
        """Wait until the edge and every connector run the control plane's current configuration
        version (their ``ferryman_config_version`` metric); returns that version."""
        version = int(self.admin("GET", "/v1/config-version")["version"])  # type: ignore[index]
        deadline = time.monotonic() + timeout
        for name in [*self.edge_names, *self.connector_names]:
            while _metric(self.metrics[name], "ferryman_config_version") < version:
                if time.monotonic() > deadline:
                    raise FabricError(f"{name} did not reach configuration version {version} within {timeout:g}s:\n"
                                      f"{self.log_tail(name)}")
                time.sleep(0.05)
        return version

    def _login(self, name: str) -> None:
        """``ferryman client login`` for the demo user: the client's device key, certificate and session."""
        env = {**os.environ, **self.env, **self._node_env(name)}
        done = subprocess.run([sys.executable, "-m", "dataplane", "client", "login", "--control", self.control_url,
                               "--ca-hash", self.ca_hash, "--user", self.user, "--password-stdin", "--device-name", name],
                              env=env, input=(self.password + "\n").encode(), capture_output=True, timeout=60)
        if done.returncode != 0:
            raise FabricError(f"signing in {self.user} on {name} failed (exit {done.returncode}):\n"
                              f"{done.stderr.decode(errors='replace')}")

    def admin(self, method: str, path: str, body: object = None) -> object:
        """One admin API call with the control plane's bootstrap key; FabricError unless it succeeds."""
        data = None if body is None else json.dumps(body).encode()
        try:
            answer = http.request_blocking(self.control_url, method, path, body=data, timeout=15, headers={
                "Authorization": f"Bearer {self.admin_key}", "Content-Type": "application/json"},
                ssl_context=self.control_tls)
        except http.HttpError as exc:
            raise FabricError(f"{method} {path}: {exc}") from None
        if answer.status >= 400:
            raise FabricError(f"{method} {path}: HTTP {answer.status}: {answer.body[:4096].decode(errors='replace')}")
        return json.loads(answer.body) if answer.body else None

    def _register(self, name: str, role: str, extra: list[str]) -> None:
        token = self.admin("POST", "/v1/registration-tokens", {"role": role})["token"]  # type: ignore[index]
        env = {**os.environ, **self.env, **self._node_env(name)}
        done = subprocess.run([sys.executable, "-m", "dataplane", role, "register", "--control", self.control_url,
                               "--token", token, "--name", name, *extra],
                              env=env, capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
        if done.returncode != 0:
            raise FabricError(f"registering {role} {name} failed (exit {done.returncode}):\n"
                              f"{done.stderr.decode(errors='replace')}")

    def node_id(self, name: str) -> str:
        """The control plane's id of registered edge or connector ``name``."""
        with open(os.path.join(self.workdir, "nodes", name, "identity", "node.json")) as fh:
            return json.load(fh)["node_id"]

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = dict.fromkeys(self.procs)
        while pending:
            for name in list(pending):
                proc = self.procs[name]
                if proc.poll() is not None:
                    raise FabricError(f"{name} exited with code {proc.returncode}:\n{self.log_tail(name)}")
                if self._ready_status(name) == 200:
                    del pending[name]
            if not pending:
                return
            if time.monotonic() > deadline:
                names = ", ".join(pending)
                tails = "\n".join(f"--- {n}\n{self.log_tail(n)}" for n in pending)
                raise FabricError(f"not ready within {timeout:g}s: {names}\n{tails}")
            time.sleep(0.05)

    def log_tail(self, name: str, lines: int = 20) -> str:
        try:
            with open(self.logs[name], "rb") as fh:
                return b"".join(fh.readlines()[-lines:]).decode(errors="replace")
        except OSError:
            return "(no log)"

    # ------------------------------------------------------------------ control
    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    def restart(self, name: str, timeout: float = 30.0) -> None:
        """Start a node again (after kill/stop) with the same arguments, ports and files."""
        proc = self.procs[name]
        if proc.poll() is None:
            raise FabricError(f"{name} is still running")
        self._spawn(name, *self._specs[name])
        self._wait_for(name, timeout)

    def _wait_for(self, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._ready_status(name) != 200:
            if self.procs[name].poll() is not None:
                raise FabricError(f"{name} exited with code {self.procs[name].returncode}:\n{self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise FabricError(f"{name} not ready within {timeout:g}s:\n{self.log_tail(name)}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        order = [*self.client_names, *self.connector_names, *self.edge_names, "control"]
        for name in order:
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> "Fabric":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


WEB_DOMAIN = "ferryman.localhost"  # the local fabric's web apps live under it (RFC 6761: loopback)


def _metric(addr: str, name: str) -> float:
    """A node's gauge ``name`` from its ``/metrics`` (-1 when it cannot be read)."""
    try:
        answer = http.request_blocking(f"http://{addr}", "GET", "/metrics", timeout=5)
    except http.HttpError:
        return -1.0
    for line in answer.body.decode(errors="replace").splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            try:
                return float(line.rsplit(" ", 1)[1])
            except ValueError:
                return -1.0
    return -1.0


def web_certificate(directory: str, hosts: list[str]) -> tuple[str, str, str]:
    """A CA and a server certificate for ``hosts`` (DNS names, wildcards allowed) in ``directory``,
    made once; (CA file, certificate file, key file)."""
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_path, cert_path, key_path = (os.path.join(directory, n) for n in ("web-ca.pem", "web.pem", "web.key"))
    if all(os.path.exists(p) for p in (ca_path, cert_path, key_path)):
        return ca_path, cert_path, key_path
    os.makedirs(directory, mode=0o700, exist_ok=True)
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Ferryman local web CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
          .not_valid_after(now + timedelta(days=365))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=90))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    with open(ca_path, "wb") as fh:
        fh.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(cert_path, "wb") as fh:
        fh.write(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    return ca_path, cert_path, key_path


# ---------------------------------------------------------------------- ferryman up
def _echo_backend(port: int) -> subprocess.Popen[bytes]:
    code = (
        "import asyncio, uvloop\n"
        "class Echo(asyncio.Protocol):\n"
        "    def connection_made(self, t): self.t = t\n"
        "    def data_received(self, d): self.t.write(d)\n"
        "    def eof_received(self): self.t.close()\n"
        "async def main():\n"
        f"    s = await asyncio.get_running_loop().create_server(Echo, '127.0.0.1', {port})\n"
        "    await s.serve_forever()\n"
        "uvloop.run(main())\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, start_new_session=True)


def _web_backend(port: int) -> subprocess.Popen[bytes]:
    """The sample web app's backend: a page that shows who the front door says is asking."""
    code = (
        "import http.server, html\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    protocol_version = 'HTTP/1.1'\n"
        "    def log_message(self, *a): pass\n"
        "    def do_GET(self):\n"
        "        rows = ''.join(f'<tr><td>{html.escape(k)}</td><td>{html.escape(v[:120])}</td></tr>'\n"
        "                       for k, v in self.headers.items())\n"
        "        body = ('<!doctype html><title>Hello from Ferryman</title><h1>Hello from a private web app</h1>'\n"
        "                '<p>This page came from a backend on loopback, through the edge and a connector.</p>'\n"
        "                f'<table>{rows}</table>').encode()\n"
        "        self.send_response(200)\n"
        "        self.send_header('Content-Type', 'text/html; charset=utf-8')\n"
        "        self.send_header('Content-Length', str(len(body)))\n"
        "        self.end_headers()\n"
        "        self.wfile.write(body)\n"
        f"http.server.ThreadingHTTPServer(('127.0.0.1', {port}), H).serve_forever()\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, start_new_session=True)


def _echo_roundtrip(port: int, size: int) -> tuple[float, bool]:
    payload = os.urandom(size)
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    elapsed = time.perf_counter() - start
    return elapsed, hashlib.sha256(b"".join(chunks)).digest() == hashlib.sha256(payload).digest()


@contextlib.contextmanager
def _signals_stop() -> Iterator[list[bool]]:
    stopped = [False]

    def handler(signum: int, frame: object) -> None:
        stopped[0] = True

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stopped
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def up(workdir: str, forward_specs: list[str], duration: float | None = None) -> int:
    forwards = [Forward.parse(spec) for spec in forward_specs]
    backend = None
    if not forwards:
        backend_port = free_port()
        backend = _echo_backend(backend_port)
        forwards = [Forward("127.0.0.1", 0, "127.0.0.1", backend_port)]
        print(f"sample echo backend on 127.0.0.1:{backend_port}", file=sys.stderr)
    web_port = free_port()
    web_backend = _web_backend(web_port)
    fabric = Fabric(workdir, [(f.listen_host, f.listen_port, f.host, f.port, f.protocol) for f in forwards],
                    managed=True, webapps=[{"name": "hello", "external_url": f"https://hello.{WEB_DOMAIN}",
                                            "internal_url": f"http://127.0.0.1:{web_port}"}])
    with _signals_stop() as stopped:
        try:
            fabric.start()
        except FabricError as exc:
            print(f"ferryman up: {exc}", file=sys.stderr)
            if backend is not None:
                backend.terminate()
            web_backend.terminate()
            return 1
        for name, proc in fabric.procs.items():
            where = (f"API {fabric.control_url}" if name == "control"
                     else f"metrics http://{fabric.metrics[name]}/metrics")
            print(f"{name:<12} pid {proc.pid:<7} {where}  log {fabric.logs[name]}", file=sys.stderr)
        control_dir = os.path.join(fabric.workdir, "control")
        print(f"control plane CA hash: {fabric.ca_hash} (nodes and clients elsewhere: --ca-hash {fabric.ca_hash})",
              file=sys.stderr)
        print(f"admin: FERRYMAN_DATA_DIR={control_dir} ferryman admin --control {fabric.control_url} apps list "
              f"(changes reach edge and connector within 2 s)", file=sys.stderr)
        print(f"client-1 is signed in as {fabric.user}, assigned to every forward's application", file=sys.stderr)
        print(f"console: open {fabric.console_url} and sign in as {fabric.user} with password {fabric.password} "
              f"(a console admin); the first sign-in shows a TOTP secret to add to an authenticator app, then asks "
              f"for a code from it", file=sys.stderr)
        print(f"  the console's certificate is from the control plane's own CA: "
              f"{os.path.join(control_dir, 'ca', 'ca.pem')} (browsers: import it as an authority; curl: --cacert)",
              file=sys.stderr)
        for lh, lp, h, p, proto in fabric.forwards:
            print(f"forward {lh}:{lp}/{proto} -> client -> edge -> connector -> {h}:{p}", file=sys.stderr)
        print(f"web app: open {fabric.web_url('hello')} in a browser (no client agent needed) and sign in as "
              f"{fabric.user} with password {fabric.password}; the page comes from 127.0.0.1:{web_port} "
              f"through the edge and the connector", file=sys.stderr)
        print(f"  trust the local CA first: {fabric.web_ca} (browsers: import it as an authority; curl: --cacert "
              f"{fabric.web_ca}); *.localhost names resolve to loopback", file=sys.stderr)
        print("ready", flush=True)
        started = time.monotonic()
        try:
            while not stopped[0] and (duration is None or time.monotonic() - started < duration):
                if backend is not None:
                    elapsed, ok = _echo_roundtrip(fabric.forward_ports[0], 256 * 1024)
                    verdict = "sha256 ok" if ok else "CONTENT MISMATCH"
                    print(f"traffic: 256 KiB echoed app -> client -> edge -> connector -> backend and back "
                          f"in {elapsed * 1000:.1f} ms ({verdict})", flush=True)
                    if not ok:
                        return 1
                time.sleep(1.0 if backend is not None else 0.2)
        except OSError as exc:
            print(f"ferryman up: traffic failed: {exc}", file=sys.stderr)
            return 1
        finally:
            fabric.stop()
            web_backend.terminate()
            web_backend.wait()
            if backend is not None:
                backend.terminate()
                backend.wait()
            print("stopped", file=sys.stderr)
    return 0
