"""The client agent's forwarding profile: which destinations are private, and what to do
with them while no edge is reachable.

``ProfileFollower`` keeps the profile of a signed-in agent current: it long-polls
``GET /v1/client/profile`` on the control plane with the session's access token, keeps
the last profile in ``FERRYMAN_DATA_DIR/client/profile.json`` (0600), starts from that
file, and keeps routing by it while the control plane is unreachable. ``Profile`` answers
the one question capture asks (``route``): is host:port/protocol covered by a private
application's segment (tunnel it), under a private DNS suffix (tunnel it: the connector
resolves it), or neither (dial it directly, not tunnelled)?
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

import msgspec

from ..access.apptable import AppTable, profile_table
from ..basics import statefile
from ..contract.snapshot import ClientProfile, SnapshotError
from ..controllink import http as httpclient
from ..transport.supervisor import Backoff
from .signin import TokenKeeper

log = logging.getLogger("ferryman.profile")

PROFILE_FILE = "profile.json"
WAIT = 25.0  # seconds one long-poll waits for a change
REQUEST_TIMEOUT = 10.0
RETRY_MIN, RETRY_MAX = 1.0, 30.0
MAX_PROFILE = 8 << 20  # bytes: 500 segments per application, many applications


class Profile:
    """A decoded profile with its lookup table."""

    def __init__(self, data: ClientProfile) -> None:
        self.data = data
        self.table: AppTable = profile_table(data)  # SnapshotError: not usable by this agent
        self.suffixes = tuple(s.lower().strip(".") for s in data.dns_suffixes)
        self.revoked = frozenset(int(serial, 16) for serial in data.revoked_serials)

    @property
    def version(self) -> int:
        return self.data.version

    @property
    def fail_mode(self) -> str:
        return self.data.fail_mode

    def private_name(self, host: str) -> bool:
        """``host`` is under one of the private DNS suffixes."""
        name = host.lower().rstrip(".")
        return any(name == s or name.endswith("." + s) for s in self.suffixes)

    def private_address(self, address: str) -> bool:
        """``address`` (an IP address) lies in a private application's segment, on some port."""
        return self.table.covers_address(address)

    def covers(self, host: str, port: int, protocol: str) -> bool:
        """host:port/protocol goes through the tunnel: a segment covers it, or the name is private."""
        return self.table.match(host, port, protocol) is not None or self.private_name(host)


def load_cached(directory: str) -> Profile | None:
    """The profile saved by the last run (None when there is none or it is unusable, which is logged)."""
    path = os.path.join(directory, PROFILE_FILE)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.error("cannot read the cached forwarding profile %s: %s", path, exc.strerror)
        return None
    try:
        return Profile(msgspec.json.decode(raw, type=ClientProfile))
    except (msgspec.MsgspecError, SnapshotError) as exc:
        log.error("cached forwarding profile %s ignored: %s", path, exc)
        return None


class ProfileFollower:
    """Follows the control plane's profile for a signed-in session; ``on_profile(profile)`` gets each new one."""

    def __init__(self, directory: str, keeper: TokenKeeper, on_profile: Callable[[Profile], None]) -> None:
        self.directory = directory
        self.keeper = keeper
        self.on_profile = on_profile
        self.profile: Profile | None = None
        self.last_sync: float | None = None  # unix time of the last answer from the control plane
        self.error = ""  # why the last attempt failed ("" after a success)

    def start_cached(self) -> Profile | None:
        cached = load_cached(self.directory)
        if cached is not None:
            log.info("forwarding profile loaded from the cache", extra={"version": cached.version,
                                                                         "fail_mode": cached.fail_mode})
            self._take(cached)
        return cached

    def _take(self, profile: Profile) -> None:
        self.profile = profile
        self.on_profile(profile)

    async def run(self, stop: asyncio.Event) -> None:
        backoff = Backoff(RETRY_MIN, RETRY_MAX)
        down = False
        while not stop.is_set():
            after = -1 if self.profile is None else self.profile.version
            try:
                answer = await httpclient.request(
                    self.keeper.session.control, "GET", f"/v1/client/profile?after={after}&wait={WAIT:g}",
                    headers={"Authorization": f"Bearer {self.keeper.token}", "Accept": "application/json"},
                    timeout=WAIT + REQUEST_TIMEOUT, max_body=MAX_PROFILE, ssl_context=self.keeper.tls)
            except httpclient.HttpError as exc:
                self.error = f"cannot reach the control plane at {self.keeper.session.control}: {exc}"
                if not down:
                    down = True
                    log.warning("control plane unreachable; routing by forwarding profile version %s",
                                None if self.profile is None else self.profile.version, extra={"reason": str(exc)})
                await _sleep(stop, backoff.next())
                continue
            if down:
                down = False
                log.info("control plane reachable again", extra={"during": "forwarding profile"})
            if answer.status in (401, 403):
                self.error = f"the control plane refused the session ({answer.status}): {_reason(answer.body)}"
                log.error("forwarding profile not updated: %s; run `ferryman client login` again", self.error)
                await _sleep(stop, RETRY_MAX)
                continue
            if answer.status not in (200, 204):
                self.error = f"the control plane answered {answer.status}: {_reason(answer.body)}"
                log.warning("forwarding profile not updated", extra={"reason": self.error})
                await _sleep(stop, backoff.next())
                continue
            backoff.reset()
            self.error = ""
            self.last_sync = time.time()
            if answer.status == 204:
                continue
            try:
                profile = Profile(msgspec.json.decode(answer.body, type=ClientProfile))
            except (msgspec.MsgspecError, SnapshotError) as exc:
                self.error = f"unusable forwarding profile from the control plane: {exc}"
                log.error("%s; keeping version %s", self.error, after)
                await _sleep(stop, RETRY_MAX)
                continue
            previous = self.profile.version if self.profile is not None else None
            self._take(profile)
            try:
                await asyncio.to_thread(statefile.write_private, os.path.join(self.directory, PROFILE_FILE),
                                        answer.body)
            except statefile.StateFileError as exc:
                log.error("forwarding profile version %d not cached: %s", profile.version, exc)
            log.info("forwarding profile updated", extra={"version": profile.version, "previous": previous,
                                                          "applications": len(profile.data.applications),
                                                          "dns_suffixes": len(profile.suffixes),
                                                          "fail_mode": profile.fail_mode})


def _reason(body: bytes) -> str:
    try:
        data = msgspec.json.decode(body)
    except msgspec.MsgspecError:
        return body[:200].decode(errors="replace")
    if isinstance(data, dict):
        return str(data.get("error") or data.get("detail") or data)[:500]
    return str(data)[:500]


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
