"""The resolver: a function of (query bytes, pre-encoded answers) to response bytes.

`answer` first tries the fast path, which serves the common query shape (one question,
class IN, at most one OPT record, an answer that fits) from pre-encoded bytes without
parsing into objects. Anything else goes to `answer_full`, which parses with dnslib and
applies every rule of the contract; tests check both give the same answers.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass, field

from dnslib import EDNS0, DNSHeader, DNSLabel, DNSRecord
from dnslib import RR as LibRR

from .answers import Answers, Zone
from .forward import UPSTREAM_PAYLOAD, Forwarder, Pending
from .records import (
    ANY,
    BADVERS,
    EDNS_PAYLOAD,
    FORMERR,
    IN,
    NOERROR,
    NOTIMP,
    NXDOMAIN,
    OPT,
    OPT_RECORD,
    PACKED_HEAD,
    REFUSED,
    SERVFAIL,
    STORED_TYPES,
    TYPE_WIRE,
    ZONE_TRANSFERS,
    RecordSet,
    Served,
    Stored,
    fit_glue,
)
from .records import counts as record_counts

UDP_MIN = 512
UDP_MAX = EDNS_PAYLOAD  # whatever size a client advertises: no amplification
TCP_MAX = 65535
_IN = b"\x00\x01"
_QD1 = b"\x00\x01\x00\x00\x00\x00"  # QDCOUNT 1, ANCOUNT 0, NSCOUNT 0

# Byte offsets in a query (RFC 1035 4.1; EDNS OPT: RFC 6891 6.1.2). Slices are module constants
# so the fast path reads them with one load, as cheap as the literals they name.
_ID = slice(0, 2)
_FLAGS_HIGH, _FLAGS_LOW = 2, 3  # QR OPCODE AA TC RD | RA Z AD CD RCODE
_QD_TO_NS = slice(4, 10)  # QDCOUNT, ANCOUNT, NSCOUNT
_ARCOUNT = slice(10, 12)
_HEADER = 12  # the question name starts here
_QUESTION_TAIL = 5  # after the name's first byte of the root label: 0, QTYPE, QCLASS
_MIN_QUERY = _HEADER + _QUESTION_TAIL  # the root name, a type and a class
_QTYPE, _QCLASS = 1, 3  # past the name's root label at `end`: 2 bytes each
_OPT_FIXED = 11  # an OPT record without options: root name, TYPE, CLASS, TTL, RDLENGTH
_OPT_HEAD = b"\x00\x00\x29"  # root owner name, TYPE 41
_OPT_PAYLOAD = 3  # CLASS: the requester's UDP payload size (2 bytes)
_OPT_VERSION = 6  # TTL's second byte: EDNS version
_OPT_RDLENGTH = 9  # 2 bytes, then the options
_OPT_DO = 7  # TTL's third byte: its top bit is DO (RFC 3225)
_OPTIONS = _OPT_FIXED  # where the options start
_COOKIE = 10  # RFC 7873: 8 bytes of client cookie, or 16 to 40 with a server cookie
_CD = 0x10  # in the flags' low byte
_NOT_QUERY = 0xF8  # QR set or an OPCODE other than QUERY
_ZONE_MEMO_SIZE = 65536  # names remembered with their zone, for negative answers
_EMPTY, _EMPTY_EDNS = record_counts(0, 0, 0), record_counts(0, 0, 1)  # a truncated answer
_ZONE_TRANSFER_WIRE = tuple(t.to_bytes(2, "big") for t in ZONE_TRANSFERS)


def _flag_table(rcode: int, aa: bool, ra: bool, tc: bool = False) -> tuple[bytes, ...]:
    """The two flag bytes of a response, indexed by the query's RD | CD << 1."""
    out = []
    for index in range(4):
        high = 0x80 | (0x04 if aa else 0) | (0x02 if tc else 0) | (index & 1)
        low = (0x80 if ra else 0) | (0x10 if index & 2 else 0) | rcode
        out.append(bytes((high, low)))
    return tuple(out)


@dataclass
class Stats:
    """Plain counters on the hot path; metrics.py reads them at scrape time."""

    rcodes: Counter[int] = field(default_factory=Counter)
    fast: int = 0
    full: int = 0
    dropped: int = 0
    truncated: int = 0
    forwarded: int = 0  # sent on to an upstream (answers from the forward cache count as fast)
    refused: Counter[str] = field(default_factory=Counter)  # by a limit, by reason (transport)


