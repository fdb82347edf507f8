"""A registered node's link to the control plane: configuration, heartbeats, certificate renewal.

An edge or a connector registered with ``ferryman ROLE register`` runs a ``ControlLink``:

- **configuration**: at start the last snapshot is read from the on-disk cache (so the
  node forwards at once, with the control plane up or not); then ``GET /v1/node/config``
  long-polls for newer versions. Each new snapshot is saved to the cache first and then
  handed to the node (``on_snapshot``). A change made in the control plane reaches the
  node in well under two seconds (the control plane publishes within half a second and
  answers the waiting request at once).
- **heartbeats**: ``POST /v1/node/heartbeat`` every ``FERRYMAN_HEARTBEAT_INTERVAL``
  seconds with what ``report()`` returns (version, addresses, tunnels, active flows) and
  the configuration version held; an edge adds how many traffic records its queue dropped
  since the last heartbeat the control plane took (``records_dropped``).
- **traffic logs** (edges): the records queued by the node are sent in batches to
  ``POST /v1/node/traffic`` (every second, or at once while a full batch is waiting).
- **renewal**: once less than ``FERRYMAN_RENEW_AT`` of the certificate's lifetime is
  left, a new key and CSR go to ``POST /v1/node/renew``; the new certificate, key and CA
  replace the old files (the old ones stay until all three are written) and ``node.json``
  is updated; ``on_renewed`` lets the node use them for new tunnels. Existing tunnels keep
  running on the old certificate, which stays valid until it expires.

When the control plane cannot be reached the node keeps running on what it has and
retries with exponential backoff (at most ``RETRY_MAX`` seconds apart), logging the outage
once and the recovery once. A refusal (401/403: a revoked or unknown certificate) is
logged as an error with the control plane's message, and retried more slowly.

Requests are asyncio HTTP/1.1 calls (``controllink.http``), so stopping the node
cancels a waiting long-poll at once; each is authenticated by a one-use token signed with
the node's key (``contract.nodeauth``, ``controllink.signer``).
"""

from __future__ import annotations

import asyncio
import datetime
import http.client
import json
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import msgspec

from ..basics import pki
from ..basics.pki import new_key_and_csr, write_node_files
from ..basics.settings import ConnectorSettings, EdgeSettings
from ..basics.version import VERSION
from ..contract import presence as presence_map
from ..contract.presence import Presence, PresenceConnector
from ..contract.snapshot import ConfigSnapshot, SnapshotError, decode
from ..transport.supervisor import Backoff
from ..transport.tunnel import Tunnel
from ..basics.controltls import insecure_warning
from . import http as httpclient
from . import trust
from .registration import Registration, control_base, update_record
from .renewal import renewal_due
from .signer import NodeSigner
from .snapshot_cache import SnapshotCache
from .traffic import TrafficQueue

log = logging.getLogger("ferryman.control_link")

CACHE_FILE = "config.json"  # next to node.json
MAX_RESPONSE = 64 * 1024 * 1024  # bytes; a snapshot with every application at its segment limit fits
REQUEST_TIMEOUT = 30.0  # seconds, on top of a long-poll's wait
RETRY_MIN = 0.5
RETRY_MAX = 10.0  # seconds between attempts while the control plane is down
REFUSED_RETRY = 60.0  # seconds between attempts while the control plane refuses this node
RENEW_CHECK = 600.0  # seconds between checks whether the certificate is due for renewal
MAX_DROPPED_REPORT = 2**31 - 1  # traffic records dropped reported in one heartbeat (the rest in the next)
LARGE_BODY = 64 * 1024  # a request body hashed for its token in a worker thread (SHA-256 lets go of the GIL)
TRAFFIC_INTERVAL = 1.0  # seconds between traffic-log batches while the queue has less than a batch
LAST_TRAFFIC_TIMEOUT = 3.0  # seconds a stopping node spends sending the traffic records still queued


