"""Micro-benchmarks of a flow grant's cost: made at the edge and checked at the connector.

Run: ``python -m pytest bench/test_grant_bench.py --benchmark-enable``. Under the project's
default ``--benchmark-disable`` every function still runs once and checks its result.
Compares the grant MAC'd under the tunnel's grant key (what edges send) with the ECDSA
signature (what an edge sends a connector that announces no grant key).
"""

from __future__ import annotations

import itertools
import os

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from dataplane.access import grants
from dataplane.access.grants import GrantVerifier

pytestmark = pytest.mark.timeout(120)

FLOW = dict(edge="edge-1", connector="conn-1", host="postgres.corp.example", port=5432, protocol="tcp",
            user="alice@corp.example", device="3f6c2a1e-9b7d-4c55-8e11-0a2b3c4d5e6f", app="billing-db")
CHECK = dict(host="postgres.corp.example", port=5432, protocol="tcp")
NOW = 1_900_000_000.0


def _flow_round(make, check):
    """One new flow's grant work: made, then verified once (a fresh connection id each time)."""
    verifier = GrantVerifier("conn-1", limit=1 << 24)
    ids = itertools.count()

    def run():
        grant = make(f"{next(ids):016x}")
        return check(verifier, grant)
    return run


def test_grant_maced(benchmark) -> None:
    key = os.urandom(grants.KEY_SIZE)
    run = _flow_round(lambda conn: grants.mac(key, connection=conn, now=NOW, **FLOW),
                      lambda v, g: v.verify(g, None, "edge-1", now=NOW, key=key, **CHECK))
    claims = benchmark(run)
    assert claims.version == grants.MACED and claims.host == "postgres.corp.example"


def test_grant_signed(benchmark) -> None:
    edge_key = ec.generate_private_key(ec.SECP256R1())
    public = edge_key.public_key()
    run = _flow_round(lambda conn: grants.sign(edge_key, connection=conn, now=NOW, **FLOW),
                      lambda v, g: v.verify(g, public, "edge-1", now=NOW, **CHECK))
    claims = benchmark(run)
    assert claims.version == grants.SIGNED and claims.host == "postgres.corp.example"
