"""The client agent's sign-in: ``ferryman client login`` and keeping the access token fresh.

``login(...)`` signs the user in at the control plane (``POST /v1/auth/sign-in``: UPN,
password, TOTP or recovery code when the account has a second factor) and registers this
device in the same call: a new device key (made here, never sent) and a CSR, answered with
a device certificate (CN = the device id). It stores, in one directory (default
``FERRYMAN_DATA_DIR/client``): the device key (0600), certificate and CA, and
``session.json`` (0600): control-plane URL, user, device id, the refresh token and the
current access token with its expiry. ``login_oidc(...)`` does the same through the control
plane's OIDC provider; both store the answer with ``_store``.

OIDC (``control.oidc`` has the control plane's side): the agent listens on 127.0.0.1 (a free
port, ``Loopback``) for the user's browser, which must run on this machine, and keeps a
random *poll verifier* to itself (the control plane gets its SHA-256 at
``POST /v1/auth/oidc/start``). The URL shown to the user is that loopback listener's; it
sends the browser to the control plane's begin URL, then to the provider; after the
sign-in the control plane sends the browser back to the listener with a one-time handoff,
and the agent collects the tokens with login id, verifier and handoff
(``POST /v1/auth/oidc/poll``, which also tells it early when the sign-in was refused). No
one else gets them: not whoever sees the URL (it points at this machine's loopback), not a
victim's browser led through a sign-in someone else started (it takes the handoff to its
own loopback), not whoever learns the login id (no verifier). The listener logs no request.

A client started with no ``FERRYMAN_TLS_*`` settings uses that directory by itself
(``dataplane.cli.nodes``). ``TokenKeeper`` then keeps the access token fresh: it refreshes
(``POST /v1/auth/refresh``, which rotates the refresh token) once 80% of the token's
lifetime has passed, stores the new tokens, and hands the token to the client node, which
sends it to the edge in an AUTH frame. While the control plane cannot be reached it
retries with backoff; flows keep working until the access token expires.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import http.server
import json
import logging
import os
import platform
import queue
import re
import secrets
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec

from ..basics import pki, statefile
from ..basics.pki import new_key_and_csr, write_node_files
from ..basics.version import VERSION
from ..basics.controltls import ControlTlsError, parse_pin, verifying_context
from ..controllink import http as httpclient
from ..controllink import trust
from ..transport.supervisor import Backoff

log = logging.getLogger("ferryman.signin")

CLIENT_DIR = "client"  # under FERRYMAN_DATA_DIR
SESSION_FILE = "session.json"
REQUEST_TIMEOUT = 30.0
REFRESH_AT = 0.8  # share of an access token's lifetime after which it is refreshed
RETRY_MAX = 30.0


class SignInError(Exception):
    """Sign-in or refresh failed; ``code`` is the control plane's (``mfa_required``, ...) or ``network``."""

    def __init__(self, message: str, code: str = "", status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class ClientSession(msgspec.Struct, kw_only=True):
    """``session.json``: file names are relative to its directory."""

    control: str
    user_id: str
    upn: str
    device_id: str
    session_id: str
    refresh_token: str
    access_token: str
    access_expires: int  # unix time
    access_lifetime: int = 3600  # seconds the current access token was issued for
    ca: str = pki.CA_CERT
    cert: str
    key: str
    control_ca: str = ""  # the control plane's CA pinned at sign-in (file name); "" for plain HTTP


def default_directory(data_dir: str) -> str:
    return os.path.join(data_dir, CLIENT_DIR)


def read_session(directory: str) -> ClientSession | None:
    path = os.path.join(directory, SESSION_FILE)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise pki.PkiError(f"{path}: {exc.strerror}") from None
    try:
        return msgspec.json.decode(data, type=ClientSession)
    except msgspec.MsgspecError as exc:
        raise pki.PkiError(f"{path}: not a Ferryman client session ({exc})") from None


def write_session(directory: str, session: ClientSession) -> None:
    statefile.write_private(os.path.join(directory, SESSION_FILE),
                            msgspec.json.format(msgspec.json.encode(session)) + b"\n")


def _error(status: int, payload: bytes) -> SignInError:
    message, code = f"HTTP {status}", ""
    try:
        body = json.loads(payload)
        if isinstance(body, dict):
            message = str(body.get("error") or message)
            code = str(body.get("code") or "")
    except ValueError:
        pass
    return SignInError(message, code, status)


class ControlTrust(NamedTuple):
    """How the control plane is reached: its CA (PEM; None for allowed plain HTTP) and that CA's context."""

    ca_pem: bytes | None
    context: ssl.SSLContext | None


def first_contact(control: str, *, ca_hash: str = "", ca_file: str = "", insecure: bool = False) -> ControlTrust:
    """Pin the control plane's CA before anything is sent (``controllink.trust.first_contact``):
    ``ca_file`` (``FERRYMAN_CONTROL_CA``), else ``ca_hash``; ``http://`` only with ``insecure``."""
    try:
        pin = parse_pin(ca_hash) if ca_hash.strip() else None
        pem = trust.first_contact(control, pin=pin, ca_file=ca_file, insecure=insecure)
    except ControlTlsError as exc:
        raise SignInError(str(exc), "tls") from None
    return ControlTrust(pem, None if pem is None else verifying_context(pem))


def session_context(directory: str, session: ClientSession, *, ca_file: str = "",
                    insecure: bool = False) -> ssl.SSLContext | None:
    """The TLS context for the stored session's control plane (``SignInError`` when it cannot be trusted)."""
    try:
        return trust.context_for(session.control, directory, session.control_ca, ca_file=ca_file, insecure=insecure)
    except ControlTlsError as exc:
        raise SignInError(str(exc), "tls") from None


def _post(base: str, path: str, body: dict[str, Any], context: ssl.SSLContext | None) -> dict[str, Any]:
    return _post_status(base, path, body, context)[1]


def _post_status(base: str, path: str, body: dict[str, Any],
                 context: ssl.SSLContext | None) -> tuple[int, dict[str, Any]]:
    """(2xx status, decoded JSON answer); ``SignInError`` for error statuses and network failures."""
    try:
        answer = httpclient.request_blocking(base, "POST", path, body=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json", "Accept": "application/json"},
                                             timeout=REQUEST_TIMEOUT, user_agent=f"ferryman/{VERSION}",
                                             ssl_context=context)
    except httpclient.HttpError as exc:
        raise SignInError(f"cannot reach the control plane at {base}: {exc}", "network") from None
    if not 200 <= answer.status < 300:
        raise _error(answer.status, answer.body[:65536])
    try:
        return answer.status, json.loads(answer.body)
    except ValueError as exc:
        raise SignInError(f"cannot reach the control plane at {base}: {exc}", "network") from None


def _device(csr_pem: bytes, device_name: str, os_name: str, os_version: str) -> dict[str, str]:
    return {"csr_pem": csr_pem.decode(), "name": device_name or platform.node()[:200],
            "os": os_name or platform.system(), "os_version": os_version or platform.release()[:64]}


def login(control: str, upn: str, password: str, *, directory: str, totp: str = "", recovery_code: str = "",
          device_name: str = "", os_name: str = "", os_version: str = "",
          tls: ControlTrust | None = None) -> ClientSession:
    """Sign in and register this device; store and return the session (see the module doc). ``tls``:
    from ``first_contact`` (without it only an allowed plain ``http://`` works)."""
    tls = tls or first_contact(control)
    key_pem, csr_pem = new_key_and_csr("device")  # the control plane names the certificate after the device id
    body: dict[str, Any] = {"upn": upn, "password": password,
                            "device": _device(csr_pem, device_name, os_name, os_version)}
    if totp:
        body["totp_code"] = totp
    if recovery_code:
        body["recovery_code"] = recovery_code
    return _store(control, _post(control, "/v1/auth/sign-in", body, tls.context), key_pem, directory, tls)


LOOPBACK_PATH = "/ferryman/oidc"  # where the control plane sends the browser back with the handoff
BROWSER_WAIT = 60.0  # seconds the browser's last request waits for the agent to collect the tokens
LOOPBACK_IDLE = 10.0  # seconds a connection to the listener may take to send its request (then closed)
_HANDOFF_RE = re.compile(r"[A-Za-z0-9_-]{43,128}")


class Loopback:
    """The agent's listener on 127.0.0.1 for the browser during an OIDC sign-in (RFC 8252 §7.3):
    ``/`` sends the browser to ``begin_url``; ``LOOPBACK_PATH?handoff=...`` passes the handoff to
    the agent (``handoffs``) and shows the browser how the sign-in ended (``finish``)."""

    def __init__(self) -> None:
        self.begin_url = ""
        self.handoffs: queue.Queue[str] = queue.Queue(maxsize=1)
        self._pages: queue.Queue[tuple[int, str, str]] = queue.Queue(maxsize=1)
        loopback = self

        class Handler(http.server.BaseHTTPRequestHandler):
            # A connection that sends nothing (a browser's spare preconnect, another local process) is
            # closed after this; each connection has its own thread, so none holds up the browser's request.
            timeout = LOOPBACK_IDLE

            def log_message(self, *_args: Any) -> None:  # the request line carries the handoff: never logged
                pass

            def _send(self, status: int, title: str, message: str, location: str = "") -> None:
                body = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>Ferryman: {html.escape(title)}"
                        f"</title></head><body><h1>{html.escape(title)}</h1><p>{html.escape(message)}</p></body>"
                        f"</html>\n").encode()
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                for name, value in (("Content-Type", "text/html; charset=utf-8"), ("Cache-Control", "no-store"),
                                    ("Referrer-Policy", "no-referrer"), ("Content-Length", str(len(body)))):
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                url = urllib.parse.urlsplit(self.path)
                if url.path == "/":
                    self._send(302, "sign-in", "Continue to sign in.", loopback.begin_url)
                    return
                if url.path != LOOPBACK_PATH:
                    self._send(404, "not found", "Nothing here.")
                    return
                handoff = urllib.parse.parse_qs(url.query).get("handoff", [""])[0]
                if not _HANDOFF_RE.fullmatch(handoff):
                    self._send(400, "sign-in failed", "The control plane's answer is not complete: start again.")
                    return
                try:
                    loopback.handoffs.put_nowait(handoff)
                except queue.Full:
                    self._send(409, "sign-in failed", "This sign-in is already being finished.")
                    return
                try:
                    status, title, message = loopback._pages.get(timeout=BROWSER_WAIT)
                except queue.Empty:
                    status, title, message = 504, "sign-in unfinished", "The agent did not finish the sign-in in time."
                self._send(status, title, message)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        def serve() -> None:
            httpclient.block_stop_signals()  # Ctrl-C goes to the main thread, which is waiting on the sign-in
            self._server.serve_forever()

        self._thread = threading.Thread(target=serve, name="oidc-loopback", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def finish(self, status: int, title: str, message: str) -> None:
        """What the browser that brought the handoff is shown."""
        try:
            self._pages.put_nowait((status, title, message))
        except queue.Full:
            pass

    def close(self) -> None:
        self.finish(503, "sign-in stopped", "The agent stopped before the sign-in finished: start again.")
        self._server.shutdown()
        self._server.server_close()


def _challenge(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode()


def login_oidc(control: str, *, directory: str, show_url: Callable[[str], None], device_name: str = "",
               os_name: str = "", os_version: str = "", sleep: Callable[[float], None] = time.sleep,
               tls: ControlTrust | None = None) -> ClientSession:
    """Sign in through the control plane's OIDC provider and register this device (module doc):
    ``show_url`` gets the URL the user opens in a browser on this machine; the sign-in ends
    when the browser is back at the agent's listener, is refused, or expires. Stores and
    returns the session like ``login``."""
    tls = tls or first_contact(control)
    key_pem, csr_pem = new_key_and_csr("device")
    verifier = secrets.token_urlsafe(32)
    device = _device(csr_pem, device_name, os_name, os_version)
    loopback = Loopback()
    try:
        started = _post(control, "/v1/auth/oidc/start", {"device": device, "redirect_port": loopback.port,
                                                         "poll_challenge": _challenge(verifier)}, tls.context)
        try:
            login_id, loopback.begin_url = str(started["login_id"]), str(started["begin_url"])
            interval = min(max(float(started.get("poll_interval", 2)), 0.5), 30.0)
            deadline = time.monotonic() + float(started.get("expires_in", 600))
        except (KeyError, TypeError, ValueError) as exc:
            raise SignInError(f"the control plane's OIDC start answer is incomplete ({exc!r})") from None
        show_url(loopback.url)
        handoff: str | None = None
        while True:
            if handoff is None:
                try:
                    handoff = loopback.handoffs.get(timeout=interval)
                except queue.Empty:
                    pass
            body = {"login_id": login_id, "poll_verifier": verifier}
            if handoff is not None:
                body["handoff"] = handoff
            try:
                status, answer = _post_status(control, "/v1/auth/oidc/poll", body, tls.context)
            except SignInError as exc:
                if exc.code != "network":
                    loopback.finish(exc.status or 502, "sign-in failed", str(exc))
                    raise
                log.warning("polling the OIDC sign-in failed; retrying: %s", exc)  # the sign-in waits on the server
                if handoff is not None:
                    sleep(interval)
            else:
                if status == 200:
                    try:
                        session = _store(control, answer, key_pem, directory, tls)
                    except (SignInError, pki.PkiError, statefile.StateFileError) as exc:
                        loopback.finish(500, "sign-in failed", f"signed in, but this device cannot store it: {exc}")
                        raise
                    loopback.finish(200, "signed in", f"Signed in as {session.upn} on device {device['name']!r} "
                                                      f"({session.device_id}): you can close this window.")
                    return session
                if handoff is not None:  # the control plane had no sign-in to finish yet: not ours
                    loopback.finish(409, "sign-in failed", "The control plane did not expect this answer.")
                    raise SignInError("the browser came back before the control plane finished the sign-in: "
                                      "start again", "oidc_handoff_invalid", 409)
            if time.monotonic() + interval > deadline:
                raise SignInError("the OIDC sign-in expired before it was completed in the browser: start again",
                                  "oidc_login_unknown", 404)
    finally:
        loopback.close()


def _store(control: str, answer: dict[str, Any], key_pem: bytes, directory: str,
           tls: ControlTrust) -> ClientSession:
    """Write the device identity, the pinned control-plane CA and ``session.json`` from a sign-in
    answer (password or OIDC)."""
    try:
        device = answer["device"]
        files = write_node_files(directory, device["id"], key_pem, device["certificate_pem"].encode(),
                               device["ca_pem"].encode())
        pinned = trust.save(directory, tls.ca_pem)
        session = ClientSession(
            control=control.rstrip("/"), user_id=answer["user"]["id"], upn=answer["user"]["upn"],
            device_id=device["id"], session_id=answer["session_id"], refresh_token=answer["refresh_token"],
            access_token=answer["access_token"], access_expires=int(time.time()) + int(answer["expires_in"]),
            access_lifetime=int(answer["expires_in"]),
            ca=os.path.basename(files.ca), cert=os.path.basename(files.cert), key=os.path.basename(files.key),
            control_ca=pinned,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise SignInError(f"the control plane's sign-in answer is incomplete ({exc!r})") from None
    write_session(directory, session)
    return session


def logout(directory: str, *, ca_file: str = "", insecure: bool = False) -> tuple[str, bool]:
    """End the stored session at the control plane (refreshing an expired access token first) and
    remove it, with the cached forwarding profile, from ``directory``: (its UPN, whether the
    control plane confirmed). ``SignInError`` when there is no session."""
    session = read_session(directory)
    if session is None:
        raise SignInError(f"not signed in (no {os.path.join(directory, SESSION_FILE)})")
    confirmed = False
    token = session.access_token
    try:
        context = session_context(directory, session, ca_file=ca_file, insecure=insecure)
        if session.access_expires <= time.time() + 5:
            refreshed = _post(session.control, "/v1/auth/refresh", {"refresh_token": session.refresh_token}, context)
            token = str(refreshed["access_token"])
        answer = httpclient.request_blocking(session.control, "POST", "/v1/auth/sign-out", body=b"",
                                             headers={"Authorization": f"Bearer {token}"}, timeout=REQUEST_TIMEOUT,
                                             user_agent=f"ferryman/{VERSION}", ssl_context=context)
        # 401: the session was already ended (revoked, expired): nothing left to end remotely
        confirmed = 200 <= answer.status < 300 or answer.status == 401
    except (SignInError, httpclient.HttpError, KeyError, TypeError, ValueError):
        confirmed = False
    for name in (SESSION_FILE, "profile.json"):
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise SignInError(f"cannot remove {os.path.join(directory, name)}: {exc.strerror}") from None
    return session.upn, confirmed


class TokenKeeper:
    """Keeps a stored session's access token fresh; ``on_token(token)`` gets each new one."""

    def __init__(self, directory: str, session: ClientSession, on_token: Callable[[str], None],
                 tls: ssl.SSLContext | None = None) -> None:
        """``tls``: the context for the session's control plane (``session_context``; None: plain HTTP)."""
        self.directory = directory
        self.session = session
        self.on_token = on_token
        self.tls = tls

    @property
    def token(self) -> str:
        return self.session.access_token

    def _due(self, now: float) -> float:
        """Seconds until the token should be refreshed (0: now)."""
        s = self.session
        return max(0.0, s.access_expires - s.access_lifetime * (1 - REFRESH_AT) - now)

    async def refresh(self) -> None:
        """One refresh now (``SignInError`` if it fails)."""
        body = msgspec.json.encode({"refresh_token": self.session.refresh_token})
        try:
            answer = await httpclient.request(self.session.control, "POST", "/v1/auth/refresh", body=body,
                                              headers={"Content-Type": "application/json"}, timeout=REQUEST_TIMEOUT,
                                              user_agent=f"ferryman/{VERSION}", ssl_context=self.tls)
        except httpclient.HttpError as exc:
            raise SignInError(f"cannot reach the control plane at {self.session.control}: {exc}", "network") from None
        if answer.status != 200:
            raise _error(answer.status, answer.body)
        try:
            data = json.loads(answer.body)
            self.session = msgspec.structs.replace(
                self.session, access_token=data["access_token"], refresh_token=data["refresh_token"],
                access_expires=int(time.time()) + int(data["expires_in"]), access_lifetime=int(data["expires_in"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise SignInError(f"the control plane's refresh answer is incomplete ({exc!r})") from None
        await asyncio.to_thread(write_session, self.directory, self.session)
        self.on_token(self.session.access_token)

    async def run(self, stop: asyncio.Event) -> None:
        backoff = Backoff(1.0, RETRY_MAX)
        while not stop.is_set():
            delay = self._due(time.time())
            if delay > 0:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                    return
                except TimeoutError:
                    pass
            try:
                await self.refresh()
                backoff.reset()
                log.info("access token refreshed", extra={"expires_in": self.session.access_expires - int(time.time())})
            except SignInError as exc:
                if exc.status in (400, 401, 403):
                    log.error("the control plane refused to refresh the access token (%s): run `ferryman client "
                              "login` again", exc)
                    return
                wait = backoff.next()
                log.warning("access token refresh failed; retrying", extra={"reason": str(exc),
                                                                             "retry_in_s": round(wait, 1)})
                try:
                    await asyncio.wait_for(stop.wait(), wait)
                    return
                except TimeoutError:
                    pass
