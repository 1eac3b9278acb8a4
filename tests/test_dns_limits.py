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
import dns.rcode
import pytest
from test_resolver import Reg, http, make_cache, query

from discovery.dns.resolver import Resolver

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
    assert dns.message.from_wire(served) == dns.message.from_wire(full)
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
