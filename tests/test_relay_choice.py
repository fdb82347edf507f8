"""Which peer edge a flow is relayed to (``dataplane.edge.relay.Relay``), and who may relay here."""

from __future__ import annotations

import asyncio

import pytest

from dataplane.basics.settings import EdgeSettings
from dataplane.contract.presence import PresenceConnector, PresenceEdge, make
from dataplane.edge.relay import FAILED_FOR, Relay

pytestmark = pytest.mark.timeout(30)


class FakeTunnel:
    """What ``Relay`` reads of a tunnel."""

    def __init__(self, load: int = 0) -> None:
        self.up, self.closed, self.draining, self.load, self.routes = True, False, False, load, {}
        self.closed_with: tuple[str, str] | None = None

    def close(self, code: str, reason: str) -> None:
        self.closed, self.closed_with = True, (code, reason)


def edge(name: str, *connectors: tuple[str, str]) -> PresenceEdge:
    return PresenceEdge(name=name, address=f"127.0.0.1:{len(name)}",
                        connectors=[PresenceConnector(name=c, group=g) for c, g in connectors])


def relay() -> Relay:
    return Relay("edge-a", EdgeSettings(), handler=None, wire=lambda: None, ssl_ctx=lambda: None)  # type: ignore[arg-type]


def test_candidates_prefer_tunnels_up_then_untried_peers_then_failed_ones() -> None:
    async def main() -> None:
        r = relay()
        r.update(make([edge("edge-a", ("k0", "default")), edge("edge-b", ("k1", "default")),
                       edge("edge-c", ("k2", "default"), ("k3", "eu")), edge("edge-d", ("k4", "default"))]))
        assert {p.name for p, _ in r.candidates("default")} == {"edge-b", "edge-c", "edge-d"}  # never itself
        assert [(p.name, c) for p, c in r.candidates("eu")] == [("edge-c", "k3")]
        assert r.candidates("other") == []
        r.out["edge-d"] = FakeTunnel(load=3)  # type: ignore[assignment]
        r._failed["edge-b"] = asyncio.get_running_loop().time() + FAILED_FOR
        assert [p.name for p, _ in r.candidates("default")] == ["edge-d", "edge-c", "edge-b"]
        r.out["edge-d"].draining = True  # type: ignore[attr-defined]  # the peer drains: dial another first
        assert [p.name for p, _ in r.candidates("default")][-1] == "edge-b"

    asyncio.run(main())


def test_who_may_relay_here_and_peers_leaving_the_map() -> None:
    async def main() -> None:
        r = relay()
        assert "no presence map" in (r.refuse_peer_edge("edge-b") or "")
        r.update(make([edge("edge-a"), edge("edge-b", ("k1", "default"))]))
        assert r.refuse_peer_edge("edge-b") is None
        assert r.refuse_peer_edge("edge-z") == "edge 'edge-z' is not an active edge registered with the control plane"
        assert r.refuse_peer_edge("edge-a") is not None  # itself
        gone = r.out["edge-b"] = FakeTunnel()  # type: ignore[assignment]
        gone.routes[1] = object()
        r.update(make([edge("edge-a")]))
        assert "edge-b" not in r.out and r.candidates("default") == []
        await asyncio.sleep(0.05)
        assert not gone.closed  # a flow still runs on it
        gone.routes.clear()
        await asyncio.sleep(1.1)
        assert gone.closed_with == ("peer_gone", "edge edge-b left the presence map")

    asyncio.run(main())
