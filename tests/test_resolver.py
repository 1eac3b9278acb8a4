"""Table-driven DNS tests (CoreDNS style) through `Resolver.answer` on a fixed registry.

One row per (qname, qtype) -> rcode, AA, answer, authority, additional. Queries are built
and responses parsed with dnspython, never with the project's own encoder.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from dns_support import DnsCache

from discovery.dns.answers import DnsSettings
from discovery.dns.resolver import Resolver
from discovery.model import InstanceKey, Registration, encode_registration
from discovery.store.base import Event, EventType, Snapshot

PREFIX = "/discovery/"
Z = "cluster.local"
Z2 = "corp.example"
DNS_TTL = 5
NEG_TTL = 7
LOAD_REV = 100

Record = tuple[str, str, int, str]  # (owner, type, ttl, rdata) as dnspython prints them


@dataclass(frozen=True)
class Reg:
    ns: str
    svc: str
    inst: str
    spec: dict[str, Any]


def http(port: int, proto: str = "tcp", name: str = "http") -> dict[str, Any]:
    return {"name": name, "port": port, "protocol": proto}


REGISTRY: list[Reg] = [
    Reg("default", "web", "a", {"address": "10.0.0.1", "ports": [http(80)]}),
    Reg(
        "default",
        "web",
        "b",
        {"address": "10.0.0.2", "ttl": 3, "ports": [http(8080), http(9090, name="grpc")]},
    ),
    Reg(
        "default",
        "web",
        "c",
        {"address": "fd00::c", "ports": [http(80)], "priority": 10, "weight": 5},
    ),
    Reg(
        "default",
        "dns",
        "ns1",
        {"address": "10.0.1.1", "ports": [http(53, "udp", "dns"), http(53, "tcp", "dns")]},
    ),
    Reg("prod", "api", "x", {"address": "10.0.2.1", "ttl": 60}),
    Reg("prod", "api", "y", {"address": "2001:db8::1", "ttl": 2}),
    *(
        Reg("prod", "mid", f"m{i}", {"address": f"10.0.3.{i + 1}", "ports": [http(80)]})
        for i in range(8)
    ),
    *(
        Reg("kube", "big", f"i{i:03d}", {"address": f"10.0.4.{i + 1}", "ports": [http(80)]})
        for i in range(100)
    ),
]
REV = LOAD_REV + len(REGISTRY)  # one store revision per registration


def put(reg: Reg, rev: int, lease: int = 7) -> Event:
    key = InstanceKey(reg.ns, reg.svc, reg.inst).store_key(PREFIX)
    return Event(EventType.PUT, key, encode_registration(Registration(**reg.spec)), rev, lease)


def make_cache(
    registry: Iterable[Reg] = REGISTRY,
    zones: tuple[str, ...] = (Z, Z2),
    load_rev: int = LOAD_REV,
    max_answers: int = 0,
) -> DnsCache:
    settings = DnsSettings(zones, DNS_TTL, NEG_TTL, max_answers=max_answers)
    cache = DnsCache(settings, PREFIX)
    cache.load(Snapshot(load_rev, []))
    cache.apply([put(reg, load_rev + 1 + i) for i, reg in enumerate(registry)])
    return cache


@pytest.fixture(scope="module")
def resolver() -> Resolver:
    return make_cache().resolver()


# query building and response reading (dnspython only)


def query(
    qname: str,
    qtype: str | int = "A",
    rdclass: str = "IN",
    edns: int | None = None,
    payload: int = 1232,
    flags: int = dns.flags.RD,
) -> dns.message.Message:
    return dns.message.make_query(
        qname,
        qtype,
        rdclass,
        use_edns=edns if edns is not None else False,
        payload=payload,
        flags=flags,
    )


def ask(resolver: Resolver, q: dns.message.Message | bytes, tcp: bool = False) -> Any:
    wire = q if isinstance(q, bytes) else q.to_wire()
    data = resolver.answer(wire, tcp)
    assert data is not None
    if tcp:
        assert len(data) <= 65535
    response = dns.message.from_wire(data)
    assert response.id == struct.unpack(">H", wire[:2])[0]
    assert response.flags & dns.flags.QR
    return response


def records(section: Iterable[dns.rrset.RRset]) -> set[Record]:
    return {
        (
            rrset.name.to_text().lower(),
            dns.rdatatype.to_text(rrset.rdtype),
            rrset.ttl,
            rdata.to_text().lower(),
        )
        for rrset in section
        for rdata in rrset
    }


def fqdn(name: str) -> str:
    return name.rstrip(".") + "."


def rr(name: str, rtype: str, ttl: int, rdata: str) -> Record:
    return (fqdn(name).lower(), rtype, ttl, rdata)


def soa(zone: str = Z, serial: int = REV) -> Record:
    rdata = f"ns.dns.{Z}. hostmaster.{Z}. {serial} 7200 1800 86400 {NEG_TTL}"
    return rr(zone, "SOA", NEG_TTL, rdata)


def reverse(address: str) -> str:
    return ipaddress.ip_address(address).reverse_pointer


def srv(owner: str, ttl: int, prio: int, weight: int, port: int, target: str) -> Record:
    return rr(owner, "SRV", ttl, f"{prio} {weight} {port} {fqdn(target)}")


# the table

WEB = f"web.default.svc.{Z}"
API = f"api.prod.svc.{Z}"
DNSSVC = f"dns.default.svc.{Z}"
INADDR = "in-addr.arpa"
IP6 = "ip6.arpa"


def glue(zone: str = Z) -> dict[str, Record]:
    return {
        "a": rr(f"a.web.default.svc.{zone}", "A", 5, "10.0.0.1"),
        "b": rr(f"b.web.default.svc.{zone}", "A", 3, "10.0.0.2"),
        "c": rr(f"c.web.default.svc.{zone}", "AAAA", 5, "fd00::c"),
        "ns1": rr(f"ns1.dns.default.svc.{zone}", "A", 5, "10.0.1.1"),
    }


@dataclass(frozen=True)
class Case:
    qname: str
    qtype: str
    rcode: int = dns.rcode.NOERROR
    aa: bool = True
    answer: frozenset[Record] = field(default_factory=frozenset)
    authority: frozenset[Record] = field(default_factory=frozenset)
    additional: frozenset[Record] = field(default_factory=frozenset)

    def __str__(self) -> str:
        return f"{self.qname}/{self.qtype}"


def case(
    qname: str,
    qtype: str,
    rcode: int = dns.rcode.NOERROR,
    aa: bool = True,
    answer: Iterable[Record] = (),
    authority: Iterable[Record] = (),
    additional: Iterable[Record] = (),
) -> Case:
    return Case(
        qname, qtype, rcode, aa, frozenset(answer), frozenset(authority), frozenset(additional)
    )


def nodata(qname: str, qtype: str, zone: str = Z) -> Case:
    return case(qname, qtype, authority=[soa(zone)])


def nxdomain(qname: str, qtype: str, zone: str = Z) -> Case:
    return case(qname, qtype, dns.rcode.NXDOMAIN, authority=[soa(zone)])


def refused(qname: str, qtype: str = "A") -> Case:
    return case(qname, qtype, dns.rcode.REFUSED, aa=False)


def srv_cases(zone: str) -> list[Case]:
    web = f"web.default.svc.{zone}"
    g = glue(zone)
    http_srv = f"_http._tcp.{web}"
    grpc_srv = f"_grpc._tcp.{web}"
    return [
        case(
            http_srv,
            "SRV",
            answer=[
                srv(http_srv, 3, 0, 100, 80, f"a.{web}"),
                srv(http_srv, 3, 0, 100, 8080, f"b.{web}"),
                srv(http_srv, 3, 10, 5, 80, f"c.{web}"),
            ],
            additional=[g["a"], g["b"], g["c"]],
        ),
        case(
            grpc_srv,
            "SRV",
            answer=[srv(grpc_srv, 3, 0, 100, 9090, f"b.{web}")],
            additional=[g["b"]],
        ),
        case(
            web,
            "SRV",
            answer=[
                srv(web, 3, 0, 100, 80, f"a.{web}"),
                srv(web, 3, 0, 100, 8080, f"b.{web}"),
                srv(web, 3, 0, 100, 9090, f"b.{web}"),
                srv(web, 3, 10, 5, 80, f"c.{web}"),
            ],
            additional=[g["a"], g["b"], g["c"]],
        ),
    ]


CASES: list[Case] = [
    # service A/AAAA: every instance (headless), TTL = min(--dns-ttl, lease ttl)
    case(WEB, "A", answer=[rr(WEB, "A", 3, "10.0.0.1"), rr(WEB, "A", 3, "10.0.0.2")]),
    case(WEB, "AAAA", answer=[rr(WEB, "AAAA", 5, "fd00::c")]),
    case(API, "A", answer=[rr(API, "A", 5, "10.0.2.1")]),
    case(API, "AAAA", answer=[rr(API, "AAAA", 2, "2001:db8::1")]),
    case(
        f"mid.prod.svc.{Z}",
        "A",
        answer=[rr(f"mid.prod.svc.{Z}", "A", 5, f"10.0.3.{i + 1}") for i in range(8)],
    ),
    # instance A/AAAA
    case(f"a.{WEB}", "A", answer=[glue()["a"]]),
    case(f"b.{WEB}", "A", answer=[glue()["b"]]),
    case(f"c.{WEB}", "AAAA", answer=[glue()["c"]]),
    case(f"y.{API}", "AAAA", answer=[rr(f"y.{API}", "AAAA", 2, "2001:db8::1")]),
    # AAAA on an IPv4-only name (and A on an IPv6-only one): NODATA, never NXDOMAIN
    nodata(f"a.{WEB}", "AAAA"),
    nodata(f"x.{API}", "AAAA"),
    nodata(f"c.{WEB}", "A"),
    nodata(f"ns1.{DNSSVC}", "AAAA"),
    nodata(f"mid.prod.svc.{Z}", "AAAA"),
    # SRV: per named port, and on the service name (all named ports)
    *srv_cases(Z),
    case(
        f"_dns._udp.{DNSSVC}",
        "SRV",
        answer=[srv(f"_dns._udp.{DNSSVC}", 5, 0, 100, 53, f"ns1.{DNSSVC}")],
        additional=[glue()["ns1"]],
    ),
    case(
        f"_dns._tcp.{DNSSVC}",
        "SRV",
        answer=[srv(f"_dns._tcp.{DNSSVC}", 5, 0, 100, 53, f"ns1.{DNSSVC}")],
        additional=[glue()["ns1"]],
    ),
    nodata(API, "SRV"),  # no named ports
    nodata(f"a.{WEB}", "SRV"),
    nodata(f"_http._tcp.{WEB}", "A"),
    # PTR for IPv4 and IPv6 reverse names
    case(
        reverse("10.0.0.1"),
        "PTR",
        answer=[rr(reverse("10.0.0.1"), "PTR", 5, f"a.{WEB}.")],
    ),
    case(
        reverse("10.0.0.2"),
        "PTR",
        answer=[rr(reverse("10.0.0.2"), "PTR", 3, f"b.{WEB}.")],
    ),
    case(
        reverse("fd00::c"),
        "PTR",
        answer=[rr(reverse("fd00::c"), "PTR", 5, f"c.{WEB}.")],
    ),
    case(
        reverse("2001:db8::1"),
        "PTR",
        answer=[rr(reverse("2001:db8::1"), "PTR", 2, f"y.{API}.")],
    ),
    nodata(reverse("10.0.0.1"), "A", INADDR),
    nxdomain(reverse("10.0.0.99"), "PTR", INADDR),
    nxdomain(reverse("fd00::d"), "PTR", IP6),
    nxdomain("1.0.0.0.10.in-addr.arpa", "PTR", INADDR),
    # reverse-zone empty non-terminals and apexes
    nodata("0.0.10.in-addr.arpa", "PTR", INADDR),
    nodata("10.in-addr.arpa", "PTR", INADDR),
    nodata(reverse("fd00::c").split(".", 1)[1], "PTR", IP6),
    nodata("d.f.ip6.arpa", "PTR", IP6),
    nxdomain("11.in-addr.arpa", "PTR", INADDR),
    case(INADDR, "SOA", answer=[soa(INADDR)]),
    nodata(INADDR, "PTR", INADDR),
    # apex: SOA (serial = store revision, minimum = negative TTL) and NS
    case(Z, "SOA", answer=[soa()]),
    case(Z, "NS", answer=[rr(Z, "NS", DNS_TTL, f"ns.dns.{Z}.")]),
    nodata(Z, "A"),
    nodata(Z, "TXT"),
    # schema version
    case(f"dns-version.{Z}", "TXT", answer=[rr(f"dns-version.{Z}", "TXT", DNS_TTL, '"1.1.0"')]),
    nodata(f"dns-version.{Z}", "A"),
    # empty non-terminals: NODATA with the SOA
    nodata(f"default.svc.{Z}", "A"),
    nodata(f"prod.svc.{Z}", "SRV"),
    nodata(f"svc.{Z}", "A"),
    nodata(f"_tcp.{WEB}", "SRV"),
    nodata(f"_udp.{DNSSVC}", "SRV"),
    nodata(f"ns.dns.{Z}", "A"),
    nodata(f"dns.{Z}", "A"),
    nodata(WEB, "TXT"),
    nodata(WEB, "MX"),
    nodata(WEB, "CAA"),
    nodata(WEB, "TYPE65280"),
    # names that do not exist: NXDOMAIN with the SOA
    nxdomain(f"nope.default.svc.{Z}", "A"),
    nxdomain(f"nope.svc.{Z}", "A"),
    nxdomain(f"d.a.{WEB}", "A"),
    nxdomain(f"_udp.{WEB}", "SRV"),
    nxdomain(f"_grpc._udp.{WEB}", "SRV"),
    nxdomain(f"_nope._tcp.{WEB}", "SRV"),
    nxdomain(f"nope.{Z}", "SOA"),
    nxdomain(f"web.default.{Z}", "A"),
    nxdomain(f"nope.default.svc.{Z}", "AAAA"),
    nxdomain(f"nope.default.svc.{Z}", "ANY"),
    # ANY: one RRset (RFC 8482 minimal)
    case(WEB, "ANY", answer=[rr(WEB, "A", 3, "10.0.0.1"), rr(WEB, "A", 3, "10.0.0.2")]),
    case(f"c.{WEB}", "ANY", answer=[glue()["c"]]),
    case(Z, "ANY", answer=[soa()]),
    case(
        reverse("10.0.0.1"),
        "ANY",
        answer=[rr(reverse("10.0.0.1"), "PTR", 5, f"a.{WEB}.")],
    ),
    case(
        f"_grpc._tcp.{WEB}",
        "ANY",
        answer=[srv(f"_grpc._tcp.{WEB}", 3, 0, 100, 9090, f"b.{WEB}")],
        additional=[glue()["b"]],
    ),
    nodata(f"svc.{Z}", "ANY"),
    # a second zone answers the same services
    case(
        f"web.default.svc.{Z2}",
        "A",
        answer=[
            rr(f"web.default.svc.{Z2}", "A", 3, "10.0.0.1"),
            rr(f"web.default.svc.{Z2}", "A", 3, "10.0.0.2"),
        ],
    ),
    case(f"c.web.default.svc.{Z2}", "AAAA", answer=[glue(Z2)["c"]]),
    *srv_cases(Z2),
    case(Z2, "SOA", answer=[soa(Z2)]),
    case(Z2, "NS", answer=[rr(Z2, "NS", DNS_TTL, f"ns.dns.{Z}.")]),
    case(f"dns-version.{Z2}", "TXT", answer=[rr(f"dns-version.{Z2}", "TXT", 5, '"1.1.0"')]),
    nxdomain(f"nope.default.svc.{Z2}", "A", Z2),
    nodata(f"default.svc.{Z2}", "A", Z2),
    # zone transfers are not served
    case(Z, "AXFR", dns.rcode.NOTIMP, aa=False),
    case(Z, "IXFR", dns.rcode.NOTIMP, aa=False),
    case(f"nope.{Z}", "AXFR", dns.rcode.NOTIMP, aa=False),
    # outside every zone: REFUSED, AA=0
    refused("example.com"),
    refused("local"),
    refused("evilcluster.local"),
    refused(f"web.default.svc.{Z}.evil"),
    refused(".", "NS"),
    refused("arpa", "SOA"),
    refused("1.0.0.10.in-addr.arpa.example", "PTR"),
]


@pytest.mark.parametrize("edns", [None, 0], ids=["plain", "edns"])
@pytest.mark.parametrize("row", CASES, ids=str)
def test_table(resolver: Resolver, row: Case, edns: int | None) -> None:
    response = ask(resolver, query(row.qname, row.qtype, edns=edns))
    assert dns.rcode.to_text(response.rcode()) == dns.rcode.to_text(row.rcode)
    assert bool(response.flags & dns.flags.AA) == row.aa
    assert not response.flags & dns.flags.TC
    assert response.flags & dns.flags.RD
    assert not response.flags & dns.flags.RA
    assert response.question[0].name.to_text() == fqdn(row.qname) or row.qname == "."
    assert records(response.answer) == row.answer
    assert records(response.authority) == row.authority
    assert records(response.additional) == row.additional
    # OPT iff the query had one, advertising 1232 bytes
    if edns is None:
        assert response.edns == -1
    else:
        assert response.edns == 0
        assert response.payload == 1232


def test_table_covers_every_record_type() -> None:
    answered = {rec[1] for row in CASES for rec in row.answer}
    assert answered >= {"A", "AAAA", "SRV", "PTR", "SOA", "NS", "TXT"}


# no duplicate records on the wire (dnspython would merge them silently)


def test_service_srv_has_no_duplicate_records(resolver: Resolver) -> None:
    """ns1 exposes port 53 over udp and tcp: the service SRV lists 0 100 53 ns1 once."""
    wire = resolver.answer(query(DNSSVC, "SRV").to_wire())
    assert wire is not None
    ancount = struct.unpack_from(">H", wire, 6)[0]
    response = dns.message.from_wire(wire)
    assert records(response.answer) == {srv(DNSSVC, 5, 0, 100, 53, f"ns1.{DNSSVC}")}
    assert ancount == 1


# case: matching ignores it, the question and answer owners keep it (0x20)


def test_mixed_case_is_echoed_exactly(resolver: Resolver) -> None:
    qname = "wEb.DeFaUlT.sVc.ClUsTeR.lOcAl."
    for edns in (None, 0):
        response = ask(resolver, query(qname, "A", edns=edns))
        assert response.rcode() == dns.rcode.NOERROR
        assert response.question[0].name.to_text() == qname
        assert {rrset.name.to_text() for rrset in response.answer} == {qname}
        assert {r[3] for r in records(response.answer)} == {"10.0.0.1", "10.0.0.2"}


@pytest.mark.parametrize(
    ("qname", "qtype", "rcode"),
    [
        ("_HTTP._Tcp.Web.Default.Svc.Cluster.Local.", "SRV", dns.rcode.NOERROR),
        ("1.0.0.10.IN-ADDR.ARPA.", "PTR", dns.rcode.NOERROR),
        ("CLUSTER.LOCAL.", "SOA", dns.rcode.NOERROR),
        ("Nope.Default.Svc.Cluster.Local.", "A", dns.rcode.NXDOMAIN),
        ("Default.SVC.Cluster.Local.", "A", dns.rcode.NOERROR),
        ("WWW.Example.COM.", "A", dns.rcode.REFUSED),
        ("Web.Default.Svc.Cluster.Local.", "ANY", dns.rcode.NOERROR),
    ],
)
def test_mixed_case_everywhere(resolver: Resolver, qname: str, qtype: str, rcode: int) -> None:
    lower = ask(resolver, query(qname.lower(), qtype))
    mixed = ask(resolver, query(qname, qtype))
    assert mixed.rcode() == rcode
    assert mixed.question[0].name.to_text() == qname
    assert records(mixed.answer) == records(lower.answer)
    assert records(mixed.authority) == records(lower.authority)
    assert records(mixed.additional) == records(lower.additional)


# header, opcode, class, EDNS and malformed queries


def test_class_ch_is_refused(resolver: Resolver) -> None:
    for qname in (WEB, "version.bind"):
        response = ask(resolver, query(qname, "TXT", rdclass="CH"))
        assert response.rcode() == dns.rcode.REFUSED
        assert not response.flags & dns.flags.AA
        assert response.question[0].rdclass == dns.rdataclass.CH
        assert not response.answer


@pytest.mark.parametrize("opcode", [dns.opcode.IQUERY, dns.opcode.STATUS, dns.opcode.NOTIFY])
@pytest.mark.parametrize("edns", [None, 0])
def test_opcode_other_than_query_is_notimp(
    resolver: Resolver, opcode: int, edns: int | None
) -> None:
    q = query(WEB, "A", edns=edns)
    q.set_opcode(opcode)
    response = ask(resolver, q)
    assert response.rcode() == dns.rcode.NOTIMP
    assert response.opcode() == opcode
    assert not response.answer
    assert response.edns == (-1 if edns is None else 0)


def header(
    qid: int = 0x1234, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0
) -> bytes:
    return struct.pack(">HHHHHH", qid, flags, qd, an, ns, ar)


def question(qname: str, qtype: int = 1, qclass: int = 1) -> bytes:
    return dns.name.from_text(qname).to_wire() + struct.pack(">HH", qtype, qclass)


def opt(payload: int = 1232, version: int = 0) -> bytes:
    return b"\x00" + struct.pack(">HHBBHH", 41, payload, 0, version, 0, 0)


@pytest.mark.parametrize(
    "wire",
    [
        header(qd=0),
        header(qd=0, ar=1) + opt(),
        header(qd=2) + question(WEB) + question(API),
        header(qd=2, ar=1) + question(WEB) + question(API) + opt(),
        header(ar=2) + question(WEB) + opt() + opt(),  # two OPT records
        header() + b"\xff\xff\xff",  # garbage after a readable header
        header() + question(WEB)[:-3],  # question cut short
        header() + b"\xc0\x0c\x00\x01\x00\x01",  # name pointing at itself
        header(ar=1) + question(WEB) + b"\x00\x00\x29",  # OPT cut short
        header(an=5) + question(WEB),  # counts larger than the message
        header() + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01",  # label over 63
        header() + (b"\x3f" + b"a" * 63) * 4 + b"\x07cluster\x05local\x00\x00\x01\x00\x01",
    ],
    ids=[
        "qd0",
        "qd0-opt",
        "qd2",
        "qd2-opt",
        "two-opt",
        "garbage",
        "short-question",
        "pointer-loop",
        "short-opt",
        "bad-ancount",
        "label-64",
        "name-over-255",
    ],
)
def test_formerr(resolver: Resolver, wire: bytes) -> None:
    response = ask(resolver, wire)
    assert response.id == 0x1234
    assert response.rcode() == dns.rcode.FORMERR
    assert not response.answer
    assert not response.flags & dns.flags.AA


def test_formerr_keeps_opt_and_question_when_readable(resolver: Resolver) -> None:
    response = ask(resolver, header(qd=2, ar=1) + question(WEB) + question(API) + opt())
    assert response.rcode() == dns.rcode.FORMERR
    assert response.edns == 0 and response.payload == 1232


@pytest.mark.parametrize(
    "wire",
    [
        b"",
        b"\x12",
        header()[:11],
        header(flags=0x8100) + question(WEB),  # a response (QR=1)
        header(flags=0x8000, qd=0),
        header(flags=0x8400) + b"\xff\xff",
    ],
    ids=["empty", "one-byte", "eleven-bytes", "qr", "qr-qd0", "qr-garbage"],
)
def test_dropped(resolver: Resolver, wire: bytes) -> None:
    assert resolver.answer(wire) is None
    assert resolver.answer(wire, tcp=True) is None


def test_edns_version_1_is_badvers(resolver: Resolver) -> None:
    response = ask(resolver, query(WEB, "A", edns=1))
    assert response.rcode() == dns.rcode.BADVERS
    assert response.edns == 0
    assert response.payload == 1232
    assert not response.answer
    assert response.question[0].name.to_text() == fqdn(WEB)


@pytest.mark.parametrize("payload", [0, 100, 511, 512, 1232, 4096, 65535])
def test_edns_payload_is_always_1232(resolver: Resolver, payload: int) -> None:
    response = ask(resolver, query(f"a.{WEB}", "A", edns=0, payload=payload))
    assert response.rcode() == dns.rcode.NOERROR
    assert response.edns == 0
    assert response.payload == 1232
    assert response.ednsflags & 0xFFFF == 0


@pytest.mark.parametrize("flags", [0, dns.flags.RD, dns.flags.CD, dns.flags.RD | dns.flags.CD])
def test_rd_and_cd_are_echoed(resolver: Resolver, flags: int) -> None:
    for qname in (WEB, f"nope.{Z}", "example.com"):
        response = ask(resolver, query(qname, "A", flags=flags))
        assert response.flags & (dns.flags.RD | dns.flags.CD) == flags
        assert not response.flags & (dns.flags.RA | dns.flags.TC | dns.flags.AD)


def test_ra_set_when_recursion_is_offered() -> None:
    resolver = make_cache(REGISTRY[:3]).resolver(recursion=True)
    for qname in (WEB, f"nope.{Z}", "example.com"):
        assert ask(resolver, query(qname, "A")).flags & dns.flags.RA


# SOA serial and store revision


def test_soa_serial_is_revision_mod_2_32() -> None:
    load_rev = 2**32 + 40
    cache = make_cache(REGISTRY[:1], load_rev=load_rev)
    resolver = cache.resolver()
    response = ask(resolver, query(Z, "SOA"))
    assert records(response.answer) == {soa(serial=41)}
    negative = ask(resolver, query(f"nope.{Z}", "A", edns=0))
    assert records(negative.authority) == {soa(serial=41)}


def test_serial_follows_changes_and_deletes() -> None:
    cache = make_cache(REGISTRY[:3])
    resolver = cache.resolver()
    rev = LOAD_REV + 3
    assert records(ask(resolver, query(Z, "SOA")).answer) == {soa(serial=rev)}
    key = InstanceKey("default", "web", "a").store_key(PREFIX)
    cache.apply([Event(EventType.DELETE, key, b"", rev + 1, 0)])
    assert records(ask(resolver, query(Z, "SOA")).answer) == {soa(serial=rev + 1)}
    gone = ask(resolver, query(f"a.{WEB}", "A"))
    assert gone.rcode() == dns.rcode.NXDOMAIN
    assert records(gone.authority) == {soa(serial=rev + 1)}
    assert ask(resolver, query(reverse("10.0.0.1"), "PTR")).rcode() == dns.rcode.NXDOMAIN
    left = ask(resolver, query(WEB, "A"))
    assert records(left.answer) == {rr(WEB, "A", 3, "10.0.0.2")}


def test_last_instance_gone_makes_namespace_nxdomain() -> None:
    cache = make_cache(REGISTRY[4:6])  # prod/api x and y
    resolver = cache.resolver()
    assert ask(resolver, query(f"prod.svc.{Z}", "A")).rcode() == dns.rcode.NOERROR
    rev = LOAD_REV + 2
    cache.apply(
        [
            Event(
                EventType.DELETE, InstanceKey("prod", "api", n).store_key(PREFIX), b"", rev + i, 0
            )
            for i, n in enumerate(("x", "y"), 1)
        ]
    )
    for qname in (API, f"prod.svc.{Z}", reverse("10.0.2.1")):
        assert ask(resolver, query(qname, "A")).rcode() == dns.rcode.NXDOMAIN
    assert ask(resolver, query(f"svc.{Z}", "A")).rcode() == dns.rcode.NOERROR
    assert ask(resolver, query("10.in-addr.arpa", "PTR")).rcode() == dns.rcode.NXDOMAIN


# before the first load


def test_servfail_until_first_load() -> None:
    cache = DnsCache(DnsSettings((Z,), DNS_TTL, NEG_TTL), PREFIX)
    resolver = cache.resolver()
    assert not cache.synced
    for qname, qtype in ((WEB, "A"), (Z, "SOA"), (f"nope.{Z}", "A"), (reverse("10.0.0.1"), "PTR")):
        wire = query(qname, qtype).to_wire()
        assert resolver._fast(wire, False) is None
        response = ask(resolver, wire)
        assert response.rcode() == dns.rcode.SERVFAIL
        assert not response.flags & dns.flags.AA
    outside = ask(resolver, query("example.com", "A"))
    assert outside.rcode() == dns.rcode.REFUSED
    cache.load(Snapshot(5, []))
    cache.apply([put(REGISTRY[0], 6)])
    response = ask(resolver, query(WEB, "A"))
    assert response.rcode() == dns.rcode.NOERROR
    assert records(response.answer) == {rr(WEB, "A", 5, "10.0.0.1")}


# rotation


@pytest.mark.parametrize(
    ("qname", "qtype", "size"),
    [(WEB, "A", 2), (f"mid.prod.svc.{Z}", "A", 8), (WEB, "ANY", 2)],
)
def test_rotation(resolver: Resolver, qname: str, qtype: str, size: int) -> None:
    firsts = set()
    orders = set()
    expected = None
    for _ in range(20):
        response = ask(resolver, query(qname, qtype))
        (rrset,) = response.answer
        addresses = [rdata.to_text() for rdata in rrset]
        assert len(addresses) == size
        if expected is None:
            expected = set(addresses)
        assert set(addresses) == expected
        firsts.add(addresses[0])
        orders.add(tuple(addresses))
    assert len(firsts) > 1
    assert len(orders) > 1


def test_rotation_keeps_big_answers_complete(resolver: Resolver) -> None:
    firsts = set()
    for _ in range(20):
        response = ask(resolver, query(f"big.kube.svc.{Z}", "A", edns=0), tcp=True)
        (rrset,) = response.answer
        assert len(rrset) == 100
        firsts.add(next(iter(rrset)).to_text())
    assert len(firsts) > 1


# truncation

BIG = f"big.kube.svc.{Z}"
BIG_ADDRESSES = {f"10.0.4.{i + 1}" for i in range(100)}


def addresses(response: Any) -> set[str]:
    return {r[3] for r in records(response.answer)}


def test_udp_without_edns_carries_the_subset_that_fits(resolver: Resolver) -> None:
    """Records left out for size: TC=1 with the records that fit, never an empty answer."""
    wire = query(BIG, "A").to_wire()
    data = resolver.answer(wire)
    assert data is not None and len(data) <= 512
    response = dns.message.from_wire(data)
    assert response.flags & dns.flags.TC
    assert response.flags & dns.flags.AA
    assert response.rcode() == dns.rcode.NOERROR
    assert 20 <= len(addresses(response)) < 100
    assert addresses(response) < BIG_ADDRESSES
    assert not response.additional
    assert response.question[0].name.to_text() == fqdn(BIG)
    assert response.edns == -1


@pytest.mark.parametrize("payload", [0, 512, 1232])
def test_udp_small_edns_carries_the_subset_and_keeps_opt(
    resolver: Resolver, payload: int
) -> None:
    data = resolver.answer(query(BIG, "A", edns=0, payload=payload).to_wire())
    assert data is not None and len(data) <= max(512, payload)
    assert len(data) > max(512, payload) - 16  # as many as fit: not one more would
    response = dns.message.from_wire(data)
    assert response.flags & dns.flags.TC
    assert addresses(response) < BIG_ADDRESSES
    assert response.edns == 0 and response.payload == 1232


@pytest.mark.parametrize("edns", [None, 0])
def test_tcp_carries_everything(resolver: Resolver, edns: int | None) -> None:
    response = ask(resolver, query(BIG, "A", edns=edns), tcp=True)
    assert not response.flags & dns.flags.TC
    assert addresses(response) == BIG_ADDRESSES
    srv_response = ask(resolver, query(f"_http._tcp.{BIG}", "SRV", edns=edns), tcp=True)
    assert not srv_response.flags & dns.flags.TC
    assert len(records(srv_response.answer)) == 100
    assert {r[3] for r in records(srv_response.additional)} == BIG_ADDRESSES


def test_big_srv_over_udp_carries_the_subset_that_fits(resolver: Resolver) -> None:
    response = ask(resolver, query(f"_http._tcp.{BIG}", "SRV", edns=0))
    assert response.flags & dns.flags.TC
    assert 0 < len(records(response.answer)) < 100
    targets = {r[3].split()[-1] for r in records(response.answer)}
    assert {r[0] for r in records(response.additional)} <= targets  # glue for these only


@pytest.mark.parametrize("edns", [None, 0])
def test_srv_drops_additional_rrsets_without_tc(resolver: Resolver, edns: int | None) -> None:
    """Eight SRV records fit in 512 bytes, their eight A records do not."""
    qname = f"_http._tcp.mid.prod.svc.{Z}"
    data = resolver.answer(query(qname, "SRV", edns=edns, payload=512).to_wire())
    assert data is not None and len(data) <= 512
    response = dns.message.from_wire(data)
    assert not response.flags & dns.flags.TC
    assert len(records(response.answer)) == 8
    full = ask(resolver, query(qname, "SRV"), tcp=True)
    assert len(full.additional) == 8
    kept = records(response.additional)
    assert kept < records(full.additional)
    # whole RRsets: every kept owner keeps all of its records
    for rrset in response.additional:
        assert rrset == full.get_rrset(full.additional, rrset.name, rrset.rdclass, rrset.rdtype)
    assert response.edns == (-1 if edns is None else 0)


def test_tcp_answer_never_exceeds_64k() -> None:
    """1000 SRV records with their targets do not fit in one TCP message: drop glue."""
    huge = [
        Reg(
            "kube",
            "huge",
            f"instance-{i:04d}",
            {"address": f"10.8.{i // 250}.{i % 250 + 1}", "ports": [http(80)]},
        )
        for i in range(1000)
    ]
    resolver = Resolver(make_cache(huge, zones=(Z,)))
    qname = f"_http._tcp.huge.kube.svc.{Z}"
    for edns in (None, 0):
        data = resolver.answer(query(qname, "SRV", edns=edns).to_wire(), tcp=True)
        assert data is not None
        assert len(data) <= 65535
        response = dns.message.from_wire(data)
        assert not response.flags & dns.flags.TC
        assert len(records(response.answer)) == 1000
        assert 0 < len(response.additional) < 1000
