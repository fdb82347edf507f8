"""Hot-path counters and the Prometheus metrics and health endpoints of every node.

- ``Stats``: plain attributes that nodes bump on the hot path (no locks, no
  prometheus_client calls per frame); ``StatsCollector`` turns them into ``ferryman_*``
  metric families only when scraped, in a per-node ``CollectorRegistry``.
- ``start_metrics_server``: a tiny HTTP/1.1 server for ``/metrics``, ``/ready`` and
  ``/health`` (``FERRYMAN_METRICS_ADDR``), one request per connection, held to
  ``caps.HttpLimits`` (connections in all and waiting per source; the whole request head
  within ``idle_timeout`` and the request timeout, whichever is shorter).
- ``merge_exposition``: the samples of several processes of one node (an edge's workers)
  as one exposition: equal series summed (or the largest kept, for gauges that every
  process reports alike).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .caps import ConnectionGate, HttpLimits, LogLimiter
from .hostport import parse_hostport
from .version import VERSION

__all__ = ["Stats", "StatsCollector", "make_registry", "start_metrics_server", "MAX_REQUEST_HEAD", "IDLE_TIMEOUT",
           "merge_exposition", "exposition"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- Stats
class Stats:
    """Counters and gauges of one node. Increment the attributes directly on the hot path."""

    __slots__ = ("role", "node", "tunnels_up", "tunnels_opened", "tunnels_closed", "reconnects",
                 "flows_active", "flows_opened", "flows_closed", "bytes_rx", "bytes_tx",
                 "open_failures", "protocol_errors", "rtt", "extra", "datagrams_rx", "datagrams_tx",
                 "datagrams_dropped", "transports", "transport_fallbacks",
                 "dial_refused", "handler_errors", "read_pauses", "log_limit", "relayed", "extra_counters")

    def __init__(self, role: str, node: str, log_limit: LogLimiter | None = None) -> None:
        self.role = role
        self.node = node
        self.tunnels_up = 0                          # gauge: tunnels currently established
        self.tunnels_opened = 0
        self.tunnels_closed: dict[str, int] = {}     # reason -> count
        self.reconnects = 0
        self.flows_active = 0                        # gauge
        self.flows_opened = 0
        self.flows_closed: dict[str, int] = {}       # reason -> count
        self.bytes_rx = 0                            # payload bytes received from tunnels
        self.bytes_tx = 0                            # payload bytes sent into tunnels
        self.open_failures: dict[str, int] = {}      # reason -> count
        self.protocol_errors: dict[str, int] = {}    # code -> count
        self.rtt: dict[str, float] = {}              # tunnel label -> last RTT (seconds)
        self.datagrams_rx = 0                        # UDP flow datagrams received from tunnels
        self.datagrams_tx = 0                        # ... and sent into tunnels
        self.datagrams_dropped: dict[str, int] = {}  # reason -> count (never queued without bound)
        self.transports: dict[str, int] = {}         # gauge: tunnels up by transport (quic, tcp)
        self.transport_fallbacks: dict[str, int] = {}  # to transport -> count (auto: QUIC failed)
        self.dial_refused: dict[str, int] = {}       # connector: rule -> resolved addresses not dialed
        self.relayed: dict[str, int] = {}            # edge: direction (out / in) -> flows relayed between edges
        # log lines about refusals, rate-limited per peer or source (its ``suppressed`` is a counter here)
        self.log_limit = log_limit or LogLimiter()
        self.handler_errors: dict[str, int] = {}     # wire event -> unexpected exceptions handling it
        self.read_pauses = 0                         # tunnels not read while their peer did not read
        # metric name -> (help, fn): node-specific gauges read at scrape time
        self.extra: dict[str, tuple[str, Callable[[], float]]] = {}
        # metric name -> (help, label, fn): node-specific counters by one label, read at scrape time
        self.extra_counters: dict[str, tuple[str, str, Callable[[], Mapping[str, int]]]] = {}

    def count(self, table: dict[str, int], key: str, n: int = 1) -> None:
        """Add ``n`` to ``table[key]`` (a by-reason counter of this Stats)."""
        table[key] = table.get(key, 0) + n


class StatsCollector(Collector):
    """Reads a ``Stats`` at scrape time; every sample carries ``role`` and ``node`` labels."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        base = [s.role, s.node]
        names = ["role", "node"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(base, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=names)
            c.add_metric(base, value)
            return c

        def by(name: str, doc: str, label: str, table: dict[str, int]) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=[*names, label])
            for key, value in sorted(table.items()):
                c.add_metric([*base, key], value)
            return c

        info = GaugeMetricFamily("ferryman_build_info", "Ferryman build; value is always 1",
                                 labels=[*names, "version"])
        info.add_metric([*base, VERSION], 1.0)
        yield info
        yield gauge("ferryman_tunnels", "Tunnels currently established", s.tunnels_up)
        yield counter("ferryman_tunnels_opened_total", "Tunnels established", s.tunnels_opened)
        yield by("ferryman_tunnels_closed_total", "Tunnels closed, by reason", "reason", s.tunnels_closed)
        yield counter("ferryman_reconnects_total", "Tunnel dial attempts after a loss", s.reconnects)
        yield gauge("ferryman_flows", "Flows currently open", s.flows_active)
        yield counter("ferryman_flows_opened_total", "Flows opened", s.flows_opened)
        yield by("ferryman_flows_closed_total", "Flows closed, by reason", "reason", s.flows_closed)
        b = CounterMetricFamily("ferryman_bytes_total", "Flow payload bytes through tunnels",
                                labels=[*names, "direction"])
        b.add_metric([*base, "rx"], s.bytes_rx)
        b.add_metric([*base, "tx"], s.bytes_tx)
        yield b
        d = CounterMetricFamily("ferryman_datagrams_total", "UDP flow datagrams through tunnels",
                                labels=[*names, "direction"])
        d.add_metric([*base, "rx"], s.datagrams_rx)
        d.add_metric([*base, "tx"], s.datagrams_tx)
        yield d
        yield by("ferryman_datagrams_dropped_total", "UDP flow datagrams dropped, by reason", "reason",
                 s.datagrams_dropped)
        t = GaugeMetricFamily("ferryman_tunnels_by_transport", "Tunnels currently established, by transport",
                              labels=[*names, "transport"])
        for kind, count in sorted(s.transports.items()):
            t.add_metric([*base, kind], count)
        yield t
        yield by("ferryman_transport_fallbacks_total", "QUIC dials that failed and fell back, by the transport used",
                 "transport", s.transport_fallbacks)
        yield by("ferryman_open_failures_total", "Flow opens that failed, by reason", "reason", s.open_failures)
        yield by("ferryman_protocol_errors_total", "Protocol errors, by code", "code", s.protocol_errors)
        yield counter("ferryman_log_lines_suppressed_total",
                      "Log lines about refusals dropped by the per-peer limit (FERRYMAN_LOG_LIMIT)",
                      s.log_limit.suppressed)
        yield by("ferryman_handler_errors_total", "Unexpected errors handling one flow's event (that flow was "
                 "reset, its tunnel kept), by event", "event", s.handler_errors)
        yield counter("ferryman_tunnel_read_pauses_total", "Times a tunnel stopped reading its peer because the "
                      "peer did not read what was sent to it (write buffer above FERRYMAN_WRITE_BUFFER_HIGH)",
                      s.read_pauses)
        yield by("ferryman_relayed_flows_total", "Flows relayed between edges, by direction (out: decided here and "
                 "carried by a peer edge to its connector; in: carried here for the peer edge that decided it)",
                 "direction", s.relayed)
        yield by("ferryman_dial_refused_total", "Addresses a connector resolved but did not dial, by rule", "rule",
                 s.dial_refused)
        rtt = GaugeMetricFamily("ferryman_tunnel_rtt_seconds", "Last measured tunnel round-trip time",
                                labels=[*names, "tunnel"])
        for label, seconds in sorted(s.rtt.items()):
            rtt.add_metric([*base, label], seconds)
        yield rtt
        for name, (doc, fn) in list(s.extra.items()):
            try:
                value = float(fn())
            except Exception:  # one broken gauge must not break the whole scrape
                log.exception("metric callback failed", extra={"metric": name})
                continue
            yield gauge(name, doc, value)
        for name, (doc, label, table_fn) in list(s.extra_counters.items()):
            try:
                table = dict(table_fn())
            except Exception:  # one broken counter must not break the whole scrape
                log.exception("metric callback failed", extra={"metric": name})
                continue
            yield by(name, doc, label, table)


