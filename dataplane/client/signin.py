"""The client agent's sign-in: ``ferryman client login`` and keeping the access token fresh.

``login(...)`` signs the user in at the control plane (``POST /v1/auth/sign-in``: UPN,
password, TOTP or recovery code when the account has a second factor) and registers this
device in the same call: a new device key (made here, never sent) and a CSR, answered with
a device certificate (CN = the device id). It stores, in one directory (default
``FERRYMAN_DATA_DIR/client``): the device key (0600), certificate and CA, and
``session.json`` (0600): control-plane URL, user, device id, the refresh token and the
current access token with its expiry. ``login_oidc(...)`` does the same through the control
plane's OIDC provider (``POST /v1/auth/oidc/start``, the user signs in in a browser, then
``POST /v1/auth/oidc/poll`` until done); both store the answer with ``_store``.

A client started with no ``FERRYMAN_TLS_*`` settings uses that directory by itself
(``dataplane.cli.nodes``). ``TokenKeeper`` then keeps the access token fresh: it refreshes
(``POST /v1/auth/refresh``, which rotates the refresh token) once 80% of the token's
lifetime has passed, stores the new tokens, and hands the token to the client node, which
sends it to the edge in an AUTH frame. While the control plane cannot be reached it
retries with backoff; flows keep working until the access token expires.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import msgspec

from ..basics import pki, statefile
from ..basics.pki import new_key_and_csr, write_node_files
from ..basics.version import VERSION
from ..controllink import http as httpclient
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


def _post(base: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    return _post_status(base, path, body)[1]


def _post_status(base: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """(2xx status, decoded JSON answer); ``SignInError`` for error statuses and network failures."""
    try:
        answer = httpclient.request_blocking(base, "POST", path, body=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json", "Accept": "application/json"},
                                             timeout=REQUEST_TIMEOUT, user_agent=f"ferryman/{VERSION}")
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
          device_name: str = "", os_name: str = "", os_version: str = "") -> ClientSession:
    """Sign in and register this device; store and return the session (see the module doc)."""
    key_pem, csr_pem = new_key_and_csr("device")  # the control plane names the certificate after the device id
    body: dict[str, Any] = {"upn": upn, "password": password,
                            "device": _device(csr_pem, device_name, os_name, os_version)}
    if totp:
        body["totp_code"] = totp
    if recovery_code:
        body["recovery_code"] = recovery_code
    return _store(control, _post(control, "/v1/auth/sign-in", body), key_pem, directory)


def login_oidc(control: str, *, directory: str, show_url: Callable[[str], None], device_name: str = "",
               os_name: str = "", os_version: str = "", sleep: Callable[[float], None] = time.sleep) -> ClientSession:
    """Sign in through the control plane's OIDC provider and register this device: ``show_url``
    gets the URL the user opens in a browser; the control plane is polled until the user is
    through (or the sign-in expired). Stores and returns the session like ``login``."""
    key_pem, csr_pem = new_key_and_csr("device")
    started = _post(control, "/v1/auth/oidc/start", {"device": _device(csr_pem, device_name, os_name, os_version)})
    try:
        login_id, url = str(started["login_id"]), str(started["authorization_url"])
        interval = min(max(float(started.get("poll_interval", 2)), 0.5), 30.0)
        deadline = time.monotonic() + float(started.get("expires_in", 600))
    except (KeyError, TypeError, ValueError) as exc:
        raise SignInError(f"the control plane's OIDC start answer is incomplete ({exc!r})") from None
    show_url(url)
    while True:
        try:
            status, answer = _post_status(control, "/v1/auth/oidc/poll", {"login_id": login_id})
        except SignInError as exc:
            if exc.code != "network":
                raise
            log.warning("polling the OIDC sign-in failed; retrying: %s", exc)  # the sign-in waits on the server
        else:
            if status == 200:
                return _store(control, answer, key_pem, directory)
        if time.monotonic() + interval > deadline:
            raise SignInError("the OIDC sign-in expired before it was completed in the browser: start again",
                              "oidc_login_unknown", 404)
        sleep(interval)


def _store(control: str, answer: dict[str, Any], key_pem: bytes, directory: str) -> ClientSession:
    """Write the device identity and ``session.json`` from a sign-in answer (password or OIDC)."""
    try:
        device = answer["device"]
        files = write_node_files(directory, device["id"], key_pem, device["certificate_pem"].encode(),
                               device["ca_pem"].encode())
        session = ClientSession(
            control=control.rstrip("/"), user_id=answer["user"]["id"], upn=answer["user"]["upn"],
            device_id=device["id"], session_id=answer["session_id"], refresh_token=answer["refresh_token"],
            access_token=answer["access_token"], access_expires=int(time.time()) + int(answer["expires_in"]),
            access_lifetime=int(answer["expires_in"]),
            ca=os.path.basename(files.ca), cert=os.path.basename(files.cert), key=os.path.basename(files.key),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise SignInError(f"the control plane's sign-in answer is incomplete ({exc!r})") from None
    write_session(directory, session)
    return session


def logout(directory: str) -> tuple[str, bool]:
    """End the stored session at the control plane (refreshing an expired access token first) and
    remove it, with the cached forwarding profile, from ``directory``: (its UPN, whether the
    control plane confirmed). ``SignInError`` when there is no session."""
    session = read_session(directory)
    if session is None:
        raise SignInError(f"not signed in (no {os.path.join(directory, SESSION_FILE)})")
    confirmed = False
    token = session.access_token
    try:
        if session.access_expires <= time.time() + 5:
            refreshed = _post(session.control, "/v1/auth/refresh", {"refresh_token": session.refresh_token})
            token = str(refreshed["access_token"])
        answer = httpclient.request_blocking(session.control, "POST", "/v1/auth/sign-out", body=b"",
                                             headers={"Authorization": f"Bearer {token}"}, timeout=REQUEST_TIMEOUT,
                                             user_agent=f"ferryman/{VERSION}")
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

    def __init__(self, directory: str, session: ClientSession, on_token: Callable[[str], None]) -> None:
        self.directory = directory
        self.session = session
        self.on_token = on_token

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
                                              user_agent=f"ferryman/{VERSION}")
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
