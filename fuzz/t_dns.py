"""Target ``dns``: DNS messages from peers — queries from local apps to the client agent's resolver,
the answers it gets back (through the tunnel from a connector, or from the system resolver), and
the queries a connector receives on a private DNS flow.

The input is one query and one answer. The resolver (``dataplane.client.dns.Resolver``) resolves
the query with that answer (what decides the route and carries the query is replaced by handing
the answer back), then resolves it again (now from its cache, when cacheable); the query also
goes through what the tunnel path does to it (``tunnel_query``) and through the connector's check
(``dataplane.connector.node._queries_for``). Contract: nothing raises — a message that cannot be
parsed is dropped and counted, a query gets an answer or SERVFAIL — and whatever a query or answer
that was parsed turns into can be written out again, and an answer of the system resolver never
reaches the app with an address in a private segment.
"""

from __future__ import annotations

import types
from collections.abc import Coroutine
from typing import Any

from dnslib import DNSRecord

from dataplane.basics.metrics import Stats
from dataplane.client import dns
from dataplane.client.profile import Profile
from dataplane.contract.snapshot import ClientProfile, SnapApp, SnapSegment
from dataplane.connector.node import _queries_for

from . import Finding, Reader


# A forwarding profile with private segments of both IP versions, so that the answers of the
# system resolver go through the rebinding check (``Resolver._rebinding``).
_PROFILE = Profile(ClientProfile(version=1, issued_at="fuzz", dns_suffixes=["corp.example"], applications=[
    SnapApp(name="lab", kind="per_app", connector_group="default", segments=[
        SnapSegment(destination="10.0.0.0/8", ports="1-65535", protocol="tcp"),
        SnapSegment(destination="fd00::/8", ports="1-65535", protocol="udp")])]))


class _Client:
    def __init__(self) -> None:
        self.stats = Stats("client", "fuzz")
        self.settings = types.SimpleNamespace(dns_cache=16, dns_upstream="")
        self.profile = _PROFILE
        self.dns_rebind_allow = ("allowed.example",)


class _Resolver(dns.Resolver):
    """The real resolver; the route (tunnel or system resolver: chosen by the query's name, as the
    agent does) answers with the fuzzed answer."""

    answer_bytes: bytes | None = None

    async def _answer(self, query: DNSRecord, name: str) -> tuple[bytes | None, str]:
        return self.answer_bytes, "tunnel" if _PROFILE.private_name(name) else "public"


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never waits (nothing here does I/O)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise Finding("the resolver waited for something")


def _parse(data: bytes) -> DNSRecord | None:
    try:
        return DNSRecord.parse(data)
    except Exception:  # as the resolver and the connector do: dnslib raises several types on crafted input
        return None


def _packs(record: DNSRecord) -> bool:
    try:
        record.pack()
    except Exception:  # a query dnslib cannot write again is dropped as malformed
        return False
    return True


def one_input(data: bytes) -> None:
    r = Reader(data)
    query = r.take(r.u16() % 1024)
    answer = r.rest()
    resolver = _Resolver(_Client(), ("127.0.0.1", 53))  # type: ignore[arg-type]
    resolver.answer_bytes = answer
    first = _run(resolver.resolve(query))
    parsed = _parse(query)
    usable = parsed is not None and not parsed.header.qr and len(parsed.questions) == 1 and _packs(parsed)
    if usable and not isinstance(first, (bytes, bytearray)):
        raise Finding(f"a query got no answer ({first!r})")
    if not usable and first is not None:
        raise Finding("an unusable query got an answer")
    if usable:
        second = _run(resolver.resolve(query))  # from the cache when the answer was cacheable
        if not isinstance(second, (bytes, bytearray)):
            raise Finding("the repeated query got no answer")
        name = str(parsed.q.qname).rstrip(".")  # type: ignore[union-attr]
        if not _PROFILE.private_name(name) and not (name == "allowed.example" or name.endswith(".allowed.example")):
            for served in (first, second):
                reply = _parse(bytes(served))
                for rr in (*reply.rr, *reply.auth, *reply.ar) if reply is not None else ():
                    if rr.rtype in (1, 28) and _PROFILE.private_address(str(rr.rdata)):
                        raise Finding(f"a public name's answer reached the app with private address {rr.rdata}")
        dns.tunnel_query(DNSRecord.parse(query))
        dns.servfail(DNSRecord.parse(query))
        name = str(parsed.q.qname).rstrip(".") or "."  # type: ignore[union-attr]
    else:
        name = "db.corp.example"
    sent: list[bytes] = []
    _queries_for(name, lambda d: sent.append(bytes(d)), Stats("connector", "fuzz"))(query)
    if sent and sent[0] != query:
        raise Finding("the connector passed on another query than it got")
