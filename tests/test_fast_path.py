"""The fast path (pre-encoded bytes) and the full path (dnslib) give the same answers,
and `Resolver.answer` survives any input.

Responses are compared after parsing with dnspython. The answer section is compared in
order: both paths start a multi-address answer at the same record (query ID mod count).
Authority and additional sections are compared as sets.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from dns_support import DnsCache
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from discovery.dns.answers import DnsSettings
from discovery.dns.resolver import Resolver
from discovery.model import InstanceKey, Registration, encode_registration
from discovery.store.base import Event, EventType, Snapshot

PREFIX = "/discovery/"
ZONES = ("cluster.local", "corp.example")
UDP_MIN = 512
UDP_MAX = 1232
TCP_MAX = 65535


def _port(name: str, port: int, protocol: str = "tcp") -> dict[str, Any]:
    return {"name": name, "port": port, "protocol": protocol}


def _registry() -> list[tuple[str, str, str, dict[str, Any]]]:
    regs: list[tuple[str, str, str, dict[str, Any]]] = [
        ("default", "web", "a", {"address": "10.0.0.1", "ports": [_port("http", 80)]}),
        (
            "default",
            "web",
            "b",
            {"address": "10.0.0.2", "ttl": 3, "ports": [_port("http", 8080), _port("grpc", 90)]},
        ),
        ("default", "web", "c", {"address": "fd00::c", "ports": [_port("http", 80)]}),
        (
            "default",
            "dns",
            "ns1",
            {"address": "10.0.1.1", "ports": [_port("dns", 53, "udp"), _port("dns", 53)]},
        ),
        ("prod", "api", "x", {"address": "10.0.2.1", "ttl": 60}),
        ("prod", "api", "y", {"address": "2001:db8::1", "ttl": 2}),
    ]
    # sizes around the 512 / 1232 byte limits, so some answers need truncation
    for count in (6, 8, 12, 30, 70, 100):
        for i in range(count):
            address = f"10.{count}.{i // 200}.{i % 200 + 1}" if i % 3 else f"fd{count:02x}::{i + 1}"
            spec = {"address": address, "ports": [_port("http", 80 + i % 2)], "ttl": 2 + i % 7}
            regs.append(("sized", f"s{count}", f"i{i:03d}", spec))
    return regs


REGISTRY = _registry()


def make_resolver() -> Resolver:
    cache = DnsCache(DnsSettings(ZONES, 5, 7), PREFIX)
    cache.load(Snapshot(1000, []))
    events = []
    for rev, (ns, svc, inst, spec) in enumerate(REGISTRY, 1001):
        key = InstanceKey(ns, svc, inst).store_key(PREFIX)
        events.append(Event(EventType.PUT, key, encode_registration(Registration(**spec)), rev, 9))
    cache.apply(events)
    return cache.resolver()


RESOLVER = make_resolver()


def _names() -> list[str]:
    names: set[str] = set()
    for zone in ZONES:
        names |= {zone, f"svc.{zone}", f"dns-version.{zone}", f"ns.dns.{zone}", f"dns.{zone}"}
        for ns, svc, inst, spec in REGISTRY:
            base = f"{svc}.{ns}.svc.{zone}"
            names |= {f"{ns}.svc.{zone}", base}
            if inst <= "i001":
                names.add(f"{inst}.{base}")
            for port in spec.get("ports", []):
                names |= {
                    f"_{port['protocol']}.{base}",
                    f"_{port['name']}._{port['protocol']}.{base}",
                }
    for _ns, _svc, inst, spec in REGISTRY:
        if inst > "i001":
            continue  # two instances per sized service are enough to name
        reverse = ipaddress.ip_address(spec["address"]).reverse_pointer
        names.add(reverse)
        names.add(reverse.split(".", 2)[2])  # a reverse empty non-terminal
    names |= {"in-addr.arpa", "ip6.arpa"}
    return sorted(names)


EXISTING = _names()
MISSING = [
    "nope.cluster.local",
    "nope.default.svc.cluster.local",
    "z.a.web.default.svc.cluster.local",
    "_udp.web.default.svc.cluster.local",
    "_x._tcp.web.default.svc.corp.example",
    "99.0.0.10.in-addr.arpa",
    "11.in-addr.arpa",
    "f.f.f.f.ip6.arpa",
]
OUTSIDE = ["example.com", "local", "arpa", "evilcluster.local", "cluster.local.example", "."]

QTYPES = [1, 28, 33, 12, 6, 2, 16, 5, 15, 257, 65280, 255, 252, 251, 41, 0, 99, 65535]


def mixed_case(draw: st.DrawFn, name: str) -> str:
    mask = draw(st.sampled_from([0, 0, -1]) | st.integers(0, 2 ** len(name) - 1))
    return "".join(c.upper() if mask >> i & 1 else c for i, c in enumerate(name))


@st.composite
def queries(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A well-formed query as a client library would send it, and whether it goes by TCP."""
    name = draw(
        st.one_of(
            st.sampled_from(EXISTING),
            st.sampled_from(MISSING),
            st.sampled_from(OUTSIDE),
            st.from_regex(r"[a-z0-9_-]{1,12}(\.[a-z0-9_-]{1,12}){0,3}", fullmatch=True).map(
                lambda head: f"{head}.cluster.local"
            ),
        )
    )
    name = mixed_case(draw, name)
    qtype = draw(st.sampled_from(QTYPES))
    rdclass = draw(st.sampled_from([1, 1, 1, 1, 3, 255]))
    flags = draw(st.sampled_from([0, dns.flags.RD, dns.flags.CD, dns.flags.RD | dns.flags.CD]))
    edns = draw(st.sampled_from([None, 0, 0, 0, 1]))
    payload = draw(st.sampled_from([0, 100, 511, 512, 513, 1232, 1400, 4096, 65535]))
    do = draw(st.booleans())
    message = dns.message.make_query(
        name, qtype, rdclass, use_edns=edns if edns is not None else False, payload=payload
    )
    message.flags = flags
    if edns is not None and do:
        message.want_dnssec(True)
    message.id = draw(st.integers(0, 0xFFFF))
    return message.to_wire(), draw(st.booleans())


