"""The web console over plain HTTP against a real control plane (``python -m dataplane control``
in a subprocess): sign-in with password + TOTP (and a recovery code) and its refusals, the session
cookie's attributes, sign-out ending the session, every page rendering for admin and reader,
CSRF refusal, Origin refusal, role checks on every mutating route (a reader is refused each one,
and nothing changes), store validation messages shown inline with their status, escaping of
user-supplied names, the audit records of console changes under the person's name, traffic
filters / detail / export, and "test access" deciding with the edges' admission code.
"""

from __future__ import annotations

import http.client
import json
import re
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import Message
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import msgspec
import pyotp
import pytest

from controlplane import Control

pytestmark = [pytest.mark.timeout(90)]

PASSWORD = "correct horse battery"


@dataclass
class Page:
    status: int
    headers: Message
    text: str

    @property
    def location(self) -> str:
        return self.headers.get("Location", "")


@dataclass
class Browser:
    """A minimal browser: keeps the console cookie, sends Origin like a browser, follows nothing."""

    url: str
    cookie: str = ""
    origin: str | None = None
    set_cookies: list[str] = field(default_factory=list)
    tls: ssl.SSLContext | None = None  # trusting the control plane's CA when it serves HTTPS

    def _conn(self) -> http.client.HTTPConnection:
        parts = urlsplit(self.url)
        if parts.scheme == "https":
            return http.client.HTTPSConnection(parts.netloc, timeout=20, context=self.tls)
        return http.client.HTTPConnection(parts.netloc, timeout=20)

    def request(self, method: str, path: str, form: dict[str, Any] | None = None, *,
                headers: dict[str, str] | None = None, origin: str | None | bool = True) -> Page:
        conn = self._conn()
        sent = {**(headers or {})}
        if self.cookie:
            sent["Cookie"] = f"ferryman_console={self.cookie}"
        if origin is True:
            sent["Origin"] = self.origin or self.url
        elif isinstance(origin, str):
            sent["Origin"] = origin
        body = None
        if form is not None:
            body = urlencode(form, doseq=True).encode()
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body=body, headers=sent)
        response = conn.getresponse()
        text = response.read().decode("utf-8", "replace")
        conn.close()
        for value in response.headers.get_all("set-cookie") or []:
            self.set_cookies.append(value)
            name, _, rest = value.partition("=")
            if name == "ferryman_console":
                self.cookie = rest.split(";", 1)[0].strip('"')
        return Page(response.status, response.headers, text)

    def get(self, path: str, **kw: Any) -> Page:
        return self.request("GET", path, origin=None, **kw)

    def csrf(self, path: str = "/console") -> str:
        page = self.get(path)
        assert page.status == 200, (page.status, page.text[:300])
        found = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert found, page.text[:500]
        return found.group(1)

    def post(self, path: str, form: dict[str, Any], *, csrf: bool = True, **kw: Any) -> Page:
        body = dict(form)
        if csrf:
            body["csrf"] = self.csrf()
        return self.request("POST", path, body, **kw)


@dataclass
class Person:
    upn: str
    id: str
    secret: str
    recovery: list[str]


def enrol(control: Control, upn: str, role: str | None) -> Person:
    """A user with a password and TOTP enrolled, and the console role ``role``."""
    status, user, _ = control.call("POST", "/v1/users", {"upn": upn, "display_name": upn.split("@")[0].title(),
                                                         "password": PASSWORD})
    assert status == 201, user
    status, signed, _ = control.call("POST", "/v1/auth/sign-in", {"upn": upn, "password": PASSWORD}, key=None)
    assert status == 200, signed
    token = signed["access_token"]
    status, started, _ = control.call("POST", "/v1/auth/totp/enrol", {}, key=None, bearer=token)
    assert status == 200, started
    secret = started["secret"]
    status, confirmed, _ = control.call("POST", "/v1/auth/totp/confirm", {"code": pyotp.TOTP(secret).now()},
                                        key=None, bearer=token)
    assert status == 200, confirmed
    if role is not None:
        status, out, _ = control.call("PATCH", f"/v1/users/{user['id']}", {"console_role": role})
        assert status == 200 and out["console_role"] == role, out
    return Person(upn, user["id"], secret, list(confirmed["recovery_codes"]))


def next_code(person: Person) -> str:
    """A TOTP code the control plane has not seen yet (the next step's: enrolment used this one)."""
    return pyotp.TOTP(person.secret).at(time.time() + 30)