def make_registry(stats: Stats) -> CollectorRegistry:
    """A fresh registry (never the global one) that exposes ``stats``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(stats))
    return registry


# ---------------------------------------------------------------------------- HTTP
def exposition(stats: Stats) -> str:
    """``stats`` in the Prometheus text format."""
    return generate_latest(make_registry(stats)).decode()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def merge_exposition(texts: Iterable[str], keep_max: frozenset[str] = frozenset()) -> bytes:
    """Prometheus text expositions of several processes as one: the samples of each series (name
    and labels) summed over the processes, or for the families named in ``keep_max`` the largest
    kept (a value every process reports alike, such as a configuration version). Families keep
    the order of their first appearance; ``ValueError`` if a text cannot be parsed."""
    families: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            doc, kind, samples = families.setdefault(family.name, (family.documentation, family.type, {}))
            largest = family.name in keep_max
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                old = samples.get(key)
                samples[key] = sample.value if old is None else (max(old, sample.value) if largest
                                                                  else old + sample.value)
    lines: list[str] = []
    for name, (doc, kind, samples) in families.items():
        shown = f"{name}_total" if kind == "counter" and any(k[0].endswith("_total") for k in samples) else name
        lines.append(f"# HELP {shown} {doc.replace(chr(92), chr(92) * 2).replace(chr(10), chr(92) + 'n')}")
        lines.append(f"# TYPE {shown} {kind}")
        for (sample, labels), value in samples.items():
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(f"{sample}{{{text}}} {floatToGoString(value)}" if text else
                         f"{sample} {floatToGoString(value)}")
    return ("\n".join(lines) + "\n").encode() if lines else b""


MAX_REQUEST_HEAD = 8192  # bytes of request line + headers
IDLE_TIMEOUT = 5.0       # seconds a client has for its whole request head (and for reading the answer)

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}


Ready = Callable[[], "bool | Awaitable[bool]"]


async def start_metrics_server(addr: str, stats: Stats, ready: Ready, *,
                               idle_timeout: float = IDLE_TIMEOUT,
                               limits: HttpLimits | None = None,
                               render: Callable[[], Awaitable[bytes]] | None = None) -> asyncio.base_events.Server:
    """Serve ``/metrics``, ``/ready`` and ``/health`` on ``addr`` (HOST:PORT, port 0 allowed).

    ``/metrics`` answers what ``render()`` gives (default: ``stats`` in the text format);
    ``ready()`` may be a coroutine function.

    ``limits``: connections in all and per source waiting for their request (beyond either, 503
    and close, logged at most ``stats.log_limit`` lines per source); the request head must be
    complete within ``idle_timeout`` or ``limits.request_timeout`` (the shorter) and within
    ``MAX_REQUEST_HEAD`` or ``limits.max_head`` bytes (the smaller)."""
    host, port = parse_hostport(addr, "FERRYMAN_METRICS_ADDR", allow_zero=True)
    registry = make_registry(stats)
    limits = limits or HttpLimits()
    gate = ConnectionGate(limits)
    head_timeout = min(idle_timeout, limits.request_timeout)
    max_head = min(MAX_REQUEST_HEAD, limits.max_head)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        refusal, key = gate.open(peer[0] if peer else None)
        if refusal is not None:
            stats.log_limit.log(log, logging.WARNING, key, "metrics connection refused",
                                {"peer_addr": key, "reason": refusal})
            body = f"{refusal}\n".encode()
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            writer.close()
            return
        waiting = [True]

        def head_done() -> None:
            if waiting[0]:
                waiting[0] = False
                gate.head_done(key)

        try:
            status, ctype, body, head_only = await _serve_one(reader, registry, ready, head_timeout, max_head,
                                                              head_done, render)
            head_done()
            if status:
                extra = "Allow: GET, HEAD\r\n" if status == 405 else ""
                writer.write((f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
                              f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
                              ).encode("latin-1") + (b"" if head_only else body))
                await asyncio.wait_for(writer.drain(), idle_timeout)
                if status in (400, 431):
                    await _linger(reader, writer)
        except (OSError, asyncio.TimeoutError):
            pass  # client went away or stopped reading
        except Exception:
            log.exception("metrics request failed")
        finally:
            gate.close(key, waiting[0])
            writer.close()

    try:
        server = await asyncio.start_server(handle, host, port, limit=MAX_REQUEST_HEAD * 2)
    except OSError as exc:
        raise OSError(exc.errno, f"FERRYMAN_METRICS_ADDR={addr!r}: cannot listen: {exc.strerror}") from None
    return server


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then discard what the client still sends (briefly), so that closing with
    unread input does not reset the connection before the client has read the answer."""
    if writer.can_write_eof():
        writer.write_eof()
    loop = asyncio.get_running_loop()
    deadline, left = loop.time() + 1.0, 1 << 20
    while left > 0 and (wait := deadline - loop.time()) > 0:
        chunk = await asyncio.wait_for(reader.read(65536), wait)
        if not chunk:
            return
        left -= len(chunk)


