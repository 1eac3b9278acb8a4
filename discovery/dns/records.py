"""Resource records as plain values, and their pre-encoding into answer bytes.

An answer for (qname, qtype) is encoded once, when the cache changes, as the bytes that
follow the question in a response. The responder splices the query's ID, flags and
question in front, so the per-query work is a dict lookup and a few byte concatenations.
Owner names equal to the question point at it (offset 12) because the echoed question
has exactly the layout of the lower-case name the answer was encoded for. No other name
points into the question, so the client's spelling (0x20) never leaks into record data.
"""

from __future__ import annotations

import functools
import socket
import struct
from dataclasses import dataclass
from typing import NamedTuple

A, NS, SOA, PTR, TXT, AAAA, SRV, OPT, ANY = 1, 2, 6, 12, 16, 28, 33, 41, 255
IXFR, AXFR = 251, 252
IN = 1
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
BADVERS = 16

# The one table of the record types answers are stored for, in the order ANY picks one
# (RFC 8482: a minimal answer), with their wire form (the type field of a question).
STORED_TYPES = (A, AAAA, SRV, PTR, TXT, SOA, NS)
TYPE_WIRE = {t: t.to_bytes(2, "big") for t in STORED_TYPES}
ZONE_TRANSFERS = (IXFR, AXFR)
RCODE_NAMES = {
    NOERROR: "NOERROR",
    FORMERR: "FORMERR",
    SERVFAIL: "SERVFAIL",
    NXDOMAIN: "NXDOMAIN",
    NOTIMP: "NOTIMP",
    REFUSED: "REFUSED",
    BADVERS: "BADVERS",
}
EDNS_PAYLOAD = 1232

# The OPT record of every EDNS answer: root owner, type 41, our payload size, version 0.
OPT_RECORD = b"\x00" + struct.pack(">HHIH", OPT, EDNS_PAYLOAD, 0, 0)

# An answer as the cache keeps it for the responder: the header's QDCOUNT..ARCOUNT without
# an OPT record (8 bytes), the same with one (8 bytes), then the records (the body). One
# bytes object per answer: a query touches as few cache lines as it can, which is what its
# cost grows with once the registry outgrows the CPU caches.
PACKED_HEAD = 16


Rotating = tuple[bytes, int, int, int]
"""An answer whose records all have one length (addresses owned by the question), served
starting at any of them so that clients spread over the addresses: (packed, count, record
size, body size). After the head, `packed` holds the records, then the records again but the
last: the answer starting at record k is one slice, k records in."""

Packed = bytes | Rotating


def turned(packed: Packed, start: int) -> tuple[bytes, bytes]:
    """(counts, body) of a packed answer, a rotating one starting at record start % count:
    what the fast path sends for a query whose ID is start."""
    if isinstance(packed, tuple):
        data, count, size, span = packed
        at = PACKED_HEAD + start % count * size
        return data[:8], data[at : at + span]
    return packed[:8], packed[PACKED_HEAD:]


@dataclass(frozen=True, slots=True)
class Soa:
    mname: str
    rname: str
    serial: int
    refresh: int = 7200
    retry: int = 1800
    expire: int = 86400
    minimum: int = 5


Rdata = str | Soa | tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RR:
    """One record. Names are lower case without the trailing dot; A/AAAA rdata is the
    address text, PTR/NS rdata a name, TXT rdata a tuple of strings."""

    name: str
    rtype: int
    ttl: int
    rdata: Rdata


@functools.lru_cache(maxsize=65536)
def name_to_wire(name: str) -> bytes:
    if not name:
        return b"\x00"
    return b"".join(bytes((len(label),)) + label.encode("ascii") for label in name.split(".")) + (
        b"\x00"
    )


class _Writer:
    """Encodes records as they follow a question for `qname` (None: no compression)."""

    def __init__(self, qname: str | None) -> None:
        self.buf = bytearray()
        self.offsets: dict[str, int] = {}  # suffixes written after the question
        self.qname = qname
        self.compress = qname is not None
        self.base = 12 + len(name_to_wire(qname)) + 4 if qname is not None else 0

    def name(self, name: str, owner: bool = False) -> None:
        """Write a name, pointing at an earlier copy of a suffix where there is one."""
        if owner and self.compress and name == self.qname:
            self.buf += b"\xc0\x0c"  # the question, spelled as the client sent it
            return
        labels = name.split(".") if name else []
        for i in range(len(labels)):
            suffix = ".".join(labels[i:])
            pointer = self.offsets.get(suffix) if self.compress else None
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
            self.buf += address_bytes(data)[1]
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


@functools.lru_cache(maxsize=4096)
def counts(an: int, ns: int, ar: int) -> bytes:
    """QDCOUNT..ARCOUNT of a response with one question (shared: there are few)."""
    return struct.pack(">HHHH", 1, an, ns, ar)


@functools.lru_cache(maxsize=65536)
def address_bytes(address: str) -> tuple[int, bytes]:
    """(A or AAAA, packed address) of an address text."""
    if ":" in address:
        return AAAA, socket.inet_pton(socket.AF_INET6, address)
    return A, socket.inet_pton(socket.AF_INET, address)


_POINTER_TO_QUESTION = b"\xc0\x0c"


_SRV_FIELDS = struct.Struct(">HHHH")  # RDLENGTH, then SRV's priority, weight and port
_ADDRESS_FIELDS = struct.Struct(">HHIH")  # type, class, TTL, RDLENGTH of an A/AAAA record


