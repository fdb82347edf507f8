"""Flow grants (``dataplane.access.grants``): what a connector accepts and every way it refuses.

Unit level here; ``test_e2e_grants.py`` sends forged and expired grants to a real connector.
"""

from __future__ import annotations

import hmac

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from dataplane.access import grants
from dataplane.access.grants import GrantClaims, GrantError, GrantVerifier

pytestmark = pytest.mark.timeout(30)

NOW = 1_900_000_000.0
EDGE_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())
FLOW = dict(host="10.20.0.5", port=3389, protocol="tcp")


def grant(key: ec.EllipticCurvePrivateKey = EDGE_KEY, now: float = NOW, **changes: object) -> bytes:
    fields: dict[str, object] = dict(edge="edge-1", connector="conn-1", connection="c0ffee", user="alice@corp",
                                     device="dev-1", **FLOW)
    fields.update(changes)
    return grants.sign(key, now=now, **fields)  # type: ignore[arg-type]


def verify(data: bytes, now: float = NOW, verifier: GrantVerifier | None = None, edge: str = "edge-1",
           **flow: object) -> GrantClaims:
    return (verifier or GrantVerifier("conn-1")).verify(data, EDGE_KEY.public_key(), edge, now=now,
                                                        **{**FLOW, **flow})  # type: ignore[arg-type]


def refused(data: bytes, code: str, **kw: object) -> str:
    with pytest.raises(GrantError) as info:
        verify(data, **kw)  # type: ignore[arg-type]
    assert info.value.code == code, str(info.value)
    return str(info.value)


def test_a_grant_for_this_flow_is_accepted_with_its_claims() -> None:
    claims = verify(grant())
    assert (claims.edge, claims.connector, claims.host, claims.port, claims.protocol, claims.connection,
            claims.user, claims.device) == ("edge-1", "conn-1", "10.20.0.5", 3389, "tcp", "c0ffee", "alice@corp",
                                            "dev-1")
    assert claims.expires - claims.issued == grants.GRANT_LIFETIME
    assert verify(grant(), now=NOW + grants.GRANT_LIFETIME + grants.CLOCK_SKEW)  # last valid second


def test_missing_and_garbage_grants() -> None:
    assert refused(b"", "grant_missing") == "the OPEN from edge edge-1 carries no grant"
    assert refused(b"\x93\x01\x02\x03", "grant_invalid") == "the grant from edge edge-1 cannot be decoded"
    assert refused(b"\xc1", "grant_invalid") == "the grant from edge edge-1 cannot be decoded"


def test_a_grant_signed_by_another_key_is_forged() -> None:
    assert refused(grant(OTHER_KEY), "grant_forged") == \
        "the grant does not verify with edge edge-1's certificate key"


def test_changing_a_signed_claim_breaks_the_signature() -> None:
    claims_bytes, signature = msgspec.msgpack.decode(grant(), type=tuple[bytes, bytes])
    claims = msgspec.msgpack.decode(claims_bytes, type=GrantClaims)
    moved = msgspec.msgpack.encode(msgspec.structs.replace(claims, host="10.99.0.1"))
    assert refused(msgspec.msgpack.encode((moved, signature)), "grant_forged", host="10.99.0.1")


def test_a_grant_for_another_flow_connector_or_edge_is_refused() -> None:
    assert refused(grant(), "grant_mismatch", port=22) == \
        "the grant is for 10.20.0.5:3389/tcp, not 10.20.0.5:22/tcp"
    assert refused(grant(), "grant_mismatch", host="10.20.0.6")
    assert refused(grant(connector="conn-2"), "grant_mismatch") == \
        "the grant is from edge-1 for conn-2, not from edge-1 for conn-1"
    assert refused(grant(edge="edge-9"), "grant_mismatch")