class Resolver:
    def __init__(
        self, answers: Answers, recursion: bool = False, forwarder: Forwarder | None = None
    ) -> None:
        """With a `forwarder`, names outside every zone are forwarded (and RA=1 throughout)."""
        self.answers = answers
        self.forwarder = forwarder
        self.recursion = recursion or forwarder is not None
        self.stats = Stats()
        self._ok = _flag_table(NOERROR, True, self.recursion)
        self._nx = _flag_table(NXDOMAIN, True, self.recursion)
        self._tc = _flag_table(NOERROR, True, self.recursion, tc=True)
        self._zone_memo: dict[bytes, Zone | None] = {}
        # (question, room) -> (answer, records, bytes) of the first records that fit the room
        self._prefixes: dict[tuple[bytes, int], tuple[bytes, int, int]] = {}

    def answer(self, query: bytes, tcp: bool = False) -> bytes | Pending | None:
        """The response to a query, a coroutine producing it (forwarded), or None when the
        query must be dropped."""
        response = self._fast(query, tcp)
        if response is not None:
            self.stats.fast += 1
            return response
        full = self.answer_full(query, tcp)
        if full is None:
            self.stats.dropped += 1
        elif isinstance(full, bytes):
            self.stats.full += 1
            self.stats.rcodes[full[3] & 0x0F] += 1
        else:
            self.stats.forwarded += 1
        return full

    # fast path

    def _fast(self, q: bytes, tcp: bool) -> bytes | None:
        size = len(q)
        if size < _MIN_QUERY or q[_FLAGS_HIGH] & _NOT_QUERY or q[_QD_TO_NS] != _QD1:
            return None
        end = q.find(0, _HEADER)  # the root label ends the name
        qend = end + _QUESTION_TAIL
        if end < 0 or qend > size:
            return None
        if qend == size:
            if q[_ARCOUNT] != b"\x00\x00":
                return None
            edns = False
            limit = UDP_MIN
        elif (
            q[_ARCOUNT] == b"\x00\x01"
            and size >= qend + _OPT_FIXED
            and q[qend : qend + _OPT_PAYLOAD] == _OPT_HEAD
            and q[qend + _OPT_VERSION] == 0
            and size
            == qend + _OPT_FIXED + (q[qend + _OPT_RDLENGTH] << 8 | q[qend + _OPT_RDLENGTH + 1])
        ):
            if size > qend + _OPTIONS and not options_well_formed(q, qend + _OPTIONS, size):
                return None  # FORMERR on the full path
            edns = True
            payload = q[qend + _OPT_PAYLOAD] << 8 | q[qend + _OPT_PAYLOAD + 1]
            limit = UDP_MIN if payload < UDP_MIN else UDP_MAX if payload > UDP_MAX else payload
        else:
            return None
        answers = self.answers
        if not answers.synced:
            return None
        state = answers.state
        question = q[_HEADER:qend]
        # One lookup by the question as sent, lower-cased. Lower-casing leaves the class
        # (IN) and every type we store unchanged, so it cannot make a false hit.
        key = question.lower()
        found = state.answers.get(key)
        room = (TCP_MAX if tcp else limit) - qend - (_OPT_FIXED if edns else 0)
        if found is not None:
            flags = self._ok
            if isinstance(found, bytes) and len(found) - PACKED_HEAD <= room:
                head = found
                body = found[PACKED_HEAD:]
            elif isinstance(found, tuple) and found[3] <= room:  # Rotating, whole
                head, count, record, span = found
                cut = PACKED_HEAD + (q[0] << 8 | q[1]) % count * record
                body = head[cut : cut + span]
            else:  # too big for the room, or a record set: a part of it
                served = self.served(key, found, q[0] << 8 | q[1], room)
                if served is None:
                    if tcp:
                        return None  # not one record fits 64 KiB: the full path
                    # Not even one record fits: TC=1 and no records (RFC 2181 9).
                    self.stats.truncated += 1
                    counts = _EMPTY_EDNS if edns else _EMPTY
                    head, body, flags = counts + counts, b"", self._tc
                else:
                    head, body, cut_short = served
                    if cut_short and not tcp:  # records left out: the client may ask by TCP
                        self.stats.truncated += 1
                        flags = self._tc
        else:
            if q[end + _QCLASS : qend] != _IN:
                return None  # not class IN
            name = key[:-4]
            zone = state.names.get(name)
            if zone is not None:
                if q[end + _QTYPE] != 0 or not 0 < q[end + _QTYPE + 1] < 128:
                    return None  # meta types (ANY, AXFR, ...) take the full path
                flags = self._ok  # NODATA
            else:
                zone = self._zone_of_wire(q, end, name)
                if zone is None:
                    forwarder = self.forwarder
                    if forwarder is None or q[_FLAGS_LOW] & _CD:
                        return None  # refused, or forwarded uncached: the full path
                    if edns and q[qend + _OPT_DO] & 0x80:
                        return None
                    return forwarder.cached(q, name + q[end + 1 : qend], question, edns, room)
                if q[end + _QTYPE : end + _QCLASS] in _ZONE_TRANSFER_WIRE:
                    return None
                flags = self._nx
            negative = zone.negative
            head = negative.packed
            body = negative.body
            if len(body) > room:
                return None  # a long zone name in a small message: the full path
        counts = head[8:PACKED_HEAD] if edns else head[:8]
        flag = flags[(q[_FLAGS_HIGH] & 1) | (q[_FLAGS_LOW] & 0x10) >> 3]  # RD | CD << 1
        if edns:
            return b"".join((q[_ID], flag, counts, question, body, OPT_RECORD))
        return b"".join((q[_ID], flag, counts, question, body))

    def served(self, key: bytes, found: Stored, qid: int, room: int) -> Served | None:
        """The part of a positive answer that a query gets when the whole does not fit its
        room (or is a record set): the answer records and as many whole additional RRsets as
        fit (no TC); else as many answer records as fit, a rotated subset for a record set or
        addresses, marked cut (TC=1 over UDP); None when not even one record fits. The fast
        and the full path both take this, so they answer alike."""
        if isinstance(found, RecordSet):
            return found.window(qid, room, _HEADER + len(key))
        if isinstance(found, tuple):  # Rotating: from record (query ID mod count) on
            data, count, record, span = found
            at = PACKED_HEAD + qid % count * record
            if span <= room:
                return Served(data[:PACKED_HEAD], data[at : at + span], False)
            k = room // record
            if k == 0:
                return None
            head = record_counts(k, 0, 0) + record_counts(k, 0, 1)
            return Served(head, data[at : at + k * record], True)
        body = found[PACKED_HEAD:]
        if len(body) <= room:
            return Served(found[:PACKED_HEAD], body, False)
        cuts = self.answers.state.cuts.get(key)
        if cuts and cuts[0] <= room:  # the answer fits, not all of its additional records
            head, body = fit_glue(found, body, cuts, room)
            return Served(head, body, False)
        memo = self._prefixes.get((key, room))
        if memo is None or memo[0] is not found:
            if len(self._prefixes) >= _ZONE_MEMO_SIZE:
                self._prefixes.clear()
            memo = self._prefixes[(key, room)] = (found, *_records_within(found, room))
        _, k, end = memo
        if k == 0:
            return None
        return Served(record_counts(k, 0, 0) + record_counts(k, 0, 1), body[:end], True)

    def _zone_of_wire(self, q: bytes, end: int, name: bytes) -> Zone | None:
        """The zone of a well-formed question name ending at `end`, lower-cased as `name`
        (memoized: zones are fixed for the life of the process)."""
        try:
            return self._zone_memo[name]
        except KeyError:
            pass
        zone = self._walk_zone(q, end, name)
        if len(self._zone_memo) >= _ZONE_MEMO_SIZE:
            self._zone_memo.clear()
        self._zone_memo[name] = zone
        return zone

    def _walk_zone(self, q: bytes, end: int, name: bytes) -> Zone | None:
        if end - 11 > 255:
            return None  # over 255 bytes: FORMERR on the full path
        try:
            q[12:end].decode()
        except UnicodeDecodeError:
            return None  # dnslib rejects non-UTF-8 labels: keep both paths alike
        starts = []
        i = 12
        while i < end:
            length = q[i]
            if length > 63:
                return None
            starts.append(i)
            i += length + 1
        if i != end:
            return None  # a label holds a zero byte: leave it to the full path
        for zone in self.answers.state.zones:
            cut = len(name) - len(zone.wire)
            if name.endswith(zone.wire) and (cut == 0 or cut + 12 in starts):
                return zone
        return None

    # full path

    def answer_full(self, q: bytes, tcp: bool = False) -> bytes | Pending | None:
        if len(q) < 12 or q[2] & 0x80:
            return None
        try:
            query = DNSRecord.parse(q)
        except Exception:  # dnslib raises many types on hostile input
            return _header_only(q, FORMERR)
        if not all(_encodable(question.qname) for question in query.questions):
            return _header_only(q, FORMERR)  # dnslib cannot echo such a question
        header = query.header
        # RD and CD are defined for QUERY only: not echoed for another opcode (ISC opcodeflg)
        query_flags = header.opcode == 0
        reply = DNSRecord(
            DNSHeader(
                id=header.id,
                qr=1,
                opcode=header.opcode,
                rd=header.rd if query_flags else 0,
                ra=int(self.recursion),
            )
        )
        reply.header.cd = header.cd if query_flags else 0
        opts = [rr for rr in query.ar if rr.rtype == OPT]
        if len(opts) > 1 or any(o.rname.label for o in opts):
            return self._finish(reply, query, FORMERR)
        limit = TCP_MAX if tcp else UDP_MIN
        if opts:
            if not tcp:
                limit = max(UDP_MIN, min(UDP_MAX, opts[0].rclass))
            reply.add_ar(EDNS0(udp_len=EDNS_PAYLOAD))
            if (opts[0].ttl >> 16) & 0xFF:
                reply.ar[-1].ttl = (BADVERS >> 4) << 24
                return self._finish(reply, query, NOERROR)
            options = _opt_rdata(q)
            if options is None or not options_well_formed(q, *options):
                return self._finish(reply, query, FORMERR)
        if header.opcode != 0:
            return self._finish(reply, query, NOTIMP)
        if len(query.questions) != 1:
            return self._finish(reply, query, FORMERR)
        question = query.questions[0]
        reply.add_question(question)
        if question.qclass != IN:
            return self._finish(reply, query, REFUSED)
        labels = tuple(label.lower() for label in question.qname.label)
        state = self.answers.state
        zone = _zone_of_labels(state.zones, labels)
        if zone is None:
            if self.forwarder is None:
                return self._finish(reply, query, REFUSED)
            if question.qtype in ZONE_TRANSFERS:
                return self._finish(reply, query, NOTIMP)
            name = b"".join(bytes((len(label),)) + label for label in question.qname.label)
            wire = name + struct.pack(">BHH", 0, question.qtype, question.qclass)
            room = min(limit, TCP_MAX if tcp else UPSTREAM_PAYLOAD) - 12 - len(wire)
            return self.forwarder.forward(
                q[:2],
                wire,
                rd=bool(header.rd),
                ad=bool(header.ad),
                cd=bool(header.cd),
                do=bool(opts and opts[0].ttl & 0x8000),
                edns=bool(opts),
                room=room - (_OPT_FIXED if opts else 0),
            )
        if not self.answers.synced:
            return self._finish(reply, query, SERVFAIL)
        if question.qtype in ZONE_TRANSFERS:
            return self._finish(reply, query, NOTIMP)
        reply.header.aa = 1
        wire = b"".join(bytes((len(label),)) + label for label in labels) + b"\x00"
        if wire not in state.names:
            reply.add_auth(_negative_soa(zone))
            return self._finish(reply, query, NXDOMAIN, limit)
        qtype = question.qtype
        if qtype == ANY:
            present = (t for t in STORED_TYPES if wire + TYPE_WIRE[t] + _IN in state.answers)
            qtype = next(present, ANY)
        found = state.answers.get(wire + qtype.to_bytes(2, "big") + _IN) if qtype < 65536 else None
        if found is None:
            reply.add_auth(_negative_soa(zone))
            return self._finish(reply, query, NOERROR, limit)
        # The records are read back from the pre-encoded bytes: one source of truth. What
        # is served of them is the fast path's choice (the same rotation, the same subset).
        key = wire + qtype.to_bytes(2, "big") + _IN
        room = limit - _HEADER - len(key) - (_OPT_FIXED if opts else 0)
        served = self.served(key, found, header.id, room)
        if served is None:
            reply.header.tc = 1
            self.stats.truncated += 1
            return self._finish(reply, query, NOERROR, limit)
        if served.cut and not tcp:
            reply.header.tc = 1
            self.stats.truncated += 1
        message = b"\x00\x00\x84\x00" + served.head[:8] + wire + b"\x00\x01\x00\x01"
        records = DNSRecord.parse(message + served.body)
        for rr in records.rr:
            rr.rname = question.qname  # owners point at the question: echo it as sent
            reply.add_answer(rr)
        for rr in records.ar:
            reply.add_ar(rr)
        return self._finish(reply, query, NOERROR, limit)

    def _finish(
        self, reply: DNSRecord, query: DNSRecord, rcode: int, limit: int = TCP_MAX
    ) -> bytes:
        if not reply.questions and len(query.questions) == 1:
            reply.add_question(query.questions[0])
        reply.header.rcode = rcode
        data = bytes(reply.pack())
        if len(data) <= limit:
            return data
        # Drop additional RRsets from the end (no TC needed: RFC 2181 9), keeping OPT.
        opt = [rr for rr in reply.ar if rr.rtype == OPT]
        rrsets: list[list[LibRR]] = []
        for rr in reply.ar:
            if rr.rtype == OPT:
                continue
            if rrsets and (rrsets[-1][0].rname, rrsets[-1][0].rtype) == (rr.rname, rr.rtype):
                rrsets[-1].append(rr)
            else:
                rrsets.append([rr])

        def keep(count: int) -> bytes:
            reply.ar = [rr for rrset in rrsets[:count] for rr in rrset] + opt
            return bytes(reply.pack())

        # Binary search for the most RRsets that fit: one pack per step, not per RRset.
        fits, too_many = 0, len(rrsets)
        data = keep(0) if rrsets else data
        if len(data) <= limit:
            while too_many - fits > 1:
                middle = (fits + too_many) // 2
                candidate = keep(middle)
                if len(candidate) <= limit:
                    fits, data = middle, candidate
                else:
                    too_many = middle
            return data
        reply.rr = []
        reply.ar = opt
        reply.header.tc = 1
        self.stats.truncated += 1
        return bytes(reply.pack())