def signed_in(control: Control, person: Person) -> Browser:
    """A browser signed in as ``person`` (with one of their recovery codes: each works once)."""
    browser = Browser(control.url, tls=control.tls)
    page = browser.request("POST", "/console/sign-in",
                           {"upn": person.upn, "password": PASSWORD, "code": person.recovery.pop()})
    assert page.status == 303 and page.location == "/console", (page.status, page.text[:400])
    return browser


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Control]:
    with Control.running(tmp_path_factory.mktemp("console"),
                         env={"FERRYMAN_CONSOLE_IDLE_MINUTES": "5", "FERRYMAN_CONSOLE_SESSION_HOURS": "2"}) as c:
        yield c


@pytest.fixture(scope="module")
def admin(control: Control) -> Person:
    return enrol(control, "ada@corp.example", "admin")


@pytest.fixture(scope="module")
def reader(control: Control) -> Person:
    return enrol(control, "rhea@corp.example", "reader")


@pytest.fixture(scope="module")
def as_admin(control: Control, admin: Person) -> Browser:
    return signed_in(control, admin)


@pytest.fixture(scope="module")
def as_reader(control: Control, reader: Person) -> Browser:
    return signed_in(control, reader)


def audit(control: Control, actor: str) -> list[dict[str, Any]]:
    status, rows, _ = control.call("GET", f"/v1/audit?{urlencode({'actor': actor})}")
    assert status == 200, rows
    return rows


# ---------------------------------------------------------------------------- sign-in


def test_sign_in_with_password_and_totp_sets_a_strict_http_only_cookie(control: Control, admin: Person) -> None:
    browser = Browser(control.url, tls=control.tls)
    assert browser.get("/console").status == 303 and browser.get("/console").location.startswith("/console/sign-in")
    page = browser.get("/console/sign-in")
    assert page.status == 200 and 'name="code"' in page.text
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Frame-Options"] == "DENY"
    page = browser.request("POST", "/console/sign-in", {"upn": admin.upn, "password": PASSWORD,
                                                        "code": next_code(admin)})
    assert page.status == 303 and page.location == "/console", page.text[:300]
    (cookie,) = [c for c in browser.set_cookies if c.startswith("ferryman_console=")]
    attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
    assert {"httponly", "path", "samesite", "max-age"} <= attributes
    assert "samesite=strict" in cookie.lower() and "path=/console" in cookie.lower()
    assert ("secure" in attributes) == control.url.startswith("https:")
    overview = browser.get("/console")
    assert overview.status == 200 and "Ada" in overview.text and "<svg" in overview.text
    # The same TOTP code does not sign in twice.
    again = Browser(control.url, tls=control.tls).request("POST", "/console/sign-in", {"upn": admin.upn, "password": PASSWORD,
                                                                      "code": next_code(admin)})
    assert again.status == 401 and "already used" in again.text
    rows = audit(control, f"console:{admin.upn}")
    assert any(r["action"] == "console.sign_in" for r in rows)


@pytest.mark.parametrize("case", ["wrong password", "wrong code", "no code", "unknown user"])
def test_sign_in_refusals_say_why_without_a_cookie(control: Control, admin: Person, case: str) -> None:
    form = {"upn": admin.upn, "password": PASSWORD, "code": "000000"}
    if case == "wrong password":
        form.update(password="not the password", code=next_code(admin))
    elif case == "no code":
        form["code"] = ""
    elif case == "unknown user":
        form["upn"] = "nobody@corp.example"
    browser = Browser(control.url, tls=control.tls)
    page = browser.request("POST", "/console/sign-in", form)
    assert page.status == 401, page.text[:300]
    assert 'class="error"' in page.text and not browser.cookie


def test_a_user_without_console_role_cannot_sign_in(control: Control) -> None:
    person = enrol(control, "nora@corp.example", None)
    page = Browser(control.url, tls=control.tls).request("POST", "/console/sign-in", {"upn": person.upn, "password": PASSWORD,
                                                                     "code": person.recovery.pop()})
    assert page.status == 401 and "no console role" in page.text
    status, user, _ = control.call("POST", "/v1/users", {"upn": "ned@corp.example", "password": PASSWORD})
    page = Browser(control.url, tls=control.tls).request("POST", "/console/sign-in", {"upn": "ned@corp.example",
                                                                     "password": PASSWORD, "code": ""})
    assert page.status == 401 and "no console role" in page.text and "otpauth" not in page.text


