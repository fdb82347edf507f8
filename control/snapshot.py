"""Compiling the store into configuration snapshots, and handing them to waiting nodes.

- ``build_snapshot(session, edges=...)``: the ``dataplane.contract.snapshot.ConfigSnapshot`` of the
  store as seen by ``session``. Its ``version`` is the store's configuration version and its
  ``issued_at`` the time of the change that made that version, and every list is sorted, so
  the same configuration always encodes to the same bytes (on any control-plane node).
- ``SnapshotHub``: the newest snapshot and the long-poll waiters for a newer one (pure
  asyncio; the HTTP endpoint calls ``wait_newer`` with the version the node holds).
- ``refresh`` / ``follow_store``: rebuild and publish when the store's version moved.
  On PostgreSQL ``follow_store`` re-reads the one-row version table when the database
  notifies a change (``LISTEN/NOTIFY``, ``control.store.notify``; every control-plane node
  sharing the database is told of a commit made through any of them), and every
  ``notify.FALLBACK_INTERVAL`` seconds as a safety net; on SQLite (one host) it reads it
  every ``FOLLOW_INTERVAL`` seconds. Either way a change reaches the hub, and from there
  every waiting node, well within the two seconds a change may take.

The ``edges`` of a snapshot are the public edge addresses the control plane was started
with, then those of registered edges (registering or revoking an edge is a configuration
change). Changing the public addresses alone changes no version: nodes get them with the
next configuration change. The same holds for ``token_keys`` / ``token_issuer`` (the public
keys users' access tokens are signed with, passed in by the server): a key rotation must
bump the configuration version for nodes to get the new keys.

Connectors: each registered connector with the group it was registered into and the serials
of its usable certificates (``store.nodes.snapshot_connectors``): edges file a connector's
tunnels under that group, whatever its HELLO says.

Least knowledge: the snapshot above is an edge's. ``connector_view(snapshot, connector_id)``
is what a connector is sent (version, time, edges, revoked serials, its own group and record);
``SnapshotHub.body_for`` encodes each node's view once per version.

Conditional access: users (with their group ids), devices and revoked sign-in sessions come
from ``store.users``, ``store.devices`` and ``store.sessions`` (a revoked session only while
an access token issued for it may still be accepted: ``token_lifetime`` is the access tokens'
lifetime in seconds; without it, until the session's own expiry); named locations from
``store.named_locations``; policies (application ids turned into names, so a renamed
application stays targeted) and application assignments from their tables.
A policy target that no longer exists (a user or group deleted since) is left out; a policy
left with no existing target in a list that named some (it targeted only deleted
applications, or only deleted users and groups) targets nothing and is left out entirely,
never widened to "everyone".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from dataplane.contract.webapps import backend_segment
from dataplane.contract.snapshot import (
    ConfigSnapshot,
    SnapApp,
    SnapConditions,
    SnapConnector,
    SnapDevice,
    SnapGroup,
    SnapLocation,
    SnapPolicy,
    SnapSegment,
    SnapUser,
    SnapWebApp,
    encode,
)

from .store import Store
from .store.applications import list_applications
from .store.certificates import listed_revocations
from .store.config_version import config_version
from .store.connector_groups import allowed_addresses, denied_addresses, list_groups
from .store.devices import snapshot_devices
from .store.dns_suffixes import list_dns_suffixes
from .store.forwarding_profile import forwarding_profile
from .store.models import AccessPolicy, AppAssignment, ConfigVersion, UserGroup
from .store.named_locations import list_locations, location_cidrs
from .store.nodes import edge_addresses, snapshot_connectors
from .store.segments import ports_from_text
from .store.sessions import revoked_session_ids
from .store.users import snapshot_users
from .store.secretbox import SecretBox, SecretBoxError
from .store.webapps import certificate_key, list_webapps

log = logging.getLogger("ferryman.snapshot")

DEFAULT_MAX_WAITERS = 10_000
FOLLOW_INTERVAL = 0.5  # seconds between checks of the store's configuration version


def iso_utc(moment: datetime) -> str:
    """``2030-01-02T03:04:05.000006Z``: fixed width, so equal moments give equal text."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---------------------------------------------------------------------------- building


