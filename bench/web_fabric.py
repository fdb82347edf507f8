"""The ``http`` workload of ``ferryman bench``: a published web app through the whole fabric.

``python -m bench.web_fabric [--seconds 8] [--connections 64]`` (or ``ferryman bench
--workloads http``) starts, on loopback:

- the backend: Debian's nginx serving 1 KiB and 64 KiB files over HTTP/1.1 (keep-alive);
- a managed local fabric (control plane, edge with its HTTPS front door, one connector)
  publishing that backend as web app ``bench`` at ``https://bench.ferryman.localhost:PORT``;
  a real sign-in through the front door's pages gives the session cookie every request
  then carries (so every request is authorized by ``admit()`` and gets its assertion);
  the per-app and per-edge request rates (``FERRYMAN_WEB_APP_RATE``/``_EDGE_RATE``) are
  raised out of the way, everything else is as shipped;
- nginx as a one-hop TLS reverse proxy to the same backend (the reference);
- ``bench.web_floor``: the path's shape (TLS to the client, one TLS tunnel with framing, a
  connector process, the backend) in a few Python callbacks with none of the edge's work
  (no sign-in, authorization, records, limits or flow control): how much of the fabric's
  cost per request the shape itself takes on uvloop (run with the 1-worker edge only);

once with an edge of 1 worker process and nginx with 1 worker, then with 2 of each (the edge's
workers share the front door's port, ``edge.workers``), and runs ``wrk`` (64 keep-alive connections, HTTP/1.1 over TLS) against edge → connector →
backend, nginx and the backend directly, for each size, in one run. It prints req/s,
p50/p99 and the CPU time each process spent per request (from /proc: edge, connector,
control plane, nginx, the floor's two processes). Numbers measured on this machine are in the README.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

from .web_frontdoor import NGINX_BACKEND, NGINX_PROXY, free_port, wrk

SIZES = ("1k", "64k")


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (nginx's workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except OSError:
            continue
    return out


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its descendants (all their threads)."""
    total = 0.0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _curl(ca: str, port: int, url: str, *args: str, jar: str, data: bytes | None = None) -> tuple[int, str, bytes]:
    """(status, redirect URL, body) of the last response."""
    body_file = jar + ".body"
    cmd = ["curl", "-sS", "--max-time", "20", "--cacert", ca, "-o", body_file, "-w", "%{http_code} %{redirect_url}",
           "-b", jar, "-c", jar, "--resolve", f"bench.ferryman.localhost:{port}:127.0.0.1",
           "--resolve", f"login.ferryman.localhost:{port}:127.0.0.1"]
    if data is not None:
        cmd += ["--data-binary", "@-"]
    out = subprocess.run([*cmd, *args, url], input=data, capture_output=True, timeout=30).stdout.decode()
    status, _, location = out.partition(" ")
    body = Path(body_file).read_bytes() if os.path.exists(body_file) else b""
    return int(status or 0), location.strip(), body


def sign_in(fabric, jar: str) -> str:
    """Sign in through the front door's own pages; the app-host cookie (``name=value``)."""
    port, ca = fabric.web_port, fabric.web_ca
    status, location, _ = _curl(ca, port, fabric.web_url("bench", "/1k"), jar=jar)
    if status != 302:
        raise RuntimeError(f"expected a sign-in redirect, got HTTP {status}")
    _, _, form = _curl(ca, port, location, jar=jar)
    fields = {n: re.search(rb'name="%s" value="([^"]+)"' % n.encode(), form).group(1).decode()
              for n in ("csrf", "nonce", "host")}
    body = urlencode({**fields, "upn": fabric.user, "password": fabric.password, "otp": ""}).encode()
    status, _, _ = _curl(ca, port, fabric.web_url("login", "/.ferryman/sign_in"), "-L", "-H",
                         "Content-Type: application/x-www-form-urlencoded", "-H",
                         f"Origin: https://login.ferryman.localhost:{port}", jar=jar, data=body)
    if status != 200:
        raise RuntimeError(f"sign-in did not end on the page (HTTP {status})")
    from dataplane.edge.web.session import COOKIE

    for line in Path(jar).read_text().splitlines():
        parts = line.split("\t")
        if len(parts) == 7 and parts[0].removeprefix("#HttpOnly_") == "bench.ferryman.localhost" \
                and parts[5] == COOKIE:
            cookie = f"{parts[5]}={parts[6]}"
            break
    else:
        raise RuntimeError("no session cookie for bench.ferryman.localhost after sign-in")
    # What wrk will send (the cookie, Host, no SNI) must get the page itself, not a redirect.
    check = subprocess.run(["curl", "-sS", "--max-time", "20", "-k", "-o", "/dev/null", "-w", "%{http_code}",
                            "-H", f"Cookie: {cookie}", "-H", f"Host: bench.ferryman.localhost:{port}",
                            f"https://127.0.0.1:{port}/1k"], capture_output=True, text=True, timeout=30)
    if check.stdout != "200":
        raise RuntimeError(f"a request with the session cookie got HTTP {check.stdout}, not 200")
    return cookie