class ControlError(Exception):
    """A request to the control plane failed; ``status`` is 0 when no HTTP answer came."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status

    @property
    def refused(self) -> bool:
        return self.status in (401, 403)


class Report(msgspec.Struct):
    """What a node says in its heartbeat (an edge: also the connectors it holds tunnels to)."""

    tunnels: int
    active_flows: int
    addresses: list[str] = []
    connectors: list[PresenceConnector] | None = None


class _Renewed(msgspec.Struct):
    certificate_pem: str
    ca_pem: str
    serial: str
    not_after: str


def cut_revoked(tunnels: Iterable[Tunnel], revoked: frozenset[int], node: str) -> int:
    """End every tunnel whose peer certificate is in ``revoked``; return how many."""
    cut = 0
    for tunnel in list(tunnels):
        peer = tunnel.peer_certificate
        if peer is None or tunnel.closed or peer.serial not in revoked:
            continue
        log.warning("tunnel cut: peer certificate revoked", extra={"tunnel": tunnel.label, "peer": peer.name,
                                                                    "serial": format(peer.serial, "x")})
        tunnel.terminate("certificate_revoked", f"{node}: the certificate {peer.serial:x} of {peer.role} "
                                                f"{peer.name!r} was revoked")
        cut += 1
    return cut


class ControlClient:
    """Calls to the control plane's node routes (asyncio, h11), each with a fresh node token."""

    def __init__(self, base: str, signer: NodeSigner, tls: ssl.SSLContext | None = None) -> None:
        """``tls``: the context verifying the control plane (``trust.context_for``); None: plain HTTP."""
        self.base = base.rstrip("/")
        self.signer = signer
        self.tls = tls

    async def call(self, method: str, target: str, body: Any = None,
                   timeout: float = REQUEST_TIMEOUT, *, encoded: bytes | None = None) -> tuple[int, bytes]:
        """(status, body) of a 2xx answer; ``ControlError`` for network failures and 4xx/5xx answers.
        ``body`` is sent as JSON, or ``encoded`` as it is."""
        data = encoded if encoded is not None else None if body is None else msgspec.json.encode(body)
        if data is not None and len(data) > LARGE_BODY:  # hashing megabytes would hold up the event loop
            token = await asyncio.to_thread(self.signer.token, method, target, data)
        else:
            token = self.signer.token(method, target, data or b"")
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            answer = await httpclient.request(self.base, method, target, headers=headers, body=data, timeout=timeout,
                                              max_body=MAX_RESPONSE, user_agent=f"ferryman/{VERSION}",
                                              ssl_context=self.tls)
        except httpclient.HttpError as exc:
            raise ControlError(f"cannot reach the control plane at {self.base}: {exc}") from None
        if answer.status >= 300:
            raise ControlError(f"{method} {target}: {_message(answer.status, answer.body)}", answer.status)
        return answer.status, answer.body


def _message(status: int, payload: bytes) -> str:
    try:
        body = json.loads(payload)
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            return f"HTTP {status}: {body['error']}"
    except ValueError:
        pass
    return f"HTTP {status} {http.client.responses.get(status, '')}".rstrip()