TokenKeys = Sequence[Mapping[str, str]]


def _assignments(session: Session) -> dict[int, tuple[list[str], list[str]]]:
    """Application id → (sorted user ids, sorted group ids) it is assigned to."""
    out: dict[int, tuple[list[str], list[str]]] = {}
    rows = session.execute(select(AppAssignment.application_id, AppAssignment.user_id, AppAssignment.group_id))
    for app_id, user_id, group_id in rows:
        users, groups = out.setdefault(app_id, ([], []))
        if user_id is not None:
            users.append(user_id)
        if group_id is not None:
            groups.append(group_id)
    for users, groups in out.values():
        users.sort()
        groups.sort()
    return out


def _conditions(stored: Mapping[str, Any]) -> SnapConditions:
    return SnapConditions(locations=list(stored.get("locations", [])), device_os=list(stored.get("device_os", [])),
                          user_risk_at_least=stored.get("user_risk_at_least", ""),
                          signin_older_than=stored.get("signin_older_than", 0))


def _policies(session: Session, app_names: Mapping[int, str], user_ids: set[str]) -> list[SnapPolicy]:
    """Every policy by id, targets as the edge needs them (see the module doc for deleted targets)."""
    group_ids = set(session.scalars(select(UserGroup.id)))
    out = []
    for row in session.scalars(select(AccessPolicy).order_by(AccessPolicy.id)):
        apps = sorted({app_names[i] for i in row.applications if i in app_names})
        users = sorted({i for i in row.users if i in user_ids})
        groups = sorted({i for i in row.groups if i in group_ids})
        if row.applications and not apps:
            continue  # every application it targeted is gone: it targets nothing
        if (row.users or row.groups) and not users and not groups:
            continue  # every user and group it targeted is gone: it targets nobody
        out.append(SnapPolicy(id=row.id, name=row.name,
                              state=row.state, grant=row.grant_control,  # type: ignore[arg-type]  # checked columns
                              applications=apps, users=users, groups=groups,
                              conditions=_conditions(row.conditions or {})))
    return out


def _web_apps(session: Session, box: SecretBox | None) -> list[SnapWebApp]:
    """The web apps, each custom-domain key opened for the edges (one that cannot be opened is
    logged and left out: the edges then show their own certificate for that host)."""
    out = []
    for w in list_webapps(session):
        certificate, key = w.certificate, ""
        if certificate:
            try:
                key = certificate_key(box, w)
            except SecretBoxError as exc:
                log.error("web app %r: its certificate key cannot be opened (%s); edges use their own certificate",
                          w.application.name, exc)
                certificate = ""
        out.append(SnapWebApp(
            name=w.application.name, external_url=w.external_url, internal_url=w.internal_url,
            connector_group=w.application.connector_group.name,
            preauth=w.preauth,  # type: ignore[arg-type]  # checked columns
            backend_timeout=w.backend_timeout,  # type: ignore[arg-type]
            translate_headers=w.translate_headers, translate_body=w.translate_body,
            cookie_http_only=w.cookie_http_only, cookie_persistent=w.cookie_persistent,
            header_sso=dict(w.header_sso or {}), websocket=w.websocket, verify_backend=w.verify_backend,
            backend_ca=w.backend_ca, cors_preflight_bypass=w.cors_preflight_bypass, certificate=certificate,
            certificate_key=key))
    return out


