"""Grants of relayed flows (``dataplane.connector.relayed``): the connector takes the deciding
edge's key from the certificate a relayed OPEN carries, and only from an edge certificate of
its own CA that is valid and not revoked. The relaying edge cannot make a grant in another
edge's name: it does not hold that edge's key.
"""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from dataplane.access import grants
from dataplane.access.grants import GrantError, GrantVerifier
from dataplane.basics import pki
from dataplane.connector.relayed import DecidingEdges

pytestmark = pytest.mark.timeout(60)

FLOW = dict(host="10.20.0.5", port=3389, protocol="tcp")


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pki.NodeFiles]:
    ours = tmp_path_factory.mktemp("pki")
    files = pki.init_pki(str(ours), edges=["edge-a", "edge-b"], connectors=["conn-1"], clients=["client-1"])
    other = tmp_path_factory.mktemp("other-ca")
    files["stranger"] = pki.init_pki(str(other), edges=["edge-a"], connectors=[], clients=[])["edge-a"]
    return files


def der(files: pki.NodeFiles) -> bytes:
    cert = x509.load_pem_x509_certificate(Path(files.cert).read_bytes())
    return cert.public_bytes(serialization.Encoding.DER)


def key(files: pki.NodeFiles):  # noqa: ANN201
    return serialization.load_pem_private_key(Path(files.key).read_bytes(), password=None)


def sign(files: pki.NodeFiles, edge: str = "edge-a", connection: str = "c1") -> bytes:
    return grants.sign(key(files), edge=edge, connector="conn-1", connection=connection, user="u", device="d",
                       now=time.time(), **FLOW)  # type: ignore[arg-type]


def check(made: dict[str, pki.NodeFiles], grant: bytes, signer: bytes, revoked: frozenset[int] = frozenset()):  # noqa: ANN201
    deciding, edge_key = DecidingEdges(made["conn-1"].ca).key_of(signer, revoked, datetime.datetime.now(datetime.UTC))
    return GrantVerifier("conn-1").verify(grant, edge_key, deciding, now=time.time(), **FLOW)  # type: ignore[arg-type]


def refused(made: dict[str, pki.NodeFiles], grant: bytes, signer: bytes, code: str, **kw: object) -> str:
    with pytest.raises(GrantError) as info:
        check(made, grant, signer, **kw)  # type: ignore[arg-type]
    assert info.value.code == code, str(info.value)
    return str(info.value)


def test_a_grant_of_the_deciding_edge_is_accepted_through_another_edge(made) -> None:
    claims = check(made, sign(made["edge-a"]), der(made["edge-a"]))
    assert (claims.edge, claims.connector) == ("edge-a", "conn-1")


def test_the_relaying_edge_cannot_mint_a_grant_in_the_deciding_edges_name(made) -> None:
    # edge-b signs a grant naming edge-a and sends edge-a's certificate along: its key is not edge-a's.
    assert refused(made, sign(made["edge-b"], edge="edge-a"), der(made["edge-a"]), "grant_forged") == \
        "the grant does not verify with edge edge-a's certificate key"
    # ... nor its own grant passed off under edge-a's certificate name
    assert refused(made, sign(made["edge-b"], edge="edge-b"), der(made["edge-a"]), "grant_forged")


def test_only_edge_certificates_of_this_ca_sign_relayed_grants(made) -> None:
    assert refused(made, sign(made["stranger"]), der(made["stranger"]), "grant_signer_invalid") == \
        "the certificate of deciding edge edge-a was not issued by this connector's CA"
    assert refused(made, sign(made["client-1"], edge="client-1"), der(made["client-1"]), "grant_signer_invalid") == \
        "the grant's signer 'client-1' is a client, not an edge"
    assert "cannot be read" in refused(made, sign(made["edge-a"]), b"\x30\x03junk", "grant_signer_invalid")


def test_a_revoked_deciding_edge_signs_nothing(made) -> None:
    serial = x509.load_der_x509_certificate(der(made["edge-a"])).serial_number
    message = refused(made, sign(made["edge-a"]), der(made["edge-a"]), "grant_signer_revoked",
                      revoked=frozenset({serial}))
    assert message == f"the certificate {serial:x} of deciding edge edge-a is revoked"


def test_a_relayed_grant_is_used_once(made) -> None:
    verifier = GrantVerifier("conn-1")
    edges = DecidingEdges(made["conn-1"].ca)
    now = datetime.datetime.now(datetime.UTC)
    grant = sign(made["edge-a"], connection="once")
    for attempt in range(2):
        name, edge_key = edges.key_of(der(made["edge-a"]), frozenset(), now)
        if attempt == 0:
            verifier.verify(grant, edge_key, name, now=time.time(), **FLOW)  # type: ignore[arg-type]
        else:
            with pytest.raises(GrantError) as info:
                verifier.verify(grant, edge_key, name, now=time.time(), **FLOW)  # type: ignore[arg-type]
            assert info.value.code == "grant_replayed"


def test_the_relaying_edges_tunnel_key_makes_no_relayed_grant(made) -> None:
    """The relaying edge holds the grant key of its own tunnel to the connector; a MAC'd grant in
    a relayed OPEN is never checked with it (the connector passes no tunnel key for relayed OPENs),
    so it is unverifiable whatever edge it names."""
    tunnel_key = os.urandom(grants.KEY_SIZE)
    minted = grants.mac(tunnel_key, edge="edge-a", connector="conn-1", connection="m1", user="u", device="d",
                        now=time.time(), **FLOW)  # type: ignore[arg-type]
    assert refused(made, minted, der(made["edge-a"]), "grant_unverifiable") == "this tunnel has no grant key"
