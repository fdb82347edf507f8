"""Edge workers: several processes of one edge sharing its ports, under a supervisor.

With ``FERRYMAN_EDGE_WORKERS`` above 1 (0: one per core), ``ferryman edge`` runs a
``Supervisor`` and no edge of its own. The supervisor opens the edge's sockets itself, one
TCP listener and one UDP (QUIC) socket per worker, all on the FERRYMAN_EDGE_LISTEN port with
``SO_REUSEPORT``, in a fixed order, and hands worker N its two sockets. It keeps every socket
open for the life of the edge, so a worker that dies leaves the kernel's port group as it was:
the connections and datagrams the kernel steers to that worker wait in its socket until the
worker is started again, and no other worker's QUIC connections move. Which worker takes a new
TCP connection is the kernel's hash of its addresses, or with ``FERRYMAN_EDGE_WORKER_STEERING=cpu``
a classic BPF program attached to the group: the receiving CPU modulo the workers.

Each worker is a whole edge (``edge.node.Edge``) with the same certificate: it follows the
control plane itself (configuration, presence, traffic records), and is a peer of the other
workers for routing: a flow it decides for a connector whose tunnel landed on another worker
is relayed there over a Unix socket in a private directory (``edge.relay``: ``LocalTunnel``,
siblings). Workers learn what their siblings hold from the supervisor: each worker reports
its state (connectors held, tunnels, flows, ready) over a channel (a socket pair, frames of
``msgspec`` JSON), and the supervisor sends every worker its siblings whenever that changes.
The control plane sees one edge: each worker's heartbeat reports the connectors of all the
workers and their tunnels and flows added up, so the presence map names this edge for all of
them; only worker 0 renews the certificate, and the others reload it when told. Every worker
serves the HTTPS front door on its own socket of that port's SO_REUSEPORT group, with the
front door's keys shared (``web_keys``).

The supervisor serves the edge's one metrics endpoint (FERRYMAN_METRICS_ADDR): ``/metrics``
scrapes every worker over its channel and adds the samples up (``basics.metrics.
merge_exposition``; the counters a dead worker had reached are kept, so they never go back),
with per-worker gauges and the restarts; ``/ready`` while at least one worker is ready;
``/health`` while the supervisor runs. A worker that exits is started again after a backoff
(0.25 s doubling up to FERRYMAN_EDGE_WORKER_RESTART_MAX, reset after a minute of work),
counted and logged; only its flows are lost. SIGTERM is passed on to every worker, which drains
(``Edge._drain``); those not gone one second after FERRYMAN_DRAIN_GRACE are killed; then the
supervisor exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from typing import TYPE_CHECKING, Any, NamedTuple, Union

import msgspec

from ..basics import statefile
from ..basics.caps import HttpLimits, LogLimiter
from ..basics.hostport import parse_hostport
from ..basics.metrics import Stats, merge_exposition, start_metrics_server
from ..basics.settings import EdgeSettings
from ..contract.presence import PresenceConnector, PresenceEdge
from ..transport.udpio import udp_socket
from .relay import LocalTunnel

if TYPE_CHECKING:
    from .node import Edge

log = logging.getLogger("ferryman.edge.workers")

MAX_MESSAGE = 16 << 20  # bytes of one channel message (a worker's metrics)
SCRAPE_TIMEOUT = 5.0  # seconds a worker has to answer a scrape
STATE_INTERVAL = 1.0  # seconds between a worker's state reports (and at once when its connectors change)
RESTART_MIN = 0.25  # seconds before the first restart of a worker
STEADY = 60.0  # seconds of work after which a worker's death restarts the backoff
# Gauges every worker reports alike: the edge's value is theirs, not their sum.
SAME_IN_EVERY_WORKER = frozenset({"ferryman_build_info", "ferryman_config_version", "ferryman_edge_presence_edges"})


def worker_count(setting: int, cgroup_cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """FERRYMAN_EDGE_WORKERS: 0 means one per core this process may run on, and no more than its
    cgroup's CPU quota allows (a container limited to 4 CPUs on a 64-core host runs 4)."""
    if setting > 0:
        return setting
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        with open(cgroup_cpu_max) as fh:
            quota = cpu_quota(fh.read())
    except OSError:
        quota = None
    return max(1, min(cores, quota) if quota is not None else cores)