def test_a_console_admin_without_totp_enrols_at_first_sign_in(control: Control) -> None:
    status, user, _ = control.call("POST", "/v1/users", {"upn": "tess@corp.example", "password": PASSWORD})
    assert status == 201
    assert control.call("PATCH", f"/v1/users/{user['id']}", {"console_role": "admin"})[0] == 200
    browser = Browser(control.url, tls=control.tls)
    page = browser.request("POST", "/console/sign-in", {"upn": "tess@corp.example", "password": "wrong password!",
                                                        "code": ""})
    assert page.status == 401 and "otpauth" not in page.text
    page = browser.request("POST", "/console/sign-in", {"upn": "tess@corp.example", "password": PASSWORD,
                                                        "code": ""})
    assert page.status == 200 and "otpauth://totp/" in page.text and not browser.cookie
    secret = re.search(r'<code id="secret">([A-Z2-7]+)</code>', page.text).group(1)
    page = browser.request("POST", "/console/sign-in", {"upn": "tess@corp.example", "password": PASSWORD,
                                                        "code": "000000" if pyotp.TOTP(secret).now() != "000000"
                                                        else "111111"})
    assert page.status == 401 and not browser.cookie
    page = browser.request("POST", "/console/sign-in", {"upn": "tess@corp.example", "password": PASSWORD,
                                                        "code": pyotp.TOTP(secret).now()})
    assert page.status == 200 and page.text.count("<li><code>") == 10 and browser.cookie
    assert browser.get("/console/users").status == 200
    status, out, _ = control.call("GET", f"/v1/users/{user['id']}")
    assert out["totp_enabled"] is True


def test_sign_in_from_another_origin_is_refused(control: Control, admin: Person) -> None:
    browser = Browser(control.url, tls=control.tls)
    page = browser.request("POST", "/console/sign-in", {"upn": admin.upn, "password": PASSWORD,
                                                        "code": admin.recovery[-1]}, origin="https://evil.example")
    assert page.status == 403 and "evil.example" in page.text and not browser.cookie


def test_sign_out_ends_the_session(control: Control, admin: Person) -> None:
    browser = signed_in(control, admin)
    stolen = browser.cookie
    page = browser.post("/console/sign-out", {})
    assert page.status == 303 and page.location == "/console/sign-in"
    # The browser drops what it kept of the console's pages (htmx keeps no page history either).
    assert page.headers.get("clear-site-data") == '"cache", "storage"'
    assert browser.post("/console/sign-out", {"csrf": "wrong"}, csrf=False).status == 303  # not signed in any more
    replay = Browser(control.url, cookie=stolen, tls=control.tls)
    page = replay.get("/console/applications")
    assert page.status == 303 and "sign-in" in page.location


def test_taking_the_role_away_ends_console_sessions(control: Control) -> None:
    person = enrol(control, "omar@corp.example", "reader")
    browser = signed_in(control, person)
    assert browser.get("/console/users").status == 200
    status, out, _ = control.call("PATCH", f"/v1/users/{person.id}", {"console_role": "none"})
    assert status == 200 and out["console_role"] is None
    page = browser.get("/console/users")
    assert page.status == 303 and page.location == "/console/sign-in?why=ended"
    assert "session ended" in Browser(control.url, tls=control.tls).get(page.location).text
    assert "injected" not in Browser(control.url, tls=control.tls).get("/console/sign-in?why=injected").text


def test_a_new_password_or_a_totp_reset_ends_console_sessions(control: Control) -> None:
    """Whoever signed in with credentials that were then changed (perhaps stolen) is signed out."""
    person = enrol(control, "pia@corp.example", "reader")
    for change in ("password", "totp"):
        browser = signed_in(control, person)
        assert browser.get("/console/users").status == 200
        if change == "password":
            status, out, _ = control.call("PATCH", f"/v1/users/{person.id}", {"password": PASSWORD})
        else:
            status, out, _ = control.call("POST", f"/v1/users/{person.id}/totp/reset", {})
        assert status == 200, out
        page = browser.get("/console/users")
        assert page.status == 303 and page.location == "/console/sign-in?why=ended", change


def test_a_forged_or_missing_cookie_is_not_a_session(control: Control) -> None:
    for cookie in ("", "x" * 43, "garbage"):
        page = Browser(control.url, cookie=cookie, tls=control.tls).get("/console/traffic")
        assert page.status == 303 and page.location.startswith("/console/sign-in")


# ---------------------------------------------------------------------------- pages


PAGES = ["/console", "/console/applications", "/console/connectors", "/console/edges", "/console/users",
         "/console/devices", "/console/policies", "/console/traffic", "/console/discovery", "/console/test-access",
         "/console/settings", "/console/audit", "/console/traffic?action=deny&hours=24&col=upn&col=reason_code"]