def _records_within(packed: bytes, room: int) -> tuple[int, int]:
    """How many answer records of a pre-encoded answer fit in `room` bytes, and their
    length. Answer records are owned by the question (a pointer), so each is 12 bytes and
    its RDATA; a prefix of them is a valid answer (compression points backwards only)."""
    an = packed[2] << 8 | packed[3]
    at, end, k = PACKED_HEAD, 0, 0
    while k < an:
        nxt = at + 12 + (packed[at + 10] << 8 | packed[at + 11])
        if nxt - PACKED_HEAD > room:
            break
        at, end, k = nxt, nxt - PACKED_HEAD, k + 1
    return k, end


def _zone_of_labels(zones: list[Zone], labels: tuple[bytes, ...]) -> Zone | None:
    for zone in zones:
        zone_labels = zone.labels
        if labels[len(labels) - len(zone_labels) :] == zone_labels and len(labels) >= len(
            zone_labels
        ):
            return zone
    return None


def _encodable(name: DNSLabel) -> bool:
    """True when the name fits the wire limits (labels <= 63, name <= 255 bytes)."""
    return len(name) <= 253 and all(len(label) <= 63 for label in name.label)


def options_well_formed(q: bytes, at: int, end: int) -> bool:
    """The EDNS options from `at` to `end`: whole options (RFC 6891 6.1.2) ending exactly
    there, and any COOKIE of a legal length (RFC 7873 5.2.2: else FORMERR)."""
    while at < end:
        if at + 4 > end:
            return False
        code, length = q[at] << 8 | q[at + 1], q[at + 2] << 8 | q[at + 3]
        at += 4 + length
        if at > end or (code == _COOKIE and not _cookie_length(length)):
            return False
    return True


