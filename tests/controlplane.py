"""A real control plane for tests: ``python -m dataplane control`` in a subprocess (SQLite in a
data directory of the test's), spoken to over HTTPS with urllib, verified against its own CA.

- ``free_port()``: a TCP port on 127.0.0.1 that is free right now.
- ``environment(data_dir, **extra)``: the environment of a Ferryman process (control plane, node or
  CLI): every inherited ``FERRYMAN_*`` variable cleared (so SQLite and the defaults), then
  ``FERRYMAN_DATA_DIR=data_dir`` and ``extra``.
- ``start(data_dir, log, edges=(), env=None, port=None, ...)``: start a control plane on
  127.0.0.1 (a free port unless given; one ``--edge`` per entry of ``edges``; ``env`` added to
  ``environment(data_dir)``), its output appended to ``log``, and wait until ``/health`` answers
  over HTTPS checked against the CA in ``data_dir/ca`` (plain HTTP when ``env`` sets
  ``FERRYMAN_CONTROL_INSECURE_HTTP=1``); returns (process, URL). The test fails, with the log, if
  the process exits or stays silent.
- ``tls_context(data_dir)``: an SSL context trusting the CA of the control plane in ``data_dir``
  (``ca_file``: ``tls/ca.pem``, the CA its HTTPS certificate chains to, which on PostgreSQL is
  the CA every control-plane node shares; else ``ca/ca.pem`` before that is written).
- ``stop(proc)``: SIGTERM, then SIGKILL after 10 s; for any subprocess.
- ``Control``: one running control plane (URL, data directory, bootstrap admin key, process,
  log). ``Control.launch(data_dir, ...)`` starts one (arguments as ``start``; the log next to the
  data directory unless given); ``Control.running(...)`` is the same as a context manager that
  stops it on exit. Requests answer (status, decoded JSON body or None, headers):
  ``request`` sends the ``Authorization`` given (or none), ``call`` the bootstrap admin key (or
  another key, a bearer token, or nothing), ``admin`` the bootstrap key. Also: ``version()``
  (the configuration version), ``token(role)`` (a registration token), ``register_node(...)``
  (a node registered with ``dataplane.controllink.registration``), ``ca_pem`` (the CA certificate),
  ``ca_hash`` (its pin, ``sha256:...``), ``tls`` (also ``ssl_context``: an SSL context trusting
  it, for requests of the test's own; None for plain HTTP).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any, Self

import pytest

from dataplane.basics.controltls import ca_pin, load_ca_pem, verifying_context
from dataplane.controllink.registration import Registration, register
from dataplane.controllink.signer import NodeSigner

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_EDGE = "edge.example.test:8443"
START_TIMEOUT = 30.0

Reply = tuple[int, Any, Message]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRYMAN_")}  # SQLite, defaults
    env["FERRYMAN_DATA_DIR"] = str(data_dir)
    env["FERRYMAN_EDGE_WORKERS"] = "1"  # an edge is one process: tests count its tunnels and caps per process
    env.update(extra)
    return env


def ca_file(data_dir: Path) -> Path:
    """The CA certificate of the control plane in ``data_dir`` (module doc)."""
    served = data_dir / "tls" / "ca.pem"
    return served if served.exists() else data_dir / "ca" / "ca.pem"


def tls_context(data_dir: Path) -> ssl.SSLContext:
    """Trusts only the CA of the control plane in ``data_dir`` (host names checked)."""
    return verifying_context(ca_file(data_dir).read_bytes())


def start(data_dir: Path, log: Path, *, edges: Sequence[str] = (), env: Mapping[str, str] | None = None,
          port: int | None = None, timeout: float = START_TIMEOUT,
          interval: float = 0.1) -> tuple[subprocess.Popen[bytes], str]:
    port = port or free_port()
    insecure = (env or {}).get("FERRYMAN_CONTROL_INSECURE_HTTP") == "1"
    url = f"{'http' if insecure else 'https'}://127.0.0.1:{port}"
    edge_flags = [flag for edge in edges for flag in ("--edge", edge)]
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dataplane", "control", "--listen", f"127.0.0.1:{port}", *edge_flags],
            cwd=ROOT, env=environment(data_dir, **(env or {})), stdout=out, stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"control plane exited with {proc.returncode}:\n{log.read_text()}")
        try:
            context = None if insecure else tls_context(data_dir)  # the CA exists once the process made it
            with urllib.request.urlopen(url + "/health", timeout=1, context=context) as response:
                if response.status == 200:
                    return proc, url
        except (OSError, ssl.SSLError):
            time.sleep(interval)
    stop(proc)
    pytest.fail(f"control plane did not answer /health within {timeout}s:\n{log.read_text()}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class Control:
    url: str
    data_dir: Path
    key: str
    proc: subprocess.Popen[bytes]
    log: Path
    _tls: ssl.SSLContext | None = field(default=None, repr=False, compare=False)

    @classmethod
    def launch(cls, data_dir: Path, log: Path | None = None, **options: Any) -> Self:
        """A control plane started by ``start(data_dir, log, **options)``; ``log`` defaults to
        ``<data_dir>.log`` next to the data directory."""
        log = log or data_dir.parent / f"{data_dir.name}.log"
        proc, url = start(data_dir, log, **options)
        try:
            key = (data_dir / "admin.key").read_text().strip()
        except BaseException:
            stop(proc)
            raise
        return cls(url, data_dir, key, proc, log)

    @classmethod
    @contextmanager
    def running(cls, data_dir: Path, log: Path | None = None, **options: Any) -> Iterator[Self]:
        control = cls.launch(data_dir, log, **options)
        try:
            yield control
        finally:
            stop(control.proc)

    def request(self, method: str, path: str, body: Any = None, *, authorization: str | None = None,
                raw: bytes | None = None, headers: Mapping[str, str] | None = None, timeout: float = 15) -> Reply:
        """(status, decoded JSON body or None, headers (case-insensitive)) of one request; ``authorization`` as
        sent (none if None); ``raw`` is sent as the body instead of ``body`` as JSON."""
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if authorization is not None:
            request.add_header("Authorization", authorization)
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=self.tls) as response:
                status, payload, got = response.status, response.read(), response.headers
        except urllib.error.HTTPError as exc:
            status, payload, got = exc.code, exc.read(), exc.headers
        return status, json.loads(payload) if payload else None, got

    def call(self, method: str, path: str, body: Any = None, *, key: str | None = "", bearer: str | None = None,
             raw: bytes | None = None, headers: Mapping[str, str] | None = None, timeout: float = 15) -> Reply:
        """``request`` with ``key=""``: the bootstrap admin key, another ``key``, ``None``: no key;
        ``bearer``: this (access) token instead of any key."""
        authorization = None
        if bearer is not None:
            authorization = f"Bearer {bearer}"
        elif key is not None:
            authorization = f"Bearer {key or self.key}"
        return self.request(method, path, body, authorization=authorization, raw=raw, headers=headers,
                            timeout=timeout)

    def admin(self, method: str, path: str, body: Any = None) -> Reply:
        return self.request(method, path, body, authorization=f"Bearer {self.key}")

    def node(self, signer: NodeSigner, method: str, target: str, body: Any = None, **kw: Any) -> Reply:
        """A node request with a fresh token made for exactly this method, target and body."""
        data = b"" if body is None else json.dumps(body).encode()
        return self.request(method, target, body, authorization=f"Bearer {signer.token(method, target, data)}", **kw)

    def version(self) -> int:
        status, body, _ = self.admin("GET", "/v1/config-version")
        assert status == 200, body
        return body["version"]

    def token(self, role: str = "connector", **extra: Any) -> str:
        """A new registration token for ``role`` (``extra``: group, ttl_seconds, ...)."""
        status, body, _ = self.admin("POST", "/v1/registration-tokens", {"role": role, **extra})
        assert status == 201, body
        assert body["role"] == role, body
        return body["token"]

    def register_node(self, directory: Path, role: str = "connector", name: str | None = None,
                      addresses: list[str] | None = None) -> Registration:
        """A node registered with a fresh token by ``dataplane.controllink.registration.register`` into ``directory``;
        named ``<role>-<random hex>`` unless ``name`` is given."""
        return register(role, self.url, self.token(role), name=name or f"{role}-{secrets.token_hex(3)}",
                        directory=str(directory), addresses=addresses)

    @property
    def ca_pem(self) -> bytes:
        return ca_file(self.data_dir).read_bytes()

    @property
    def ca_hash(self) -> str:
        """The CA's pin (``sha256:...``): what ``--ca-hash`` takes and registration tokens carry."""
        return ca_pin(load_ca_pem(self.ca_pem, "the control plane's CA"))

    @property
    def tls(self) -> ssl.SSLContext | None:
        """Trusts only this control plane's CA; None when it serves plain HTTP."""
        if self.url.startswith("http://"):
            return None
        if self._tls is None:
            self._tls = tls_context(self.data_dir)
        return self._tls

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """``tls`` under the name other helpers ask for."""
        return self.tls
