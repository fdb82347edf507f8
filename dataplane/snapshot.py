"""The configuration snapshot: everything an edge or a connector needs from the control plane.

The control plane compiles its store into a ``ConfigSnapshot`` (``control.snapshot``) and
pushes it to every node; a node holds the newest one it has seen, keeps it on disk
(``SnapshotCache``) so that it can start and keep forwarding while the control plane is
down, and catches up when the control plane returns. A snapshot carries one number,
``version`` (the store's configuration version): a node only ever moves to a higher one.

Contents: applications (per-app and the catch-all quick access one) with their segments and
assignments, connector groups, private DNS suffixes, revoked certificate serials (lower-case
hex), the edges nodes dial, and for conditional access: users (groups, disabled, risk),
devices (OS, compliance), named locations, policies, revoked sign-in sessions and the public
keys of access tokens. The encoding is msgspec JSON (``encode`` / ``decode``); a field a node
does not know is ignored, so a newer control plane may add fields without breaking nodes.

Helpers a node uses on each new snapshot:

- ``app_table(snapshot)``: the ``dataplane.apps.AppTable`` the edge matches flows against.
  A per-app application always beats the quick access application: quick access only gets
  the flows that no per-app segment covers, however specific its own segments are.
- ``is_revoked(snapshot, serial)``: set lookup, for every TLS handshake.

A snapshot is treated as immutable once built or decoded (``is_revoked`` caches on it).
This module is data plane: it must not import ``control``.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from .apps import App, AppsError, AppTable, Match

APP_KINDS = ("per_app", "quick_access")
CACHE_MODE = 0o600

_Name = Annotated[str, msgspec.Meta(min_length=1)]
# A certificate serial number as the store keeps it: hex digits (at most 20 octets by RFC 5280,
# the column allows 64 characters).
_Serial = Annotated[str, msgspec.Meta(pattern="^[0-9a-fA-F]{1,64}$")]


class SnapshotError(ValueError):
    """A snapshot cannot be decoded, read, written or used; the message says which and why."""


class SnapSegment(msgspec.Struct):
    """One segment: ``ports`` is the store's canonical text (``"80,443,8000-8100"``)."""

    destination: _Name
    ports: _Name
    protocol: Literal["tcp", "udp"] = "tcp"


class SnapApp(msgspec.Struct):
    """An application; ``users`` and ``groups`` are the ids it is assigned to (a flow is
    allowed only for a user assigned directly or through one of their groups)."""

    name: _Name
    kind: Literal["per_app", "quick_access"]
    connector_group: _Name
    segments: list[SnapSegment] = []
    users: list[str] = []
    groups: list[str] = []


class SnapGroup(msgspec.Struct):
    name: _Name
    region: str = ""


class SnapUser(msgspec.Struct):
    """A user as edges need it: id, UPN, the ids of their groups, disabled flag, risk level."""

    id: _Name
    upn: _Name
    groups: list[str] = []
    disabled: bool = False
    risk: Literal["none", "low", "medium", "high"] = "none"


class SnapDevice(msgspec.Struct):
    """A registered device (its client certificate's CN is ``id``)."""

    id: _Name
    user_id: _Name
    os: str = ""
    os_version: str = ""
    compliant: bool = False
    revoked: bool = False


class SnapLocation(msgspec.Struct):
    """A named location: source networks (CIDR text) a policy condition may name."""

    name: _Name
    cidrs: list[str] = []


class SnapConditions(msgspec.Struct, omit_defaults=True):
    """When a policy applies; every condition given must hold (an empty one is not checked).

    - ``locations``: the flow's source address is in one of these named locations;
    - ``device_os``: the device's OS is one of these (case-insensitive);
    - ``user_risk_at_least``: the user's risk level is this or higher;
    - ``signin_older_than``: the sign-in is older than this many seconds.
    """

    locations: list[str] = []
    device_os: list[str] = []
    user_risk_at_least: Literal["", "low", "medium", "high"] = ""
    signin_older_than: Annotated[int, msgspec.Meta(ge=0)] = 0


class SnapPolicy(msgspec.Struct):
    """A conditional-access policy. ``applications`` are names (empty: every application);
    ``users`` / ``groups`` are ids (both empty: every user). ``report_only`` evaluates and
    logs but never denies."""

    id: int
    name: _Name
    state: Literal["on", "off", "report_only"]
    grant: Literal["block", "require_mfa", "require_compliant_device"]
    applications: list[str] = []
    users: list[str] = []
    groups: list[str] = []
    conditions: SnapConditions = msgspec.field(default_factory=SnapConditions)


