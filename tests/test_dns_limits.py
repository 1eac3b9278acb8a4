"""The DNS holes of issue 13, each a regression test: answers never above 1232 bytes over
UDP, flags of answers to other opcodes, malformed EDNS options on both paths.

Queries are built and responses read with dnspython (or as raw bytes where dnspython would
refuse them); every row runs through `Resolver.answer`, and where the fast path serves a
query, it must give the full path's answer.
"""

from __future__ import annotations

import struct
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import pytest
from test_resolver import PREFIX, Reg, http, make_cache, put, query

from discovery.cli import build_parser, config_from
from discovery.config import Config, ConfigError, env_name, normalize_zone
from discovery.dns.resolver import Resolver
from discovery.model import InstanceKey
from discovery.store.base import Event, EventType

Z = "cluster.local"
HUGE = f"huge.kube.svc.{Z}"
HUGE_COUNT = 3000  # 48 kB of A records: the answer that a 52-byte query got whole


def _huge() -> list[Reg]:
    return [
        Reg(
            "kube",
            "huge",
            f"i{i:04d}",
            {"address": f"10.9.{i // 250}.{i % 250 + 1}", "ports": [http(80)]},
        )
        for i in range(HUGE_COUNT)
    ]


@pytest.fixture(scope="module")
def resolver() -> Resolver:
    return make_cache([*_huge(), Reg("default", "web", "a", {"address": "10.0.0.1"})]).resolver()


def both(resolver: Resolver, wire: bytes, tcp: bool = False) -> bytes:
    """The served answer, checked against the full path's."""
    served = resolver.answer(wire, tcp)
    full = resolver.answer_full(wire, tcp)
    assert isinstance(served, bytes) and isinstance(full, bytes)
    fast_message, full_message = dns.message.from_wire(served), dns.message.from_wire(full)
    if fast_message != full_message:
        # dnslib compresses glue owners less: near the limit the full path keeps fewer
        assert fast_message.flags == full_message.flags
        assert fast_message.answer == full_message.answer
        assert all(rrset in fast_message.additional for rrset in full_message.additional)
    return served


# item 7: UDP answers never above 1232 bytes, whatever the client advertises


@pytest.mark.parametrize("payload", [1232, 1233, 4096, 16384, 65535])
@pytest.mark.parametrize("qtype", ["A", "SRV"])
def test_udp_answers_never_exceed_1232_bytes(resolver: Resolver, payload: int, qtype: str) -> None:
    wire = query(HUGE, qtype, edns=0, payload=payload).to_wire()
    assert len(wire) < 64
    served = resolver.answer(wire)
    assert isinstance(served, bytes)
    assert len(served) <= 1232
    full = resolver.answer_full(wire)
    assert isinstance(full, bytes) and len(full) <= 1232
    response = dns.message.from_wire(served)
    assert response.payload == 1232


def test_tcp_still_carries_up_to_64k(resolver: Resolver) -> None:
    served = resolver.answer(query(HUGE, "A", edns=0, payload=65535).to_wire(), tcp=True)
    assert isinstance(served, bytes)
    assert 1232 < len(served) <= 65535


# item 12: an unknown opcode gets NOTIMP with QR only: RD and CD are defined for QUERY


def raw_query(opcode: int, flags: int, edns: bool) -> bytes:
    wire = bytearray(query(f"a.web.default.svc.{Z}", "A", edns=0 if edns else None).to_wire())
    struct.pack_into(">H", wire, 2, opcode << 11 | flags)
    return bytes(wire)


@pytest.mark.parametrize("opcode", [1, 2, 3, 4, 5, 6, 15])
@pytest.mark.parametrize("edns", [False, True])
def test_unknown_opcode_echoes_no_query_flags(resolver: Resolver, opcode: int, edns: bool) -> None:
    rd, ad, cd = 0x0100, 0x0020, 0x0010
    response = resolver.answer(raw_query(opcode, rd | ad | cd, edns))
    assert isinstance(response, bytes)
    (flags,) = struct.unpack_from(">H", response, 2)
    assert flags & 0x000F == dns.rcode.NOTIMP
    assert flags >> 11 & 0x0F == opcode
    assert flags & 0x87F0 == 0x8000, f"flags {flags:#06x}: QR only"


def test_unparsable_other_opcode_echoes_no_rd(resolver: Resolver) -> None:
    wire = struct.pack(">HHHHHH", 9, 15 << 11 | 0x0110, 1, 0, 0, 0) + b"\xff\xff"
    response = resolver.answer(wire)
    assert isinstance(response, bytes)
    (flags,) = struct.unpack_from(">H", response, 2)
    assert flags == 0x8000 | 15 << 11 | dns.rcode.FORMERR


