"""Web applications: applications published to browsers through the edges' HTTPS front door.

A web app is an application row (its name, connector group, assignments and the policies
that name it: ``store.applications``, ``store.assignments``, ``store.policies`` treat it
like any application) with a ``WebApplication`` row holding what publishing needs: the
external URL (``https://host[:port][/prefix]``; one web app per external host), the
internal URL (``http(s)://host[:port][/prefix]``, dialed by a connector of the group),
pre-authentication (``ferryman``: sign-in and conditional access on every request, or
``passthrough``: neither), the backend timeout (``default`` / ``long``) and the options
(header and body URL translation, cookie flags, header SSO, WebSocket, backend certificate
verification with an optional CA bundle, CORS preflight bypass) and optionally a
custom-domain certificate (PEM chain and key: the key must match, the certificate must
cover the external host and be valid; the key is stored sealed with the store's secrets
key and never shown, only the certificate's SHA-256 and expiry). A web app has no segments.
Fields are checked with ``dataplane.contract.webapps`` (the rules nodes apply too); every
change is configuration, audited as ``web_app.*``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import hashlib
import time

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select
from sqlalchemy.orm import Session

from dataplane.contract.webapps import (
    BACKEND_TIMEOUTS, PREAUTH, WebAppFieldError, check_certificate, check_header_sso, external_endpoint,
    internal_endpoint,
)

from .applications import create_application, delete_application, get_application
from .audit import change, record_change
from .config_version import lock_config
from .connector_groups import get_group
from .errors import StoreError
from .models import Application, WebApplication, utcnow
from .secretbox import SecretBox, SecretBoxError
from .values import refuse_taken, valid_name

MAX_BACKEND_CA = 65536  # characters of PEM
FLAGS = ("translate_headers", "translate_body", "cookie_http_only", "cookie_persistent", "websocket",
         "verify_backend", "cors_preflight_bypass")
DEFAULTS: dict[str, Any] = {"preauth": "ferryman", "backend_timeout": "default", "translate_headers": True,
                            "translate_body": False, "cookie_http_only": True, "cookie_persistent": False,
                            "websocket": True, "verify_backend": True, "cors_preflight_bypass": False,
                            "header_sso": {}, "backend_ca": ""}
OPTIONS = tuple(DEFAULTS)


def certificate_summary(chain: str) -> tuple[str, str]:
    """(SHA-256 of the leaf certificate in hex, its expiry in ISO 8601) of a stored PEM chain; ("", "") for none."""
    if not chain:
        return "", ""
    leaf = x509.load_pem_x509_certificates(chain.encode())[0]
    return (hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest(),
            leaf.not_valid_after_utc.isoformat())


def web_state(row: WebApplication) -> dict[str, Any]:
    """A web app as the API shows it and the audit log records it (never the certificate's key)."""
    sha256, not_after = certificate_summary(row.certificate)
    return {"name": row.application.name, "connector_group": row.application.connector_group.name,
            "external_url": row.external_url, "internal_url": row.internal_url,
            **{key: getattr(row, key) for key in OPTIONS},
            "certificate_sha256": sha256, "certificate_not_after": not_after}


def _key_context(application_id: int) -> str:
    return f"web-app-key:{application_id}"


def certificate_key(box: SecretBox | None, row: WebApplication) -> str:
    """The custom-domain certificate's key in the clear (for the edges' snapshot); "" for none.
    ``SecretBoxError`` when it cannot be opened (no or another secrets key)."""
    if not row.certificate_key:
        return ""
    if box is None:
        raise SecretBoxError("the store was opened without its secrets key")
    return box.unseal(row.certificate_key, _key_context(row.application_id)).decode()


def _set_certificate(row: WebApplication, box: SecretBox | None, chain: object, key: object) -> None:
    """Replace (or, with two empty strings, remove) a web app's custom-domain certificate."""
    if chain == "" and key == "":
        row.certificate, row.certificate_key = "", ""
        return
    host = _field(external_endpoint, row.external_url).host
    try:
        check_certificate(chain, key, host, time.time())
    except WebAppFieldError as exc:
        raise StoreError("invalid", f"web app {row.application.name!r}: {exc}") from None
    if box is None:
        raise StoreError("invalid", "this control plane's store has no secrets key to seal the certificate key with")
    assert isinstance(chain, str) and isinstance(key, str)
    row.certificate = chain.strip() + "\n"
    row.certificate_key = box.seal(key.strip().encode() + b"\n", _key_context(row.application_id))


def list_webapps(session: Session) -> list[WebApplication]:
    rows = session.scalars(select(WebApplication))
    return sorted(rows, key=lambda r: r.application.name)


def find_webapp(session: Session, application_id: int) -> WebApplication | None:
    return session.get(WebApplication, application_id)


def get_webapp(session: Session, name: str) -> WebApplication:
    app = session.scalar(select(WebApplication).join(WebApplication.application).where(Application.name == name))
    if app is None:
        raise StoreError("not_found", f"web app {name!r} does not exist")
    return app


def _field(fn, value: object) -> Any:
    try:
        return fn(value)
    except WebAppFieldError as exc:
        raise StoreError("invalid", str(exc)) from None


def _options(values: Mapping[str, Any]) -> dict[str, Any]:
    """The options in ``values`` checked (unknown names refused)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in DEFAULTS:
            raise StoreError("invalid", f"unknown web app field {key!r} (fields: {', '.join(OPTIONS)})")
        if key in FLAGS:
            if not isinstance(value, bool):
                raise StoreError("invalid", f"{key} must be true or false, not {value!r}")
        elif key == "preauth":
            if value not in PREAUTH:
                raise StoreError("invalid", f"preauth must be one of {', '.join(PREAUTH)}, not {value!r}")
        elif key == "backend_timeout":
            if value not in BACKEND_TIMEOUTS:
                raise StoreError("invalid", f"backend_timeout must be one of {', '.join(BACKEND_TIMEOUTS)}, "
                                            f"not {value!r}")
        elif key == "header_sso":
            value = _field(check_header_sso, value)
        elif key == "backend_ca":
            value = _backend_ca(value)
        out[key] = value
    return out


def _backend_ca(value: object) -> str:
    if not isinstance(value, str):
        raise StoreError("invalid", "backend_ca must be PEM text (one or more CA certificates)")
    text = value.strip()
    if not text:
        return ""
    if len(text) > MAX_BACKEND_CA:
        raise StoreError("invalid", f"backend_ca is longer than {MAX_BACKEND_CA} characters")
    try:
        certs = x509.load_pem_x509_certificates(text.encode())
    except ValueError as exc:
        raise StoreError("invalid", f"backend_ca holds no usable PEM certificate ({exc})") from None
    if not certs:
        raise StoreError("invalid", "backend_ca holds no PEM certificate")
    return text + "\n"


def _external(session: Session, url: object, row: WebApplication | None) -> tuple[str, str]:
    end = _field(external_endpoint, url)
    assert isinstance(url, str)
    query = select(WebApplication).where(WebApplication.external_authority == end.authority)
    other = session.scalar(query)
    if other is not None and other is not row:
        raise StoreError("conflict", f"external host {end.authority} is already used by web app "
                                     f"{other.application.name!r}: each web app needs its own external host")
    return url.strip(), end.authority


def _internal(url: object) -> str:
    _field(internal_endpoint, url)
    assert isinstance(url, str)
    return url.strip()


@change
def create_webapp(session: Session, actor: str, name: str, *, external_url: object, internal_url: object,
                  connector_group: str | None = None, certificate: object = "", certificate_key: object = "",
                  box: SecretBox | None = None, **options: Any) -> WebApplication:
    """A new web app (in the default connector group unless ``connector_group`` names one);
    ``options`` as in ``DEFAULTS``. Refused: ``invalid`` field, ``conflict`` for a taken name
    or external host, ``not_found`` for an unknown connector group."""
    lock_config(session)
    checked = {**DEFAULTS, **_options(options)}
    external, authority = _external(session, external_url, None)
    internal = _internal(internal_url)
    app = create_application(session, actor, name, connector_group=connector_group)
    row = WebApplication(application=app, external_url=external, external_authority=authority,
                         internal_url=internal, certificate="", certificate_key="", **checked)
    session.add(row)
    session.flush()
    _set_certificate(row, box, certificate, certificate_key)
    session.flush()
    record_change(session, actor, "web_app.create", "web_app", app.id, None, web_state(row), config=True)
    return row


@change
def update_webapp(session: Session, actor: str, name: str, *, new_name: str | None = None,
                  external_url: object = None, internal_url: object = None, connector_group: str | None = None,
                  certificate: object = None, certificate_key: object = None, box: SecretBox | None = None,
                  **options: Any) -> WebApplication:
    """Change a web app's fields (None: unchanged); a change that changes nothing is not recorded.
    A new certificate needs its key too (two empty strings remove it); a new external URL must
    still be covered by the certificate the app has."""
    lock_config(session)
    row = get_webapp(session, name)
    before = web_state(row)
    checked = _options(options)
    if external_url is not None:
        row.external_url, row.external_authority = _external(session, external_url, row)
    if internal_url is not None:
        row.internal_url = _internal(internal_url)
    if certificate is not None or certificate_key is not None:
        _set_certificate(row, box, certificate if certificate is not None else "",
                         certificate_key if certificate_key is not None else "")
    elif external_url is not None and row.certificate:
        _set_certificate(row, box, row.certificate, certificate_key_of(box, row))
    for key, value in checked.items():
        setattr(row, key, value)
    app = row.application
    if new_name is not None or connector_group is not None:
        if new_name is not None and new_name.strip() != app.name:
            new = valid_name(new_name, "application name")
            refuse_taken(session, Application.name, new, "application")
            app.name = new
        if connector_group is not None:
            app.connector_group = get_group(session, connector_group)
    session.flush()
    after = web_state(row)
    if after == before:
        return row
    app.updated_at = utcnow()
    session.flush()
    record_change(session, actor, "web_app.update", "web_app", app.id, before, after, config=True)
    return row


def certificate_key_of(box: SecretBox | None, row: WebApplication) -> str:
    try:
        return certificate_key(box, row)
    except SecretBoxError as exc:
        raise StoreError("invalid", f"web app {row.application.name!r}: its certificate key cannot be opened "
                                    f"({exc}); give the certificate and key again") from None


@change
def delete_webapp(session: Session, actor: str, name: str) -> None:
    """Delete a web app (with its assignments); refused while a policy names it (as an application)."""
    lock_config(session)
    row = get_webapp(session, name)
    before = web_state(row)
    app_id = row.application_id
    session.delete(row)
    session.flush()
    delete_application(session, actor, get_application(session, before["name"]).name)
    record_change(session, actor, "web_app.delete", "web_app", app_id, before, None, config=True)