class ControlLink:
    """Keeps one registered node in step with the control plane (see the module doc).

    ``on_snapshot(snapshot)`` is called on the event loop with each newer snapshot (first
    the cached one, if any); ``report()`` gives the heartbeat's figures; ``on_renewed()``
    is called after the certificate files were replaced.
    """

    def __init__(self, settings: EdgeSettings | ConnectorSettings, registration: Registration,
                 on_snapshot: Callable[[ConfigSnapshot], None], report: Callable[[], Report],
                 on_renewed: Callable[[], None] | None = None, *, traffic: TrafficQueue | None = None,
                 on_presence: Callable[[Presence], None] | None = None, renews: bool = True) -> None:
        self.settings = settings
        self.renews = renews  # False: another process of this node renews the certificate (an edge worker)
        self.registration = registration
        self.base = control_base(settings.control_url or registration.record.control)
        self.signer = NodeSigner(registration.cert, registration.key)
        tls = trust.context_for(self.base, registration.directory, registration.record.control_ca,
                                ca_file=settings.control_ca, insecure=bool(settings.control_insecure_http))
        if tls is None:
            log.warning(insecure_warning(f"calls to the control plane at {self.base} use"))
        self.client = ControlClient(self.base, self.signer, tls)
        self.cache = SnapshotCache(os.path.join(registration.directory, CACHE_FILE))
        self.on_snapshot = on_snapshot
        self.report = report
        self.on_renewed = on_renewed
        self.traffic = traffic
        self.on_presence = on_presence
        self.presence: Presence | None = None
        self._report_soon = asyncio.Event()  # the node's presence changed: heartbeat early (rate-limited)
        self.snapshot: ConfigSnapshot | None = None
        self.last_heartbeat: float | None = None  # loop time of the last accepted heartbeat
        self._down: set[str] = set()  # which loops currently see the control plane unreachable
        self._outages = 0  # outages begun so far: a call started before the current one began proves nothing
        self._unusable = -1  # the newest version this node could not apply (not asked for again)

    @property
    def version(self) -> int | None:
        return None if self.snapshot is None else self.snapshot.version

    # ------------------------------------------------------------------ lifecycle
    def load_cached(self) -> ConfigSnapshot | None:
        """Start from the cached snapshot, if there is a readable one (a corrupt one is logged and ignored)."""
        try:
            cached = self.cache.load()
        except SnapshotError as exc:
            log.error("%s; waiting for the control plane", exc)
            return None
        if cached is not None:
            log.info("configuration loaded from the cache", extra={"version": cached.version,
                                                                  "issued_at": cached.issued_at,
                                                                  "path": str(self.cache.path)})
            self._apply(cached)
        return cached

    async def run(self, stop: asyncio.Event) -> None:
        """Follow configuration, send heartbeats and renew the certificate until ``stop`` is set;
        then send the traffic records still queued (for at most ``LAST_TRAFFIC_TIMEOUT`` seconds:
        the records of the flows that ended last are not lost to a restart)."""
        loops = [self._follow, self._heartbeats, *([self._renewals] if self.renews else [])]
        if self.traffic is not None:
            loops.append(self._ship_traffic)
        if self.on_presence is not None:
            loops.append(self._follow_presence)
        tasks = [asyncio.create_task(self._guarded(loop)) for loop in loops]
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in [stopping, *tasks]:
                task.cancel()
            await asyncio.gather(stopping, *tasks, return_exceptions=True)
        await self._last_traffic()

    async def _last_traffic(self) -> None:
        queue = self.traffic
        if queue is None or not len(queue):
            return
        batch: list[Any] = []
        try:
            async with asyncio.timeout(LAST_TRAFFIC_TIMEOUT):
                while True:
                    batch, body = queue.take_batch()
                    if not batch:
                        break
                    await self.client.call("POST", "/v1/node/traffic", timeout=LAST_TRAFFIC_TIMEOUT, encoded=body)
                    queue.shipped += len(batch)
                    batch = []
        except (ControlError, TimeoutError) as exc:
            log.warning("traffic records not sent before stopping: %s", exc or "no answer in time",
                        extra={"records": len(batch) + len(queue)})

    @staticmethod
    async def _guarded(loop: Callable[[], Awaitable[None]]) -> None:
        """Run one of the link's loops; an unexpected error is logged and the loop started again
        (a node must not silently lose its heartbeats, configuration or renewal)."""
        while True:
            try:
                await loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("control link task %s failed; restarting it in %gs", loop.__name__, RETRY_MAX)
                await asyncio.sleep(RETRY_MAX)

    def _apply(self, snapshot: ConfigSnapshot) -> bool:
        """Hand ``snapshot`` to the node; whether it took it (a refusal is logged, the old one stays)."""
        try:
            self.on_snapshot(snapshot)
        except SnapshotError as exc:  # e.g. segments this node version cannot parse: keep the old one
            log.error("configuration version %d not applied: %s", snapshot.version, exc)
            return False
        self.snapshot = snapshot
        return True

    # ------------------------------------------------------------------ outages
    def _failed(self, what: str, exc: ControlError) -> float:
        """Log a failed call (an outage once, however many loops see it); the delay before the next try."""
        if 400 <= exc.status < 500:
            log.error("the control plane refused this node's %s: %s", what, exc)
            return REFUSED_RETRY
        first = not self._down
        self._down.add(what)
        if first:
            self._outages += 1
            log.warning("control plane unreachable; running on configuration version %s", self.version,
                        extra={"reason": str(exc), "during": what})
        return 0.0

    def _succeeded(self, what: str, outages: int) -> None:
        """Log the end of an outage once, at the first call that goes through again (whichever loop
        makes it: the others may still be waiting out their backoff). ``outages``: the count when
        the call started; a call already under way when the outage began (answered while the
        control plane was shutting down) does not end it."""
        if self._down and outages == self._outages:
            self._down.clear()
            log.info("control plane reachable again", extra={"during": what, "version": self.version})

    # ------------------------------------------------------------------ configuration
    async def _follow(self) -> None:
        backoff = Backoff(RETRY_MIN, RETRY_MAX)
        wait = self.settings.config_wait
        while True:
            after = max(-1 if self.snapshot is None else self.snapshot.version, self._unusable)
            target = f"/v1/node/config?after={after}&wait={wait:g}"
            outages = self._outages
            try:
                status, payload = await self.client.call("GET", target, None, wait + REQUEST_TIMEOUT)
            except ControlError as exc:
                slow = self._failed("configuration", exc)
                await asyncio.sleep(slow or backoff.next())
                continue
            self._succeeded("configuration", outages)
            backoff.reset()
            if status == 204:
                continue
            await self._received(payload)

    async def _received(self, payload: bytes) -> None:
        if len(payload) > MAX_RESPONSE:
            log.error("configuration from the control plane is larger than %d bytes; ignored", MAX_RESPONSE)
            await asyncio.sleep(RETRY_MAX)
            return
        try:
            snapshot = decode(payload)
        except SnapshotError as exc:
            log.error("configuration from the control plane ignored: %s", exc)
            await asyncio.sleep(RETRY_MAX)
            return
        previous = self.version
        restored = previous is not None and snapshot.version < previous
        if previous is not None and snapshot.version == previous:
            return
        if restored:
            log.warning("the control plane's configuration version %d is below this node's %d (its database was "
                        "restored?): taking it", snapshot.version, previous)
        if not self._apply(snapshot):
            self._unusable = snapshot.version  # wait for a newer version instead of fetching this one again
            await asyncio.sleep(RETRY_MAX)
            return
        self._unusable = -1
        try:  # cached only once applied: the cache always holds a configuration this node can run
            await asyncio.to_thread(self.cache.save, snapshot, restored)
        except SnapshotError as exc:  # still use it: forwarding matters more than the cache
            log.error("%s; configuration version %d used without a cached copy", exc, snapshot.version)
        log.info("configuration updated", extra={"version": snapshot.version, "previous": previous,
                                                 "applications": len(snapshot.applications),
                                                 "revoked": len(snapshot.revoked_serials)})

    # ------------------------------------------------------------------ heartbeats
    def presence_changed(self) -> None:
        """The node's presence (the connectors it holds) changed: report it with an early heartbeat,
        at most one per FERRYMAN_PRESENCE_INTERVAL seconds (a flapping tunnel costs one request per
        interval, and never a configuration version)."""
        self._report_soon.set()

    async def _heartbeats(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.settings.heartbeat_interval
        spacing = getattr(self.settings, "presence_interval", interval)
        reported = 0  # the queue's drop count the control plane has taken
        while True:
            self._report_soon.clear()
            figures = self.report()
            body: dict[str, Any] = {"version": VERSION[:64], "addresses": figures.addresses[:16],
                                    "tunnels": figures.tunnels, "active_flows": figures.active_flows,
                                    "config_version": self.version}
            if figures.connectors is not None:
                body["connectors"] = figures.connectors[:presence_map.MAX_CONNECTORS]
            dropped = self.traffic.dropped if self.traffic is not None else 0
            if self.traffic is not None:  # since the last heartbeat that got through (sent again until one does)
                body["records_dropped"] = min(dropped - reported, MAX_DROPPED_REPORT)
            outages = self._outages
            try:
                await self.client.call("POST", "/v1/node/heartbeat", body)
            except ControlError as exc:
                self._failed("heartbeat", exc)
            else:
                self._succeeded("heartbeat", outages)
                self.last_heartbeat = loop.time()
                reported = min(dropped, reported + MAX_DROPPED_REPORT)
            sent = loop.time()
            try:
                # (not wait_for: on Python 3.11 it swallows a cancellation that arrives as the event is set)
                async with asyncio.timeout(interval):
                    await self._report_soon.wait()
            except TimeoutError:
                continue
            await asyncio.sleep(max(0.0, sent + min(spacing, interval) - loop.time()))

    # ------------------------------------------------------------------ presence (edges)
    async def _follow_presence(self) -> None:
        """Follow the presence map (which edge holds which connectors) with its own long-poll."""
        assert self.on_presence is not None
        backoff = Backoff(RETRY_MIN, RETRY_MAX)
        wait = self.settings.config_wait
        while True:
            tag = self.presence.tag if self.presence is not None else ""
            outages = self._outages
            try:
                status, payload = await self.client.call("GET", f"/v1/node/presence?after={tag}&wait={wait:g}", None,
                                                         wait + REQUEST_TIMEOUT)
            except ControlError as exc:
                slow = self._failed("presence", exc)
                await asyncio.sleep(slow or backoff.next())
                continue
            self._succeeded("presence", outages)
            backoff.reset()
            if status == 204:
                continue
            try:
                current = presence_map.decode(payload)
            except ValueError as exc:
                log.error("%s", exc)
                await asyncio.sleep(RETRY_MAX)
                continue
            self.presence = current
            self.on_presence(current)

    # ------------------------------------------------------------------ traffic logs
    async def _ship_traffic(self) -> None:
        """Send queued traffic records in batches; an unsent batch goes back to the front of the queue."""
        queue = self.traffic
        assert queue is not None
        backoff = Backoff(RETRY_MIN, RETRY_MAX)
        while True:
            batch, body = queue.take_batch()
            if not batch:
                await asyncio.sleep(TRAFFIC_INTERVAL)
                continue
            more = len(queue) > 0  # a full batch, or one cut to fit a request: the next goes at once
            outages = self._outages
            try:
                await self.client.call("POST", "/v1/node/traffic", encoded=body)
            except ControlError as exc:
                queue.give_back(batch)
                slow = self._failed("traffic logs", exc)
                await asyncio.sleep(slow or backoff.next())
                continue
            self._succeeded("traffic logs", outages)
            backoff.reset()
            queue.shipped += len(batch)
            if not more:
                await asyncio.sleep(TRAFFIC_INTERVAL)

    # ------------------------------------------------------------------ renewal
    async def _renewals(self) -> None:
        backoff = Backoff(RETRY_MIN * 10, RENEW_CHECK)
        while True:
            delay = RENEW_CHECK
            try:
                due = renewal_due(self.registration.cert, datetime.datetime.now(datetime.timezone.utc),
                                  self.settings.renew_at)
            except (pki.PkiError, ValueError) as exc:
                log.error("cannot check the certificate for renewal: %s", exc)
                due = False
            if due:
                try:
                    await self.renew()
                    backoff.reset()
                except ControlError as exc:  # retried on its own schedule; not an outage of the other loops
                    delay = REFUSED_RETRY if 400 <= exc.status < 500 else backoff.next()
                    log.error("certificate renewal failed: %s; next attempt in %.0fs", exc, delay)
                except pki.PkiError as exc:
                    log.error("certificate renewal failed: %s", exc)
                    delay = backoff.next()
            await asyncio.sleep(delay)

    async def renew(self) -> Registration:
        """Renew the certificate now: new key, CSR, new files, updated node.json; then ``on_renewed``."""
        record = self.registration.record
        key_pem, csr_pem = new_key_and_csr(record.name)
        _, payload = await self.client.call("POST", "/v1/node/renew", {"csr_pem": csr_pem.decode()})
        try:
            answer = msgspec.json.decode(payload, type=_Renewed)
        except msgspec.MsgspecError as exc:
            raise ControlError(f"the control plane's renewal answer is not a certificate ({exc})") from None
        await asyncio.to_thread(write_node_files, self.registration.directory, record.name, key_pem,
                                answer.certificate_pem.encode(), answer.ca_pem.encode())
        self.registration = await asyncio.to_thread(update_record, self.registration, serial=answer.serial,
                                                not_after=answer.not_after)
        self.signer.reload()
        log.info("certificate renewed", extra={"serial": answer.serial, "not_after": answer.not_after})
        if self.on_renewed is not None:
            self.on_renewed()
        return self.registration
