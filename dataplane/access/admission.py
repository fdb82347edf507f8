"""Admission: the one decision whether a request may go through, for every kind of request.

``admit(request, principal, tables, now)`` answers an ``AccessRequest`` (where to, which
protocol, from where) for a ``principal`` (who asks: a ``Principal`` from a verified access
token, or ``Unauthenticated`` with the reason there is none) against ``AccessTables`` (what
the edge's configuration says) and returns a ``Verdict``. It decides, in this order:

1. the protocol is one the fabric carries (``tcp``, ``udp``, ``dns``: a private DNS query);
2. the edge has a configuration (an application file, or a snapshot from the control plane);
3. a ``dns`` request names a host under one of the private DNS suffixes, and belongs to the
   application whose name segment covers it, if any (else it is decided on the user alone);
   any other request matches an application's segment (``access.apptable``);
4. when identity is enforced (the control plane publishes token keys): the request comes
   with a signed-in principal, who is known, enabled, on a live session with a current
   token and their own registered device, is assigned to the application, and whom no
   conditional-access policy denies (``access.policy``); a report-only policy that would
   have denied is reported in the verdict, never enforced.

A live flow is decided again (continuous access) with the same request and its
``application`` set: the destination keeps the application it was opened for, and only
step 4 is made again. Pure: no I/O, no clock of its own (``now`` is passed in), nothing
about wires, tunnels or HTTP, so that every OPEN, every re-check and, later, every HTTP
request of a published web app go through this one function.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from .apptable import AppTable, Match, describe_miss
from .policy import AccessIndex, Decision, Principal

PROTOCOLS = ("tcp", "udp", "dns")


class AccessRequest(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    """What asks to go through: ``host``:``port`` over ``protocol`` (``tcp``, ``udp``, or ``dns`` for
    a private DNS query of name ``host``), from ``source`` (the client's address as the edge
    sees it: named locations are matched against it). ``kind`` says what carries it (``flow``:
    a flow a client agent opens; ``web``: a request to a published web app from a browser, with
    ``application`` the web app's name: a principal without a device is then a browser). ``application`` is set when a live flow is decided again:
    the application it was admitted to ("" for a private DNS name outside every application)."""

    host: str
    port: int
    protocol: str
    source: str = ""
    kind: str = "flow"
    application: str | None = None


class Unauthenticated(msgspec.Struct, frozen=True, gc=False):
    """No signed-in principal: ``reason`` says why (no token, a token that did not verify, ...)."""

    reason: str = ""


class AccessTables:
    """What admission decides from, one object per configuration: the application table, the
    private DNS suffixes, the access index (None: no identity enforced), and ``unconfigured``:
    why there is no configuration yet ("" once there is one; until then nothing is admitted)."""

    __slots__ = ("apps", "dns_suffixes", "access", "unconfigured")

    def __init__(self, apps: AppTable, *, dns_suffixes: tuple[str, ...] | list[str] = (),
                 access: AccessIndex | None = None, unconfigured: str = "") -> None:
        self.apps = apps
        self.dns_suffixes = tuple(s.lower().strip(".") for s in dns_suffixes)
        self.access = access
        self.unconfigured = unconfigured

    @property
    def enforcing(self) -> bool:
        """Whether requests need a signed-in principal (the control plane publishes token keys)."""
        return self.access is not None and self.access.enforcing

    def private_name(self, host: str) -> bool:
        """``host`` is under one of the private DNS suffixes."""
        name = host.lower().rstrip(".")
        return any(name == s or name.endswith("." + s) for s in self.dns_suffixes)


class Verdict(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    """The answer: ``allowed``, or the ``code`` and ``reason`` (for the user) of a refusal.

    ``match`` is the application and segment the request belongs to (None: none yet, or a DNS
    name outside every application), ``principal`` who it was decided for (None when identity
    is not enforced), ``decision`` the conditional-access decision (None when none was made).
    ``recorded`` is False for a refusal made before the destination was looked at (it is not a
    traffic-log attempt). ``action`` is ``allow``, ``deny``, or ``report`` (allowed, but a
    report-only policy would have denied), with the ``policy`` and ``rule`` (grant) it names."""

    allowed: bool
    code: str = ""
    reason: str = ""
    match: Match | None = None
    principal: Principal | None = None
    decision: Decision | None = None
    recorded: bool = True

    @property
    def action(self) -> Literal["allow", "deny", "report"]:
        if not self.allowed:
            return "deny"
        return "report" if self.decision is not None and self.decision.report else "allow"

    @property
    def policy(self) -> str:
        decision = self.decision
        if decision is None:
            return ""
        if decision.allowed and decision.report:
            return decision.report[0].policy
        return decision.policy

    @property
    def rule(self) -> str:
        decision = self.decision
        if decision is None:
            return ""
        if decision.allowed and decision.report:
            return decision.report[0].grant
        return next((p.grant for p in decision.applied if p.policy == decision.policy), "")


def admit(request: AccessRequest, principal: Principal | Unauthenticated, tables: AccessTables,
          now: float) -> Verdict:
    """Whether ``request`` of ``principal`` goes through under ``tables`` at ``now`` (see the module doc)."""
    match: Match | None = None
    if request.application is None:
        protocol = request.protocol
        if protocol not in PROTOCOLS:
            return Verdict(allowed=False, code="unsupported_protocol",
                           reason=f"{protocol!r} flows are not supported (tcp, udp or dns)", recorded=False)
        if tables.unconfigured:
            return Verdict(allowed=False, code="no_config", reason=tables.unconfigured, recorded=False)
        if protocol == "dns":
            # A private DNS query: the name must be under a private suffix; it belongs to the
            # application whose name segment covers it (its connector group answers), if any.
            if not tables.private_name(request.host):
                suffixes = ", ".join(tables.dns_suffixes) or "none are configured"
                return Verdict(allowed=False, code="not_private_name",
                               reason=f"{request.host} is not under a private DNS suffix ({suffixes})")
            match = tables.apps.covering_name(request.host)
        else:
            match = tables.apps.match(request.host, request.port, protocol)
            if match is None:
                return Verdict(allowed=False, code="no_application",
                               reason=describe_miss(request.host, request.port, protocol))
        application = match.app.name if match is not None else ""
    else:
        application = request.application
    access = tables.access
    if access is None or not access.enforcing:
        return Verdict(allowed=True, match=match)
    if not isinstance(principal, Principal):
        return Verdict(allowed=False, code="sign_in_required",
                       reason=f"sign-in required: {principal.reason or 'no token'}", match=match)
    browser = request.kind == "web"
    decision = (access.decide(principal, application, request.source, now, browser) if application
                else access.check_principal(principal, now, browser))  # a private DNS name outside every application
    if not decision.allowed:
        return Verdict(allowed=False, code=decision.code, reason=decision.reason, match=match, principal=principal,
                       decision=decision)
    return Verdict(allowed=True, match=match, principal=principal, decision=decision)