def test_expired_future_and_overlong_grants_are_refused() -> None:
    late = NOW + grants.GRANT_LIFETIME + grants.CLOCK_SKEW + 1
    assert refused(grant(), "grant_expired", now=late) == "the grant expired 6s ago"
    assert refused(grant(now=NOW + 60), "grant_invalid") == \
        "the grant is issued 60s in the future (check the clocks of edge and connector)"
    claims = GrantClaims(1, "edge-1", "conn-1", "10.20.0.5", 3389, "tcp", "c", "u", "d", int(NOW), int(NOW) + 3600)
    encoded = msgspec.msgpack.encode(claims)
    long_lived = msgspec.msgpack.encode((encoded, EDGE_KEY.sign(encoded, ec.ECDSA(grants.hashes.SHA256()))))
    assert refused(long_lived, "grant_invalid") == "the grant claims to live 3600s (at most 35s)"


def signed_claims(claims: GrantClaims) -> bytes:
    encoded = msgspec.msgpack.encode(claims)
    return msgspec.msgpack.encode((encoded, EDGE_KEY.sign(encoded, ec.ECDSA(grants.hashes.SHA256()))))


def test_a_grant_may_live_no_longer_than_edges_issue_them_plus_the_clock_skew() -> None:
    """Every grant honoured is remembered until it expires: a longer-lived one would only hold
    its place in the replay memory longer (300 s was accepted, ten times what edges issue)."""
    issued = int(NOW)
    claims = GrantClaims(1, "edge-1", "conn-1", "10.20.0.5", 3389, "tcp", "c", "u", "d", issued,
                         issued + grants.GRANT_LIFETIME + grants.CLOCK_SKEW)
    assert verify(signed_claims(claims))
    longer = msgspec.structs.replace(claims, expires=claims.expires + 1)
    assert refused(signed_claims(longer), "grant_invalid") == "the grant claims to live 36s (at most 35s)"
    assert refused(signed_claims(msgspec.structs.replace(claims, expires=issued + 300)), "grant_invalid") == \
        "the grant claims to live 300s (at most 35s)"


def test_oversize_claims_are_invalid() -> None:
    """Claims no edge makes: a connection id beyond 64 characters, a name beyond 255."""
    assert verify(grant(connection="c" * 64)).connection == "c" * 64
    assert verify(grant(user="u" * 255)).user == "u" * 255
    for field, value in (("connection", "c" * 65), ("connection", "c" * 1000), ("user", "u" * 256),
                         ("device", "d" * 256), ("app", "a" * 256), ("edge", "e" * 256)):
        edge = value if field == "edge" else "edge-1"
        data = grant(**{field: value})  # type: ignore[arg-type]
        assert refused(data, "grant_invalid", edge=edge) == f"the grant from edge {edge} cannot be decoded", field


def test_a_grant_is_honoured_once() -> None:
    verifier = GrantVerifier("conn-1")
    data = grant()
    verify(data, verifier=verifier)
    with pytest.raises(GrantError) as info:
        verify(data, verifier=verifier)
    assert (info.value.code, str(info.value)) == ("grant_replayed", "the grant for connection c0ffee was already used")
    verify(grant(connection="other"), verifier=verifier)  # another flow's grant is fine


def test_a_full_replay_memory_refuses_new_grants_and_never_forgets_an_unexpired_one() -> None:
    verifier = GrantVerifier("conn-1", limit=10)
    first = grant(connection="c0")
    for i in range(10):
        edge = f"edge-{i % 2 + 1}"
        verify(grant(connection=f"c{i}", edge=edge), verifier=verifier, edge=edge)
    assert verifier.remembered == 10
    # Full of unexpired grants: a new flow is refused rather than an unexpired grant forgotten...
    assert refused(grant(connection="c10", edge="edge-3"), "grant_cache_full", verifier=verifier, edge="edge-3") == (
        "this connector remembers 10 unexpired grants, the most it may (FERRYMAN_GRANT_CACHE): it opens no more "
        "flows until some expire")
    # ...so the oldest grant still cannot be replayed, however many flows came after it.
    assert refused(first, "grant_replayed", verifier=verifier, now=NOW + 20) == \
        "the grant for connection c0 was already used"
    # Once expired (with the clock skew allowed) they are forgotten, every edge's, and new grants are taken again.
    late = NOW + grants.GRANT_LIFETIME + grants.CLOCK_SKEW + 1
    verify(grant(connection="late", edge="edge-3", now=late), now=late, verifier=verifier, edge="edge-3")
    assert verifier.remembered == 1