def build_snapshot(session: Session, *, edges: Iterable[str], token_keys: TokenKeys = (),
                   token_issuer: str = "", token_lifetime: int | None = None,
                   box: SecretBox | None = None) -> ConfigSnapshot:
    """The configuration in the store as seen by ``session`` (use one transaction: ``store.read()``).

    Every list is sorted (applications, groups, users, locations by name; devices by id;
    policies by id; DNS suffixes, serials, sessions, assignment ids), so equal configurations
    give equal bytes. The edges are ``edges`` (the configured public addresses) then those of
    registered, unrevoked edges, in that order (``edge_addresses``): nodes dial them in
    order. ``token_keys`` (public JWKs) and ``token_issuer`` are passed through; keys are
    sorted by ``kid``. ``token_lifetime`` (seconds) bounds how long revoked sessions are listed.
    """
    version, changed_at = session.execute(
        select(ConfigVersion.version, ConfigVersion.changed_at).where(ConfigVersion.id == 1)).one()
    assigned = _assignments(session)
    stored_apps = sorted(list_applications(session), key=lambda a: a.name)
    applications = [
        SnapApp(
            name=app.name,
            kind=app.kind,  # type: ignore[arg-type]  # the schema's check constraint keeps it a known kind
            connector_group=app.connector_group.name,
            segments=[
                SnapSegment(destination=s.destination, ports=s.ports, protocol=s.protocol)  # type: ignore[arg-type]
                for s in sorted(app.segments, key=lambda s: (s.protocol, s.destination, ports_from_text(s.ports)))
            ],
            users=assigned.get(app.id, ([], []))[0],
            groups=assigned.get(app.id, ([], []))[1],
        )
        for app in stored_apps
    ]
    groups = [SnapGroup(name=g.name, region=g.region, allowed_addresses=allowed_addresses(g),
                        denied_addresses=denied_addresses(g))
              for g in sorted(list_groups(session), key=lambda g: g.name)]
    users = [SnapUser(id=user_id, upn=upn, groups=sorted(group_ids), disabled=disabled,
                      risk=risk)  # type: ignore[arg-type]  # the schema's check constraint keeps it a known level
             for user_id, upn, group_ids, disabled, risk in sorted(snapshot_users(session), key=lambda u: (u[1], u[0]))]
    devices = [SnapDevice(id=device_id, user_id=user_id, os=os_name, os_version=os_version, compliant=compliant,
                          revoked=revoked)
               for device_id, user_id, os_name, os_version, compliant, revoked
               in sorted(snapshot_devices(session), key=lambda d: d[0])]
    locations = [SnapLocation(name=row.name, cidrs=location_cidrs(row))
                 for row in sorted(list_locations(session), key=lambda row: row.name)]
    return ConfigSnapshot(
        version=version,
        issued_at=iso_utc(changed_at),
        applications=applications,
        groups=groups,
        dns_suffixes=sorted(row.suffix for row in list_dns_suffixes(session)),
        revoked_serials=listed_revocations(session, changed_at),
        edges=edge_addresses(session, edges),
        connectors=[SnapConnector(id=cid, name=name, group=group, serials=serials)
                    for cid, name, group, serials in snapshot_connectors(session, changed_at)],
        users=users,
        devices=devices,
        locations=locations,
        policies=_policies(session, {a.id: a.name for a in stored_apps}, {u.id for u in users}),
        revoked_sessions=sorted(set(revoked_session_ids(
            session, token_lifetime=None if token_lifetime is None else timedelta(seconds=token_lifetime)))),
        token_keys=sorted(({str(k): str(v) for k, v in key.items()} for key in token_keys),
                          key=lambda key: (key.get("kid", ""), sorted(key.items()))),
        token_issuer=token_issuer,
        fail_mode=forwarding_profile(session).fail_mode,  # type: ignore[arg-type]  # checked by the schema
        web_apps=_web_apps(session, box),
    )


def build_from_store(store: Store, *, edges: Iterable[str], token_keys: TokenKeys = (),
                     token_issuer: str = "", token_lifetime: int | None = None) -> ConfigSnapshot:
    """``build_snapshot`` in a read transaction of its own (blocking: run it in a thread from asyncio)."""
    with store.read() as session:
        return build_snapshot(session, edges=edges, token_keys=token_keys, token_issuer=token_issuer,
                              token_lifetime=token_lifetime, box=store.box)


# ---------------------------------------------------------------------------- what each role is sent


