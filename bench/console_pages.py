"""Console page render times with a realistic amount of data: ``python -m bench.console_pages``.

Seeds a fresh SQLite store (``seed``: connector groups, connectors and edges with heartbeats,
applications with segments and assignments, users with devices and sessions, policies, named
locations, DNS suffixes, and ``--records`` traffic records over the last 24 hours), starts a real
control plane on it (``python -m dataplane control`` on loopback, HTTPS), signs an admin in to the
console (password + TOTP), and requests every page ``--rounds`` times, printing the median and
the worst time per page (request round trip over loopback: the server's time plus a little).
The issue's bar: each page under 200 ms with 10,000 traffic records.
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import re
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode, urlsplit

import msgspec
import pyotp

from control.store import (
    applications,
    assignments,
    connector_groups,
    devices,
    dns_suffixes,
    named_locations,
    nodes,
    open_store,
    policies,
    sessions,
    totp,
    traffic,
    user_groups,
    users,
)
from control.store import console as console_store
from control.store.db import database_url
from control.store.secretbox import SecretBox
from dataplane.contract.flowrecord import FlowRecord

ACTOR = "admin-key:seed"
PASSWORD = "correct horse battery"
ADMIN = "ada.lovelace@corp.example"
PAGES = ("/console", "/console/applications", "/console/applications/1", "/console/connectors", "/console/edges",
         "/console/users", "/console/devices", "/console/policies", "/console/traffic",
         "/console/traffic?action=deny&hours=24", "/console/traffic/1", "/console/discovery",
         "/console/test-access", "/console/settings", "/console/audit")
FIRST = ("ada", "grace", "alan", "edsger", "barbara", "ken", "margaret", "dennis", "radia", "linus", "frances",
         "john", "hedy", "tim", "katherine", "donald")
LAST = ("lovelace", "hopper", "turing", "dijkstra", "liskov", "thompson", "hamilton", "ritchie", "perlman",
        "torvalds", "allen", "backus", "lamarr", "berners-lee", "johnson", "knuth")
REASONS = ("not_assigned", "no_application", "mfa_required", "device_not_compliant", "blocked_by_policy",
           "device_revoked")


def seed(data_dir: str, *, records: int = 10_000, users_count: int = 300, apps_count: int = 120,
         connectors_per_group: int = 3, rng: random.Random | None = None) -> str:
    """Fill ``data_dir``'s store; returns the admin's TOTP secret (the admin is ``ADMIN``, console
    role admin, password ``PASSWORD``)."""
    rng = rng or random.Random(7)
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    box = SecretBox.open(data_dir)
    now = datetime.now(UTC)
    with open_store(database_url(data_dir), box) as store:
        with store.begin() as session:
            regions = [("default", ""), ("eu-west", "eu-west-1"), ("us-east", "us-east-1"), ("apac", "ap-south-1"),
                       ("lab", "on-prem")]
            for name, region in regions[1:]:
                connector_groups.create_group(session, ACTOR, name, region, allowed=["10.0.0.0/8"],
                                              denied=["10.255.0.0/16"])
            connector_ids = []
            for name, _region in regions:
                for i in range(connectors_per_group):
                    c = nodes.add_connector(session, ACTOR, f"{name}-conn-{i + 1}", group=name,
                                            cert_serial=rng.getrandbits(64), cert_not_after=now + timedelta(days=170))
                    connector_ids.append((c.id, c.name))
                    if not (name == "lab" and i == 0):  # one connector down, for the alerts
                        nodes.record_heartbeat(session, "connector", c.id, version="0.1.0",
                                               external_addr=f"198.51.100.{10 + len(connector_ids)}",
                                               internal_addr=f"10.{len(connector_ids)}.0.5", tunnels=2,
                                               active_flows=rng.randint(0, 40))
            for i in range(3):
                e = nodes.add_edge(session, ACTOR, f"edge-{i + 1}", f"edge{i + 1}.corp.example:8443",
                                   cert_serial=rng.getrandbits(64),
                                   cert_not_after=now + timedelta(days=20 if i == 2 else 170))
                nodes.record_heartbeat(session, "edge", e.id, version="0.1.0", external_addr=f"203.0.113.{i + 1}",
                                       internal_addr=f"10.200.0.{i + 1}", tunnels=rng.randint(20, 200),
                                       active_flows=rng.randint(50, 400))
            groups = [user_groups.create_user_group(session, ACTOR, g)
                      for g in ("engineering", "finance", "support", "contractors", "admins")]
            people = []
            device_of: dict[str, str] = {}
            for i in range(users_count):
                first, last = FIRST[i % len(FIRST)], LAST[(i // len(FIRST) + i) % len(LAST)]
                upn = ADMIN if i == 0 else f"{first}.{last}{i}@corp.example"
                u = users.create_user(session, ACTOR, upn, display_name=f"{first.title()} {last.title()}",
                                      password=PASSWORD if i == 0 else None)
                user_groups.add_group_member(session, ACTOR, groups[i % len(groups)].id, u.id)
                people.append(u)
                for d in range(1 + (i % 3 == 0)):
                    dev = devices.register_device(session, ACTOR, u.id, name=f"{first}-laptop-{d + 1}",
                                                  os=("Windows", "macOS", "Linux")[i % 3], os_version="14.4")
                    sessions.create_session(session, u.id, device_id=dev.id)
                    device_of[u.id] = dev.id
            app_names = []
            for i in range(apps_count):
                name = f"app-{i + 1:03d}-{('wiki', 'git', 'erp', 'crm', 'ssh', 'rdp', 'db', 'files')[i % 8]}"
                applications.create_application(session, ACTOR, name, connector_group=regions[i % 5][0], segments=[
                    {"destination": f"{name}.corp.example", "ports": "443"},
                    {"destination": f"10.{i // 200 + 1}.{i % 200}.0/24", "ports": "22,3389,8000-8100"}])
                assignments.assign_application(session, ACTOR, name, group=groups[i % len(groups)].id)
                app_names.append(name)
            applications.create_application(session, ACTOR, "quick-access", kind="quick_access",
                                            segments=[{"destination": "10.0.0.0/8", "ports": "1-65535"}])
            named_locations.create_location(session, ACTOR, "office", ["198.51.100.0/24", "2001:db8::/48"])
            for i, (grant, state) in enumerate([("require_mfa", "on"), ("require_compliant_device", "report_only"),
                                                ("block", "off"), ("require_mfa", "report_only")]):
                policies.create_policy(session, ACTOR, f"policy-{i + 1}-{grant}", grant=grant, state=state,
                                       applications=app_names[i * 3:i * 3 + 3], groups=[groups[i].id],
                                       conditions={"locations": ["office"]} if i == 1 else {})
            for suffix in ("corp.example", "lab.internal"):
                dns_suffixes.add_dns_suffix(session, ACTOR, suffix)
            admin = people[0]
            console_store.set_console_role(session, ACTOR, admin.id, "admin")
            secret = totp.start_totp_enrolment(session, admin.id, box)
            totp.confirm_totp(session, admin.id, pyotp.TOTP(secret).at(time.time() - 30), box,
                              recovery_codes=totp.new_recovery_codes())
        batch = []
        starts = sorted(now - timedelta(seconds=rng.uniform(0, 86_400)) for _ in range(records))
        for n, start in enumerate(starts):
            u = people[rng.randrange(len(people))]
            deny = rng.random() < 0.08
            quick = not deny and rng.random() < 0.15
            app = "quick-access" if quick else app_names[min(int(rng.paretovariate(1.2)) - 1, len(app_names) - 1)]
            cid, cname = connector_ids[rng.randrange(len(connector_ids))]
            batch.append({
                "connection_id": f"c{n:08x}", "transaction_id": f"t{n // 5:08x}", "start": start.timestamp(),
                "end": None if deny else (start + timedelta(seconds=rng.uniform(0.1, 600))).timestamp(),
                "duration_ms": 0 if deny else rng.randint(100, 600_000), "user_id": u.id, "upn": u.upn,
                "device_id": device_of[u.id], "device_os": "Windows", "device_os_version": "14.4",
                "client_version": "ferryman/0.1.0", "process": "chrome.exe",
                "source_ip": f"100.64.{rng.randrange(256)}.{rng.randrange(256)}", "source_port": rng.randint(1024, 65535),
                "destination_ip": f"10.1.{rng.randrange(200)}.{rng.randrange(256)}", "destination_port": 443,
                "destination_fqdn": f"host{rng.randrange(40)}.corp.example" if quick else f"{app}.corp.example",
                "transport": "tcp", "network": "ipv4", "application": "" if deny and rng.random() < 0.3 else app,
                "application_kind": "quick_access" if quick else "per_app", "segment": "", "policy": "",
                "rule": "", "action": "deny" if deny else ("report" if rng.random() < 0.03 else "allow"),
                "reason_code": rng.choice(REASONS) if deny else "", "connector_id": cid, "connector_name": cname,
                "connector_address": "10.0.0.2", "bytes_sent": 0 if deny else int(rng.lognormvariate(9, 2)),
                "bytes_received": 0 if deny else int(rng.lognormvariate(11, 2.5)), "close_reason": ""})
            if len(batch) == 2000:
                with store.begin() as session:
                    traffic.insert_records(session, "edge-1", msgspec.convert(batch, list[FlowRecord]))
                batch = []
        if batch:
            with store.begin() as session:
                traffic.insert_records(session, "edge-1", msgspec.convert(batch, list[FlowRecord]))
    return secret


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tls_context(data_dir: str) -> ssl.SSLContext:
    """Trusts only the CA of the control plane in ``data_dir``."""
    return ssl.create_default_context(cafile=os.path.join(data_dir, "ca", "ca.pem"))


def start_control(data_dir: str, log: str) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m dataplane control`` on ``data_dir`` (HTTPS, its own CA), on a free loopback port;
    waits for /health."""
    port = _free_port()
    url = f"https://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRYMAN_")}
    env["FERRYMAN_DATA_DIR"] = data_dir
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dataplane", "control", "--listen", f"127.0.0.1:{port}"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"control plane exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1, context=tls_context(data_dir)):
                return proc, url
        except (OSError, ssl.SSLError):
            time.sleep(0.1)
    proc.terminate()
    raise SystemExit(f"control plane did not answer within 30 s; see {log}")


