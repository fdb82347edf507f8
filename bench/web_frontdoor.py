"""Benchmark of the HTTPS front door alone (no tunnel): wrk through it, through nginx, and direct.

``python -m bench.web_frontdoor [--seconds 10] [--connections 64] [--workers 1]`` starts, on loopback:

- a backend: Debian's nginx serving 1 KiB and 64 KiB files over HTTP/1.1 (keep-alive);
- the front door (``dataplane.edge.web.FrontDoor`` on uvloop, one process) publishing the
  backend as a ``ferryman`` app (every request carries a signed-in cookie, is authorized
  and gets an assertion) and as a ``passthrough`` app, dialing the backend over TCP;
- nginx as a one-hop TLS reverse proxy to the same backend (upstream keep-alive);

and runs ``wrk`` (HTTP/1.1 keep-alive over TLS) against each, printing requests/s and
p50/p99 latency per path and size. ``serve`` is the front door's own process. The full
benchmark (edge → connector → backend through a tunnel) is ``ferryman bench``'s job; this
one measures the HTTP machinery by itself.

Measured on this machine (2 cores, idle, ``--seconds 8``, 64 connections, one front-door
process and one nginx worker; CPU per request from /proc):

=====  =========================  =======  ======  ======  ========  ============
size   path                       req/s    p50 ms  p99 ms  vs nginx  CPU/request
=====  =========================  =======  ======  ======  ========  ============
1k     direct (HTTP)              76141    0.78    2.10    2.10x
1k     nginx TLS proxy            36328    1.80    4.16    1.00x     20 µs
1k     front door, passthrough    12873    4.82    9.49    0.35x     77 µs
1k     front door, signed in      10983    5.57    15.20   0.30x     93 µs
64k    direct (HTTP)              34028    1.83    3.81    3.00x
64k    nginx TLS proxy            11354    5.42    9.11    1.00x
64k    front door, passthrough    5808     10.67   18.24   0.51x
64k    front door, signed in      5365     11.61   22.25   0.47x
=====  =========================  =======  ======  ======  ========  ============

Of the ~93 µs a signed-in request costs, TLS + parsing + writing is ~17 µs (a uvloop TLS
server answering a fixed response), the proxy's Python path ~50 µs
(``bench/test_web_request_bench.py``), the backend socket the rest. One process is one core:
more throughput comes from worker processes sharing the port (``FrontDoor.start(reuse_port=True)``,
all with the same cookie keys). On this 2-core machine ``--workers 2`` (and two nginx workers)
changes little — wrk, the backend and the proxies already share the two cores: 1 KiB signed
in 13965 req/s (0.40x nginx, p99 9.1 ms), 64 KiB 5779 req/s (0.47x).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOST = "app.bench.test"
OPEN = "open.bench.test"
AUTH = "auth.bench.test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_cert(directory: Path) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in (HOST, OPEN, AUTH)]), False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


# ---------------------------------------------------------------------------- the front door process
async def serve(port: int, backend: int, cert: str, key: str, cookie_keys: str) -> None:
    from dataplane.edge.web import (
        AssertionSigner, FrontDoor, KeyRing, Principal, SignInError, Verdict, WebApp, WebSettings,
    )
    from dataplane.edge.web.backend import open_socket_stream
    from dataplane.edge.web.session import COOKIE, AppSession, Sealer

    class Allow:
        def authorize(self, app, principal, facts):
            return Verdict(allowed=True, groups=("g-bench",))

    class Dial:
        async def open(self, app, principal):
            return await open_socket_stream("127.0.0.1", backend, "bench")

    class NoSignIn:
        async def sign_in(self, *a):
            raise SignInError("auth_failed", "benchmark")

        refresh = sign_in

        async def sign_out(self, *a):
            return None

    keys = KeyRing.from_text(cookie_keys)  # every worker seals and opens with the same keys
    settings = WebSettings(auth_host=f"{AUTH}:{port}", app_rate=1e9, edge_rate=1e9)
    door = FrontDoor(settings, authorizer=Allow(), dialer=Dial(), sign_in=NoSignIn(), cookie_keys=keys,
                     signer=AssertionSigner.generate(), certificate=(Path(cert).read_text(), Path(key).read_text()))
    door.set_apps([WebApp(name="app", external_url=f"https://{HOST}:{port}", internal_url=f"http://backend:{backend}"),
                   WebApp(name="open", external_url=f"https://{OPEN}:{port}", internal_url=f"http://backend:{backend}",
                          preauth="passthrough")])
    now = int(time.time())
    principal = Principal(user_id="u-bench", upn="bench@corp.example", session_id="s-bench", amr=("pwd", "mfa"),
                          auth_time=now, expires=now + 3600)
    cookie = Sealer(keys).seal(f"{HOST}:{port}", AppSession(principal, now + 3600, now))
    await door.start("127.0.0.1", port, reuse_port=True)
    print(f"cookie {COOKIE}={cookie}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await door.close()


# ---------------------------------------------------------------------------- runner
NGINX_BACKEND = """
worker_processes 1; daemon off; pid {dir}/backend.pid; error_log {dir}/backend.err;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{port}; root {dir}/www; }} }}
"""
NGINX_PROXY = """
worker_processes {workers}; daemon off; pid {dir}/proxy.pid; error_log {dir}/proxy.err;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000;
  upstream backend {{ server 127.0.0.1:{backend}; keepalive 128; }}
  server {{ listen 127.0.0.1:{port} ssl http2; ssl_certificate {cert}; ssl_certificate_key {key};
    ssl_protocols TLSv1.3;
    location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $remote_addr; }} }} }}