def connector_view(snapshot: ConfigSnapshot, connector_id: str) -> ConfigSnapshot:
    """What connector ``connector_id`` is sent of ``snapshot``: the version and its time, the edges
    to dial, the revoked serials (to refuse a revoked edge), its own record, its own group (with
    its dial lists) and the applications that group serves with their segments only (the
    addresses a segment names explicitly are the ones it may dial although they are special); a
    web application of that group as an application whose one segment is its backend (internal
    host and port; no external URL, options or assignments).
    No other group's applications, no assignments, users, groups of users, devices, named
    locations, policies, sessions or token keys: a connector decides nothing about people."""
    own = [c for c in snapshot.connectors or () if c.id == connector_id]
    groups = {c.group for c in own}
    apps = [SnapApp(name=a.name, kind=a.kind, connector_group=a.connector_group, segments=list(a.segments))
            for a in snapshot.applications if a.connector_group in groups]
    apps += [SnapApp(name=w.name, kind="per_app", connector_group=w.connector_group, segments=[backend_segment(w)])
             for w in snapshot.web_apps if w.connector_group in groups]
    return ConfigSnapshot(version=snapshot.version, issued_at=snapshot.issued_at,
                          groups=[g for g in snapshot.groups if g.name in groups], applications=apps,
                          revoked_serials=list(snapshot.revoked_serials), edges=list(snapshot.edges),
                          connectors=own)


def node_view(snapshot: ConfigSnapshot, role: str, node_id: str) -> ConfigSnapshot:
    """The snapshot a node of ``role`` is sent: an edge all of it, a connector ``connector_view``."""
    if role == "edge":
        return snapshot
    if role == "connector":
        return connector_view(snapshot, node_id)
    raise ValueError(f"no configuration view for role {role!r}")


def _store_version(store: Store) -> int:
    with store.read() as session:
        return config_version(session)


# ---------------------------------------------------------------------------- distribution


class TooManyWaiters(RuntimeError):
    """``SnapshotHub.wait_newer`` refused: the hub already holds its maximum of waiters."""