class ConfigSnapshot(msgspec.Struct, dict=True):
    """Version ``version`` of the configuration, as of ``issued_at`` (ISO 8601 UTC).

    ``dict=True`` lets helpers keep derived lookups (the revocation set) on the instance;
    they are never encoded.
    """

    version: Annotated[int, msgspec.Meta(ge=0)]
    issued_at: str
    applications: list[SnapApp] = []
    groups: list[SnapGroup] = []
    dns_suffixes: list[str] = []
    revoked_serials: list[_Serial] = []
    edges: list[str] = []
    # Identity and conditional access (empty on a control plane without users: edges then
    # enforce nothing beyond applications).
    users: list[SnapUser] = []
    devices: list[SnapDevice] = []
    locations: list[SnapLocation] = []
    policies: list[SnapPolicy] = []
    revoked_sessions: list[str] = []
    # The public keys (JWK dicts, OKP/Ed25519 with "kid") access tokens are signed with, and
    # the issuer they name: edges verify users' tokens offline with these.
    token_keys: list[dict[str, str]] = []
    token_issuer: str = ""
    # The forwarding profile's fail mode: what client agents do with private destinations
    # while no edge is reachable ("closed": refuse them, "open": dial them directly).
    fail_mode: Literal["closed", "open"] = "closed"


class _VersionOnly(msgspec.Struct):
    version: int


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(ConfigSnapshot)
_version_decoder = msgspec.json.Decoder(_VersionOnly)


# ---------------------------------------------------------------------------- encoding


def encode(snapshot: ConfigSnapshot) -> bytes:
    """JSON bytes of ``snapshot`` (equal snapshots give equal bytes)."""
    return _encoder.encode(snapshot)


def decode(data: bytes | bytearray | memoryview | str) -> ConfigSnapshot:
    """The snapshot encoded in ``data``; ``SnapshotError`` saying what is wrong otherwise."""
    try:
        return _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise SnapshotError(f"invalid configuration snapshot: {exc}") from None
    except msgspec.DecodeError as exc:
        raise SnapshotError(f"configuration snapshot is not valid JSON: {exc}") from None
    except TypeError as exc:
        raise SnapshotError(f"configuration snapshot must be bytes or text: {exc}") from None


# ---------------------------------------------------------------------------- applications


class TieredAppTable(AppTable):
    """An ``AppTable`` whose ``fallback`` applications only match flows that ``apps`` leave uncovered.

    Within each tier the usual rule holds (most specific destination, then narrowest port
    range, then order). ``app_table`` puts per-app applications in the first tier and the
    quick access application in the fallback tier.
    """

    def __init__(self, apps: Sequence[App], fallback: Sequence[App] = ()) -> None:
        super().__init__(apps)
        self._fallback = AppTable(fallback) if fallback else None
        self._all = (*apps, *fallback)

    @property
    def apps(self) -> list[App]:
        return list(self._all)

    def groups(self) -> set[str]:
        return {app.connector_group for app in self._all}

    def match(self, host: str, port: int, protocol: str = "tcp") -> Match | None:
        found = super().match(host, port, protocol)
        if found is None and self._fallback is not None:
            return self._fallback.match(host, port, protocol)
        return found

    def covering_name(self, name: str) -> Match | None:
        found = super().covering_name(name)
        if found is None and self._fallback is not None:
            return self._fallback.covering_name(name)
        return found


def app_table(snapshot: ConfigSnapshot) -> AppTable:
    """The applications of ``snapshot`` for ``AppTable.match`` (applications without segments left out).

    Per-app applications come first and quick access is a fallback tier: a flow goes to quick
    access only if no per-app segment covers it (an identical, or even a narrower, quick
    access segment does not take a flow away from a per-app application).
    """
    ordered = sorted((a for a in snapshot.applications if a.segments), key=lambda a: a.kind != "per_app")
    obj: dict[str, Any] = {"apps": [
        {"name": a.name, "connector_group": a.connector_group,
         "segments": [{"destination": s.destination, "ports": s.ports, "protocol": s.protocol} for s in a.segments]}
        for a in ordered
    ]}
    try:
        parsed = AppTable.from_obj(obj, source=f"snapshot version {snapshot.version}").apps
    except AppsError as exc:
        raise SnapshotError(str(exc)) from None
    per_app = sum(1 for a in ordered if a.kind == "per_app")
    return TieredAppTable(parsed[:per_app], parsed[per_app:])


# ---------------------------------------------------------------------------- client forwarding profile