def test_query_flags_still_echoed_for_query(resolver: Resolver) -> None:
    response = dns.message.from_wire(
        both(resolver, raw_query(0, 0x0110, edns=True))  # RD and CD
    )
    assert response.flags & (dns.flags.RD | dns.flags.CD) == dns.flags.RD | dns.flags.CD


# item 11: malformed EDNS options get FORMERR on the fast and the full path alike


def with_options(options: bytes, rdlength: int | None = None) -> bytes:
    wire = bytearray(query(f"web.default.svc.{Z}", "A", edns=0).to_wire())
    size = len(options) if rdlength is None else rdlength
    struct.pack_into(">H", wire, len(wire) - 2, size)
    return bytes(wire) + options


def option(code: int, data: bytes, length: int | None = None) -> bytes:
    return struct.pack(">HH", code, len(data) if length is None else length) + data


OPTIONS: list[Any] = [
    ("past-the-end", option(10, b"ab", length=9), dns.rcode.FORMERR),
    ("cut-header", b"\x00\x0a\x00", dns.rcode.FORMERR),
    ("cookie-5", option(10, b"abcde"), dns.rcode.FORMERR),
    ("cookie-9", option(10, b"a" * 9), dns.rcode.FORMERR),
    ("cookie-15", option(10, b"a" * 15), dns.rcode.FORMERR),
    ("cookie-41", option(10, b"a" * 41), dns.rcode.FORMERR),
    ("cookie-0", option(10, b""), dns.rcode.FORMERR),
    ("second-bad", option(3, b"") + option(10, b"abc"), dns.rcode.FORMERR),
    ("cookie-8", option(10, b"a" * 8), dns.rcode.NOERROR),
    ("cookie-16", option(10, b"a" * 16), dns.rcode.NOERROR),
    ("cookie-40", option(10, b"a" * 40), dns.rcode.NOERROR),
    ("nsid", option(3, b""), dns.rcode.NOERROR),
    ("padding", option(12, b"\x00" * 20), dns.rcode.NOERROR),
    ("nsid-and-cookie", option(3, b"") + option(10, b"c" * 8), dns.rcode.NOERROR),
]


@pytest.mark.parametrize(
    ("options", "rcode"), [row[1:] for row in OPTIONS], ids=[row[0] for row in OPTIONS]
)
@pytest.mark.parametrize("tcp", [False, True])
def test_edns_options_same_on_both_paths(
    resolver: Resolver, options: bytes, rcode: int, tcp: bool
) -> None:
    wire = with_options(options)
    served, full = resolver.answer(wire, tcp), resolver.answer_full(wire, tcp)
    assert isinstance(served, bytes) and isinstance(full, bytes)
    if served != full:
        assert dns.message.from_wire(served) == dns.message.from_wire(full)
    assert served[3] & 0x0F == rcode
    if rcode == dns.rcode.NOERROR:
        assert resolver._fast(wire, tcp) is not None, "well-formed options stay on the fast path"


def test_option_length_past_the_end_of_rdata(resolver: Resolver) -> None:
    """RDLENGTH covers the bytes sent, but the option inside claims more."""
    wire = with_options(option(10, b"a" * 8)[:-2], rdlength=10)
    assert resolver._fast(wire, False) is None
    served = resolver.answer(wire)
    assert isinstance(served, bytes) and served[3] & 0x0F == dns.rcode.FORMERR


# items 3 and 4: a huge service is answered with a rotated subset that fits, UDP and TCP


def huge_addresses() -> set[str]:
    return {f"10.9.{i // 250}.{i % 250 + 1}" for i in range(HUGE_COUNT)}


def answered(response: dns.message.Message) -> list[str]:
    return [rdata.to_text() for rrset in response.answer for rdata in rrset]


@pytest.mark.parametrize(("tcp", "limit"), [(False, 512), (False, 1232), (True, 65535)])
def test_huge_service_gets_a_rotated_subset_that_fits(
    resolver: Resolver, tcp: bool, limit: int
) -> None:
    seen: set[str] = set()
    firsts: set[str] = set()
    ids = range(12) if tcp else range(300)  # more IDs than windows
    for qid in ids:
        message = query(HUGE, "A", edns=0 if limit > 512 else None, payload=limit)
        message.id = qid
        served = both(resolver, message.to_wire(), tcp)
        assert len(served) <= limit
        response = dns.message.from_wire(served)
        records = answered(response)
        if tcp:
            assert len(records) == HUGE_COUNT  # 48 kB: all of it fits 64 KiB
        else:
            assert len(served) > limit - 16, "as many records as fit: not one more would"
        assert bool(response.flags & dns.flags.TC) != tcp  # TCP never answers TC
        assert len(set(records)) == len(records)
        seen.update(records)
        firsts.add(records[0])
    assert seen == huge_addresses()  # every instance is served to some queries
    assert len(firsts) == len(ids)  # and clients that take the first address spread out