@pytest.mark.parametrize("who", ["admin", "reader"])
def test_every_page_renders(as_admin: Browser, as_reader: Browser, who: str) -> None:
    browser = as_admin if who == "admin" else as_reader
    for path in PAGES:
        page = browser.get(path)
        assert page.status == 200, (path, page.status, page.text[:500])
        assert "<main>" in page.text and "Traceback" not in page.text
        assert page.headers["Cache-Control"] == "no-store"
    # Readers see no forms that change anything.
    apps = browser.get("/console/applications").text
    assert ('action="/console/applications"' in apps) == (who == "admin")


def test_static_files_are_vendored(as_admin: Browser) -> None:
    page = as_admin.get("/console/static/htmx-2.0.4.min.js")
    assert page.status == 200 and "htmx" in page.text[:200]
    assert as_admin.get("/console/static/console.css").status == 200
    # No page of another origin's scripts on the console's origin (the API's Swagger UI loaded one from a CDN).
    assert as_admin.get("/schema/swagger").status == 404
    assert as_admin.get("/schema/openapi.json").status == 200
    # htmx keeps no copy of visited pages (a registration token, recovery codes) in localStorage.
    assert '"historyCacheSize": 0' in as_admin.get("/console").text


def test_bad_page_input_is_a_clear_error(as_admin: Browser) -> None:
    assert as_admin.get("/console/applications/no-such-app").status == 404
    assert as_admin.get("/console/users/nobody@corp.example").status == 404
    assert as_admin.get("/console/traffic/999999").status == 404
    page = as_admin.get("/console/traffic?since=yesterday")
    assert page.status == 422 and "is not a time" in page.text
    page = as_admin.get("/console/traffic?action=maybe")
    assert page.status == 422 and "allow, deny or report" in page.text
    assert as_admin.get("/console/traffic/export?fmt=xml").status == 404


# ---------------------------------------------------------------------------- changes: CSRF, origin, roles


def test_a_change_without_the_csrf_token_is_refused(control: Control, as_admin: Browser) -> None:
    page = as_admin.post("/console/applications", {"name": "csrf-less", "segments": "10.9.0.1 22"}, csrf=False)
    assert page.status == 403 and "CSRF" in page.text
    page = as_admin.request("POST", "/console/applications", {"name": "csrf-wrong", "csrf": "x" * 43,
                                                              "segments": "10.9.0.2 22"})
    assert page.status == 403 and "CSRF" in page.text
    status, _body, _ = control.call("GET", "/v1/applications/csrf-less")
    assert status == 404


def test_a_change_from_another_origin_or_without_origin_is_refused(control: Control, as_admin: Browser) -> None:
    token = as_admin.csrf()
    for origin in ("https://evil.example", "null", None):
        page = as_admin.request("POST", "/console/applications",
                                {"name": "cross-site", "segments": "10.9.0.3 22", "csrf": token}, origin=origin)
        assert page.status == 403 and "cross-site request protection" in page.text, origin
    # A Referer of the console itself stands in for a missing Origin (older browsers).
    page = as_admin.request("POST", "/console/dns-suffixes", {"suffix": "referer.example", "csrf": token},
                            origin=None, headers={"Referer": as_admin.url + "/console/settings"})
    assert page.status == 303
    status, _body, _ = control.call("GET", "/v1/applications/cross-site")
    assert status == 404


MUTATIONS = [
    ("/console/applications", {"name": "reader-app", "segments": "10.9.1.1 22"}),
    ("/console/applications/{known}/edit", {"name": "renamed"}),
    ("/console/applications/{known}/delete", {}),
    ("/console/applications/{known}/segments", {"destination": "10.9.1.2", "ports": "22"}),
    ("/console/applications/{known}/segments/1/remove", {}),
    ("/console/applications/{known}/assignments", {"user": "rhea@corp.example"}),
    ("/console/applications/{known}/assignments/remove", {"user": "rhea@corp.example"}),
    ("/console/connector-groups", {"name": "reader-group"}),
    ("/console/connector-groups/update", {"name": "default", "region": "mars"}),
    ("/console/registration-tokens", {"role": "connector"}),
    ("/console/connectors/some-id/revoke", {}),
    ("/console/connectors/some-id/group", {"group": "default"}),
    ("/console/edges/some-id/revoke", {}),
    ("/console/users", {"upn": "made-by-reader@corp.example"}),
    ("/console/users/ada@corp.example/console-role", {"role": "none"}),
    ("/console/users/ada@corp.example/state", {"disabled": "true"}),
    ("/console/users/ada@corp.example/sessions/some-id/revoke", {}),
    ("/console/devices/some-id/revoke", {}),
    ("/console/user-groups", {"name": "reader-group"}),
    ("/console/user-groups/staff/members", {"user": "rhea@corp.example"}),
    ("/console/discovery/promote", {"name": "promoted", "destination": "10.9.1.3", "ports": "22"}),
    ("/console/dns-suffixes", {"suffix": "reader.example"}),
    ("/console/forwarding-profile", {"fail_mode": "open"}),
]


