"""Which edges a connector holds tunnels to (``dataplane.connector.placement``)."""

from __future__ import annotations

import collections

import pytest

from dataplane.connector import placement

pytestmark = pytest.mark.timeout(30)

EDGES = [(f"edge-{i}.example", 8443) for i in range(8)]


def test_connectors_spread_over_the_edges() -> None:
    counts = collections.Counter(e for n in range(400) for e in placement.choose(f"connector-{n}", EDGES, 4))
    assert set(counts) == set(EDGES)
    assert all(150 <= c <= 250 for c in counts.values()), counts  # 200 each on average


def test_a_choice_stays_put_and_moves_only_for_the_edge_that_went() -> None:
    before = {n: placement.choose(f"c{n}", EDGES, 3) for n in range(200)}
    assert before == {n: placement.choose(f"c{n}", list(reversed(EDGES)), 3) for n in range(200)}  # order-free
    gone = EDGES[2]
    after = {n: placement.choose(f"c{n}", [e for e in EDGES if e != gone], 3) for n in range(200)}
    for n in range(200):
        if gone in before[n]:
            assert set(before[n]) - {gone} <= set(after[n]) and gone not in after[n]
        else:
            assert after[n] == before[n]
    came = ("edge-new.example", 8443)
    grown = {n: placement.choose(f"c{n}", [*EDGES, came], 3) for n in range(200)}
    assert all(grown[n] == before[n] or came in grown[n] for n in range(200))


def test_fewer_edges_than_asked_and_duplicates() -> None:
    assert sorted(placement.choose("c", [EDGES[0], EDGES[1], EDGES[0]], 4)) == sorted(EDGES[:2])
    assert len(placement.choose("c", EDGES, 0)) == 1  # at least one edge


def test_every_chosen_edge_gets_a_slot_and_the_rest_are_fallbacks() -> None:
    chosen = placement.choose("c", EDGES, 3)
    count = placement.slots(chosen, 2)
    assert count == 3
    orders = placement.plan(chosen, EDGES, count)
    assert [o[0] for o in orders] == chosen
    for order in orders:
        assert sorted(order) == sorted(EDGES) and set(order[:3]) == set(chosen)
    assert [o[0] for o in placement.plan(chosen, EDGES, 5)] == [*chosen, *chosen[:2]]