def run(seconds: int = 8, connections: int = 64, workers: tuple[int, ...] = (1, 2)) -> list[dict]:
    """One run of every path and size, for an edge of each number of ``workers`` (and nginx with as
    many worker processes); rows of {size, path, workers, rps, p50, p99, cpu_us}."""
    from dataplane.fabric import Fabric, web_certificate

    for tool in ("nginx", "wrk", "curl"):
        if not shutil.which(tool):
            raise RuntimeError(f"{tool} is needed (Debian packages nginx, wrk and curl)")
    work = Path(tempfile.mkdtemp(prefix="ferryman-web-fabric-bench-"))
    os.chmod(work, 0o755)
    (work / "www").mkdir()
    for size, n in (("1k", 1024), ("64k", 65536)):
        (work / "www" / size).write_bytes(os.urandom(n))
    backend = free_port()
    ca, cert, key = web_certificate(str(work / "nginx-pki"), ["localhost"])
    (work / "backend.conf").write_text(NGINX_BACKEND.format(dir=work, port=backend))
    procs = [subprocess.Popen(["nginx", "-c", str(work / "backend.conf"), "-e", str(work / "backend.err")])]
    rows: list[dict] = []
    try:
        floor_port, floor = _start_floor(ca, cert, key, backend, procs)
        for count in workers:
            proxy = free_port()
            conf = work / f"proxy-{count}.conf"
            conf.write_text(NGINX_PROXY.format(dir=work, port=proxy, backend=backend, cert=cert, key=key,
                                               workers=count).replace("proxy.pid", f"proxy-{count}.pid"))
            nginx = subprocess.Popen(["nginx", "-c", str(conf), "-e", str(work / f"proxy-{count}.err")])
            procs.append(nginx)
            fabric = Fabric(str(work / f"fabric-{count}"), [], managed=True, workers=count,
                            env={"FERRYMAN_WEB_APP_RATE": "1000000000", "FERRYMAN_WEB_EDGE_RATE": "1000000000",
                                 "FERRYMAN_LOG_LEVEL": "warning"},
                            webapps=[{"name": "bench", "external_url": "https://bench.ferryman.localhost",
                                      "internal_url": f"http://127.0.0.1:{backend}"}])
            try:
                fabric.start(timeout=60)
                cookie = sign_in(fabric, str(work / f"jar-{count}"))
                host = f"bench.ferryman.localhost:{fabric.web_port}"
                pids = {name: fabric.procs[name].pid for name in ("edge-1", "connector-1", "control")}
                pids["nginx"] = nginx.pid
                if count == workers[0]:
                    pids.update(floor)
                for size in SIZES:
                    paths = {
                        "nginx TLS proxy": (f"https://127.0.0.1:{proxy}/{size}", "", ""),
                        "edge -> connector": (f"https://127.0.0.1:{fabric.web_port}/{size}", cookie, host),
                    }
                    if count == workers[0]:
                        paths = {"direct (HTTP)": (f"http://127.0.0.1:{backend}/{size}", "", ""), **paths,
                                 "python floor": (f"https://127.0.0.1:{floor_port}/{size}", "", "")}
                    for path, (url, with_cookie, resolve) in paths.items():
                        before = {name: _cpu_seconds(pid) for name, pid in pids.items()}
                        result = wrk(url, seconds, connections, cookie=with_cookie, resolve=resolve)
                        spent = {name: _cpu_seconds(pid) - before[name] for name, pid in pids.items()}
                        requests = max(result["rps"] * seconds, 1.0)
                        result["cpu_us"] = {name: spent[name] / requests * 1e6 for name in spent if spent[name] > 0}
                        rows.append({"size": size, "path": path, "workers": count, **result})
                        time.sleep(0.5)
            finally:
                fabric.stop()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)
    return rows


def _start_floor(ca: str, cert: str, key: str, backend: int, procs: list[subprocess.Popen]) -> tuple[int, dict[str, int]]:
    """``bench.web_floor``'s connector and edge in front of ``backend``: the port to send requests
    to and the processes' pids by name (the CPU columns)."""
    tunnel, port = free_port(), free_port()
    tls = ["--cert", cert, "--key", key]
    connector = subprocess.Popen([sys.executable, "-m", "bench.web_floor", "connector", *tls, "--listen", str(tunnel),
                                  "--backend", str(backend)])
    procs.append(connector)
    _wait_listening(tunnel, connector)
    edge = subprocess.Popen([sys.executable, "-m", "bench.web_floor", "edge", "--ca", ca, *tls, "--listen", str(port),
                             "--tunnel", str(tunnel)])
    procs.append(edge)
    _wait_listening(port, edge)
    return port, {"floor edge": edge.pid, "floor connector": connector.pid}


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bench.web_floor exited with status {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"bench.web_floor did not listen on port {port} within {timeout:g} s")


def table(rows: list[dict]) -> str:
    """Each path's figures; Ferryman's and nginx's against nginx with as many worker processes."""
    nginx = {(r["size"], r["workers"]): r["rps"] for r in rows if r["path"] == "nginx TLS proxy"}
    lines = [f"{'size':<5} {'path':<20} {'workers':>7} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'vs nginx':>9}  "
             f"CPU µs/request"]
    for r in rows:
        cpu = ", ".join(f"{name} {us:.0f}" for name, us in sorted(r["cpu_us"].items()))
        ratio = f"{r['rps'] / nginx[r['size'], r['workers']]:>8.2f}x" if r["path"] != "direct (HTTP)" else f"{'':>9}"
        lines.append(f"{r['size']:<5} {r['path']:<20} {r['workers']:>7} {r['rps']:>9.0f} {r['p50']:>8.2f} "
                     f"{r['p99']:>8.2f} {ratio}  {cpu}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.web_fabric", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args(argv)
    try:
        rows = run(args.seconds, args.connections)
    except (RuntimeError, OSError) as exc:
        print(f"web benchmark failed: {exc}", file=sys.stderr)
        return 1
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
