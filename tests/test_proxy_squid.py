"""Tunnel egress through a REAL squid (Debian package ``squid``), started by each test with
its own generated configuration: no caching, CONNECT allowed only to the test's edge port,
Proxy Basic authentication through ``basic_ncsa_auth`` with a generated htpasswd file.

- ``dial_tls`` through squid carries mutual-TLS bytes, and squid's access.log records the
  CONNECT with the user; squid's own refusals (wrong password, no credentials, a port its
  policy forbids, an edge that is down) give the specific error texts;
- ``netns``: a whole fabric whose connector runs in a network namespace (with the private
  backend) that can reach nothing but squid's address: no route to the edge, the edge's
  port closed on every address it can reach. Real bytes go client -> edge -> connector ->
  backend, and squid's access.log shows the connector's tunnels (from the namespace's
  address, as the authenticated user, carrying the transfer's bytes) and the client
  agent's (which dials through squid too).

Skips name their reason: no squid, no openssl (htpasswd), not root or no ``ip netns``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest
import uvloop

from conftest import upload_sha
from netns import private_network, reachable_from, start_backend_in
from dataplane.fabric import Fabric, free_port
from dataplane.transport.proxy import EgressProxy, ProxyError, dial_tls
from test_proxy import Collect, client_ctx, echo_through, tls_echo_server

pytestmark = pytest.mark.timeout(120)

SQUID = shutil.which("squid") or "/usr/sbin/squid"
NCSA = "/usr/lib/squid/basic_ncsa_auth"
USER, PASSWORD = "alice", "s3cr@t:pw"
PASSWORD_IN_URL = "s3cr%40t%3Apw"
MiB = 1 << 20


def _need_squid() -> None:
    if not os.path.exists(SQUID):
        pytest.skip("squid is not installed (apt-get install squid; .ci/run does)")
    if not os.path.exists(NCSA):
        pytest.skip(f"{NCSA} (squid's Basic auth helper) is missing")
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to write squid's htpasswd file")


class Squid:
    """One squid process listening on ``host:port`` (foreground, ``-N``), its files in a
    private directory; CONNECT allowed only to ``edge_port``, for ``users`` when given."""

    def __init__(self, host: str, edge_port: int, users: dict[str, str] | None = None) -> None:
        self.host = host
        self.port = free_port() if host == "127.0.0.1" else random.randint(20000, 60000)
        self.edge_port = edge_port
        self.users = users
        # Not under pytest's 0700 tmp_path: squid drops root for the `proxy` user, which must
        # reach its own files.
        self.dir = tempfile.mkdtemp(prefix="ferryman-squid-")
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, credentials: str = "") -> str:
        return f"http://{credentials}{self.host}:{self.port}"

    def proxy(self, credentials: str = "") -> EgressProxy:
        return EgressProxy.parse(self.url(credentials))

    def _config(self) -> str:
        lines = [
            f"http_port {self.host}:{self.port}",
            "visible_hostname ferryman-test",
            "cache deny all",
            "cache_mem 0 MB",
            f"pid_filename {self.dir}/squid.pid",
            f"cache_log {self.dir}/cache.log",
            f"access_log stdio:{self.dir}/access.log",
            f"coredump_dir {self.dir}",
            "netdb_filename none",
            "pinger_enable off",
            "shutdown_lifetime 0 seconds",
            "logfile_rotate 0",
            "connect_timeout 5 seconds",
            "acl CONNECT method CONNECT",
            f"acl edge_port port {self.edge_port}",
        ]
        if os.geteuid() == 0:
            lines.append("cache_effective_user proxy")
        if self.users is not None:
            with open(f"{self.dir}/htpasswd", "w") as fh:
                for user, password in self.users.items():
                    hashed = subprocess.run(["openssl", "passwd", "-apr1", "-stdin"], input=password.encode(),
                                            capture_output=True, check=True, timeout=10).stdout.decode().strip()
                    fh.write(f"{user}:{hashed}\n")
            lines += [f"auth_param basic program {NCSA} {self.dir}/htpasswd",
                      "auth_param basic realm ferryman-test",
                      "acl authed proxy_auth REQUIRED",
                      "http_access allow CONNECT edge_port authed"]
        else:
            lines.append("http_access allow CONNECT edge_port")
        lines.append("http_access deny all")
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 20.0) -> "Squid":
        conf = f"{self.dir}/squid.conf"
        with open(conf, "w") as fh:
            fh.write(self._config())
        if os.geteuid() == 0:
            for path in [self.dir, *(os.path.join(self.dir, f) for f in os.listdir(self.dir))]:
                shutil.chown(path, "proxy", "proxy")
        with open(f"{self.dir}/stderr.log", "wb") as err:
            self.proc = subprocess.Popen([SQUID, "-N", "-f", conf, "-n", f"fmtest{self.port}"], stdout=err,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"squid exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=1):
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"squid not listening on {self.host}:{self.port} within {timeout:g}s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self) -> str:
        out = []
        for name in ("stderr.log", "cache.log"):
            with contextlib.suppress(OSError), open(os.path.join(self.dir, name), errors="replace") as fh:
                out.append(f"--- {name}\n" + "".join(fh.readlines()[-20:]))
        return "\n".join(out)

    def access_log(self) -> list[str]:
        try:
            with open(os.path.join(self.dir, "access.log")) as fh:
                return fh.read().splitlines()
        except FileNotFoundError:
            return []

    def wait_access(self, pattern: str, count: int = 1, timeout: float = 15.0) -> list[re.Match[str]]:
        """Lines of access.log matching ``pattern`` (squid writes a CONNECT line when the tunnel ends)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [m for m in (re.search(pattern, line) for line in self.access_log()) if m]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"squid's access.log has {len(found)} lines matching {pattern!r}, expected "
                                     f"{count}:\n" + "\n".join(self.access_log()))
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None:  # its auth helpers share its process group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def squid() -> Iterator[type[Squid]]:
    _need_squid()
    started: list[Squid] = []

    class Started(Squid):
        def start(self, timeout: float = 20.0) -> "Squid":
            started.append(self)
            return super().start(timeout)

    yield Started
    for s in started:
        s.stop()