"""


def wrk(url: str, seconds: int, connections: int, cookie: str = "", resolve: str = "") -> dict[str, float]:
    cmd = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if cookie:
        cmd += ["-H", f"Cookie: {cookie}"]
    if resolve:
        cmd += ["-H", f"Host: {resolve}"]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=seconds + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)

    def ms(v: str) -> float:
        n = float(re.match(r"[\d.]+", v).group(0))
        return n / 1000 if v.endswith("us") else n * 1000 if v.endswith("s") and not v.endswith("ms") else n

    if non2xx:
        raise RuntimeError(f"{url}: {non2xx.group(1)} responses were not 2xx:\n{out}")
    return {"rps": rps, "p50": ms(lat["50"]), "p99": ms(lat["99"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd")
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--backend", type=int, required=True)
    s.add_argument("--cert", required=True)
    s.add_argument("--key", required=True)
    s.add_argument("--cookie-keys", required=True)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="front-door processes sharing the port (and nginx workers)")
    args = parser.parse_args()
    if args.cmd == "serve":
        import uvloop
        uvloop.run(serve(args.port, args.backend, args.cert, args.key, args.cookie_keys))
        return
    for tool in ("nginx", "wrk"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is needed (Debian packages nginx and wrk)")
    work = Path(tempfile.mkdtemp(prefix="ferryman-web-bench-"))
    os.chmod(work, 0o755)
    (work / "www").mkdir()
    (work / "www" / "1k").write_bytes(os.urandom(1024))
    (work / "www" / "64k").write_bytes(os.urandom(65536))
    cert, key = make_cert(work)
    backend, proxy, door_port = free_port(), free_port(), free_port()
    (work / "backend.conf").write_text(NGINX_BACKEND.format(dir=work, port=backend))
    (work / "proxy.conf").write_text(NGINX_PROXY.format(dir=work, port=proxy, backend=backend, cert=cert, key=key,
                                                        workers=args.workers))
    procs = [subprocess.Popen(["nginx", "-c", str(work / "backend.conf"), "-e", str(work / "backend.err")]),
             subprocess.Popen(["nginx", "-c", str(work / "proxy.conf"), "-e", str(work / "proxy.err")])]
    cookie_keys = "k1:" + base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
    doors = [subprocess.Popen([sys.executable, "-m", "bench.web_frontdoor", "serve", "--port", str(door_port),
                               "--backend", str(backend), "--cert", str(cert), "--key", str(key),
                               "--cookie-keys", cookie_keys], stdout=subprocess.PIPE, text=True)
             for _ in range(args.workers)]
    procs.extend(doors)
    try:
        cookie = [d.stdout.readline().strip() for d in doors][0].split(" ", 1)[1]
        time.sleep(0.5)
        rows = []
        for size in ("1k", "64k"):
            runs = {
                "direct (HTTP)": wrk(f"http://127.0.0.1:{backend}/{size}", args.seconds, args.connections),
                "nginx TLS proxy": wrk(f"https://127.0.0.1:{proxy}/{size}", args.seconds, args.connections),
                "front door, passthrough": wrk(f"https://127.0.0.1:{door_port}/{size}", args.seconds,
                                               args.connections, resolve=f"{OPEN}:{door_port}"),
                "front door, signed in": wrk(f"https://127.0.0.1:{door_port}/{size}", args.seconds, args.connections,
                                             cookie=cookie, resolve=f"{HOST}:{door_port}"),
            }
            for path, r in runs.items():
                rows.append((size, path, r))
        nginx = {size: r["rps"] for size, path, r in rows if path == "nginx TLS proxy"}
        print(f"{'size':<5} {'path':<26} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'vs nginx':>9}")
        for size, path, r in rows:
            print(f"{size:<5} {path:<26} {r['rps']:>9.0f} {r['p50']:>8.2f} {r['p99']:>8.2f} "
                  f"{r['rps'] / nginx[size]:>8.2f}x")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