def _connection(url: str, data_dir: str) -> http.client.HTTPConnection:
    return http.client.HTTPSConnection(urlsplit(url).netloc, timeout=30, context=tls_context(data_dir))


def console_cookie(url: str, data_dir: str, secret: str) -> str:
    """Sign ``ADMIN`` in to the console; the session cookie's value."""
    conn = _connection(url, data_dir)
    body = urlencode({"upn": ADMIN, "password": PASSWORD, "code": pyotp.TOTP(secret).at(time.time() + 30)})
    conn.request("POST", "/console/sign-in", body=body, headers={
        "Content-Type": "application/x-www-form-urlencoded", "Origin": url})
    response = conn.getresponse()
    response.read()
    found = re.search(r"ferryman_console=([^;]+)", response.headers.get("set-cookie", ""))
    if response.status != 303 or not found:
        raise SystemExit(f"console sign-in failed: {response.status}")
    return found.group(1)


def measure(url: str, data_dir: str, cookie: str, rounds: int) -> list[tuple[str, float, float, int]]:
    """(page, median ms, worst ms, bytes) per page, over one kept-alive HTTPS connection."""
    conn = _connection(url, data_dir)
    out = []
    for path in PAGES:
        times, size = [], 0
        for _ in range(rounds):
            t0 = time.perf_counter()
            conn.request("GET", path, headers={"Cookie": f"ferryman_console={cookie}"})
            response = conn.getresponse()
            size = len(response.read())
            times.append((time.perf_counter() - t0) * 1000)
            if response.status != 200:
                raise SystemExit(f"{path}: HTTP {response.status}")
        out.append((path, statistics.median(times), max(times), size))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.console_pages", description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=10_000, help="traffic records in the store (default 10000)")
    parser.add_argument("--users", type=int, default=300, help="users (default 300)")
    parser.add_argument("--apps", type=int, default=120, help="applications (default 120)")
    parser.add_argument("--rounds", type=int, default=20, help="requests per page (default 20)")
    args = parser.parse_args(argv)
    if min(args.records, args.rounds) < 1 or args.users < 2 or args.apps < 12:
        parser.error("--records and --rounds must be at least 1, --users at least 2, --apps at least 12")
    with tempfile.TemporaryDirectory(prefix="ferryman-console-bench-") as tmp:
        data_dir = os.path.join(tmp, "data")
        t0 = time.perf_counter()
        secret = seed(data_dir, records=args.records, users_count=args.users, apps_count=args.apps)
        print(f"seeded {args.records} traffic records, {args.users} users, {args.apps} applications "
              f"in {time.perf_counter() - t0:.1f} s")
        proc, url = start_control(data_dir, os.path.join(tmp, "control.log"))
        try:
            cookie = console_cookie(url, data_dir, secret)
            rows = measure(url, data_dir, cookie, args.rounds)
        finally:
            proc.terminate()
            proc.wait(timeout=15)
    print(f"{'page':<42} {'median ms':>10} {'worst ms':>9} {'KiB':>7}")
    for path, median, worst, size in rows:
        print(f"{path:<42} {median:>10.1f} {worst:>9.1f} {size / 1024:>7.1f}")
    slow = [path for path, median, _w, _s in rows if median >= 200]
    print("every page's median under 200 ms" if not slow else f"over 200 ms: {', '.join(slow)}")
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
