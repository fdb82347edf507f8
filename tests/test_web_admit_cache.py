"""The edge's web authorizer reusing allowing decisions (``FERRYMAN_WEB_ADMIT_CACHE``).

``webdoor._Authorizer`` runs every web request through ``admit()`` with the edge's current
access tables; an allowing decision may be reused for a short time for the same principal,
app, host and source address. Checked here with real tables (a snapshot's applications,
users and assignments) and a controlled clock: a reused decision is the same one and costs
no ``admit()``; a new configuration (the assignment removed) refuses the very next request;
a denial is never reused; a different source address, host or session is decided anew; a
decision is not reused past its time or the session's end; ``0`` decides every request.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dataplane.access.admission import AccessTables
from dataplane.access.apptable import app_table
from dataplane.access.policy import AccessIndex
from dataplane.contract.snapshot import ConfigSnapshot, SnapApp, SnapUser
from dataplane.edge import webdoor
from dataplane.edge.web import Principal, RequestFacts, WebApp

pytestmark = pytest.mark.timeout(30)

NOW = 1_900_000_000.0
KEY = {"kty": "OKP", "crv": "Ed25519", "x": "AAAA", "kid": "k1"}
APP = WebApp(name="wiki", external_url="https://wiki.corp.example", internal_url="http://10.0.0.5:8080")
ALICE = Principal(user_id="u-alice", upn="alice@corp.example", session_id="s-1", amr=("pwd",),
                  auth_time=int(NOW) - 60, expires=int(NOW) + 3000)
FACTS = RequestFacts(method="GET", host="wiki.corp.example", path="/", source="203.0.113.9")


def tables(assigned: bool) -> AccessTables:
    snap = ConfigSnapshot(version=3, issued_at="t", token_keys=[KEY],
                          applications=[SnapApp(name="wiki", kind="per_app", connector_group="g",
                                                users=["u-alice"] if assigned else [])],
                          users=[SnapUser(id="u-alice", upn="alice@corp.example", groups=["g-staff"])])
    return AccessTables(app_table(snap), dns_suffixes=[], access=AccessIndex(snap))


@pytest.fixture
def clock(monkeypatch):
    now = [NOW]
    monkeypatch.setattr(webdoor, "time", SimpleNamespace(time=lambda: now[0]))
    calls = []
    real = webdoor.admit

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(webdoor, "admit", counting)
    return now, calls


def authorizer(ttl: float, assigned: bool = True):
    edge = SimpleNamespace(settings=SimpleNamespace(web_admit_cache=ttl), tables=tables(assigned))
    return edge, webdoor._Authorizer(edge)  # noqa: SLF001 - the edge's own authorizer


def test_allow_reused_until_new_configuration(clock) -> None:
    now, calls = clock
    edge, auth = authorizer(1.0)
    first = auth.authorize(APP, ALICE, FACTS)
    assert first.allowed and first.groups == ("g-staff",) and len(calls) == 1
    now[0] += 0.5
    assert auth.authorize(APP, ALICE, FACTS) is first and len(calls) == 1  # reused: no admit()
    edge.tables = tables(assigned=False)  # a new configuration: the assignment is removed
    denied = auth.authorize(APP, ALICE, FACTS)
    assert not denied.allowed and denied.code == "not_assigned" and len(calls) == 2
    assert not auth.authorize(APP, ALICE, FACTS).allowed and len(calls) == 3  # a denial is never reused
    edge.tables = tables(assigned=True)
    assert auth.authorize(APP, ALICE, FACTS).allowed and len(calls) == 4


def test_reuse_is_per_principal_source_and_host_and_bounded_in_time(clock) -> None:
    now, calls = clock
    _, auth = authorizer(1.0)
    auth.authorize(APP, ALICE, FACTS)
    auth.authorize(APP, ALICE, RequestFacts(method="GET", host="wiki.corp.example", path="/", source="198.51.100.7"))
    auth.authorize(APP, ALICE, RequestFacts(method="GET", host="wiki.corp.example:8443", path="/", source=FACTS.source))
    other_session = Principal(user_id="u-alice", upn="alice@corp.example", session_id="s-2", amr=("pwd",),
                              auth_time=ALICE.auth_time, expires=ALICE.expires)
    auth.authorize(APP, other_session, FACTS)
    assert len(calls) == 4
    now[0] += 1.0  # the decision's time is over
    assert auth.authorize(APP, ALICE, FACTS).allowed and len(calls) == 5
    ending = Principal(user_id="u-alice", upn="alice@corp.example", session_id="s-3", amr=("pwd",),
                       auth_time=ALICE.auth_time, expires=int(now[0]) + 1)
    now[0] = float(int(now[0]))
    assert auth.authorize(APP, ending, FACTS).allowed and len(calls) == 6
    now[0] += 0.99
    assert auth.authorize(APP, ending, FACTS).allowed and len(calls) == 6
    now[0] += 0.02  # past the session's end (before the cache time would be over): decided anew
    auth.authorize(APP, ending, FACTS)
    assert len(calls) == 7


def test_zero_decides_every_request(clock) -> None:
    _, calls = clock
    _, auth = authorizer(0.0)
    for _ in range(3):
        assert auth.authorize(APP, ALICE, FACTS).allowed
    assert len(calls) == 3