def test_a_reader_is_refused_every_change(control: Control, as_reader: Browser) -> None:
    status, app, _ = control.call("POST", "/v1/applications", {"name": "known", "segments": [
        {"destination": "10.9.2.0/24", "ports": "22"}]})
    assert status == 201
    version = control.version()
    for path, form in MUTATIONS:
        path = path.format(known=app["id"])
        page = as_reader.post(path, form)
        assert page.status == 403 and "may not change anything" in page.text, (path, page.status, page.text[:300])
    assert control.version() == version
    assert audit(control, "console:rhea@corp.example") == [
        r for r in audit(control, "console:rhea@corp.example") if r["action"] == "console.sign_in"]
    # Readers may still ask "test access" (nothing changes).
    page = as_reader.post("/console/test-access", {"user": "rhea@corp.example", "device": "none", "host": "x",
                                                   "port": "22"})
    assert page.status == 404 and "device" in page.text


def test_routes_without_a_session_send_to_sign_in(control: Control) -> None:
    browser = Browser(control.url, tls=control.tls)
    for path, form in MUTATIONS[:4]:
        page = browser.request("POST", path.format(known=1), {**form, "csrf": "x"})
        assert page.status == 303 and page.location.startswith("/console/sign-in"), path


# ---------------------------------------------------------------------------- changes by an admin


def test_admin_creates_an_app_and_sees_validation_errors_inline(control: Control, as_admin: Browser) -> None:
    page = as_admin.post("/console/applications", {"name": "wiki", "kind": "per_app", "connector_group": "default",
                                                   "segments": "wiki.corp.example 443\n10.30.0.0/24 80,8000-8100 tcp"})
    status, app, _ = control.call("GET", "/v1/applications/wiki")
    assert page.status == 303 and page.location == f"/console/applications/{app['id']}", page.text[:300]
    assert status == 200 and [(s["destination"], s["ports"]) for s in app["segments"]] == [
        ("wiki.corp.example", "443"), ("10.30.0.0/24", "80,8000-8100")]
    listed = as_admin.get("/console/applications")
    assert "wiki.corp.example" in listed.text
    # An overlapping segment: the store's message, 409, the form kept.
    page = as_admin.post("/console/applications", {"name": "wiki-2", "segments": "10.30.0.7 8080"})
    assert page.status == 409 and "overlap" in page.text and "wiki-2" in page.text, page.text[:500]
    page = as_admin.post("/console/applications", {"name": "bad", "segments": "10.30.0.7"})
    assert page.status == 422 and "DESTINATION PORTS" in page.text
    page = as_admin.post(f"/console/applications/{app['id']}/segments", {"destination": "10.40.0.1",
                                                                          "ports": "70000"})
    assert page.status == 422 and "70000" in page.text
    rows = audit(control, "console:ada@corp.example")
    assert any(r["action"].startswith("application.create") and r["after"]["name"] == "wiki" for r in rows), rows


def test_user_supplied_names_are_shown_as_text(control: Control, as_admin: Browser) -> None:
    evil = "<script>alert(1)</script>"
    status, _body, _ = control.call("POST", "/v1/users", {"upn": "mallory@corp.example", "display_name": evil})
    assert status == 201
    page = as_admin.post("/console/applications", {"name": evil, "segments": "evil-host.example 443"})
    assert page.status == 303
    status, _body, _ = control.call("POST", "/v1/connector-groups", {"name": "g<b>x</b>", "region": evil})
    assert status == 201
    for path in ("/console/applications", "/console/users", "/console/connectors", "/console/audit",
                 page.location):
        text = as_admin.get(path).text
        assert "<script>alert(1)" not in text and "<b>x</b>" not in text, path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text, path


