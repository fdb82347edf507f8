"""Unit tests of private DNS pieces: the client's answer cache (TTLs, negative answers, LRU),
the DNS server settings, and the connector's rule that a ``dns`` flow only asks for its name."""

from __future__ import annotations

import pytest
from dnslib import OPCODE, QTYPE, RCODE, RR, SOA, A, DNSLabel, DNSQuestion, DNSRecord

from dataplane.client.dns import DnsCache, cache_ttl, from_cache, key_of, servfail
from dataplane.connector.node import _queries_for
from dataplane.basics.metrics import Stats
from dataplane.basics.hostport import dns_server


def _reply(name: str, ttl: int = 60, rcode: int = RCODE.NOERROR, soa_min: int | None = None) -> DNSRecord:
    reply = DNSRecord.question(name, "A").reply()
    reply.header.rcode = rcode
    if rcode == RCODE.NOERROR and soa_min is None:
        reply.add_answer(RR(name, QTYPE.A, rdata=A("10.1.2.3"), ttl=ttl))
    if soa_min is not None:
        reply.add_auth(RR("corp.example", QTYPE.SOA, ttl=ttl,
                          rdata=SOA("ns.corp.example", "admin.corp.example", (1, 2, 3, 4, soa_min))))
    return reply


def test_ttl_of_answers_and_negative_answers() -> None:
    assert cache_ttl(_reply("a.corp.example", ttl=42)) == 42
    assert cache_ttl(_reply("x.corp.example", ttl=600, rcode=RCODE.NXDOMAIN, soa_min=30)) == 30
    assert cache_ttl(_reply("x.corp.example", ttl=20, rcode=RCODE.NXDOMAIN, soa_min=900)) == 20
    assert cache_ttl(_reply("x.corp.example", ttl=9000, rcode=RCODE.NXDOMAIN, soa_min=9000)) == 300  # capped
    assert cache_ttl(_reply("x.corp.example", rcode=RCODE.NXDOMAIN)) == 0  # no SOA: not cached
    assert cache_ttl(DNSRecord.parse(servfail(DNSRecord.question("x.corp.example")))) == 0


def test_cache_serves_the_remaining_ttl_with_the_new_query_id_and_expires() -> None:
    cache = DnsCache(10)
    first = DNSRecord.question("a.corp.example", "A")
    cache.put(key_of(first), _reply("a.corp.example", ttl=60), now=100.0)
    again = DNSRecord.question("A.CORP.example", "A")  # names are case-insensitive
    entry = cache.get(key_of(again), now=130.0)
    assert entry is not None
    served = DNSRecord.parse(from_cache(again, entry, now=130.0))
    assert served.header.id == again.header.id and served.header.rcode == RCODE.NOERROR
    assert [(str(rr.rdata), rr.ttl) for rr in served.rr] == [("10.1.2.3", 30)]
    assert cache.get(key_of(again), now=160.0) is None and len(cache) == 0
    assert (cache.hits, cache.misses) == (1, 1)


def test_cache_is_bounded_least_recently_used_first() -> None:
    cache = DnsCache(2)
    keys = [key_of(DNSRecord.question(f"h{i}.corp.example")) for i in range(3)]
    cache.put(keys[0], _reply("h0.corp.example"), 0.0)
    cache.put(keys[1], _reply("h1.corp.example"), 0.0)
    assert cache.get(keys[0], 1.0) is not None  # h0 used: h1 is now the oldest
    cache.put(keys[2], _reply("h2.corp.example"), 0.0)
    assert len(cache) == 2 and cache.get(keys[1], 1.0) is None and cache.get(keys[0], 1.0) is not None
    off = DnsCache(0)
    off.put(keys[0], _reply("h0.corp.example"), 0.0)
    assert len(off) == 0


@pytest.mark.parametrize("setting, expected", [
    ("10.0.0.53", ("10.0.0.53", 53)), ("10.0.0.53:5353", ("10.0.0.53", 5353)), ("dns.corp.example", ("dns.corp.example", 53)),
    ("[fd00::53]:54", ("fd00::53", 54)), ("[fd00::53]", ("fd00::53", 53)), ("fd00::53", ("fd00::53", 53)),
])
def test_dns_server_setting(setting: str, expected: tuple[str, int]) -> None:
    assert dns_server(setting) == expected


@pytest.mark.parametrize("setting", ["10.0.0.53:0", "10.0.0.53:99999", "10.0.0.53:x", ":53"])
def test_dns_server_setting_refused(setting: str) -> None:
    with pytest.raises(ValueError, match="expected HOST"):
        dns_server(setting)


def test_dns_server_from_resolv_conf(tmp_path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nsearch corp.example\nnameserver 192.0.2.53\nnameserver 192.0.2.54\n")
    assert dns_server("", str(conf)) == ("192.0.2.53", 53)
    conf.write_text("search corp.example\n")
    with pytest.raises(ValueError, match="names no nameserver"):
        dns_server("", str(conf))
    with pytest.raises(ValueError, match="cannot be read"):
        dns_server("", str(tmp_path / "missing"))


def test_connector_passes_only_queries_for_the_granted_name() -> None:
    sent: list[bytes] = []
    stats = Stats("connector", "c")
    send = _queries_for("rdp.corp.example", lambda d: sent.append(bytes(d)), stats)
    good = DNSRecord.question("RDP.corp.example.", "AAAA").pack()
    send(good)
    send(DNSRecord.question("files.corp.example").pack())  # another name: not with this grant
    # Labels, not text: "rdp.corp" + "example" is written rdp.corp.example, but it is another name
    # (rdp\.corp.example) to the DNS server. Case still does not count (RDP above).
    dotted = DNSRecord(q=DNSQuestion(DNSLabel([b"rdp.corp", b"example"])))
    assert str(dotted.q.qname).rstrip(".") == "rdp.corp.example"
    send(dotted.pack())
    send(DNSRecord(q=DNSQuestion(DNSLabel([b"rdp", b"corp.example"]))).pack())
    send(b"\x00\x01garbage")
    answer = _reply("rdp.corp.example").pack()  # an answer, not a query
    send(answer)
    two = DNSRecord.question("rdp.corp.example")
    two.add_question(DNSRecord.question("files.corp.example").q)
    send(two.pack())
    update = DNSRecord.question("rdp.corp.example", "SOA")
    update.header.opcode = OPCODE.UPDATE
    update.add_auth(RR("rdp.corp.example", QTYPE.A, rdata=A("10.6.6.6"), ttl=60))  # an injected record
    send(update.pack())
    # dnslib raises UnicodeDecodeError (not DNSError) for this crafted CAA record: dropped, counted,
    # never an exception into the tunnel's callback.
    crafted = bytes.fromhex("da59010000010001000000000372647004636f7270076578616d706c650000010001"
                            "c00c010100010000003c00050003fffefd")
    with pytest.raises(UnicodeDecodeError):
        DNSRecord.parse(crafted)
    send(crafted)
    assert sent == [good]
    assert stats.datagrams_dropped == {"dns_name_mismatch": 4, "dns_not_a_query": 2, "dns_malformed": 2}