@functools.lru_cache(maxsize=1024)
def _fixed(rtype: int, ttl: int) -> bytes:
    """Type, class IN and TTL of a record: a handful of distinct values."""
    return struct.pack(">HHI", rtype, IN, ttl)


@dataclass(frozen=True, slots=True)
class Answer:
    """The positive answer for one (name, type), as the bytes that follow the question.

    `counts` are the header's QDCOUNT..ARCOUNT without and with an OPT record. `rotate`:
    the records all have one length and may be served starting at any of them. `cuts` are
    the lengths of the body with 0, 1, … additional RRsets (empty when it has none): an
    answer too big for the client keeps as many whole additional RRsets as fit.
    """

    counts: bytes
    counts_edns: bytes
    body: bytes
    an: int
    cuts: tuple[int, ...] = ()
    rotate: bool = False

    @classmethod
    def of(
        cls, body: bytes, an: int, ar: int = 0, rotate: bool = False, cuts: tuple[int, ...] = ()
    ) -> Answer:
        return cls(counts(an, 0, ar), counts(an, 0, ar + 1), body, an, cuts, rotate and an > 1)

    def packed(self) -> Packed:
        head = self.counts + self.counts_edns
        if not self.rotate:
            return head + self.body
        size = len(self.body) // self.an
        return (head + self.body + self.body[:-size], self.an, size, len(self.body))

    @classmethod
    def build(cls, qname: str, answer: tuple[RR, ...], additional: tuple[RR, ...] = ()) -> Answer:
        """Any records, through the general encoder (zone apex and other static names)."""
        body = encode_sections(qname, answer, (), additional)
        rotate = not additional and all(rr.rtype in (A, AAAA) for rr in answer)
        # Every record has the same length (a pointer owner and a fixed-size address), so a
        # rotation is a cut of the bytes at a record boundary. Encoding is prefix-stable,
        # so the lengths with fewer glue records are cut points.
        cuts = tuple(
            len(encode_sections(qname, answer, (), additional[:k]))
            for k in range(len(additional) + 1)
        )
        return cls.of(body, len(answer), len(additional), rotate, cuts if additional else ())

    @classmethod
    def addresses(cls, ttl: int, addresses: list[str]) -> Answer:
        """A or AAAA records (all of one type) owned by the question name."""
        parts = []
        for address in addresses:
            rtype, packed = address_bytes(address)
            fields = _ADDRESS_FIELDS.pack(rtype, IN, ttl, len(packed))
            parts.append(_POINTER_TO_QUESTION + fields + packed)
        return cls.of(b"".join(parts), len(parts), rotate=True)

    @classmethod
    def services(cls, qname_wire: bytes, ttl: int, targets: list[SrvTarget]) -> Answer:
        """SRV records owned by the question, with each target's address as glue.

        Targets are written uncompressed (RFC 2782); a glue record's owner points at its
        target's first copy when that offset can be expressed.
        """
        head = _POINTER_TO_QUESTION + _fixed(SRV, ttl)
        offset = 12 + len(qname_wire) + 4  # where the next record starts in the message
        records = []
        first_copy: dict[bytes, tuple[int, SrvTarget]] = {}
        pack = _SRV_FIELDS.pack
        for target in targets:
            wire = target.wire
            size = len(wire)
            record = head + pack(6 + size, target.priority, target.weight, target.port) + wire
            if wire not in first_copy:
                first_copy[wire] = (offset + len(record) - size, target)
            records.append(record)
            offset += len(record)
        cuts = [sum(map(len, records))]
        for pointer, target in first_copy.values():
            rtype, packed = address_bytes(target.address)
            owner = (0xC000 | pointer).to_bytes(2, "big") if pointer <= 0x3FFF else target.wire
            fields = _ADDRESS_FIELDS.pack(rtype, IN, target.ttl, len(packed))
            records.append(owner + fields + packed)
            cuts.append(cuts[-1] + len(records[-1]))
        glued = len(first_copy)
        body = b"".join(records)
        return cls.of(body, len(targets), glued, cuts=tuple(cuts) if glued else ())

    @classmethod
    def pointers(cls, ttl: int, targets: list[bytes]) -> Answer:
        """PTR records owned by the question; targets are wire names."""
        body = b"".join(
            _POINTER_TO_QUESTION + _fixed(PTR, ttl) + _rdlength(target) + target
            for target in targets
        )
        return cls.of(body, len(targets))


def _rdlength(rdata: bytes) -> bytes:
    return len(rdata).to_bytes(2, "big")


def with_serial(data: bytes, serial: int) -> bytes:
    """data, which ends with one SOA record, with that record's serial set to serial (the
    serial is followed by four 32-bit fields: refresh, retry, expire, minimum)."""
    return data[:-20] + serial.to_bytes(4, "big") + data[-16:]


class SrvTarget(NamedTuple):
    """One SRV record's data and its target's address (for the glue). A tuple: a service's
    rebuild makes one per instance and port, and compares them to drop duplicates."""

    priority: int
    weight: int
    port: int
    wire: bytes
    address: str
    ttl: int


@dataclass(frozen=True, slots=True)
class Negative:
    """An answer without records (NXDOMAIN or NODATA): the zone SOA in authority. `packed`
    as for positive answers; `body` is its records, kept apart so that a query need not cut
    them out."""

    packed: bytes
    body: bytes

    @classmethod
    def build(cls, soa: RR) -> Negative:
        body = encode_sections(None, (), (soa,), ())
        return cls(counts(0, 1, 0) + counts(0, 1, 1) + body, body)

    def with_serial(self, serial: int) -> Negative:
        return Negative(with_serial(self.packed, serial), with_serial(self.body, serial))
