"""The paths the benchmark compares: ways for an app on 127.0.0.1 to reach the private backend.

- ``direct``: the backend itself (no proxy);
- ``ferryman``: app → client agent → edge → connector → backend (``dataplane.fabric``);
- ``ferryman-relay``: the same with a control plane and two edges, the connector on the second
  only: app → client agent → edge-1 → edge-2 → connector → backend (the relay hop);
- ``ferryman-workers1``, ``ferryman-workers2``: the ``ferryman`` path with the edge run by a
  supervisor and 1 or 2 worker processes (FERRYMAN_EDGE_WORKERS), the connector holding 4
  tunnels (spread over the workers by the kernel: a flow whose connector tunnel landed on the
  other worker is relayed to it over the workers' Unix sockets);
- ``ssh``: the OpenSSH bastion chain operators use today: a private sshd, a "connector"
  ``ssh -R`` publishing the backend on the bastion and a "client" ``ssh -L`` reaching it;
- ``stunnel``: a client-mode stunnel wrapping the flow in TLS to a server-mode stunnel;
- ``haproxy``: the same shape with two haproxy processes (``mode tcp``, TLS between them);
- ``relay-floor``: three plain haproxy relays in a row (``mode tcp``, no TLS, one thread
  each): the process shape of the fabric and of the ssh chain (three processes between app
  and backend) with none of their work, so its round trip is what three hand-offs between
  processes cost on this machine, a floor under any three-process path.

Each path starts its own processes (configuration, keys and logs in a temporary
directory), reports the address the app connects to and the pids of its proxy processes
(looked up fresh, so forked sessions count), and says why it is unavailable if it is.
Paths that carry UDP (direct, Ferryman) also give ``udp_address``, the UDP port the app
sends datagrams to (reaching the UDP echo backend); the others say why they do not in
``udp_unsupported``. ``udp_counters()`` reads the datagram counters of the path's nodes.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .backend import ECHO, header
from .procfs import alive, listening, process_tree

if TYPE_CHECKING:
    from dataplane.fabric import Fabric

START_TIMEOUT = 30.0
PROBE = b"ferryman-bench-probe-" + bytes(43)


class PathError(RuntimeError):
    """A path could not start or one of its processes died; the message carries its log tail."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def round_trip(address: tuple[str, int], timeout: float = 5.0) -> None:
    """One 64-byte echo round trip through ``address``; raises OSError or PathError if it fails."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(header(ECHO) + PROBE)
        got = b""
        while len(got) < len(PROBE):
            chunk = sock.recv(len(PROBE) - len(got))
            if not chunk:
                raise PathError(f"{address[0]}:{address[1]} closed the probe flow after {len(got)} bytes")
            got += chunk
    if got != PROBE:
        raise PathError(f"{address[0]}:{address[1]} echoed different bytes")


def _which(program: str) -> str | None:
    """``program`` on PATH or in the sbin directories (sshd lives in /usr/sbin)."""
    return shutil.which(program) or shutil.which(program, path="/usr/local/sbin:/usr/sbin:/sbin")


def _version_line(argv: list[str], prefix: str) -> str:
    """The first output line of ``argv`` (stdout, then stderr) that starts with ``prefix``."""
    out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    return next((ln.strip() for ln in (out.stdout + out.stderr).splitlines() if ln.startswith(prefix)), "")


def write_tls_material(directory: str) -> dict[str, str]:
    """A CA and a server certificate for localhost / 127.0.0.1 (ECDSA P-256), as PEM files.

    Returns paths: ``ca`` (CA certificate), ``cert`` and ``key`` (server), ``bundle``
    (server certificate + key in one file, as haproxy wants it).
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=2))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ferryman bench CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(validity[0]).not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(validity[0]).not_valid_after(validity[1])
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    files = {"ca": ca_cert.public_bytes(serialization.Encoding.PEM), "cert": cert_pem, "key": key_pem,
             "bundle": cert_pem + key_pem}
    paths = {}
    for name, data in files.items():
        paths[name] = os.path.join(directory, f"{name}.pem")
        with open(os.open(paths[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fh:
            fh.write(data)
    return paths


class Path:
    """Base: a temporary work directory, spawned processes with logs, liveness checks, cleanup."""

    name = ""
    udp_unsupported: str | None = "does not carry UDP"  # None: the path has a udp_address

    def __init__(self, backend_port: int, udp_backend_port: int = 0) -> None:
        self.backend_port = backend_port
        self.udp_backend_port = udp_backend_port
        self.workdir = ""
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._address: tuple[str, int] | None = None
        self._udp_address: tuple[str, int] | None = None

    @property
    def udp_address(self) -> tuple[str, int]:
        if self._udp_address is None:
            raise PathError(f"{self.name} has no UDP address ({self.udp_unsupported or 'not started'})")
        return self._udp_address

    def udp_counters(self) -> dict[str, dict]:
        """``{node: {"rx", "tx", "dropped": {reason: n}}}`` of the path's own datagram counters."""
        return {}

    def udp_owners(self) -> dict[str, list[int]]:
        """``{node: pids}``: whose UDP sockets to read the kernel's drop counts of."""
        return {}

    @property
    def address(self) -> tuple[str, int]:
        if self._address is None:
            raise PathError(f"{self.name} is not started")
        return self._address

    def available(self) -> str | None:
        return None

    def version(self) -> str:
        return ""

    def max_flows(self, nofile: int) -> int | None:
        """Most concurrent flows the path admits under open-file limit ``nofile``, if it has its own cap."""
        return None

    def start(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix=f"ferryman-bench-{self.name}-")
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        raise NotImplementedError

    def pids(self) -> list[int]:
        return [pid for proc in self.procs.values() for pid in process_tree(proc.pid)]

    def processes(self) -> dict[str, list[int]]:
        """``{process name: pids of its tree}``: whose CPU the per-process figures are."""
        return {name: process_tree(proc.pid) for name, proc in self.procs.items()}

    def check(self) -> None:
        """Raise PathError if one of the path's processes has exited."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise PathError(f"{name} exited with code {proc.returncode}: {self.log_tail(name)}")

    def stop(self) -> None:
        """End the spawned processes (last started first), then whatever they forked, then clean up."""
        leftovers = self.pids()
        for proc in reversed(self.procs.values()):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.procs.clear()
        self._address = None
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # helpers for subclasses
    def _file(self, name: str, text: str) -> str:
        path = os.path.join(self.workdir, name)
        with open(path, "w") as fh:
            fh.write(text)
        return path

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(os.path.join(self.workdir, f"{name}.log"), "wb") as log:
            self.procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                                cwd=self.workdir, start_new_session=True)

    def log_tail(self, name: str, lines: int = 8) -> str:
        try:
            with open(os.path.join(self.workdir, f"{name}.log"), "rb") as fh:
                tail = fh.read().decode(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return "(no log)"
        return " | ".join(tail) or "(empty log)"

    def _wait(self, what: str, attempt: Callable[[], None]) -> None:
        """Retry ``attempt()`` until it stops raising OSError/PathError, a process dies, or time runs out."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            self.check()
            try:
                attempt()
                return
            except (OSError, PathError) as exc:
                if time.monotonic() > deadline:
                    logs = "; ".join(f"{n}: {self.log_tail(n)}" for n in self.procs)
                    raise PathError(f"{self.name}: {what} not ready after {START_TIMEOUT:g}s ({exc}); {logs}") from exc
            time.sleep(0.05)

    def _wait_listening(self, port: int) -> None:
        def attempt() -> None:
            if not listening(port):
                raise PathError("nothing listens there yet")

        self._wait(f"a listener on 127.0.0.1:{port}", attempt)

    def _wait_round_trip(self) -> None:
        self._wait(f"a round trip through 127.0.0.1:{self.address[1]}", lambda: round_trip(self.address))


class DirectPath(Path):
    name = "direct"
    udp_unsupported = None

    def _start(self) -> None:
        self._address = ("127.0.0.1", self.backend_port)
        if self.udp_backend_port:
            self._udp_address = ("127.0.0.1", self.udp_backend_port)
        self._wait_round_trip()


class FerrymanPath(Path):
    """The full fabric (client agent, edge, connector) with its tunnels on TLS 1.3 over TCP."""

    name = "ferryman"
    transport = "tcp"
    quic_engine = "auto"
    udp_unsupported = None

    def __init__(self, backend_port: int, udp_backend_port: int = 0) -> None:
        super().__init__(backend_port, udp_backend_port)
        self.fabric: Fabric | None = None

    def available(self) -> str | None:
        try:
            import dataplane.fabric  # noqa: F401
        except Exception as exc:  # any import failure makes the path unusable; say which
            return f"dataplane.fabric does not import: {type(exc).__name__}: {exc}"
        return None

    def version(self) -> str:
        from dataplane.basics.version import SOFTWARE

        return SOFTWARE

    def _start(self) -> None:
        forwards: list[tuple] = [("127.0.0.1", 0, "127.0.0.1", self.backend_port)]
        if self.udp_backend_port:
            forwards.append(("127.0.0.1", 0, "127.0.0.1", self.udp_backend_port, "udp"))
        self.fabric = self._fabric(forwards)
        self.fabric.start(timeout=START_TIMEOUT)
        self._address = ("127.0.0.1", self.fabric.forward_ports[0])
        if self.udp_backend_port:
            self._udp_address = ("127.0.0.1", self.fabric.forward_ports[1])
        self._wait_round_trip()

    def _fabric(self, forwards: list[tuple]) -> Fabric:
        from dataplane.fabric import Fabric

        return Fabric(os.path.join(self.workdir, "fabric"), forwards, env=self._env())

    def _env(self) -> dict[str, str]:
        return {"FERRYMAN_TRANSPORT": self.transport, "FERRYMAN_QUIC_ENGINE": self.quic_engine}

    def udp_counters(self) -> dict[str, dict]:
        from prometheus_client.parser import text_string_to_metric_families

        if self.fabric is None:
            return {}
        out: dict[str, dict] = {}
        for node, addr in self.fabric.metrics.items():
            counts: dict = {"rx": 0, "tx": 0, "dropped": {}}
            try:
                with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as resp:
                    text = resp.read().decode()
            except OSError as exc:
                counts["error"] = str(exc)
                out[node] = counts
                continue
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == "ferryman_datagrams_total":
                        counts[sample.labels.get("direction", "?")] = int(sample.value)
                    elif sample.name == "ferryman_datagrams_dropped_total":
                        counts["dropped"][sample.labels.get("reason", "?")] = int(sample.value)
            out[node] = counts
        return out

    def udp_owners(self) -> dict[str, list[int]]:
        if self.fabric is None:
            return {}
        return {role: process_tree(pid) for role, pid in self.fabric.pids.items()}

    def pids(self) -> list[int]:
        if self.fabric is None:
            return []
        return [pid for root in self.fabric.pids.values() for pid in process_tree(root)]

    def processes(self) -> dict[str, list[int]]:
        if self.fabric is None:
            return {}
        return {role: process_tree(pid) for role, pid in self.fabric.pids.items()}

    def check(self) -> None:
        if self.fabric is None:
            return
        for role, pid in self.fabric.pids.items():
            if not alive(pid):
                raise PathError(f"ferryman {role} (pid {pid}) is gone")

    def stop(self) -> None:
        if self.fabric is not None:
            self.fabric.stop()
            self.fabric = None
        super().stop()


SSH_CIPHER = "aes128-gcm@openssh.com"
HAPROXY_RESERVED_FDS = 200


class SshPath(Path):
    """sshd on 127.0.0.1 as the bastion; ``ssh -R`` as the connector, ``ssh -L`` as the client."""

    name = "ssh"
    udp_unsupported = "OpenSSH -L/-R forward TCP connections only"

    def available(self) -> str | None:
        missing = [p for p in ("sshd", "ssh", "ssh-keygen") if not _which(p)]
        if missing:
            return f"{', '.join(missing)} not installed (apt-get install openssh-server openssh-client)"
        return None

    def version(self) -> str:
        return _version_line([_which("ssh"), "-V"], "OpenSSH")

    def _keygen(self, name: str) -> str:
        path = os.path.join(self.workdir, name)
        subprocess.run([_which("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", f"bench-{name}", "-f", path],
                       check=True, capture_output=True, timeout=30)
        return path

    def _start(self) -> None:
        host_key = self._keygen("host_ed25519")
        user_key = self._keygen("user_ed25519")
        shutil.copy(f"{user_key}.pub", os.path.join(self.workdir, "authorized_keys"))
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        sshd_port = free_port()
        config = self._file("sshd_config", "\n".join([
            "ListenAddress 127.0.0.1",
            f"Port {sshd_port}",
            f"HostKey {host_key}",
            "PidFile none",
            "PermitRootLogin prohibit-password",
            f"AuthorizedKeysFile {self.workdir}/authorized_keys",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            f"Ciphers {SSH_CIPHER}",
            "UseDNS no",
            "AllowTcpForwarding yes",
            "PrintMotd no",
            "LogLevel ERROR",
            "",
        ]))
        self._spawn("sshd", [_which("sshd"), "-D", "-e", "-f", config])
        self._wait_listening(sshd_port)
        user = pwd.getpwuid(os.getuid()).pw_name
        ssh = [_which("ssh"), "-N", "-F", "none", "-p", str(sshd_port), "-c", SSH_CIPHER, "-i", user_key,
               "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
               "-o", "ExitOnForwardFailure=yes", "-o", "Compression=no", "-o", "LogLevel=ERROR"]
        remote_port = free_port()
        self._spawn("ssh-R", [*ssh, "-R", f"127.0.0.1:{remote_port}:127.0.0.1:{self.backend_port}",
                              f"{user}@127.0.0.1"])
        self._wait_listening(remote_port)
        local_port = free_port()
        self._spawn("ssh-L", [*ssh, "-L", f"127.0.0.1:{local_port}:127.0.0.1:{remote_port}", f"{user}@127.0.0.1"])
        self._address = ("127.0.0.1", local_port)
        self._wait_round_trip()


class StunnelPath(Path):
    """stunnel client (plain LPORT → TLS) and stunnel server (TLS → backend)."""

    name = "stunnel"
    udp_unsupported = "stunnel wraps TCP connections only"

    @staticmethod
    def _binary() -> str | None:
        return _which("stunnel4") or _which("stunnel")

    def available(self) -> str | None:
        return None if self._binary() else "stunnel not installed (apt-get install stunnel4)"

    def version(self) -> str:
        return _version_line([self._binary(), "-version"], "stunnel ")

    def max_flows(self, nofile: int) -> int | None:
        # stunnel admits 125/256 of its descriptors as clients (it logs "Clients allowed=N").
        return nofile * 125 // 256

    def _start(self) -> None:
        tls = write_tls_material(self.workdir)
        server_port, local_port = free_port(), free_port()
        common = "foreground = yes\npid =\ndebug = warning\n"
        server = self._file("server.conf", common + "\n".join([
            "[server]",
            f"accept = 127.0.0.1:{server_port}",
            f"connect = 127.0.0.1:{self.backend_port}",
            f"cert = {tls['cert']}",
            f"key = {tls['key']}",
            "sslVersionMin = TLSv1.3",
            "",
        ]))
        client = self._file("client.conf", common + "\n".join([
            "[client]",
            "client = yes",
            f"accept = 127.0.0.1:{local_port}",
            f"connect = 127.0.0.1:{server_port}",
            f"CAfile = {tls['ca']}",
            "verifyChain = yes",
            "checkHost = localhost",
            "sslVersionMin = TLSv1.3",
            "",
        ]))
        self._spawn("stunnel-server", [self._binary(), server])
        self._wait_listening(server_port)
        self._spawn("stunnel-client", [self._binary(), client])
        self._address = ("127.0.0.1", local_port)
        self._wait_round_trip()


class HaproxyPath(Path):
    """haproxy client side (plain LPORT → TLS, server certificate verified) and server side (TLS → backend)."""

    name = "haproxy"
    udp_unsupported = "haproxy (mode tcp) proxies TCP connections only"

    def available(self) -> str | None:
        return None if _which("haproxy") else "haproxy not installed (apt-get install haproxy)"

    def version(self) -> str:
        return _version_line([_which("haproxy"), "-v"], "HAProxy")

    def max_flows(self, nofile: int) -> int | None:
        # Two descriptors per flow in each process, and a few for listeners, logs and pollers.
        return (nofile - HAPROXY_RESERVED_FDS) // 2

    def _start(self) -> None:
        tls = write_tls_material(self.workdir)
        server_port, local_port = free_port(), free_port()
        common = "\n".join([
            "global",
            f"    maxconn {self.max_flows(resource.getrlimit(resource.RLIMIT_NOFILE)[0])}",
            "defaults",
            "    mode tcp",
            "    timeout connect 10s",
            "    timeout client 1h",
            "    timeout server 1h",
            "",
        ])
        server = self._file("server.cfg", common + "\n".join([
            "frontend tls_in",
            f"    bind 127.0.0.1:{server_port} ssl crt {tls['bundle']} ssl-min-ver TLSv1.3",
            "    default_backend app",
            "backend app",
            f"    server app 127.0.0.1:{self.backend_port}",
            "",
        ]))
        client = self._file("client.cfg", common + "\n".join([
            "frontend plain_in",
            f"    bind 127.0.0.1:{local_port}",
            "    default_backend tls_out",
            "backend tls_out",
            f"    server peer 127.0.0.1:{server_port} ssl verify required ca-file {tls['ca']} "
            "verifyhost localhost sni str(localhost) ssl-min-ver TLSv1.3",
            "",
        ]))
        self._spawn("haproxy-server", [_which("haproxy"), "-db", "-f", server])
        self._wait_listening(server_port)
        self._spawn("haproxy-client", [_which("haproxy"), "-db", "-f", client])
        self._address = ("127.0.0.1", local_port)
        self._wait_round_trip()


class RelayFloorPath(HaproxyPath):
    """Three haproxy processes relaying plain TCP one to the next (``relay-1`` → ``relay-2`` →
    ``relay-3`` → backend): no encryption, no framing, no decisions. Not a peer to compare
    features with but the floor of the three-process shape: every byte and every round trip
    through the fabric or the ssh chain crosses the same three processes and four loopback
    connections, so neither can go below this path's round trip on the same machine."""

    name = "relay-floor"

    def _start(self) -> None:
        ports = [free_port() for _ in range(3)] + [self.backend_port]
        maxconn = self.max_flows(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        for i in (3, 2, 1):  # from the backend side, so each relay's next hop listens before it
            config = self._file(f"relay-{i}.cfg", "\n".join([
                "global",
                f"    maxconn {maxconn}",
                "    nbthread 1",
                "defaults",
                "    mode tcp",
                "    timeout connect 10s",
                "    timeout client 1h",
                "    timeout server 1h",
                "listen relay",
                f"    bind 127.0.0.1:{ports[i - 1]}",
                f"    server next 127.0.0.1:{ports[i]}",
                "",
            ]))
            self._spawn(f"relay-{i}", [_which("haproxy"), "-db", "-f", config])
            self._wait_listening(ports[i - 1])
        self._address = ("127.0.0.1", ports[0])
        self._wait_round_trip()


class FerrymanQuicPath(FerrymanPath):
    """The same fabric with its tunnels on QUIC (the default engine, qh3 when installed): one stream
    per TCP flow, UDP as QUIC datagrams."""

    name = "ferryman-quic"
    transport = "quic"


class FerrymanAioquicPath(FerrymanQuicPath):
    """The QUIC fabric on the aioquic engine (FERRYMAN_QUIC_ENGINE=aioquic), to compare the engines."""

    name = "ferryman-quic-aioquic"
    quic_engine = "aioquic"


class FerrymanRelayPath(FerrymanPath):
    """The relay path: app → client agent → edge-1 → edge-2 → connector → backend, with a control
    plane (edges relay by its presence map); the connector holds tunnels to edge-2 only."""

    name = "ferryman-relay"

    def _fabric(self, forwards: list[tuple]) -> Fabric:
        from dataplane.fabric import Fabric

        return Fabric(os.path.join(self.workdir, "fabric"), forwards, env=self._env(),
                      managed=True, edges=2, connector_edges={"connector-1": ["edge-2"]})


class FerrymanWorkersPath(FerrymanPath):
    """The ``ferryman`` path with an edge of ``workers`` worker processes under its supervisor."""

    name = "ferryman-workers1"
    workers = 1

    def _env(self) -> dict[str, str]:
        # --workers 1 with a supervisor: FERRYMAN_EDGE_WORKERS=1 runs the edge in one process, so the
        # one-worker path is the supervisor-less edge (what a worker is, less the relay between them).
        return {**super()._env(), "FERRYMAN_EDGE_WORKERS": str(self.workers), "FERRYMAN_CONNECTOR_TUNNELS": "4"}


class FerrymanWorkers2Path(FerrymanWorkersPath):
    name = "ferryman-workers2"
    workers = 2


PATHS: dict[str, type[Path]] = {cls.name: cls for cls in (DirectPath, FerrymanPath, FerrymanQuicPath,
                                                           FerrymanAioquicPath, FerrymanRelayPath, FerrymanWorkersPath,
                                                           FerrymanWorkers2Path, SshPath, StunnelPath, HaproxyPath,
                                                           RelayFloorPath)}