def cpu_quota(text: str) -> int | None:
    """The CPUs a cgroup v2 ``cpu.max`` ("QUOTA PERIOD", or "max PERIOD") allows, rounded up; None: no limit."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, -(-quota // period))


# ---------------------------------------------------------------------------- channel messages
class State(msgspec.Struct, tag="state"):
    """Worker -> supervisor: what it holds now."""

    connectors: list[PresenceConnector]
    clients: int = 0
    connector_tunnels: int = 0
    tunnels: int = 0
    flows: int = 0
    ready: bool = False


class Scrape(msgspec.Struct, tag="scrape"):
    """Supervisor -> worker: send your metrics."""

    id: int


class Scraped(msgspec.Struct, tag="scraped"):
    id: int
    metrics: str
    ready: bool


class Sibling(msgspec.Struct):
    index: int
    socket: str
    connectors: list[PresenceConnector] = []
    tunnels: int = 0
    flows: int = 0


class Siblings(msgspec.Struct, tag="siblings"):
    """Supervisor -> worker: the other workers running now."""

    siblings: list[Sibling]


class Renewed(msgspec.Struct, tag="renewed"):
    """Worker 0 -> supervisor: the certificate files were replaced."""


class Reload(msgspec.Struct, tag="reload"):
    """Supervisor -> the other workers: use the renewed certificate files."""


Message = Union[State, Scrape, Scraped, Siblings, Renewed, Reload]
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Message)


def frame(message: Any) -> bytes:
    body = _encoder.encode(message)
    return struct.pack("!I", len(body)) + body


async def read_message(reader: asyncio.StreamReader) -> Any:
    """The next message on a channel; None at its end. ``ValueError`` for one that cannot be read."""
    try:
        head = await reader.readexactly(4)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    (size,) = struct.unpack("!I", head)
    if size > MAX_MESSAGE:
        raise ValueError(f"worker channel message of {size} bytes (at most {MAX_MESSAGE})")
    try:
        body = await reader.readexactly(size)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    try:
        return _decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise ValueError(f"worker channel message cannot be read: {exc}") from None


# ---------------------------------------------------------------------------- pure parts
class RestartBackoff:
    """How long to wait before starting a dead worker again: ``RESTART_MIN`` after a death that
    ended ``STEADY`` seconds of work or more, doubling with each quicker death, at most ``maximum``."""

    def __init__(self, maximum: float) -> None:
        self.maximum = max(RESTART_MIN, maximum)
        self.delay = 0.0

    def died(self, lived: float) -> float:
        if lived >= STEADY or self.delay == 0.0:
            self.delay = RESTART_MIN
        else:
            self.delay = min(self.maximum, self.delay * 2)
        return self.delay


# classic BPF: A = the receiving CPU; A %= workers; return A (the index of the socket in the group)
_BPF_LD_W_ABS, _BPF_ALU_MOD_K, _BPF_RET_A = 0x20, 0x94, 0x16
_SKF_AD_CPU = (-0x1000 + 36) & 0xFFFFFFFF
SO_ATTACH_REUSEPORT_CBPF = 51


def cpu_steering_program(workers: int) -> list[tuple[int, int, int, int]]:
    """The classic BPF instructions (code, jt, jf, k) steering a connection to worker CPU % workers."""
    if workers < 1:
        raise ValueError("cpu steering needs at least one worker")
    return [(_BPF_LD_W_ABS, 0, 0, _SKF_AD_CPU), (_BPF_ALU_MOD_K, 0, 0, workers), (_BPF_RET_A, 0, 0, 0)]


def attach_cpu_steering(sock: socket.socket, workers: int) -> None:
    code = b"".join(struct.pack("HBBI", *ins) for ins in cpu_steering_program(workers))
    buf = ctypes.create_string_buffer(code)
    fprog = struct.pack("HL", len(code) // 8, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)  # the kernel copies the program


class Sockets(NamedTuple):
    """The edge's sockets, one of each kind per worker, in worker order."""

    tcp: list[socket.socket]  # tunnels over TLS/TCP
    udp: list[socket.socket]  # tunnels over QUIC (empty without QUIC)
    https: list[socket.socket]  # the HTTPS front door (empty without FERRYMAN_EDGE_HTTPS_LISTEN)
    port: int  # the tunnel port (FERRYMAN_EDGE_LISTEN may say 0)

    def all(self) -> list[socket.socket]:
        return [*self.tcp, *self.udp, *self.https]


