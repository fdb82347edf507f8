"""Edge workers, the parts without processes: merging the workers' metrics, the restart backoff,
the CPU steering program, the channel's framing, the worker's command line and spec, what a
worker reports for the whole edge, sibling relay candidates, and the Unix tunnel's peer check."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import struct
import tempfile

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dataplane.basics.caps import LogLimiter
from dataplane.basics.metrics import Stats, exposition, merge_exposition
from dataplane.basics.settings import EdgeSettings, SettingsError, load
from dataplane.contract.presence import Presence, PresenceConnector, PresenceEdge
from dataplane.edge import workers
from dataplane.edge.relay import Relay, same_user
from dataplane.edge.workers import (
    RESTART_MIN, STEADY, RestartBackoff, Scrape, Sibling, Siblings, State, WorkerLink, WorkerSpec,
    counters_only, cpu_quota, cpu_steering_program, frame, read_message, worker_argv, worker_count,
)

pytestmark = pytest.mark.timeout(20)


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def _worker_stats(opened: int, active: int, version: float) -> str:
    stats = Stats("edge", "edge-1", LogLimiter(10, 1.0))
    stats.flows_opened = opened
    stats.flows_active = active
    stats.count(stats.relayed, "out", opened)
    stats.extra = {"ferryman_config_version": ("Configuration version", lambda: version)}
    return exposition(stats)


def test_merged_metrics_add_up_the_workers_and_keep_what_every_worker_says_alike() -> None:
    a, b = _worker_stats(3, 1, 7), _worker_stats(5, 2, 7)
    merged = _samples(merge_exposition([a, b], workers.SAME_IN_EVERY_WORKER).decode())
    base = (("node", "edge-1"), ("role", "edge"))
    assert merged[("ferryman_flows_opened_total", base)] == 8
    assert merged[("ferryman_flows", base)] == 3
    assert merged[("ferryman_relayed_flows_total", (("direction", "out"), *base))] == 8
    assert merged[("ferryman_config_version", base)] == 7  # not 14
    assert merged[("ferryman_build_info", (*base, ("version", next(
        s.labels["version"] for f in text_string_to_metric_families(a) for s in f.samples
        if s.name == "ferryman_build_info"))))] == 1


def test_merged_metrics_escape_labels_and_refuse_what_is_not_the_text_format() -> None:
    text = '# TYPE x_total counter\nx_total{path="a\\\\b\\"c\\nd"} 1.0\n'
    merged = merge_exposition([text, text]).decode()
    assert _samples(merged) == {("x_total", (("path", 'a\\b"c\nd'),)): 2.0}
    assert merge_exposition([]) == b""
    with pytest.raises(ValueError):
        merge_exposition(["x_total{oops 1\n"])


def test_a_dead_workers_counters_are_kept_and_its_gauges_dropped() -> None:
    kept = counters_only(merge_exposition([_worker_stats(4, 2, 7)]).decode())
    names = {name for name, _ in _samples(kept)}
    assert "ferryman_flows_opened_total" in names
    assert "ferryman_flows" not in names and "ferryman_config_version" not in names
    live = _worker_stats(1, 1, 7)
    merged = _samples(merge_exposition([live, kept], workers.SAME_IN_EVERY_WORKER).decode())
    base = (("node", "edge-1"), ("role", "edge"))
    assert merged[("ferryman_flows_opened_total", base)] == 5
    assert merged[("ferryman_flows", base)] == 1


def test_restart_backoff_doubles_for_quick_deaths_and_starts_over_after_steady_work() -> None:
    backoff = RestartBackoff(2.0)
    assert [backoff.died(1.0) for _ in range(5)] == [RESTART_MIN, 0.5, 1.0, 2.0, 2.0]
    assert backoff.died(STEADY) == RESTART_MIN
    assert RestartBackoff(0.0).died(0.0) == RESTART_MIN  # never below the first wait


def test_how_a_worker_ended_is_said_plainly() -> None:
    assert workers.exit_text(0) == "exit code 0"
    assert workers.exit_text(2) == "exit code 2"
    assert workers.exit_text(-9) == "signal SIGKILL"
    assert workers.exit_text(-40) == "signal 40"


def test_cpu_steering_program_returns_the_cpu_modulo_the_workers() -> None:
    (load_cpu, mod, ret) = cpu_steering_program(3)
    assert load_cpu == (0x20, 0, 0, (-0x1000 + 36) & 0xFFFFFFFF)  # A = SKF_AD_CPU
    assert mod == (0x94, 0, 0, 3)  # A %= 3
    assert ret == (0x16, 0, 0, 0)  # return A
    with pytest.raises(ValueError):
        cpu_steering_program(0)


def test_cpu_steering_attaches_to_a_reuseport_group() -> None:
    first = socket.create_server(("127.0.0.1", 0), reuse_port=True)
    second = socket.create_server(("127.0.0.1", first.getsockname()[1]), reuse_port=True)
    try:
        workers.attach_cpu_steering(first, 2)  # the kernel takes the program (EINVAL otherwise)
    finally:
        first.close()
        second.close()


def test_worker_count_and_settings() -> None:
    assert worker_count(3) == 3
    assert worker_count(0, "/nonexistent") == len(os.sched_getaffinity(0))
    assert cpu_quota("max 100000\n") is None
    assert cpu_quota("400000 100000\n") == 4
    assert cpu_quota("150000 100000") == 2  # rounded up
    assert cpu_quota("garbage") is None and cpu_quota("0 100000") is None
    assert load(EdgeSettings, {"edge_workers": 2}).edge_workers == 2
    with pytest.raises(SettingsError, match="FERRYMAN_EDGE_WORKER_STEERING='rss': must be hash or cpu"):
        load(EdgeSettings, {"edge_worker_steering": "rss"})
    with pytest.raises(SettingsError, match="FERRYMAN_EDGE_WORKERS=-1: must be between 0 and 1024"):
        load(EdgeSettings, {"edge_workers": -1})


def test_worker_command_line_drops_the_worker_count_and_the_spec_is_checked() -> None:
    assert worker_argv(["edge", "--workers", "4", "--listen", "h:1"]) == ["edge", "--listen", "h:1"]
    assert worker_argv(["edge", "--workers=4", "--apps", "a.json"]) == ["edge", "--apps", "a.json"]
    spec = WorkerSpec(index=1, workers=2, channel=5, tcp=6, udp=-1, directory="/run/x")
    assert WorkerSpec.parse(__import__("msgspec").json.encode(spec).decode()) == spec
    assert spec.socket_path() == "/run/x/worker-1.sock" and spec.socket_path(0) == "/run/x/worker-0.sock"
    with pytest.raises(ValueError, match="--worker-of: .*given by the edge's supervisor only"):
        WorkerSpec.parse('{"index": "one"}')


def test_channel_frames_round_trip_and_oversized_or_garbled_ones_are_refused() -> None:
    async def main() -> None:
        reader = asyncio.StreamReader()
        state = State(connectors=[PresenceConnector(name="c1", group="g")], clients=2, tunnels=3, ready=True)
        reader.feed_data(frame(state) + frame(Scrape(id=7)))
        assert await read_message(reader) == state
        assert await read_message(reader) == Scrape(id=7)
        reader.feed_eof()
        assert await read_message(reader) is None
        big = asyncio.StreamReader()
        big.feed_data(struct.pack("!I", workers.MAX_MESSAGE + 1))
        with pytest.raises(ValueError, match="at most"):
            await read_message(big)
        bad = asyncio.StreamReader()
        bad.feed_data(struct.pack("!I", 2) + b"{}")
        with pytest.raises(ValueError, match="cannot be read"):
            await read_message(bad)

    asyncio.run(main())


def test_a_worker_reports_the_whole_edges_connectors_and_figures() -> None:
    link = WorkerLink(WorkerSpec(index=0, workers=3, channel=-1, tcp=-1, udp=-1, directory="/d"))
    link.siblings = [Sibling(index=1, socket="/d/worker-1.sock", connectors=[PresenceConnector(name="b", group="g")],
                             tunnels=4, flows=10),
                     Sibling(index=2, socket="/d/worker-2.sock", connectors=[PresenceConnector(name="a", group="g")],
                             tunnels=1, flows=1)]
    own = [PresenceConnector(name="b", group="g"), PresenceConnector(name="c", group="h")]
    assert link.connectors(own) == [PresenceConnector(name="a", group="g"), PresenceConnector(name="b", group="g"),
                                    PresenceConnector(name="c", group="h")]
    assert link.totals() == (5, 11)
    assert Siblings(siblings=link.siblings).siblings[0].index == 1


class _Up:
    """A relay tunnel that is up (what ``Relay`` looks at)."""

    up, closed, draining, load = True, False, False, 0
    sibling = True
    routes: dict = {}

    def goaway(self, code: str, reason: str) -> None:
        pass

    def close(self, code: str, reason: str) -> None:
        self.closed = True


def test_relay_candidates_put_sibling_workers_before_peer_edges() -> None:
    async def main() -> None:
        relay = Relay("edge-1", EdgeSettings(), handler=None, wire=lambda: None, ssl_ctx=lambda: None)  # type: ignore[arg-type]
        held = [PresenceConnector(name="conn", group="g")]
        relay.update(Presence(tag="t", edges=[PresenceEdge(name="edge-1", address="a:1", connectors=held),
                                              PresenceEdge(name="edge-2", address="b:1", connectors=held)]))
        relay.set_siblings([PresenceEdge(name="worker 1", address="/d/worker-1.sock", connectors=held)])
        assert [p.name for p, _ in relay.candidates("g")] == ["worker 1", "edge-2"]
        assert relay.candidates("other") == []
        assert relay.sibling_holding("conn") is None  # no tunnel up to it yet
        relay.out["worker 1"] = _Up()  # type: ignore[assignment]
        assert relay.sibling_holding("conn") is relay.out["worker 1"]
        assert relay.sibling_holding("nobody") is None
        relay.update(Presence(tag="u", edges=[]))  # a new presence map keeps the siblings' tunnels
        assert "worker 1" in relay.out
        relay.set_siblings([])  # the sibling stopped: its tunnel is no longer used
        assert "worker 1" not in relay.out
        relay.close()

    asyncio.run(main())


def test_only_a_process_of_the_edges_own_user_may_use_a_worker_socket() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        assert same_user(a) is None
    finally:
        a.close()
        b.close()
    tcp = socket.socket()
    try:
        assert same_user(tcp) == "a worker tunnel must be a Unix socket"
    finally:
        tcp.close()
    assert same_user(None) == "a worker tunnel must be a Unix socket"


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another user")
def test_a_worker_socket_refuses_a_process_of_another_user() -> None:
    directory = tempfile.mkdtemp()  # reachable by the other user (pytest's own directories are not)
    os.chmod(directory, 0o777)
    path = os.path.join(directory, "worker-0.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    os.chmod(path, 0o777)
    server.listen(1)
    server.settimeout(10)
    pid = os.fork()
    if pid == 0:  # the child: another user dials the socket
        try:
            os.setuid(65534)
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.connect(path)
            client.recv(1)
        finally:
            os._exit(0)
    try:
        conn, _ = server.accept()
        assert same_user(conn) == f"the peer of a worker tunnel runs as uid 65534, not as this edge's uid 0"
        conn.close()
    finally:
        os.waitpid(pid, 0)
        server.close()
        shutil.rmtree(directory)