def _cookie_length(length: int) -> bool:
    return length == 8 or 16 <= length <= 40


def _opt_rdata(q: bytes) -> tuple[int, int] | None:
    """Where the first OPT record's options start and end in a query that parsed (dnslib
    reads options leniently: it skips a cut one rather than refusing it)."""
    try:
        qdcount, *records = struct.unpack_from(">HHHH", q, 4)
        at = 12
        for _ in range(qdcount):
            at = _name_end(q, at) + 4
        for _ in range(sum(records)):
            at = _name_end(q, at)
            rtype, rdlength = q[at] << 8 | q[at + 1], q[at + 8] << 8 | q[at + 9]
            at += 10
            if rtype == OPT:
                return at, at + rdlength
            at += rdlength
    except IndexError:
        pass
    return None


def _name_end(q: bytes, at: int) -> int:
    while (length := q[at]) and length < 0xC0:
        at += length + 1
    return at + (2 if length else 1)


def _header_only(q: bytes, rcode: int) -> bytes:
    """A response carrying only the query's ID, opcode and (for QUERY) RD bit: for
    unparsable input."""
    qid, flags = struct.unpack_from(">HH", q)
    flags = 0x8000 | (flags & (0x7900 if flags & 0x7800 == 0 else 0x7800)) | rcode
    return struct.pack(">HHHHHH", qid, flags, 0, 0, 0, 0)


def _negative_soa(zone: Zone) -> LibRR:
    """The zone's SOA as the fast path sends it, read back from those bytes."""
    message = b"\x00\x00\x84\x00" + zone.negative.packed[:8] + b"\x00\x00\x06\x00\x01"
    soa: LibRR = DNSRecord.parse(message + zone.negative.body).auth[0]
    return soa