def test_one_edge_cannot_fill_the_replay_memory_for_the_others() -> None:
    """An edge (compromised, or driven by its clients' OPENs) holds at most half the memory."""
    verifier = GrantVerifier("conn-1", limit=100)
    for i in range(50):
        verify(grant(connection=f"c{i}"), verifier=verifier)
    assert refused(grant(connection="c50"), "grant_cache_full", verifier=verifier) == (
        "this connector remembers 50 unexpired grants from edge edge-1, the most one edge may (half of "
        "FERRYMAN_GRANT_CACHE): it opens no more flows from that edge until some expire")
    assert verify(grant(connection="c50", edge="edge-2"), verifier=verifier, edge="edge-2")
    assert verifier.remembered == 51


def test_the_replay_memory_keeps_each_edges_connection_ids_apart() -> None:
    """Edge names and connection ids are not run together ("a/b" + "c" was "a" + "b/c")."""
    verifier = GrantVerifier("conn-1")
    for edge, connection in (("a/b", "c"), ("a", "b/c"), ("edge-1", "c0ffee"), ("edge-2", "c0ffee")):
        assert verify(grant(edge=edge, connection=connection), verifier=verifier, edge=edge)
    assert refused(grant(edge="a", connection="b/c"), "grant_replayed", verifier=verifier, edge="a")
    assert verifier.remembered == 4


def test_grants_expiring_out_of_order_are_found_when_the_memory_is_full() -> None:
    """An edge whose clock is set back makes grants that expire before those it made earlier."""
    verifier = GrantVerifier("conn-1", limit=6)  # 3 for one edge
    verify(grant(connection="later-edge", now=NOW + 4), verifier=verifier)  # the edge 4 s ahead, then set back
    verify(grant(connection="a"), verifier=verifier)
    verify(grant(connection="b"), verifier=verifier)
    at = NOW + grants.GRANT_LIFETIME + grants.CLOCK_SKEW + 1  # "a" and "b" expired, the first one not yet
    verify(grant(connection="c", now=at), now=at, verifier=verifier)
    assert verifier.remembered == 2
    assert refused(grant(connection="later-edge", now=NOW + 4), "grant_replayed", verifier=verifier, now=at) == \
        "the grant for connection later-edge was already used"


# ------------------------------------------------------------------ grants MAC'd under a tunnel's grant key
TUNNEL_KEY = bytes(range(32))
OTHER_TUNNEL_KEY = bytes(range(1, 33))


def maced(key: bytes = TUNNEL_KEY, now: float = NOW, **changes: object) -> bytes:
    fields: dict[str, object] = dict(edge="edge-1", connector="conn-1", connection="c0ffee", user="alice@corp",
                                     device="dev-1", app="rdp", **FLOW)
    fields.update(changes)
    return grants.mac(key, now=now, **fields)  # type: ignore[arg-type]


def verify_mac(data: bytes, key: bytes = TUNNEL_KEY, now: float = NOW, verifier: GrantVerifier | None = None,
               **flow: object) -> GrantClaims:
    return (verifier or GrantVerifier("conn-1")).verify(data, None, "edge-1", now=now, key=key,
                                                        **{**FLOW, **flow})  # type: ignore[arg-type]


def mac_refused(data: bytes, code: str, **kw: object) -> str:
    with pytest.raises(GrantError) as info:
        verify_mac(data, **kw)  # type: ignore[arg-type]
    assert info.value.code == code, str(info.value)
    return str(info.value)