def parse(data: bytes) -> dns.message.Message:
    return dns.message.from_wire(data)


def section(rrsets: list[dns.rrset.RRset]) -> set[tuple[str, int, int, int, str]]:
    """Owner names keep their case: both paths must echo the question's spelling."""
    return {
        (rrset.name.to_text(), rrset.rdtype, rrset.rdclass, rrset.ttl, rdata.to_text())
        for rrset in rrsets
        for rdata in rrset
    }


def ordered(rrsets: list[dns.rrset.RRset]) -> list[tuple[str, int, int, int, str]]:
    return [
        (rrset.name.to_text(), rrset.rdtype, rrset.rdclass, rrset.ttl, rdata.to_text())
        for rrset in rrsets
        for rdata in rrset
    ]


def summary(message: dns.message.Message) -> dict[str, Any]:
    return {
        "id": message.id,
        "flags": message.flags,
        "rcode": message.rcode(),
        "opcode": message.opcode(),
        "question": [(q.name.to_text(), q.rdtype, q.rdclass) for q in message.question],
        "answer": ordered(message.answer),
        "authority": section(message.authority),
        "additional": section(message.additional),
        "edns": message.edns,
        "payload": message.payload if message.edns >= 0 else None,
        "ednsflags": message.ednsflags,
    }


def limit_of(wire: bytes, tcp: bool) -> int:
    if tcp:
        return TCP_MAX
    message = dns.message.from_wire(wire)
    return max(UDP_MIN, min(UDP_MAX, message.payload)) if message.edns >= 0 else UDP_MIN


def assert_same(wire: bytes, tcp: bool, fast: bytes) -> None:
    """The fast answer equals the full path's (authority and additional: as sets)."""
    full = RESOLVER.answer_full(wire, tcp)
    assert full is not None
    got, want = summary(parse(fast)), summary(parse(full))
    if got != want and got["additional"] != want["additional"]:
        # Both keep whole additional RRsets while they fit, but dnslib compresses a little
        # less than the pre-encoder: near the limit the full path keeps fewer. Only then.
        untruncated = RESOLVER.answer_full(wire, True)
        assert untruncated is not None
        assert len(untruncated) > limit_of(wire, tcp)
        assert len(fast) <= limit_of(wire, tcp)
        assert want["additional"] < got["additional"]
        assert got["additional"] <= summary(parse(untruncated))["additional"]
        got["additional"] = want["additional"]
    assert got == want
    assert len(fast) <= limit_of(wire, tcp)