class ClientProfile(msgspec.Struct):
    """What a signed-in client agent is told (``GET /v1/client/profile``): the private
    applications' segments (which destinations to tunnel), the private DNS suffixes, the
    fail mode and the edges. Assignments stay out of it: the edge decides each flow, and
    a user who is not assigned gets the edge's reason rather than a silent direct dial."""

    version: Annotated[int, msgspec.Meta(ge=0)]
    issued_at: str
    applications: list[SnapApp] = []
    dns_suffixes: list[str] = []
    fail_mode: Literal["closed", "open"] = "closed"
    edges: list[str] = []


def client_profile(snapshot: ConfigSnapshot) -> ClientProfile:
    """The forwarding profile of ``snapshot`` (the same for every user)."""
    return ClientProfile(
        version=snapshot.version, issued_at=snapshot.issued_at,
        applications=[SnapApp(name=a.name, kind=a.kind, connector_group=a.connector_group, segments=a.segments)
                      for a in snapshot.applications if a.segments],
        dns_suffixes=list(snapshot.dns_suffixes), fail_mode=snapshot.fail_mode, edges=list(snapshot.edges),
    )


def profile_table(profile: ClientProfile) -> AppTable:
    """The profile's applications for ``AppTable.match``, tiered like the edge's (``app_table``)."""
    return app_table(ConfigSnapshot(version=profile.version, issued_at=profile.issued_at,
                                    applications=profile.applications))


# ---------------------------------------------------------------------------- revocations


def revoked_set(snapshot: ConfigSnapshot) -> frozenset[int]:
    """The revoked serial numbers of ``snapshot`` as integers (computed once per snapshot)."""
    cached = snapshot.__dict__.get("_revoked")
    if cached is None:
        cached = frozenset(int(serial, 16) for serial in snapshot.revoked_serials)
        snapshot.__dict__["_revoked"] = cached
    return cached


def is_revoked(snapshot: ConfigSnapshot, serial: int) -> bool:
    """Whether the certificate with serial number ``serial`` is revoked in ``snapshot``."""
    return serial in revoked_set(snapshot)


# ---------------------------------------------------------------------------- on disk


class SnapshotCache:
    """The newest snapshot a node has seen, in one file, so it can run without the control plane.

    ``save`` writes a new file (mode 0600), fsyncs it and renames it over the old one, so
    a crash leaves either the old or the new snapshot, never a torn one; it refuses to
    replace a snapshot of the same or a newer version. Processes sharing the file (edge
    workers) serialise ``save`` with an advisory lock on ``<path>.lock``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> ConfigSnapshot | None:
        """The stored snapshot; None when there is none yet; ``SnapshotError`` naming the file if unreadable."""
        data = self._read()
        if data is None:
            return None
        try:
            return decode(data)
        except SnapshotError as exc:
            raise SnapshotError(f"snapshot cache {self.path} is corrupt: {exc}") from None

    def stored_version(self) -> int | None:
        """The version of the stored snapshot; None when there is none or it cannot be read."""
        try:
            data = self._read()
            return None if data is None else _version_decoder.decode(data).version
        except (SnapshotError, msgspec.DecodeError):
            return None

    def save(self, snapshot: ConfigSnapshot, replace_newer: bool = False) -> bool:
        """Store ``snapshot`` if it is newer than the stored one (or none / a corrupt one is stored,
        or ``replace_newer``: the control plane went back to an older version).

        Returns whether it was written.
        """
        data = encode(snapshot)
        directory = self.path.parent
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise SnapshotError(f"cannot create directory {directory} for the snapshot cache: "
                                f"{exc.strerror}") from None
        with self._locked():
            stored = self.stored_version()
            if stored is not None and snapshot.version <= stored and not replace_newer:
                return False
            self._write(data)
        return True

    def _read(self) -> bytes | None:
        try:
            with open(self.path, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SnapshotError(f"cannot read snapshot cache {self.path}: {exc.strerror}") from None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        lock_path = f"{self.path}.lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, CACHE_MODE)
        except OSError as exc:
            raise SnapshotError(f"cannot open lock file {lock_path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write(self, data: bytes) -> None:
        directory = self.path.parent
        try:
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{self.path.name}.", suffix=".tmp")
        except OSError as exc:
            raise SnapshotError(f"cannot write snapshot cache {self.path}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as fh:
                os.fchmod(fh.fileno(), CACHE_MODE)
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise SnapshotError(f"cannot write snapshot cache {self.path}: {exc.strerror}") from None
        try:  # make the rename itself durable
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass  # some file systems cannot fsync a directory; the file itself is complete