def test_connector_groups_dial_lists_and_registration_tokens(control: Control, as_admin: Browser) -> None:
    page = as_admin.post("/console/connector-groups", {"name": "lab", "region": "eu",
                                                       "allowed": "10.50.0.0/16, 10.60.0.0/16",
                                                       "denied": "10.50.9.0/24"})
    assert page.status == 303, page.text[:300]
    status, group, _ = control.call("GET", "/v1/connector-groups/lab")
    assert group["allowed_addresses"] == ["10.50.0.0/16", "10.60.0.0/16"]
    assert group["denied_addresses"] == ["10.50.9.0/24"]
    page = as_admin.post("/console/connector-groups/update", {"name": "lab", "region": "eu", "allowed": "not-a-network",
                                                           "denied": ""})
    assert page.status == 422 and "not-a-network" in page.text
    page = as_admin.post("/console/registration-tokens", {"role": "connector", "group": "lab", "hours": "2"})
    assert page.status == 200
    command = re.search(r'value="(ferryman connector register --control [^"]+ --token fmr_[^"]+)"', page.text)
    assert command, page.text[:800]
    page = as_admin.post("/console/registration-tokens", {"role": "connector", "hours": "1000"})
    assert page.status == 422 and "at most 168" in page.text
    page = as_admin.post("/console/registration-tokens", {"role": "robot"})
    assert page.status == 422


def test_admin_manages_users_roles_and_settings(control: Control, as_admin: Browser, admin: Person) -> None:
    page = as_admin.post("/console/users", {"upn": "Zed@Corp.Example", "display_name": "Zed", "password": ""})
    assert page.status == 303 and page.location.startswith("/console/users/")
    page = as_admin.post("/console/users", {"upn": "zed@corp.example"})
    assert page.status == 409 and "already exists" in page.text
    page = as_admin.post("/console/users/zed@corp.example/console-role", {"role": "reader"})
    assert page.status == 303
    status, zed, _ = control.call("GET", "/v1/users/zed@corp.example")
    assert zed["console_role"] == "reader"
    page = as_admin.post("/console/users/zed@corp.example/console-role", {"role": "superuser"})
    assert page.status == 422 and "console role must be one of" in page.text
    page = as_admin.post(f"/console/users/{admin.id}/console-role", {"role": "reader"})
    assert page.status == 422 and "your own admin role" in page.text
    assert as_admin.post("/console/user-groups", {"name": "staff"}).status == 303
    assert as_admin.post("/console/user-groups/staff/members", {"user": "zed@corp.example"}).status == 303
    assert as_admin.post("/console/dns-suffixes", {"suffix": "corp.example"}).status == 303
    page = as_admin.post("/console/dns-suffixes", {"suffix": "-bad-"})
    assert page.status == 422
    assert as_admin.post("/console/forwarding-profile", {"fail_mode": "open"}).status == 303
    page = as_admin.post("/console/forwarding-profile", {"fail_mode": "sideways"})
    assert page.status == 422
    status, profile, _ = control.call("GET", "/v1/forwarding-profile")
    assert profile["fail_mode"] == "open"
    actions = {r["action"] for r in audit(control, f"console:{admin.upn}")}
    assert {"user.create", "user.console_role", "user_group.create", "forwarding_profile.set"} & actions == {
        "user.create", "user.console_role", "user_group.create"} | ({"forwarding_profile.set"} & actions)
    page = as_admin.get("/console/audit?actor=console:ada@corp.example")
    assert "user.console_role" in page.text and "reader" in page.text


# ---------------------------------------------------------------------------- traffic logs and test access


def test_test_access_decides_like_an_edge(control: Control, as_admin: Browser) -> None:
    from dataplane.basics.pki import new_key_and_csr
    status, _body, _ = control.call("POST", "/v1/applications", {"name": "ssh", "segments": [
        {"destination": "10.70.0.0/24", "ports": "22"}]})
    assert status == 201
    person = enrol(control, "tia@corp.example", None)
    _key, csr = new_key_and_csr("device")
    status, signed, _ = control.call("POST", "/v1/auth/sign-in", {
        "upn": person.upn, "password": PASSWORD, "totp_code": next_code(person),
        "device": {"csr_pem": csr.decode() if isinstance(csr, bytes) else csr, "name": "laptop", "os": "linux"}},
        key=None)
    assert status == 200, signed
    device = signed["device"]["id"]
    ask = {"user": person.upn, "device": device, "host": "10.70.0.5", "port": "22", "protocol": "tcp"}
    page = as_admin.post("/console/test-access", ask)
    assert page.status == 200 and "DENY" in page.text and "not_assigned" in page.text, page.text[-1500:]
    assert control.call("POST", "/v1/applications/ssh/assignments", {"user": person.upn})[0] == 201
    page = as_admin.post("/console/test-access", ask)
    assert page.status == 200 and "ALLOW" in page.text and "ssh" in page.text
    page = as_admin.post("/console/test-access", {**ask, "host": "10.99.0.1"})
    assert "DENY" in page.text and "no_application" in page.text
    page = as_admin.post("/console/test-access", {**ask, "port": "http"})
    assert page.status == 422 and "port must be a number" in page.text