def _head_end(buf: bytes) -> int:
    """Offset of the blank line ending a request head (CRLF or bare LF), or -1."""
    found = [i for i in (buf.find(b"\r\n\r\n"), buf.find(b"\n\n")) if i >= 0]
    return min(found) if found else -1


async def _serve_one(reader: asyncio.StreamReader, registry: CollectorRegistry, ready: Ready,
                     head_timeout: float, max_head: int, head_done: Callable[[], None],
                     render: Callable[[], Awaitable[bytes]] | None = None) -> tuple[int, str, bytes, bool]:
    """Read one request head (all of it within ``head_timeout`` seconds) and decide the answer;
    status 0 means close without answering."""
    text = "text/plain; charset=utf-8"
    buf = b""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + head_timeout
    while (end := _head_end(buf)) < 0:
        if len(buf) > max_head:
            return 431, text, b"request head too large\n", False
        try:
            chunk = await asyncio.wait_for(reader.read(4096), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            return 0, "", b"", False
        if not chunk:
            return 0, "", b"", False
        buf += chunk
    head_done()
    head = buf[:end]
    if len(head) > max_head:
        return 431, text, b"request head too large\n", False
    parts = head.split(b"\n", 1)[0].rstrip(b"\r").split(b" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1] or not parts[2].startswith(b"HTTP/1."):
        return 400, text, b"bad request\n", False
    method, target = parts[0].decode("ascii"), parts[1].split(b"?", 1)[0]
    if method not in ("GET", "HEAD"):
        return 405, text, b"method not allowed\n", False
    head_only = method == "HEAD"
    if target == b"/metrics":
        return 200, CONTENT_TYPE_LATEST, (await render() if render is not None else generate_latest(registry)), head_only
    if target == b"/ready":
        answer = ready()
        ok = bool(await answer) if inspect.isawaitable(answer) else bool(answer)
        return (200 if ok else 503), text, (b"ready\n" if ok else b"not ready\n"), head_only
    if target == b"/health":
        return 200, text, b"ok\n", head_only
    return 404, text, b"not found\n", head_only