def test_a_maced_grant_for_this_flow_on_this_tunnel_is_accepted() -> None:
    claims = verify_mac(maced())
    assert (claims.version, claims.edge, claims.connector, claims.host, claims.port, claims.connection,
            claims.app) == (grants.MACED, "edge-1", "conn-1", "10.20.0.5", 3389, "c0ffee", "rdp")
    assert claims.expires - claims.issued == grants.GRANT_LIFETIME


def test_a_maced_grant_from_another_tunnel_or_forged_is_refused() -> None:
    # Made under another tunnel's key (an edge replaying it on another tunnel, or a guess).
    assert mac_refused(maced(OTHER_TUNNEL_KEY), "grant_forged") == \
        "the grant does not verify with this tunnel's grant key from edge edge-1"
    # A changed claim breaks the MAC.
    claims_bytes, tag = msgspec.msgpack.decode(maced(), type=tuple[bytes, bytes])
    claims = msgspec.msgpack.decode(claims_bytes, type=GrantClaims)
    moved = msgspec.msgpack.encode(msgspec.structs.replace(claims, host="10.99.0.1"))
    assert mac_refused(msgspec.msgpack.encode((moved, tag)), "grant_forged", host="10.99.0.1")
    # A MAC without the label (the key used for anything else) is not a grant's.
    bare = msgspec.msgpack.encode((claims_bytes, hmac.digest(TUNNEL_KEY, claims_bytes, "sha256")))
    assert mac_refused(bare, "grant_forged")
    # A truncated or empty tag.
    assert mac_refused(msgspec.msgpack.encode((claims_bytes, tag[:16])), "grant_forged")
    assert mac_refused(msgspec.msgpack.encode((claims_bytes, b"")), "grant_forged")


def test_a_maced_grant_on_a_tunnel_without_a_key_and_a_signed_one_without_an_edge_key_are_unverifiable() -> None:
    assert mac_refused(maced(), "grant_unverifiable", key=b"") == "this tunnel has no grant key"
    assert mac_refused(grant(), "grant_unverifiable") == "the edge's certificate key is unknown on this tunnel"
    with pytest.raises(ValueError, match="a grant key has 32 bytes, not 8"):
        maced(b"short-ky")


def test_a_maced_grant_is_checked_like_a_signed_one() -> None:
    assert mac_refused(maced(), "grant_mismatch", port=22)
    assert mac_refused(maced(connector="conn-2"), "grant_mismatch")
    assert mac_refused(maced(edge="edge-9"), "grant_mismatch")
    late = NOW + grants.GRANT_LIFETIME + grants.CLOCK_SKEW + 1
    assert mac_refused(maced(), "grant_expired", now=late) == "the grant expired 6s ago"
    claims = GrantClaims(grants.MACED, "edge-1", "conn-1", "10.20.0.5", 3389, "tcp", "c", "u", "d", int(NOW),
                         int(NOW) + 3600)
    encoded = msgspec.msgpack.encode(claims)
    long_lived = msgspec.msgpack.encode((encoded, hmac.digest(TUNNEL_KEY, grants.MAC_LABEL + encoded, "sha256")))
    assert mac_refused(long_lived, "grant_invalid") == "the grant claims to live 3600s (at most 35s)"
    version_3 = msgspec.msgpack.encode(msgspec.structs.replace(claims, version=3, expires=int(NOW) + 30))
    assert mac_refused(msgspec.msgpack.encode((version_3, b"x")), "grant_invalid") == \
        "grant version 3 is not supported"


def test_a_maced_grant_is_honoured_once() -> None:
    verifier = GrantVerifier("conn-1")
    data = maced()
    verify_mac(data, verifier=verifier)
    assert mac_refused(data, "grant_replayed", verifier=verifier) == \
        "the grant for connection c0ffee was already used"
    verify_mac(maced(connection="other"), verifier=verifier)