def _listeners(setting: str, value: str, workers: int, steering: str) -> list[socket.socket]:
    """``workers`` TCP listeners on the address ``value`` of ``setting``, in one SO_REUSEPORT group."""
    host, port = parse_hostport(value, setting, allow_zero=True)
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    listeners: list[socket.socket] = []
    try:
        for _ in range(workers):
            try:
                sock = socket.create_server((host, port), family=family, backlog=1024, reuse_port=True)
            except OSError as exc:
                raise OSError(exc.errno, f"{setting}={value!r}: cannot listen: {exc.strerror}") from None
            listeners.append(sock)
            port = sock.getsockname()[1]
        if steering == "cpu":
            attach_cpu_steering(listeners[0], workers)
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners


def open_sockets(settings: EdgeSettings, workers: int) -> Sockets:
    """One TCP listener, (with QUIC) one UDP socket and (with the front door) one HTTPS listener
    per worker, each kind on its port with SO_REUSEPORT, in worker order."""
    host, port = parse_hostport(settings.edge_listen, "FERRYMAN_EDGE_LISTEN", allow_zero=True)
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    tcp = _listeners("FERRYMAN_EDGE_LISTEN", settings.edge_listen, workers, settings.edge_worker_steering)
    port = tcp[0].getsockname()[1]
    udp: list[socket.socket] = []
    https: list[socket.socket] = []
    try:
        if settings.edge_quic == "on":
            addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)[0][4]
            for _ in range(workers):
                try:
                    udp.append(udp_socket(family, bind=addr, reuse_port=True, buffer=settings.quic_socket_buffer))
                except OSError as exc:
                    raise OSError(exc.errno, f"FERRYMAN_EDGE_LISTEN={settings.edge_listen!r}: cannot bind UDP "
                                             f"port {port} for QUIC: {exc.strerror}") from None
        if settings.edge_https_listen:
            https = _listeners("FERRYMAN_EDGE_HTTPS_LISTEN", settings.edge_https_listen, workers,
                               settings.edge_worker_steering)
    except BaseException:
        for sock in [*tcp, *udp]:
            sock.close()
        raise
    return Sockets(tcp, udp, https, port)


def web_keys(settings: EdgeSettings, directory: str) -> dict[str, str]:
    """The front door's keys every worker must share, for an edge that leaves them to chance: a
    cookie sealed by one worker is opened by another, and backends see one assertion key. Made
    once per supervisor (random, as a single edge process makes them) and handed to the workers
    in their environment (cookie keys) and a 0600 file in the workers' private directory (the
    assertion key); keys the operator set are passed on as they are."""
    env: dict[str, str] = {}
    if not settings.edge_https_listen:
        return env
    from .web.assertion import AssertionSigner
    from .web.session import KeyRing

    if not settings.web_cookie_keys:
        env["FERRYMAN_WEB_COOKIE_KEYS"] = KeyRing.generate_text()
        log.warning("FERRYMAN_WEB_COOKIE_KEYS is not set: web sessions are sealed with a random key of this edge "
                    "(shared by its workers; sessions end when the edge restarts, and no other edge can open them)")
    if not settings.web_assertion_key:
        path = os.path.join(directory, "web-assertion-key.pem")
        statefile.write_private(path, AssertionSigner.generate().private_pem())
        env["FERRYMAN_WEB_ASSERTION_KEY"] = path
    return env