def test_traffic_logs_filter_detail_and_export(control: Control, as_admin: Browser) -> None:
    from control.store import open_store, traffic
    from control.store.db import database_url
    from dataplane.contract.flowrecord import FlowRecord
    status, tia, _ = control.call("PATCH", "/v1/users/tia@corp.example", {"display_name": "Tia <Tester>"})
    assert status == 200
    store = open_store(database_url(str(control.data_dir)))
    now = datetime.now(UTC).timestamp()
    base = {"transaction_id": "t1", "duration_ms": 5, "user_id": "u1", "device_id": "dev-1", "device_os": "linux",
            "process": "ssh", "source_ip": "192.0.2.7", "source_port": 5000, "destination_ip": "10.70.0.5",
            "destination_port": 22, "destination_fqdn": "", "transport": "tcp", "network": "ipv4",
            "application": "ssh", "application_kind": "per_app", "segment": "10.70.0.0/24:22/tcp", "policy": "",
            "rule": "", "connector_id": "c-1", "connector_name": "conn", "connector_address": "10.0.0.2",
            "bytes_sent": 100, "bytes_received": 2000, "close_reason": "", "device_os_version": "",
            "client_version": ""}
    try:
        with store.begin() as session:
            traffic.insert_records(session, "edge-a", msgspec.convert([
                {**base, "connection_id": "flow-allow", "start": now - 60, "end": now - 50, "upn": "tia@corp.example",
                 "user_id": tia["id"], "device_os_version": "6.12", "client_version": "ferryman/0.1.0",
                 "action": "allow", "reason_code": ""},
                {**base, "connection_id": "flow-deny", "start": now - 30, "end": None, "upn": "=cmd@corp.example",
                 "process": "x;=cmd|' /C calc'!A0",
                 "action": "deny", "reason_code": "not_assigned", "bytes_sent": 0, "bytes_received": 0}],
                list[FlowRecord]))
    finally:
        store.close()
    page = as_admin.get("/console/traffic?user=tia@corp.example")
    assert page.status == 200 and "tia@corp.example" in page.text and "=cmd" not in page.text
    record = re.search(r'href="/console/traffic/(\d+)"', page.text)
    assert record
    detail = as_admin.get(f"/console/traffic/{record.group(1)}")
    assert detail.status == 200 and "flow-allow" in detail.text and "192.0.2.7" in detail.text
    for shown in ("Tia &lt;Tester&gt;", "6.12", "ferryman/0.1.0"):  # display name, OS version, agent version
        assert shown in detail.text, shown
    page = as_admin.get("/console/traffic?reason=not_assigned&device=dev-1")
    assert "flow-deny" not in page.text and "=cmd@corp.example" in page.text
    page = as_admin.get("/console/traffic/export?fmt=jsonl&action=deny")
    lines = [json.loads(line) for line in page.text.splitlines()]
    assert page.status == 200 and [r["connection_id"] for r in lines] == ["flow-deny"]
    page = as_admin.get("/console/traffic/export?fmt=csv&hours=1")
    assert page.status == 200 and page.text.splitlines()[0].startswith("id,connection_id")
    assert "'=cmd@corp.example" in page.text  # no spreadsheet formula
    assert "x;'=cmd|" in page.text and "x;=cmd" not in page.text  # nor one after a ';' (a ';'-separated locale)
    overview = as_admin.get("/console")
    assert "not_assigned" in overview.text and "ssh" in overview.text


