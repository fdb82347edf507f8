"""Every error the API returns, as one JSON shape (``schemas.ErrorBody``), never a traceback.

- ``StoreError``: its precise message; its code picks the status (``STORE_STATUS``).
- ``CaError`` (a CSR that cannot be signed): 422, code ``invalid_csr``.
- Litestar's own errors (400 validation with one ``detail`` entry per field, 401, 404,
  405, ...): their message and status.
- Anything else: 500 with a fixed message; the traceback goes to the log only.
"""

from __future__ import annotations

import logging

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from control.ca import CaError
from control.store import StoreError

from .schemas import ErrorBody, ErrorDetail

log = logging.getLogger("ferryman.control.api")

STORE_STATUS = {
    "not_found": 404,
    "conflict": 409,
    "invalid": 422,
    "token_unknown": 403,
    "token_used": 403,
    "token_expired": 403,
    "auth_failed": 401,
    "account_disabled": 401,
    "mfa_required": 401,
    "mfa_failed": 401,
    "device_refused": 403,
    "device_revoked": 401,
    "refresh_invalid": 401,
    "refresh_reused": 401,
    "session_revoked": 401,
    "session_expired": 401,
    "too_many_sessions": 429,
}
_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type"}


def _response(status: int, body: ErrorBody, headers: dict[str, str] | None = None) -> Response[ErrorBody]:
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def store_error(_request: Request, exc: StoreError) -> Response[ErrorBody]:
    return _response(STORE_STATUS.get(exc.code, 422), ErrorBody(error=str(exc), code=exc.code))


def ca_error(_request: Request, exc: CaError) -> Response[ErrorBody]:
    return _response(422, ErrorBody(error=str(exc), code="invalid_csr"))


def _details(extra: object) -> list[ErrorDetail]:
    items = extra if isinstance(extra, list) else [extra] if isinstance(extra, dict) else []
    out = []
    for item in items:
        if isinstance(item, dict) and "message" in item:
            key, source = item.get("key"), item.get("source")
            source = getattr(source, "value", source)  # Litestar gives an enum for parameters
            out.append(ErrorDetail(message=str(item["message"]), key=None if key is None else str(key),
                                   source=None if source is None else str(source)))
    return out


def http_error(_request: Request, exc: HTTPException) -> Response[ErrorBody]:
    status = exc.status_code
    if status == 503:  # raised on purpose ("not ready yet, retry"): its message and Retry-After
        return _response(status, ErrorBody(error=exc.detail, code="unavailable"), exc.headers)
    if status >= 500:
        return internal_error(_request, exc)
    if isinstance(exc, ValidationException) or status == 400:
        details = _details(exc.extra)
        fields = "; ".join(f"{d.key}: {d.message}" if d.key else d.message for d in details)
        message = f"invalid request: {fields}" if fields else f"invalid request: {exc.detail}"
        return _response(400, ErrorBody(error=message, code="validation", detail=details or None), exc.headers)
    return _response(status, ErrorBody(error=exc.detail, code=_HTTP_CODES.get(status, "error")), exc.headers)


def internal_error(request: Request, exc: Exception) -> Response[ErrorBody]:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return _response(HTTP_500_INTERNAL_SERVER_ERROR,
                     ErrorBody(error="internal error in the control plane (details are in its log)", code="internal"))


EXCEPTION_HANDLERS = {
    StoreError: store_error,
    CaError: ca_error,
    HTTPException: http_error,
    Exception: internal_error,
}
