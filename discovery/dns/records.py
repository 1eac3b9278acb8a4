"""Resource records as plain values, and their pre-encoding into answer bytes.

An answer for (qname, qtype) is encoded once, when the cache changes, as the bytes that
follow the question in a response. The responder splices the query's ID, flags and
question in front, so the per-query work is a dict lookup and a few byte concatenations.
Owner names equal to the question point at it (offset 12) because the echoed question
has exactly the layout of the lower-case name the answer was encoded for. No other name
points into the question, so the client's spelling (0x20) never leaks into record data.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

A, NS, SOA, PTR, TXT, AAAA, SRV, OPT, ANY = 1, 2, 6, 12, 16, 28, 33, 41, 255
IN = 1
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
BADVERS = 16
EDNS_PAYLOAD = 1232
MAX_ROTATIONS = 16

# The OPT record of every EDNS answer: root owner, type 41, our payload size, version 0.
OPT_RECORD = b"\x00" + struct.pack(">HHIH", OPT, EDNS_PAYLOAD, 0, 0)


@dataclass(frozen=True, slots=True)
class Soa:
    mname: str
    rname: str
    serial: int
    refresh: int = 7200
    retry: int = 1800
    expire: int = 86400
    minimum: int = 5


@dataclass(frozen=True, slots=True)
class Srv:
    priority: int
    weight: int
    port: int
    target: str


Rdata = str | Srv | Soa | tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RR:
    """One record. Names are lower case without the trailing dot; A/AAAA rdata is the
    address text, PTR/NS rdata a name, TXT rdata a tuple of strings."""

    name: str
    rtype: int
    ttl: int
    rdata: Rdata


def name_to_wire(name: str) -> bytes:
    if not name:
        return b"\x00"
    out = bytearray()
    for label in name.split("."):
        raw = label.encode("ascii")
        out.append(len(raw))
        out += raw
    out.append(0)
    return bytes(out)


class _Writer:
    """Encodes records as they follow a question for `qname` (None: no compression)."""

    def __init__(self, qname: str | None) -> None:
        self.buf = bytearray()
        self.offsets: dict[str, int] = {}  # suffixes written after the question
        self.qname = qname
        self.compress = qname is not None
        self.base = 12 + len(name_to_wire(qname)) + 4 if qname is not None else 0

    def name(self, name: str, compress: bool = True, owner: bool = False) -> None:
        """Write a name, pointing at an earlier copy of a suffix when `compress`."""
        if owner and self.compress and name == self.qname:
            self.buf += b"\xc0\x0c"  # the question, spelled as the client sent it
            return
        labels = name.split(".") if name else []
        for i in range(len(labels)):
            suffix = ".".join(labels[i:])
            pointer = self.offsets.get(suffix) if self.compress and compress else None
            if pointer is not None:
                self.buf += struct.pack(">H", 0xC000 | pointer)
                return
            if self.compress and self.base + len(self.buf) <= 0x3FFF:
                self.offsets[suffix] = self.base + len(self.buf)
            raw = labels[i].encode("ascii")
            self.buf.append(len(raw))
            self.buf += raw
        self.buf.append(0)

    def rr(self, rr: RR) -> None:
        self.name(rr.name, owner=True)
        self.buf += struct.pack(">HHI", rr.rtype, IN, rr.ttl)
        at = len(self.buf)
        self.buf += b"\x00\x00"
        data = rr.rdata
        if rr.rtype == A or rr.rtype == AAAA:
            assert isinstance(data, str)
            self.buf += ipaddress.ip_address(data).packed
        elif rr.rtype == SRV:
            assert isinstance(data, Srv)
            self.buf += struct.pack(">HHH", data.priority, data.weight, data.port)
            self.name(data.target, compress=False)  # RFC 2782: no compression here
        elif rr.rtype == PTR or rr.rtype == NS:
            assert isinstance(data, str)
            self.name(data)
        elif rr.rtype == SOA:
            assert isinstance(data, Soa)
            self.name(data.mname)
            self.name(data.rname)
            self.buf += struct.pack(
                ">IIIII", data.serial, data.refresh, data.retry, data.expire, data.minimum
            )
        elif rr.rtype == TXT:
            assert isinstance(data, tuple)
            for text in data:
                raw = text.encode()
                self.buf.append(len(raw))
                self.buf += raw
        else:
            raise ValueError(f"cannot encode type {rr.rtype}")
        struct.pack_into(">H", self.buf, at, len(self.buf) - at - 2)


def encode_sections(
    qname: str | None, answer: tuple[RR, ...], authority: tuple[RR, ...], additional: tuple[RR, ...]
) -> bytes:
    writer = _Writer(qname)
    for rr in (*answer, *authority, *additional):
        writer.rr(rr)
    return bytes(writer.buf)


def counts(an: int, ns: int, ar: int) -> bytes:
    """QDCOUNT..ARCOUNT of a response with one question."""
    return struct.pack(">HHHH", 1, an, ns, ar)


@dataclass(frozen=True, slots=True)
class Answer:
    """The positive answer for one (name, type): its records and their encodings.

    `bodies` holds one encoding per rotation of the answer records; the responder picks
    one per query so that multi-address answers rotate without re-encoding.
    """

    answer: tuple[RR, ...]
    additional: tuple[RR, ...]
    counts: bytes
    counts_edns: bytes
    bodies: tuple[bytes, ...]

    @classmethod
    def build(cls, qname: str, answer: tuple[RR, ...], additional: tuple[RR, ...] = ()) -> Answer:
        body = encode_sections(qname, answer, (), additional)
        n = len(answer)
        bodies = [body]
        if n > 1 and not additional and all(rr.rtype in (A, AAAA) for rr in answer):
            # Owner names are all pointers to the question and address rdata has a fixed
            # size, so every record has the same length: rotate by slicing the bytes.
            size = len(body) // n
            steps = min(n, MAX_ROTATIONS)
            for step in range(1, steps):
                cut = (step * n // steps) * size
                bodies.append(body[cut:] + body[:cut])
        return cls(
            answer,
            additional,
            counts(n, 0, len(additional)),
            counts(n, 0, len(additional) + 1),
            tuple(bodies),
        )


@dataclass(frozen=True, slots=True)
class Negative:
    """An answer without records (NXDOMAIN or NODATA): the zone SOA in authority."""

    soa: RR
    body: bytes
    counts: bytes
    counts_edns: bytes

    @classmethod
    def build(cls, soa: RR) -> Negative:
        return cls(soa, encode_sections(None, (), (soa,), ()), counts(0, 1, 0), counts(0, 1, 1))