@pytest.mark.parametrize("tcp", [False, True])
def test_huge_srv_gets_a_subset_with_its_glue(resolver: Resolver, tcp: bool) -> None:
    for qid in (0, 1, 2, 977):
        message = query(f"_http._tcp.{HUGE}", "SRV", edns=0)
        message.id = qid
        served = both(resolver, message.to_wire(), tcp)
        assert len(served) <= (65535 if tcp else 1232)
        response = dns.message.from_wire(served)
        targets = {rdata.target for rrset in response.answer for rdata in rrset}
        assert len(targets) > (500 if tcp else 10)
        assert bool(response.flags & dns.flags.TC) != tcp
        glue = {rrset.name for rrset in response.additional}
        assert glue <= targets
        if tcp:
            assert len(glue) > 100  # glue trimmed to fit, not dropped


def test_huge_service_name_srv_and_any(resolver: Resolver) -> None:
    for qtype in ("SRV", "ANY"):
        response = dns.message.from_wire(both(resolver, query(HUGE, qtype).to_wire()))
        assert response.flags & dns.flags.TC
        assert response.answer


@pytest.mark.parametrize("limit", [1, 3, 40])
@pytest.mark.parametrize("tcp", [False, True])
def test_max_answers_caps_every_answer(limit: int, tcp: bool) -> None:
    registrations = [
        Reg("kube", "mid", f"m{i:02d}", {"address": f"10.7.0.{i + 1}", "ports": [http(80)]})
        for i in range(50)
    ]
    resolver = make_cache(registrations, zones=(Z,), max_answers=limit).resolver()
    firsts = set()
    for qid in range(40):
        for name, qtype in ((f"mid.kube.svc.{Z}", "A"), (f"_http._tcp.mid.kube.svc.{Z}", "SRV")):
            message = query(name, qtype, edns=0)
            message.id = qid
            response = dns.message.from_wire(both(resolver, message.to_wire(), tcp))
            records = answered(response)
            assert len(records) == min(limit, 50 if tcp else len(records))
            if limit <= 3 or tcp:
                assert len(records) == limit
                assert not response.flags & dns.flags.TC  # a chosen limit, not a cut
            if qtype == "A":
                firsts.add(records[0])
    assert len(firsts) > min(limit, 10)


def test_changes_to_a_large_service_match_a_full_load() -> None:
    """Record sets updated one instance at a time answer as a full build would."""
    base = [
        Reg("kube", "big", f"b{i:03d}", {"address": f"10.6.0.{i + 1}", "ports": [http(80)]})
        for i in range(120)
    ]
    cache = make_cache(base, zones=(Z, "corp.example"))
    revision = 100 + len(base)
    changed = [
        Reg("kube", "big", "b005", {"address": "fd00::5", "ports": [http(81, name="grpc")]}),
        Reg("kube", "big", "b200", {"address": "10.6.1.1", "ttl": 2, "ports": [http(80)]}),
        Reg("kube", "big", "b010", {"address": "10.6.0.11", "priority": 3, "ports": []}),
    ]
    events = [put(reg, revision + i + 1) for i, reg in enumerate(changed)]
    events.append(
        Event(
            EventType.DELETE,
            InstanceKey("kube", "big", "b050").store_key(PREFIX),
            b"",
            revision + 9,
            0,
        )
    )
    cache.apply(events)
    final = {reg.inst: reg for reg in base}
    final.update({reg.inst: reg for reg in changed})
    del final["b050"]
    fresh = make_cache(sorted(final.values(), key=lambda r: r.inst), zones=(Z, "corp.example"))
    fresh.apply([Event(EventType.PUT, b"/unrelated", b"", revision + 9, 0)])
    incremental, full = cache.resolver(), fresh.resolver()
    for zone in (Z, "corp.example"):
        for name, qtype in (
            (f"big.kube.svc.{zone}", "A"),
            (f"big.kube.svc.{zone}", "AAAA"),
            (f"big.kube.svc.{zone}", "SRV"),
            (f"_http._tcp.big.kube.svc.{zone}", "SRV"),
            (f"_grpc._tcp.big.kube.svc.{zone}", "SRV"),
            (f"_tcp.big.kube.svc.{zone}", "A"),
            (f"b050.big.kube.svc.{zone}", "A"),
        ):
            for qid, tcp, edns in ((0, False, None), (5, False, 0), (77, True, 0)):
                message = query(name, qtype, edns=edns)
                message.id = qid
                wire = message.to_wire()
                got, want = incremental.answer(wire, tcp), full.answer(wire, tcp)
                assert isinstance(got, bytes) and isinstance(want, bytes)
                assert dns.message.from_wire(got) == dns.message.from_wire(want), (name, qtype)