class SnapshotHub:
    """The newest snapshot, and the nodes waiting (long-poll) for a newer one than theirs.

    ``publish`` and ``wait_newer`` must be called from the event loop's thread. A published
    snapshot that is not newer than the current one is ignored, so publishers may race.
    """

    def __init__(self, snapshot: ConfigSnapshot | None = None, *, max_waiters: int = DEFAULT_MAX_WAITERS) -> None:
        if max_waiters < 1:
            raise ValueError(f"max_waiters must be at least 1, not {max_waiters}")
        self.max_waiters = max_waiters
        self._current: ConfigSnapshot | None = None
        self._encoded: bytes | None = None
        self._views: dict[tuple[str, str], bytes] = {}  # (role, node id) -> its view of the current snapshot
        self._waiting = 0
        self._wakeups: set[asyncio.Future[None]] = set()
        self._closed = False
        if snapshot is not None:
            self.publish(snapshot)

    @property
    def current(self) -> ConfigSnapshot | None:
        """The newest published snapshot (None before the first one)."""
        return self._current

    @property
    def encoded(self) -> bytes | None:
        """``encode(current)``, computed once per snapshot (for serving it to many nodes)."""
        return self._encoded

    @property
    def version(self) -> int | None:
        return None if self._current is None else self._current.version

    @property
    def waiters(self) -> int:
        """How many ``wait_newer`` calls are waiting now."""
        return self._waiting

    def publish(self, snapshot: ConfigSnapshot) -> bool:
        """Make ``snapshot`` current and wake every waiter, if it is newer; return whether it was."""
        if self._current is not None and snapshot.version <= self._current.version:
            return False
        self._current = snapshot
        self._encoded = encode(snapshot)
        self._views = {}
        self._wake()
        return True

    def body_for(self, snapshot: ConfigSnapshot, role: str, node_id: str) -> bytes:
        """``encode(node_view(snapshot, role, node_id))``; of the current snapshot, encoded once per node."""
        if snapshot is not self._current:
            return encode(node_view(snapshot, role, node_id))
        if role == "edge":
            return self._encoded or b""
        key = (role, node_id)
        body = self._views.get(key)
        if body is None:
            body = self._views[key] = encode(node_view(snapshot, role, node_id))
        return body

    async def wait_newer(self, version: int, timeout: float) -> ConfigSnapshot | None:
        """The current snapshot as soon as its version is above ``version``; None after ``timeout`` seconds.

        Returns at once when the current snapshot is already newer (a node that is behind, or
        one that holds none: pass -1), and None at once once the hub is closed. Raises
        ``TooManyWaiters`` when ``max_waiters`` calls are already waiting.
        """
        current = self._current
        if current is not None and current.version > version:
            return current
        if self._closed or timeout <= 0:
            return None
        if self._waiting >= self.max_waiters:
            raise TooManyWaiters(f"{self._waiting} nodes are already waiting for a configuration change, "
                                 f"the most this control plane accepts (max_waiters); retry later")
        loop = asyncio.get_running_loop()
        self._waiting += 1
        try:
            async with asyncio.timeout(timeout):
                while True:
                    wakeup = loop.create_future()
                    self._wakeups.add(wakeup)
                    try:
                        await wakeup
                    finally:
                        self._wakeups.discard(wakeup)
                    current = self._current
                    if current is not None and current.version > version:
                        return current
                    if self._closed:
                        return None
        except TimeoutError:
            return None
        finally:
            self._waiting -= 1

    @property
    def closed(self) -> bool:
        """Shutting down: long-polls answer at once."""
        return self._closed

    def close(self) -> None:
        """Release every waiter (they get None) and answer later calls at once (shutdown)."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        wakeups, self._wakeups = self._wakeups, set()
        for wakeup in wakeups:
            if not wakeup.done():
                wakeup.set_result(None)


# ---------------------------------------------------------------------------- following the store


async def refresh(store: Store, hub: SnapshotHub, *, edges: Iterable[str], token_keys: TokenKeys = (),
                  token_issuer: str = "", token_lifetime: int | None = None) -> bool:
    """Build a snapshot from ``store`` (in a thread) and publish it; return whether it was newer."""
    edges = list(edges)
    keys = [dict(key) for key in token_keys]
    snapshot = await asyncio.to_thread(build_from_store, store, edges=edges, token_keys=keys,
                                       token_issuer=token_issuer, token_lifetime=token_lifetime)
    return hub.publish(snapshot)


async def follow_store(store: Store, hub: SnapshotHub, *, edges: Iterable[str], token_keys: TokenKeys = (),
                       token_issuer: str = "", token_lifetime: int | None = None,
                       interval: float = FOLLOW_INTERVAL, changed: asyncio.Event | None = None) -> None:
    """Keep ``hub`` at the store's configuration version until cancelled.

    The version is read (one row) whenever ``changed`` is set (a PostgreSQL notification,
    ``control.store.notify.ChangeListener``) and at least every ``interval`` seconds; when it
    differs from the hub's the snapshot is rebuilt and published. A database error is logged
    (once per outage) and retried at the next tick: the hub keeps serving the last snapshot
    meanwhile.
    """
    edges = list(edges)
    keys = [dict(key) for key in token_keys]
    failing = False
    built: int | None = None  # the store version last built (rebuilt only when it moves)
    while True:
        try:
            version = await asyncio.to_thread(_store_version, store)
            if version != built and version != hub.version:
                snapshot = await asyncio.to_thread(build_from_store, store, edges=edges, token_keys=keys,
                                                   token_issuer=token_issuer, token_lifetime=token_lifetime)
                built = snapshot.version
                if hub.publish(snapshot):
                    log.info("configuration snapshot published", extra={"version": snapshot.version})
                else:
                    log.warning("the store's configuration version %d is below the published %s "
                                "(database replaced or restored?); nodes keep the newer snapshot",
                                snapshot.version, hub.version)
            if failing:
                log.info("configuration store reachable again", extra={"version": version})
                failing = False
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the database is down or refusing: keep serving what we have
            if not failing:
                log.warning("cannot read the configuration store: %s", exc)
                failing = True
        if changed is None or failing:
            await asyncio.sleep(interval if changed is None else min(interval, FOLLOW_INTERVAL * 4))
            continue
        try:
            await asyncio.wait_for(changed.wait(), interval)
        except TimeoutError:
            pass
        changed.clear()  # cleared before the read: a change committed after it sets it again
