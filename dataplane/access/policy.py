"""Conditional access: the decision an edge makes for every flow, from its snapshot alone.

Pure and synchronous (no I/O, no clock of its own): ``AccessIndex(snapshot)`` prepares the
snapshot's users, devices, assignments, named locations and policies for lookups once per
configuration version, and ``AccessIndex.decide(who, app, source, now)`` answers one flow:

1. the user is known and enabled, the sign-in session is not revoked, the access token has
   not expired, the device is the token's device, known and not revoked;
2. the user is assigned to the application, directly or through a group;
3. every policy that is not ``off``, targets the application and the user, and whose
   conditions all hold (named location of the source, device OS, user risk, sign-in age)
   demands its grant: ``block``; ``require_mfa`` (the token's ``amr`` has ``mfa``);
   ``require_compliant_device``. Policies are evaluated in id order; the first one that is
   ``on`` and unmet denies the flow with a reason the user can act on. A ``report_only``
   policy that is unmet is reported (``Decision.report``) and never denies.

The same decision re-made for a live flow on every new configuration is what cuts flows
when a user is disabled, a device or session revoked, or a policy now denies
(continuous access).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence
from typing import Literal

import msgspec

from ..contract.snapshot import TOKEN_LEEWAY, ConfigSnapshot, SnapApp, SnapDevice, SnapPolicy, SnapUser

RISK_ORDER = {"none": 0, "low": 1, "medium": 2, "high": 3}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Principal(msgspec.Struct, frozen=True):
    """Who opens flows on a client tunnel: from the verified access token and the device certificate."""

    user_id: str
    upn: str
    session_id: str
    device_id: str
    amr: tuple[str, ...]
    auth_time: int
    expires: int


class PolicyResult(msgspec.Struct, frozen=True):
    """One policy that applied to a flow: its name, state, grant, and whether the flow met it."""

    policy: str
    state: str
    grant: str
    satisfied: bool


class Decision(msgspec.Struct, frozen=True):
    """``allow`` or ``deny`` with a code and a reason for the user; ``policy`` names the policy
    that denied (or the first that applied); ``applied`` lists every policy evaluated as
    applying, ``report`` the report-only ones that would have denied."""

    action: Literal["allow", "deny"]
    code: str = ""
    reason: str = ""
    policy: str = ""
    applied: tuple[PolicyResult, ...] = ()

    @property
    def allowed(self) -> bool:
        return self.action == "allow"

    @property
    def report(self) -> tuple[PolicyResult, ...]:
        return tuple(p for p in self.applied if p.state == "report_only" and not p.satisfied)


def _deny(code: str, reason: str, policy: str = "", applied: Sequence[PolicyResult] = ()) -> Decision:
    return Decision("deny", code, reason, policy, tuple(applied))


class _Policy:
    __slots__ = ("spec", "apps", "users", "groups", "networks", "device_os", "risk", "older_than")

    def __init__(self, spec: SnapPolicy, locations: dict[str, list[Network]]) -> None:
        self.spec = spec
        self.apps = frozenset(spec.applications)
        self.users = frozenset(spec.users)
        self.groups = frozenset(spec.groups)
        c = spec.conditions
        # A location this edge does not know (should not happen: the control plane checks) matches nothing.
        self.networks = [net for name in c.locations for net in locations.get(name, [])] if c.locations else None
        self.device_os = frozenset(o.lower() for o in c.device_os) if c.device_os else None
        self.risk = RISK_ORDER[c.user_risk_at_least] if c.user_risk_at_least else None
        self.older_than = c.signin_older_than or None

    def targets(self, app: str, user: SnapUser) -> bool:
        if self.apps and app not in self.apps:
            return False
        if not self.users and not self.groups:
            return True
        return user.id in self.users or not self.groups.isdisjoint(user.groups)

    def conditions_hold(self, user: SnapUser, device: SnapDevice, who: Principal,
                        source: ipaddress.IPv4Address | ipaddress.IPv6Address | None, now: float) -> bool:
        if self.networks is not None and (source is None or not any(source in net for net in self.networks
                                                                    if net.version == source.version)):
            return False
        if self.device_os is not None and device.os.lower() not in self.device_os:
            return False
        if self.risk is not None and RISK_ORDER[user.risk] < self.risk:
            return False
        if self.older_than is not None and now - who.auth_time <= self.older_than:
            return False
        return True


@functools.lru_cache(maxsize=4096)
def _source_address(source: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address of ``source`` (``ip``, ``ip:port`` or ``[ip]:port``), None if it has none."""
    if not source:
        return None
    try:
        return ipaddress.ip_address(source.rsplit(":", 1)[0].strip("[]"))
    except ValueError:
        return None