# item 10: names never over 255 octets, labels never over 63, whatever the store holds

LONG_ZONE = ("z" * 60 + ".") + "y" * 16  # 77 characters
LABEL = "a" * 63


def test_ptr_target_over_255_octets_is_left_out() -> None:
    """A 77-character zone and 63-character labels: the instance name would be 275 octets."""
    cache = make_cache(
        [
            Reg(LABEL, LABEL, LABEL, {"address": "10.5.0.1"}),
            Reg("default", "web", "ok", {"address": "10.5.0.2"}),
        ],
        zones=(LONG_ZONE,),
    )
    resolver = cache.resolver()
    assert cache.answers.stats.skipped > 0
    for address, present in (("10.5.0.1", False), ("10.5.0.2", True)):
        reverse = ".".join(reversed(address.split("."))) + ".in-addr.arpa"
        response = dns.message.from_wire(both(resolver, query(reverse, "PTR").to_wire()))
        assert bool(response.answer) == present
    ok = dns.message.from_wire(both(resolver, query(f"web.default.svc.{LONG_ZONE}").to_wire()))
    assert answered(ok) == ["10.5.0.2"]


def test_port_label_over_63_octets_is_left_out() -> None:
    port = {"name": "p" * 63, "port": 80, "protocol": "tcp"}
    cache = make_cache(
        [Reg("default", "web", "a", {"address": "10.5.0.3", "ports": [port, http(81)]})],
        zones=(Z,),
    )
    resolver = cache.resolver()
    assert all(
        len(label) <= 63 for wire in cache.state.names for label in dns.name.from_wire(wire, 0)[0]
    )
    assert cache.answers.stats.skipped > 0
    fine = dns.message.from_wire(
        both(resolver, query(f"_http._tcp.web.default.svc.{Z}", "SRV").to_wire())
    )
    assert len(answered(fine)) == 1
    service = dns.message.from_wire(both(resolver, query(f"web.default.svc.{Z}", "SRV").to_wire()))
    assert {rdata.port for rrset in service.answer for rdata in rrset} == {80, 81}


@pytest.mark.parametrize(("length", "accepted"), [(224, True), (225, False), (253, False)])
def test_zone_too_long_for_any_name_is_refused_at_start(length: int, accepted: bool) -> None:
    zone = (("z" * 49 + ".") * 6)[:length]
    zone = zone[:-1] + "x" if zone.endswith(".") else zone
    assert len(zone) == length
    if accepted:
        assert Config(zones=(normalize_zone(zone),)).zones == (zone,)
    else:
        with pytest.raises(ConfigError, match="no room"):
            normalize_zone(zone)


# the flags: each from the command line and from its DISCOVERY_* variable, validated once

FLAGS = [
    ("--tcp-message-timeout", "0.5", "tcp_message_timeout", 0.5, "0"),
    ("--tcp-max-connections-per-client", "4", "tcp_max_connections_per_client", 4, "0"),
    ("--dns-rate-limit", "100", "dns_rate_limit", 100, "-1"),
    ("--max-answers", "8", "max_answers", 8, "-3"),
]


@pytest.mark.parametrize(("flag", "text", "attribute", "value", "bad"), FLAGS)
def test_dns_limit_flags(flag: str, text: str, attribute: str, value: float, bad: str) -> None:
    parser = build_parser()
    from_flag = config_from(parser.parse_args(["serve", flag, text]), {})
    from_env = config_from(parser.parse_args(["serve"]), {env_name(flag): text})
    assert getattr(from_flag, attribute) == getattr(from_env, attribute) == value
    with pytest.raises(ConfigError, match=flag):
        config_from(parser.parse_args(["serve", flag, bad]), {})


def test_dns_limit_defaults() -> None:
    config = config_from(build_parser().parse_args(["serve"]), {})
    assert (config.tcp_message_timeout, config.tcp_max_connections_per_client) == (2.0, 16)
    assert (config.dns_rate_limit, config.max_answers) == (0, 0)
