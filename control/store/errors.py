"""The one error type of the store: a refused change or lookup, with a machine-readable code."""

from __future__ import annotations

from typing import Literal

ErrorCode = Literal[
    "not_found", "conflict", "invalid", "token_used", "token_expired", "token_unknown",
    # sign-in and sessions (control/store/users.py, sessions.py, totp.py, devices.py)
    "auth_failed", "account_disabled", "mfa_required", "mfa_failed", "device_refused", "device_revoked",
    "refresh_invalid", "refresh_reused", "session_revoked", "session_expired",
]


class StoreError(ValueError):
    """A change or lookup the store refuses. ``str(error)`` is the precise reason for a human;
    ``code`` is for programs (the API maps it to an HTTP status)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