# ---------------------------------------------------------------------------- worker side
class WorkerSpec(msgspec.Struct):
    """What the supervisor hands a worker on its command line (``--worker-of``)."""

    index: int
    workers: int
    channel: int  # file descriptors inherited from the supervisor
    tcp: int
    udp: int  # -1: no QUIC
    directory: str  # where the workers' Unix sockets are
    https: int = -1  # the front door's listener; -1: none

    @staticmethod
    def parse(text: str) -> WorkerSpec:
        try:
            return msgspec.json.decode(text, type=WorkerSpec)
        except msgspec.DecodeError as exc:
            raise ValueError(f"--worker-of: {exc} (it is given by the edge's supervisor only)") from None

    def socket_path(self, index: int | None = None) -> str:
        return socket_path(self.directory, self.index if index is None else index)


def socket_path(directory: str, index: int) -> str:
    """The Unix socket worker ``index`` takes its siblings' relay tunnels on."""
    return os.path.join(directory, f"worker-{index}.sock")


def sibling_name(index: int) -> str:
    """How a worker is named among its siblings (a name no certificate can have)."""
    return f"worker {index}"


class WorkerLink:
    """A worker's side: its sockets, its channel to the supervisor, the Unix socket its siblings
    relay through, and what they hold (for heartbeats)."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.index = spec.index
        self.siblings: list[Sibling] = []
        self._writer: asyncio.StreamWriter | None = None
        self._edge: Edge | None = None
        self._server: asyncio.AbstractServer | None = None
        self._sent: State | None = None

    def listener(self) -> socket.socket:
        sock = socket.socket(fileno=self.spec.tcp)
        sock.setblocking(False)
        return sock

    def quic_socket(self) -> socket.socket | None:
        return socket.socket(fileno=self.spec.udp) if self.spec.udp >= 0 else None

    def https_socket(self) -> socket.socket | None:
        if self.spec.https < 0:
            return None
        sock = socket.socket(fileno=self.spec.https)
        sock.setblocking(False)
        return sock

    # ------------------------------------------------------------------ what the edge reports
    def connectors(self, own: list[PresenceConnector]) -> list[PresenceConnector]:
        """The connectors of the whole edge: this worker's and its siblings'."""
        held = {(c.name, c.group) for c in own}
        for sibling in self.siblings:
            held.update((c.name, c.group) for c in sibling.connectors)
        return [PresenceConnector(name=name, group=group) for name, group in sorted(held)]

    def totals(self) -> tuple[int, int]:
        """(tunnels, flows) of the siblings, as last reported."""
        return sum(s.tunnels for s in self.siblings), sum(s.flows for s in self.siblings)

    def state_changed(self) -> None:
        """This worker's connectors changed: tell the supervisor now."""
        self._send_state()

    def renewed(self) -> None:
        if self.index == 0:
            self._send(Renewed())

    # ------------------------------------------------------------------ running
    async def run(self, edge: Edge, stop: asyncio.Event) -> None:
        """Serve the siblings' Unix socket and the channel until ``stop`` (set when the channel
        ends: the supervisor is gone)."""
        self._edge = edge
        s = edge.settings
        identity = edge.relay.identity if edge.relay is not None else None
        assert identity is not None
        loop = asyncio.get_running_loop()
        path = self.spec.socket_path()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by this worker's previous life
        self._server = await loop.create_unix_server(
            lambda: LocalTunnel(identity, edge, edge.wire(), dialer=False, accept_roles=("edge",),
                                keepalive=s.keepalive_interval, handshake_timeout=s.handshake_timeout,
                                write_buffer_high=s.write_buffer_high, label="worker-in"), path)
        os.chmod(path, 0o600)
        reader, self._writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=self.spec.channel))
        reporting = loop.create_task(self._report_state())
        try:
            while True:
                try:
                    message = await read_message(reader)
                except ValueError as exc:
                    log.error("worker channel broken: %s", exc)
                    message = None
                if message is None:
                    if not stop.is_set():
                        log.error("the edge's supervisor is gone; worker %d stops", self.index)
                        stop.set()
                    return
                self._received(message)
        finally:
            reporting.cancel()
            self._server.close()
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _received(self, message: Any) -> None:
        edge = self._edge
        assert edge is not None
        if isinstance(message, Scrape):
            self._send(Scraped(id=message.id, metrics=edge.metrics_text(), ready=edge.ready()))
        elif isinstance(message, Siblings):
            before = self.connectors([])
            self.siblings = [s for s in message.siblings if s.index != self.index]
            if edge.relay is not None:
                edge.relay.set_siblings([PresenceEdge(name=sibling_name(s.index), address=s.socket,
                                                      connectors=s.connectors) for s in self.siblings])
            if self.connectors([]) != before and edge.link is not None:
                edge.link.presence_changed()
        elif isinstance(message, Reload):
            edge.reload_credentials()

    async def _report_state(self) -> None:
        while True:
            self._send_state(force=True)
            await asyncio.sleep(STATE_INTERVAL)

    def _send_state(self, force: bool = False) -> None:
        edge = self._edge
        if edge is None:
            return
        state = edge.worker_state()
        if (force or self._sent is None or state.connectors != self._sent.connectors) and self._send(state):
            self._sent = state

    def _send(self, message: Any) -> bool:
        """Whether ``message`` went to the supervisor (not before the channel is open, nor after it closed)."""
        if self._writer is None or self._writer.is_closing():
            return False
        self._writer.write(frame(message))
        return True