# fast == full on generated queries


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(queries())
def test_fast_and_full_agree(case: tuple[bytes, bool]) -> None:
    wire, tcp = case
    fast = RESOLVER._fast(wire, tcp)
    if fast is not None:
        assert_same(wire, tcp, fast)
        return
    # not served fast: `answer` is exactly the full path
    served = RESOLVER.answer(wire, tcp)
    full = RESOLVER.answer_full(wire, tcp)
    assert served is not None and full is not None
    assert summary(parse(served)) == summary(parse(full))


@pytest.mark.parametrize(("tcp", "edns"), [(False, None), (False, 0), (True, 0)])
def test_every_name_and_type_agrees(tcp: bool, edns: int | None) -> None:
    """Exhaustive over registered names x common types."""
    served_fast = 0
    for name in EXISTING + MISSING:
        for spelling in (name.title(),):
            for qtype in (1, 28, 33, 12, 6, 2, 16, 15, 255):
                message = dns.message.make_query(
                    spelling, qtype, use_edns=edns if edns is not None else False, payload=1232
                )
                wire = message.to_wire()
                fast = RESOLVER._fast(wire, tcp)
                if fast is None:
                    served = RESOLVER.answer(wire, tcp)
                    full = RESOLVER.answer_full(wire, tcp)
                    assert served is not None and full is not None
                    assert summary(parse(served)) == summary(parse(full))
                else:
                    served_fast += 1
                    assert_same(wire, tcp, fast)
    assert served_fast > len(EXISTING)


# the fast path really serves the common shapes

COMMON = [
    ("web.default.svc.cluster.local", "A", dns.rcode.NOERROR, True),
    ("web.default.svc.cluster.local", "AAAA", dns.rcode.NOERROR, True),
    ("a.web.default.svc.cluster.local", "A", dns.rcode.NOERROR, True),
    ("c.web.default.svc.corp.example", "AAAA", dns.rcode.NOERROR, True),
    ("_http._tcp.web.default.svc.cluster.local", "SRV", dns.rcode.NOERROR, True),
    ("web.default.svc.cluster.local", "SRV", dns.rcode.NOERROR, True),
    ("1.0.0.10.in-addr.arpa", "PTR", dns.rcode.NOERROR, True),
    (
        "c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa",
        "PTR",
        dns.rcode.NOERROR,
        True,
    ),
    ("cluster.local", "SOA", dns.rcode.NOERROR, True),
    ("cluster.local", "NS", dns.rcode.NOERROR, True),
    ("dns-version.cluster.local", "TXT", dns.rcode.NOERROR, True),
    ("nope.default.svc.cluster.local", "A", dns.rcode.NXDOMAIN, False),
    ("99.0.0.10.in-addr.arpa", "PTR", dns.rcode.NXDOMAIN, False),
    ("a.web.default.svc.cluster.local", "AAAA", dns.rcode.NOERROR, False),  # NODATA
    ("default.svc.cluster.local", "A", dns.rcode.NOERROR, False),  # ENT NODATA
    ("web.default.svc.cluster.local", "MX", dns.rcode.NOERROR, False),
]


@pytest.mark.parametrize("tcp", [False, True])
@pytest.mark.parametrize("edns", [None, 0])
@pytest.mark.parametrize(("qname", "qtype", "rcode", "has_answer"), COMMON)
def test_fast_path_serves_common_shapes(
    qname: str, qtype: str, rcode: int, has_answer: bool, edns: int | None, tcp: bool
) -> None:
    for spelling in (qname, qname.upper()):
        wire = dns.message.make_query(
            spelling, qtype, use_edns=edns if edns is not None else False
        ).to_wire()
        fast = RESOLVER._fast(wire, tcp)
        assert fast is not None, "fast path stopped serving this query"
        response = parse(fast)
        assert response.rcode() == rcode
        assert bool(response.answer) == has_answer
        assert bool(response.authority) != has_answer
        assert (response.edns >= 0) == (edns is not None)
        assert_same(wire, tcp, fast)


def test_answer_counts_fast_path_hits() -> None:
    resolver = make_resolver()
    for qname, qtype, *_ in COMMON:
        assert resolver.answer(dns.message.make_query(qname, qtype).to_wire()) is not None
    assert resolver.stats.fast == len(COMMON)
    assert resolver.stats.full == 0