def run(coro_factory, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    async def bounded():  # type: ignore[no-untyped-def]
        return await asyncio.wait_for(coro_factory(), timeout)

    return uvloop.run(bounded())


# ---------------------------------------------------------------------------- dial_tls through squid
def test_dial_through_squid_with_basic_auth_carries_tls_bytes(squid: type[Squid], pki_cache: str) -> None:
    payload = os.urandom(2 * MiB)

    async def main() -> int:
        edge = await tls_echo_server(pki_cache)
        edge_port = edge.sockets[0].getsockname()[1]
        proxy = squid("127.0.0.1", edge_port, {USER: PASSWORD}).start()
        transport, proto = await dial_tls(Collect, "127.0.0.1", edge_port, client_ctx(pki_cache),
                                          handshake_timeout=10, proxy=proxy.proxy(f"{USER}:{PASSWORD_IN_URL}@"))
        assert transport.get_extra_info("ssl_object").version() == "TLSv1.3"
        assert await echo_through(transport, proto, payload) == payload
        edge.close()
        (line,) = await asyncio.to_thread(
            proxy.wait_access, rf" 127\.0\.0\.1 TCP_TUNNEL/200 (\d+) CONNECT 127\.0\.0\.1:{edge_port} {USER} "
                               rf"HIER_DIRECT/127\.0\.0\.1 ")
        return int(line.group(1))

    sent_by_squid = run(main)
    assert sent_by_squid >= 2 * MiB  # the echoed bytes crossed squid


def test_squid_refuses_a_wrong_password(squid: type[Squid]) -> None:
    proxy = squid("127.0.0.1", 48443, {USER: PASSWORD}).start()
    text = _refusal(proxy.proxy(f"{USER}:wrong@"), 48443)
    assert text == (f"proxy 127.0.0.1:{proxy.port}: proxy refused the credentials for user 'alice' "
                    f"(407 Proxy Authentication Required; x-squid-error: ERR_CACHE_ACCESS_DENIED 0)")


def test_squid_asks_for_credentials_the_url_lacks(squid: type[Squid]) -> None:
    proxy = squid("127.0.0.1", 48443, {USER: PASSWORD}).start()
    text = _refusal(proxy.proxy(), 48443)
    assert text == (f"proxy 127.0.0.1:{proxy.port}: proxy authentication required and the proxy URL has no "
                    f"user:password (407 Proxy Authentication Required; x-squid-error: ERR_CACHE_ACCESS_DENIED 0)")


def test_squid_forbids_another_port(squid: type[Squid]) -> None:
    proxy = squid("127.0.0.1", 48443, {USER: PASSWORD}).start()
    text = _refusal(proxy.proxy(f"{USER}:{PASSWORD_IN_URL}@"), 48444)
    assert text == (f"proxy 127.0.0.1:{proxy.port} forbids CONNECT to 127.0.0.1:48444: its policy does not allow "
                    f"this destination (403 Forbidden; x-squid-error: ERR_ACCESS_DENIED 0)")


def test_squid_cannot_reach_an_edge_that_is_down(squid: type[Squid]) -> None:
    edge_port = free_port()  # nothing listens there
    proxy = squid("127.0.0.1", edge_port).start()
    text = _refusal(proxy.proxy(), edge_port)
    assert text == (f"proxy 127.0.0.1:{proxy.port} could not reach the edge 127.0.0.1:{edge_port} "
                    f"(503 Service Unavailable; x-squid-error: ERR_CONNECT_FAIL 111)")


def _refusal(proxy: EgressProxy, edge_port: int) -> str:
    async def main() -> str:
        import ssl

        try:
            await dial_tls(Collect, "127.0.0.1", edge_port, ssl.create_default_context(), handshake_timeout=10,
                           proxy=proxy)
        except ProxyError as exc:
            return str(exc)
        raise AssertionError("the dial through squid succeeded")

    return run(main)


# ---------------------------------------------------------------------------- a fabric behind squid
@pytest.mark.netns
def test_fabric_whose_connector_can_only_reach_squid(squid: type[Squid], pki_cache: str, tmp_path) -> None:
    with private_network() as (ns, ours, theirs):
        backend = start_backend_in(ns, "sha")
        fab = None
        try:
            workdir = tmp_path / "fabric"
            workdir.mkdir()
            shutil.copytree(pki_cache, workdir / "pki")
            fab = Fabric(str(workdir), [("127.0.0.1", 0, "127.0.0.1", backend.port)], env={
                "FERRYMAN_DRAIN_GRACE": "1", "FERRYMAN_TRANSPORT": "tcp", "FERRYMAN_NO_PROXY": "",
                "NO_PROXY": "", "no_proxy": "", "HTTPS_PROXY": "", "https_proxy": ""})
            edge_port = fab.edge_port = free_port()  # squid's policy names it before the edge starts
            proxy = squid(ours, edge_port, {USER: PASSWORD}).start()
            fab.env["FERRYMAN_HTTPS_PROXY"] = proxy.url(f"{USER}:{PASSWORD_IN_URL}@")
            fab.prefix["connector-1"] = ["ip", "netns", "exec", ns]
            fab.metrics["connector-1"] = f"{theirs}:{random.randint(20000, 60000)}"
            fab.start(timeout=40)

            # From inside the namespace the edge is unreachable on every address; squid is not.
            seen = reachable_from(ns, [("127.0.0.1", edge_port), (ours, edge_port), (proxy.host, proxy.port)])
            assert seen == {("127.0.0.1", edge_port): False, (ours, edge_port): False,
                            (proxy.host, proxy.port): True}

            data = os.urandom(3 * MiB)
            assert upload_sha(fab.forward_ports[0], data) == hashlib.sha256(data).hexdigest()
            assert backend.wait_event("eof", bytes=len(data))["sha256"] == hashlib.sha256(data).hexdigest()

            with open(fab.logs["connector-1"]) as fh:
                connector_log = fh.read()
            assert f"proxy=http://{USER}:***@{ours}:{proxy.port}" in connector_log
            assert PASSWORD not in connector_log and PASSWORD_IN_URL not in connector_log
        except BaseException:
            if fab is not None:
                for name in fab.logs:
                    print(f"--- {name}\n{fab.log_tail(name, 40)}")
            raise
        finally:
            if fab is not None:
                fab.stop()
            backend.proc.terminate()
            backend.proc.wait(10)

        # squid logs a CONNECT when its tunnel ends: the connector's (from the namespace's
        # address) carried the upload to the connector, the client agent's came from here.
        pattern = rf"^\S+\s+\d+ {{}} TCP_TUNNEL/200 (\d+) CONNECT 127\.0\.0\.1:{edge_port} {USER} HIER_DIRECT/127\.0\.0\.1 "
        connector_lines = proxy.wait_access(pattern.format(re.escape(theirs)))
        assert sum(int(m.group(1)) for m in connector_lines) >= len(data)
        proxy.wait_access(pattern.format(re.escape(ours)))