# ---------------------------------------------------------------------------- supervisor
class _Worker:
    """The supervisor's record of one worker slot."""

    def __init__(self, index: int, maximum: float) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.state: State | None = None  # None: not running, or not reported yet
        self.started = 0.0
        self.restarts = 0
        self.backoff = RestartBackoff(maximum)
        self.waiting: dict[int, asyncio.Future[Scraped]] = {}
        self.last_metrics = ""  # its last scrape (its counters are kept when it dies)


class Supervisor:
    """Starts ``workers`` edge workers running ``argv`` (the edge's own command line) and keeps
    them running (see the module doc)."""

    def __init__(self, settings: EdgeSettings, name: str, argv: list[str], workers: int) -> None:
        self.settings = settings
        self.name = name
        self.argv = argv
        self.workers = [_Worker(i, settings.edge_worker_restart_max) for i in range(workers)]
        self.stats = Stats("edge", name, LogLimiter(settings.log_limit, settings.log_limit_interval))
        self.retired = ""  # the counters of workers that died, as an exposition
        self._stopping = False
        self._stopped = asyncio.Event()  # set with _stopping: ends the wait before a restart
        self._figures_changed = False
        self._scrapes = 0
        self.directory = ""
        self.port = 0
        self.worker_env: dict[str, str] = {}  # what every worker gets on top of the supervisor's environment

    # ------------------------------------------------------------------ lifecycle
    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        try:
            sockets = open_sockets(s, len(self.workers))
            self.port = sockets.port
        except OSError as exc:
            log.error("edge cannot start: %s", exc.strerror or exc)
            raise SystemExit(2) from None
        try:
            self.directory = tempfile.mkdtemp(prefix="ferryman-edge-")  # 0700: only this user reaches the workers
        except OSError as exc:
            for sock in sockets.all():
                sock.close()
            log.error("edge cannot start: no private directory for its workers' sockets in %s (TMPDIR): %s",
                      tempfile.gettempdir(), exc.strerror or exc)
            raise SystemExit(2) from None
        metrics = None
        try:
            self.worker_env = web_keys(s, self.directory)
            if s.metrics_addr:
                metrics = await start_metrics_server(s.metrics_addr, self.stats, self.ready,
                                                     limits=HttpLimits.from_settings(s), render=self.render)
            log.info("edge supervisor starting workers", extra={
                "workers": len(self.workers), "port": self.port, "steering": s.edge_worker_steering,
                "transports": "tcp,quic" if sockets.udp else "tcp", "https": s.edge_https_listen or None})
            keepers = [asyncio.create_task(self._keep(w, sockets, w.index)) for w in self.workers]
            rounds = asyncio.create_task(self._rounds())
            await stop.wait()
            rounds.cancel()
            self._stopping = True
            self._stopped.set()
            log.info("edge supervisor stopping: SIGTERM to every worker", extra={"grace": s.drain_grace})
            for w in self.workers:
                if w.proc is not None and w.proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        w.proc.send_signal(signal.SIGTERM)
            _, pending = await asyncio.wait(keepers, timeout=s.drain_grace + 1.0)
            for w in self.workers:
                if w.proc is not None and w.proc.returncode is None:
                    log.warning("worker did not stop within FERRYMAN_DRAIN_GRACE: killed", extra={"worker": w.index})
                    with contextlib.suppress(ProcessLookupError):
                        w.proc.kill()
            if pending:
                await asyncio.wait(pending, timeout=5.0)
            for task in keepers:
                task.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)
        finally:
            if metrics is not None:
                metrics.close()
            for sock in sockets.all():
                sock.close()
            shutil.rmtree(self.directory, ignore_errors=True)
        log.info("edge supervisor stopped")

    async def _keep(self, w: _Worker, sockets: Sockets, index: int) -> None:
        """Run worker ``w`` on its sockets (``index`` of each kind), and start it again whenever it
        exits (until the edge stops)."""
        loop = asyncio.get_running_loop()
        tcp = sockets.tcp[index]
        udp = sockets.udp[index] if sockets.udp else None
        https = sockets.https[index] if sockets.https else None
        while not self._stopping:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            spec = WorkerSpec(index=w.index, workers=len(self.workers), channel=theirs.fileno(),
                              tcp=tcp.fileno(), udp=udp.fileno() if udp is not None else -1,
                              directory=self.directory, https=https.fileno() if https is not None else -1)
            fds = [theirs.fileno(), *(sock.fileno() for sock in (tcp, udp, https) if sock is not None)]
            try:
                w.proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "dataplane", *self.argv, "--worker-of",
                    msgspec.json.encode(spec).decode(), pass_fds=fds, stdin=subprocess.DEVNULL,
                    env={**os.environ, **self.worker_env},
                    start_new_session=True)  # a terminal's Ctrl-C reaches the supervisor, which tells them
            except OSError as exc:
                ours.close()
                theirs.close()
                log.error("worker cannot be started", extra={"worker": w.index, "reason": str(exc)})
                await self._pause(w.backoff.died(0.0))
                continue
            finally:
                theirs.close()
            w.started = loop.time()
            log.info("worker started", extra={"worker": w.index, "pid": w.proc.pid})
            reader, w.writer = await asyncio.open_unix_connection(sock=ours)
            listening = loop.create_task(self._listen(w, reader))
            code = await w.proc.wait()
            listening.cancel()
            await asyncio.gather(listening, return_exceptions=True)
            w.writer.close()
            w.writer = None
            self._retire(w)
            if self._stopping:
                log.info("worker stopped", extra={"worker": w.index, "code": code})
                return
            delay = w.backoff.died(loop.time() - w.started)
            w.restarts += 1
            log.warning("worker died; its flows are lost; restarting it", extra={
                "worker": w.index, "pid": w.proc.pid, "how": exit_text(code), "restarts": w.restarts, "delay": delay})
            await self._pause(delay)

    async def _pause(self, delay: float) -> None:
        """Wait ``delay`` seconds, or less if the edge stops meanwhile."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), delay)

    async def _rounds(self) -> None:
        """Every STATE_INTERVAL: the workers' changed tunnel and flow counts to the others."""
        while True:
            await asyncio.sleep(STATE_INTERVAL)
            if self._figures_changed:
                self._figures_changed = False
                self._broadcast()

    def _retire(self, w: _Worker) -> None:
        """Worker ``w`` exited: the siblings forget it; its counters stay in the edge's totals."""
        w.state = None
        for future in w.waiting.values():
            if not future.done():
                future.cancel()
        w.waiting.clear()
        if w.last_metrics:
            try:
                self.retired = counters_only(merge_exposition([self.retired, w.last_metrics]).decode())
            except ValueError as exc:
                log.error("the last metrics of worker %d cannot be kept: %s", w.index, exc)
            w.last_metrics = ""
        self._broadcast()

    async def _listen(self, w: _Worker, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                message = await read_message(reader)
            except ValueError as exc:
                log.error("worker channel broken", extra={"worker": w.index, "reason": str(exc)})
                return
            if message is None:
                return
            if isinstance(message, State):
                before = w.state
                w.state = message
                if before is None or before.connectors != message.connectors:
                    self._broadcast()  # at once: siblings relay by it
                elif (before.tunnels, before.flows) != (message.tunnels, message.flows):
                    self._figures_changed = True  # with the next round (heartbeats report the sums)
            elif isinstance(message, Scraped):
                future = w.waiting.pop(message.id, None)
                if future is not None and not future.done():
                    future.set_result(message)
            elif isinstance(message, Renewed):
                log.info("certificate renewed by worker %d: the others reload it", w.index)
                for other in self.workers:
                    if other is not w:
                        self._send(other, Reload())

    def _broadcast(self) -> None:
        """Every running worker learns the others: their Unix sockets and what they hold."""
        running = [Sibling(index=w.index, socket=socket_path(self.directory, w.index),
                           connectors=w.state.connectors, tunnels=w.state.tunnels, flows=w.state.flows)
                   for w in self.workers if w.state is not None]
        for w in self.workers:
            self._send(w, Siblings(siblings=[s for s in running if s.index != w.index]))

    @staticmethod
    def _send(w: _Worker, message: Any) -> None:
        if w.writer is not None and not w.writer.is_closing():
            w.writer.write(frame(message))

    # ------------------------------------------------------------------ the edge's one endpoint
    def ready(self) -> bool:
        """At least one worker takes tunnels with a configuration."""
        return any(w.state is not None and w.state.ready for w in self.workers)

    async def _scrape(self, w: _Worker) -> Scraped | None:
        if w.writer is None or w.state is None:
            return None
        self._scrapes += 1
        future: asyncio.Future[Scraped] = asyncio.get_running_loop().create_future()
        w.waiting[self._scrapes] = future
        self._send(w, Scrape(id=self._scrapes))
        try:
            return await asyncio.wait_for(future, SCRAPE_TIMEOUT)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            return None
        finally:
            w.waiting.pop(self._scrapes, None)

    async def render(self) -> bytes:
        """The workers' samples added up (and the counters of those that died), then the supervisor's own."""
        answers = await asyncio.gather(*(self._scrape(w) for w in self.workers))
        texts = []
        for w, answer in zip(self.workers, answers):
            if answer is not None:
                w.last_metrics = answer.metrics
                texts.append(answer.metrics)
        texts.append(self.retired)
        try:
            merged = merge_exposition(texts, SAME_IN_EVERY_WORKER)
        except ValueError as exc:
            log.error("worker metrics cannot be merged: %s", exc)
            merged = b""
        return merged + self.own_metrics().encode()

    def own_metrics(self) -> str:
        labels = f'role="edge",node="{self.name}"'
        lines = ["# HELP ferryman_edge_workers Worker processes the edge runs (FERRYMAN_EDGE_WORKERS)",
                 "# TYPE ferryman_edge_workers gauge", f"ferryman_edge_workers{{{labels}}} {len(self.workers)}"]
        per_worker = [
            ("ferryman_edge_worker_up", "gauge", "1 while the worker runs and reports", lambda w: w.state is not None),
            ("ferryman_edge_worker_restarts_total", "counter", "Times the worker died and was started again",
             lambda w: w.restarts),
            ("ferryman_edge_worker_clients", "gauge", "Client tunnels the worker holds",
             lambda w: w.state.clients if w.state else 0),
            ("ferryman_edge_worker_connector_tunnels", "gauge", "Connector tunnels the worker holds",
             lambda w: w.state.connector_tunnels if w.state else 0),
            ("ferryman_edge_worker_flows", "gauge", "Flows the worker splices",
             lambda w: w.state.flows if w.state else 0),
        ]
        for name, kind, doc, value in per_worker:
            lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
            lines += [f'{name}{{{labels},worker="{w.index}"}} {float(value(w))}' for w in self.workers]
        return "\n".join(lines) + "\n"


def exit_text(code: int) -> str:
    """How a process ended, from its return code (negative: the signal that killed it)."""
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"


def counters_only(text: str) -> str:
    """The counter families of an exposition (what a dead worker leaves to the edge's totals)."""
    keep: list[str] = []
    counting = False
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            counting = line.rsplit(" ", 1)[-1] == "counter"
        if counting:
            keep.append(line)
    return "\n".join(keep) + "\n" if keep else ""


def worker_argv(argv: list[str]) -> list[str]:
    """The edge's command line for its workers: ``--workers N`` dropped (a worker is one)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers="):
            continue
        out.append(arg)
    return out

