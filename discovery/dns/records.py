"""Resource records as plain values, and their pre-encoding into answer bytes.

An answer for (qname, qtype) is encoded once, when the cache changes, as the bytes that
follow the question in a response. The responder splices the query's ID, flags and
question in front, so the per-query work is a dict lookup and a few byte concatenations.
Owner names equal to the question point at it (offset 12) because the echoed question
has exactly the layout of the lower-case name the answer was encoded for. No other name
points into the question, so the client's spelling (0x20) never leaks into record data.
"""

from __future__ import annotations

import bisect
import functools
import socket
import struct
from collections import Counter
from dataclasses import dataclass
from typing import Any, NamedTuple

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


EAGER = 32  # an answer of at most this many records is encoded whole on every change
WINDOW_CACHE = 512  # windows kept per record set (a change drops them all)
MAX_LABEL, MAX_NAME = 63, 255  # octets (RFC 1035 2.3.4)


def legal_name(wire: bytes) -> bool:
    """A wire name (uncompressed) within the limits: labels of 1-63 octets, 255 in all."""
    if len(wire) > MAX_NAME:
        return False
    at = 0
    while (length := wire[at]) != 0:
        if length > MAX_LABEL:
            return False
        at += length + 1
    return at == len(wire) - 1


class Served(NamedTuple):
    """What a query gets of a positive answer: `head` is the counts without and with an OPT
    record (16 bytes), `body` the records, within the room asked for; `cut`: answer records
    were left out for size (TC=1 over UDP)."""

    head: bytes
    body: bytes
    cut: bool


def fit_glue(head: bytes, body: bytes, cuts: tuple[int, ...], room: int) -> tuple[bytes, bytes]:
    """Keep the answer records (body[:cuts[0]]) and as many whole additional RRsets as fit."""
    kept = bisect.bisect_right(cuts, room) - 1
    an = head[2] << 8 | head[3]
    return counts(an, 0, kept) + counts(an, 0, kept + 1), body[: cuts[kept]]