def test_fast_path_leaves_the_rest_to_the_full_path() -> None:
    leftovers = [
        dns.message.make_query("example.com", "A"),  # outside the zones
        dns.message.make_query("web.default.svc.cluster.local", "ANY"),
        dns.message.make_query("cluster.local", "AXFR"),
        dns.message.make_query("nope.cluster.local", "AXFR"),
        dns.message.make_query("web.default.svc.cluster.local", "A", rdclass="CH"),
        dns.message.make_query("web.default.svc.cluster.local", "A", use_edns=1),
    ]
    for message in leftovers:
        assert RESOLVER._fast(message.to_wire(), False) is None


def test_fast_path_serves_the_subset_that_fits() -> None:
    """A large answer over UDP costs no more than a small one: TC=1 with the records that
    fit, from pre-encoded bytes."""
    for edns in (False, True):
        query = dns.message.make_query(
            "s100.sized.svc.cluster.local", "A", use_edns=0 if edns else False, payload=512
        )
        wire = query.to_wire()
        fast = RESOLVER._fast(wire, False)
        assert fast is not None
        response = parse(fast)
        assert response.flags & dns.flags.TC
        assert 0 < sum(len(rrset) for rrset in response.answer) < 100
        assert (response.edns >= 0) == edns
        assert_same(wire, False, fast)


# robustness: random bytes and mutated queries


def check_response(wire: bytes, tcp: bool) -> None:
    response = RESOLVER.answer(wire, tcp)
    readable = len(wire) >= 12 and not wire[2] & 0x80
    if not readable:
        assert response is None
        return
    assert response is not None
    assert len(response) >= 12
    assert response[:2] == wire[:2]
    assert response[2] & 0x80  # QR=1
    assert len(response) <= TCP_MAX
    if (response[2] >> 3) & 0x0F == 5:
        # dnspython rejects an UPDATE whose zone section is not SOA: read it as a QUERY
        response = response[:2] + bytes((response[2] & 0x87,)) + response[3:]
    message = dns.message.from_wire(response)
    assert message.id == struct.unpack(">H", wire[:2])[0]
    assert message.flags & dns.flags.QR


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=600), st.booleans())
def test_random_bytes(wire: bytes, tcp: bool) -> None:
    check_response(wire, tcp)


@settings(max_examples=600, deadline=None)
@given(st.binary(min_size=12, max_size=12), st.binary(max_size=300), st.booleans())
def test_random_body_behind_a_query_header(head: bytes, body: bytes, tcp: bool) -> None:
    # QR=0 and QDCOUNT=1: the header is readable, the rest may be anything
    wire = head[:2] + bytes((head[2] & 0x7F,)) + head[3:4] + b"\x00\x01" + head[6:] + body
    check_response(wire, tcp)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, bool]:
    wire, tcp = draw(queries())
    data = bytearray(wire)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete", "append"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[position] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[position:]
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and data:
            del data[position : position + draw(st.integers(1, 8))]
        elif kind == "append":
            data += draw(st.binary(min_size=1, max_size=16))
    return bytes(data), tcp


@settings(max_examples=300, deadline=None)
@given(mutated())
def test_mutated_queries(case: tuple[bytes, bool]) -> None:
    wire, tcp = case
    check_response(wire, tcp)
    # whatever the fast path serves must match the full path
    if len(wire) >= 12:
        fast = RESOLVER._fast(wire, tcp)
        if fast is not None:
            assert_same(wire, tcp, fast)


@settings(max_examples=150, deadline=None)
@given(queries())
def test_within_the_size_limit(case: tuple[bytes, bool]) -> None:
    wire, tcp = case
    response = RESOLVER.answer(wire, tcp)
    assert response is not None
    try:
        limit = limit_of(wire, tcp)
    except dns.exception.DNSException:
        assume(False)
    parse(response)
    assert len(response) <= limit


@pytest.mark.parametrize(
    "qname",
    [b"\x01\xff\x07cluster\x05local\x00", b"\x02\xc3\x28\x03svc\x07cluster\x05local\x00"],
    ids=["ff", "bad-utf8"],
)
def test_binary_labels_take_the_full_path(qname: bytes) -> None:
    """dnslib refuses non-UTF-8 labels (FORMERR); the fast path must not answer NXDOMAIN."""
    wire = struct.pack(">HHHHHH", 7, 0x0100, 1, 0, 0, 0) + qname + b"\x00\x01\x00\x01"
    assert RESOLVER._fast(wire, False) is None
    served, full = RESOLVER.answer(wire), RESOLVER.answer_full(wire)
    assert served is not None and served == full
    assert parse(served).rcode() == dns.rcode.FORMERR