class AccessIndex:
    """One snapshot's access data, indexed; ``enforcing`` is False when the control plane
    publishes no token keys (no identity: edges then only match applications)."""

    def __init__(self, snapshot: ConfigSnapshot) -> None:
        self.version = snapshot.version
        self.enforcing = bool(snapshot.token_keys)
        self.users = {u.id: u for u in snapshot.users}
        self.devices = {d.id: d for d in snapshot.devices}
        self.revoked_sessions = frozenset(snapshot.revoked_sessions)
        self.apps: dict[str, SnapApp] = {a.name: a for a in snapshot.applications}
        self.assigned = {a.name: (frozenset(a.users), frozenset(a.groups)) for a in snapshot.applications}
        locations: dict[str, list[Network]] = {}
        for location in snapshot.locations:
            nets = []
            for cidr in location.cidrs:
                try:
                    nets.append(ipaddress.ip_network(cidr, strict=False))
                except ValueError:
                    continue  # the control plane validates; an unparsable entry matches nothing
            locations[location.name] = nets
        self.policies = [_Policy(p, locations) for p in sorted(snapshot.policies, key=lambda p: p.id)
                         if p.state != "off"]
        # The source address is parsed only when a policy has a named-location condition.
        self.uses_locations = any(p.networks is not None for p in self.policies)

    def check_principal(self, who: Principal, now: float, browser: bool = False) -> Decision:
        """Whether ``who`` may act at all (known and enabled user, live session and token, its own
        registered device): the first step of ``decide``, and all there is for a flow outside every
        application (a private DNS query for a name no application covers)."""
        user = self.users.get(who.user_id)
        if user is None:
            return _deny("user_unknown", f"user {who.upn} is not known here: sign in again")
        if user.disabled:
            return _deny("user_disabled", f"the account {user.upn} is disabled")
        if who.session_id in self.revoked_sessions:
            return _deny("session_revoked", "the sign-in session was revoked: sign in again")
        if now > who.expires + TOKEN_LEEWAY:
            return _deny("token_expired", "the access token has expired: the client must refresh it or sign in again")
        if browser and not who.device_id:  # a web request from a browser: no client agent, no device
            return Decision("allow")
        device = self.devices.get(who.device_id)
        if device is None or device.user_id != user.id:
            return _deny("device_unknown", f"device {who.device_id} is not registered to {user.upn}")
        if device.revoked:
            return _deny("device_revoked", f"device {who.device_id} was revoked")
        return Decision("allow")

    def decide(self, who: Principal, app: str, source: str, now: float, browser: bool = False) -> Decision:
        """The decision for a flow of ``who`` to application ``app`` from ``source`` (an IP, or "").

        ``browser``: a web app request from a browser without the client agent (the principal
        names no device): device checks are skipped, the device has no OS and is not compliant,
        and a policy that needs a compliant device says that the browser cannot show one."""
        checked = self.check_principal(who, now, browser)
        if not checked.allowed:
            return checked
        user = self.users[who.user_id]
        device = self.devices.get(who.device_id) or SnapDevice(id="", user_id=user.id)
        users, groups = self.assigned.get(app, (frozenset(), frozenset()))
        if user.id not in users and groups.isdisjoint(user.groups):
            return _deny("not_assigned", f"{user.upn} is not assigned to application '{app}'")
        address = _source_address(source) if self.uses_locations else None
        applied: list[PolicyResult] = []
        denial: Decision | None = None
        for policy in self.policies:
            spec = policy.spec
            if not policy.targets(app, user) or not policy.conditions_hold(user, device, who, address, now):
                continue
            if spec.grant == "block":
                met, code, reason = False, "blocked_by_policy", f"access to '{app}' is blocked by policy '{spec.name}'"
            elif spec.grant == "require_mfa":
                met, code, reason = ("mfa" in who.amr, "mfa_required",
                                     f"MFA required for app '{app}' (policy '{spec.name}'): sign in again with "
                                     f"your second factor")
            elif device.id:
                met, code, reason = (device.compliant, "device_not_compliant",
                                     f"a compliant device is required for app '{app}' (policy '{spec.name}')")
            else:
                met, code, reason = (False, "device_not_compliant",
                                     f"a compliant device is required for app '{app}' (policy '{spec.name}'): "
                                     "this browser has no Ferryman client agent, so its device cannot be checked; "
                                     "use a device with the client agent")
            applied.append(PolicyResult(spec.name, spec.state, spec.grant, met))
            if not met and spec.state == "on" and denial is None:
                denial = _deny(code, reason, spec.name)
        if denial is not None:
            return _deny(denial.code, denial.reason, denial.policy, applied)
        return Decision("allow", policy=applied[0].policy if applied else "", applied=tuple(applied))