class RecordSet:
    """The records of one answer kept one by one, in key order (an instance's name), so that
    a change to one record costs an insertion, not a new encoding of all of them.

    Each record is stored without its owner (a pointer to the question), type, class and TTL,
    which every record of the set shares (the TTL is the smallest of the records'), and an SRV
    record with its target's glue. A query gets a window of the set: every record when they all
    fit (rotated for addresses, as `Rotating`), else k records that fit, window w = query ID mod
    the number of windows, rotated within the window for addresses. Windows are built when first
    asked for and kept until the next change: the work of one query is bounded by what fits one
    message, never by the size of the set.
    """

    def __init__(self, rtype: int, limit: int = 0) -> None:
        self.rtype = rtype
        self.limit = limit  # most records per answer (--max-answers); 0: as many as fit
        self.rotate = rtype in (A, AAAA)
        self._glue_room = 2 + _ADDRESS_FIELDS.size + 16 if rtype == SRV else 0
        self.keys: list[Any] = []
        self.parts: list[bytes] = []  # RDLENGTH and RDATA of each record
        self.ttls: list[int] = []
        self.glue: list[tuple[bytes, bytes] | None] = []  # (target, the record after its owner)
        self._ttl_counts: Counter[int] = Counter()
        self._size_counts: Counter[int] = Counter()
        self.total = 0  # bytes of every record, with owner, type, class and TTL
        self._windows: dict[tuple[int, int], Any] = {}
        self._whole: dict[int, tuple[Packed, tuple[int, ...]]] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def put(self, key: Any, part: bytes, ttl: int, glue: tuple[bytes, bytes] | None = None) -> None:
        keys = self.keys
        if not keys or keys[-1] < key:  # past the last (a full load puts in key order)
            keys.append(key)
            self.parts.append(part)
            self.ttls.append(ttl)
            self.glue.append(glue)
        else:
            at = bisect.bisect_left(keys, key)
            if keys[at] == key:
                self._subtract(self.parts[at], self.ttls[at])
                self.parts[at], self.ttls[at], self.glue[at] = part, ttl, glue
            else:
                keys.insert(at, key)
                self.parts.insert(at, part)
                self.ttls.insert(at, ttl)
                self.glue.insert(at, glue)
        self._ttl_counts[ttl] += 1
        size = len(part)
        self._size_counts[size] += 1
        self.total += 10 + size
        if self._windows or self._whole:
            self._changed()

    def fill(self, entries: list[tuple[Any, bytes, int, tuple[bytes, bytes] | None]]) -> None:
        """An empty set's records, (key, part, ttl, glue) in key order, set in one pass."""
        assert not self.keys, "fill() is for an empty set"
        if not entries:
            return
        keys, parts, ttls, glue = zip(*entries, strict=True)
        self.keys, self.parts, self.ttls = list(keys), list(parts), list(ttls)
        self.glue = list(glue)
        self._ttl_counts = Counter(ttls)
        sizes = list(map(len, parts))
        self._size_counts = Counter(sizes)
        self.total = 10 * len(sizes) + sum(sizes)
        self._changed()

    def remove(self, key: Any) -> None:
        at = bisect.bisect_left(self.keys, key)
        if at < len(self.keys) and self.keys[at] == key:
            self._subtract(self.parts[at], self.ttls[at])
            del self.keys[at], self.parts[at], self.ttls[at], self.glue[at]
            self._changed()

    def _subtract(self, part: bytes, ttl: int) -> None:
        for counter, value in ((self._ttl_counts, ttl), (self._size_counts, len(part))):
            left = counter[value] - 1
            if left:
                counter[value] = left
            else:
                del counter[value]
        self.total -= 10 + len(part)

    def _changed(self) -> None:
        self._windows.clear()
        self._whole.clear()

    @property
    def small(self) -> bool:
        """Encoded whole on every change (and served like any pre-encoded answer)."""
        return len(self.keys) <= EAGER and (not self.limit or len(self.keys) <= self.limit)

    def packed(self, base: int) -> tuple[Packed, tuple[int, ...]]:
        """The whole answer as the resolver serves pre-encoded ones, with its glue's cuts;
        `base` is where the records start in a message (12 + the question's length)."""
        whole = self._whole.get(base)
        if whole is None:
            n = len(self.keys)
            if self.rotate:
                head, body = self._records(0, n)
                size = len(body) // n
                rotating = (
                    counts(n, 0, 0) + counts(n, 0, 1) + body + body[:-size],
                    n,
                    size,
                    len(body),
                )
                whole = self._whole[base] = (
                    rotating if n > 1 else rotating[0][: PACKED_HEAD + size],
                    (),
                )
            else:
                head, body, cuts = self._glued(0, n, base)
                whole = self._whole[base] = (head + body, cuts)
        return whole

    def window(self, qid: int, room: int, base: int) -> Served | None:
        """The records a query with `room` bytes for them gets (None: not even one fits)."""
        n = len(self.keys)
        limit = min(n, self.limit) if self.limit else n
        if limit == n and self.total <= room:
            k = n
        else:
            # the longest record, with room for an address as its glue (owner a pointer)
            k = min(limit, room // (10 + max(self._size_counts) + self._glue_room))
            if k == 0:
                return None
        cut = k < limit
        windows = -(-n // k)
        w = qid % windows
        if self.rotate:
            cached = self._windows.get((k, w))
            if cached is None:
                if len(self._windows) >= WINDOW_CACHE:
                    self._windows.clear()
                head, body = self._records(w * k, k)
                cached = self._windows[(k, w)] = (head, body + body[: -(len(body) // k)])
            head, doubled = cached
            size = len(doubled) // (2 * k - 1)
            at = (qid // windows) % k * size
            return Served(head, doubled[at : at + k * size], cut)
        cached = self._windows.get((k, w))
        if cached is None:
            if len(self._windows) >= WINDOW_CACHE:
                self._windows.clear()
            cached = self._windows[(k, w)] = self._glued(w * k, k, base)
        head, body, cuts = cached
        if len(body) > room:
            head, body = fit_glue(head, body, cuts, room)
        return Served(head, body, cut)

    def _slice(self, items: list[Any], start: int, k: int) -> list[Any]:
        end = start + k
        if end <= len(items):
            return items[start:end]
        return items[start:] + items[: end - len(items)]

    def _records(self, start: int, k: int) -> tuple[bytes, bytes]:
        """Counts (without and with OPT) and the bytes of k records from `start` on."""
        owner = _POINTER_TO_QUESTION + _fixed(self.rtype, min(self._ttl_counts))
        parts = self._slice(self.parts, start, k)
        return counts(k, 0, 0) + counts(k, 0, 1), owner + owner.join(parts)

    def _glued(self, start: int, k: int, base: int) -> tuple[bytes, bytes, tuple[int, ...]]:
        """The same with each target's glue (once per target), whose owner points at the
        target in its record where the offset can be expressed."""
        _, records = self._records(start, k)
        glue = []
        seen: set[bytes] = set()
        offset = base
        for part, target in zip(
            self._slice(self.parts, start, k), self._slice(self.glue, start, k), strict=True
        ):
            if target is not None and target[0] not in seen:
                seen.add(target[0])
                pointer = offset + 10 + len(part) - len(target[0])
                owner = (0xC000 | pointer).to_bytes(2, "big") if pointer <= 0x3FFF else target[0]
                glue.append(owner + target[1])
            offset += 10 + len(part)
        cuts = [len(records)]
        for record in glue:
            cuts.append(cuts[-1] + len(record))
        head = counts(k, 0, len(glue)) + counts(k, 0, len(glue) + 1)
        return head, records + b"".join(glue), tuple(cuts) if glue else ()


Stored = bytes | Rotating | RecordSet  # what AnswerState.answers holds for a question


def address_part(address: str) -> tuple[int, bytes]:
    """(A or AAAA, RDLENGTH and RDATA) of an address record."""
    rtype, packed = address_bytes(address)
    return rtype, len(packed).to_bytes(2, "big") + packed


def glue_record(address: str, ttl: int) -> bytes:
    """An address record after its owner name: the glue of an SRV target."""
    rtype, packed = address_bytes(address)
    return _ADDRESS_FIELDS.pack(rtype, IN, ttl, len(packed)) + packed


def srv_part(priority: int, weight: int, port: int, target: bytes) -> bytes:
    return _SRV_FIELDS.pack(6 + len(target), priority, weight, port) + target