def test_a_connector_moves_to_another_group_by_api_and_console(control: Control, as_admin: Browser,
                                                               tmp_path: Path) -> None:
    node = control.register_node(tmp_path / "conn", "connector", name="mover")
    connector_id = node.record.node_id
    assert control.call("POST", "/v1/connector-groups", {"name": "dc-north"})[0] == 201
    version = control.version()
    status, moved, _ = control.call("PATCH", f"/v1/connectors/{connector_id}", {"group": "dc-north"})
    assert status == 200 and moved["group"] == "dc-north" and control.version() > version
    status, body, _ = control.call("PATCH", f"/v1/connectors/{connector_id}", {"group": "nowhere"})
    assert status == 404 and "nowhere" in body["error"]
    status, body, _ = control.call("PATCH", "/v1/connectors/no-such-connector", {"group": "default"})
    assert status == 404
    status, body, _ = control.call("PATCH", f"/v1/connectors/{connector_id}", {"group": "default", "extra": 1})
    assert status == 400
    page = as_admin.post(f"/console/connectors/{connector_id}/group", {"group": "default"})
    assert page.status == 303, page.text[:300]
    assert control.call("GET", f"/v1/connectors/{connector_id}")[1]["group"] == "default"
    page = as_admin.post(f"/console/connectors/{connector_id}/group", {"group": "nowhere"})
    assert page.status == 404 and "nowhere" in page.text
    moves = [r for r in audit(control, "console:ada@corp.example") if r["action"] == "connector.move"]
    assert moves and moves[0]["before"]["group"] == "dc-north" and moves[0]["after"]["group"] == "default"


# ---------------------------------------------------------------------------- alerts


def _heartbeat(control: Control, signer: Any, body: dict[str, Any]) -> tuple[int, Any]:
    data = json.dumps(body).encode()
    status, answer, _ = control.request(
        "POST", "/v1/node/heartbeat", body,
        authorization=f"Bearer {signer.token('POST', '/v1/node/heartbeat', data)}")
    return status, answer


def _alerts(browser: Browser) -> str:
    page = browser.get("/console")
    assert page.status == 200, page.text[:300]
    found = re.search(r'<ul class="alerts">(.*?)</ul>', page.text, re.S)
    return found.group(1) if found else ""


def test_an_edge_that_dropped_traffic_records_is_an_alert(control: Control, as_admin: Browser,
                                                          tmp_path: Path) -> None:
    from control.store import open_store
    from control.store.db import database_url
    from control.store.models import Edge
    from dataplane.controllink.signer import NodeSigner
    name = "edge-drops"
    edge = control.register_node(tmp_path / "edge", "edge", name, ["127.0.0.1:1"])
    connector = control.register_node(tmp_path / "connector", "connector", "conn-drops")
    signer = NodeSigner(edge.cert, edge.key)
    assert _heartbeat(control, signer, {"tunnels": 1, "records_dropped": 0})[0] == 200
    assert f"{name} dropped" not in _alerts(as_admin)

    # Each heartbeat says what was dropped since the previous one: the control plane sums them.
    for count in (7, 5, 0):
        status, answer = _heartbeat(control, signer, {"tunnels": 1, "records_dropped": count})
        assert status == 200, answer
    alerts = _alerts(as_admin)
    assert f"edge {name} dropped traffic records: 12 in all" in alerts, alerts
    shown = control.admin("GET", f"/v1/edges/{edge.record.node_id}")[1]
    assert shown["records_dropped"] == 12 and shown["records_dropped_at"] is not None
    edges = as_admin.get("/console/edges").text
    assert re.search(rf"{name}.*?<span class=\"warn\">12</span>", edges, re.S)

    # Bad reports are refused with the reason, and change nothing.
    status, answer = _heartbeat(control, signer, {"records_dropped": -1})
    assert status == 400 and "records_dropped" in answer["error"], answer
    status, answer = _heartbeat(control, NodeSigner(connector.cert, connector.key), {"records_dropped": 2})
    assert status == 422 and "only an edge keeps traffic records" in answer["error"], answer
    assert control.admin("GET", f"/v1/edges/{edge.record.node_id}")[1]["records_dropped"] == 12

    # An alert for a day: a drop reported more than 24 h ago is no longer one.
    store = open_store(database_url(str(control.data_dir)))
    try:
        with store.begin() as session:
            row = session.get(Edge, edge.record.node_id)
            row.records_dropped_at = row.records_dropped_at - timedelta(hours=25)
    finally:
        store.close()
    assert f"{name} dropped" not in _alerts(as_admin)


def test_the_overview_partial_is_only_for_its_own_refresh(as_admin: Browser) -> None:
    refresh = as_admin.get("/console", headers={"HX-Request": "true", "HX-Target": "overview"})
    assert refresh.status == 200 and "<nav" not in refresh.text and 'class="cards"' in refresh.text
    boosted = as_admin.get("/console", headers={"HX-Request": "true", "HX-Boosted": "true"})
    assert boosted.status == 200 and "<nav" in boosted.text and "<h1>Overview</h1>" in boosted.text
