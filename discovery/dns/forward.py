"""Forwarding for names outside every zone: upstream resolvers, their health, a bounded cache.

The resolver hands a query for a name outside every zone to `Forwarder`: a warm cache entry
is answered at once (`cached`, on the fast path), anything else becomes a coroutine
(`forward`) that asks the upstreams in turn over UDP, retries over TCP when the answer is
truncated, and builds the client's response. An upstream answer is accepted only from the
address it was sent to, with the query's ID and question; anything else is dropped as a lie.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import ipaddress
import logging
import secrets
import struct
import time
from collections import Counter
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from dnslib import DNSRecord

from ..config import ConfigError
from .records import NOERROR, NXDOMAIN, OPT, SERVFAIL, SOA, counts

log = logging.getLogger(__name__)

MAX_POSITIVE_TTL = 3600  # as CoreDNS's cache: an upstream's week-long TTL is not kept that long
MAX_NEGATIVE_TTL = 1800
FAILURES_TO_DOWN = 2  # consecutive failures before an upstream is skipped
PROBE_INTERVAL = 1.0  # seconds between probes of an upstream that is down
MAX_PENDING = 1000  # upstream exchanges in flight; past that, SERVFAIL at once
UPSTREAM_PAYLOAD = 1232  # what we advertise upstream, and the most a UDP client gets
_PROBE_QUESTION = b"\x00\x00\x02\x00\x01"  # . NS IN: any answer shows the upstream is alive

Pending = Coroutine[Any, Any, bytes]


class Rejected(Exception):
    """An upstream message that is not the answer to our query."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class ForwardStats:
    """Plain counters; metrics.py reads them at scrape time."""

    queries: int = 0  # queries for names outside the zones, answered or not
    cache_hits: int = 0
    servfail: int = 0  # no upstream gave an answer
    overloaded: int = 0  # refused because MAX_PENDING exchanges were in flight
    upstream_queries: Counter[str] = field(default_factory=Counter)
    upstream_failures: Counter[tuple[str, str]] = field(default_factory=Counter)


class Upstream:
    """One resolver and its health: down after FAILURES_TO_DOWN failures in a row."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.ip = ipaddress.ip_address(host.partition("%")[0])
        self.label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.up = True
        self.failures = 0
        self.probe: asyncio.Task[None] | None = None

    def sent_by(self, addr: tuple[Any, ...]) -> bool:
        try:
            source = ipaddress.ip_address(str(addr[0]).partition("%")[0])
        except ValueError:
            return False
        if isinstance(source, ipaddress.IPv6Address) and source.ipv4_mapped is not None:
            source = source.ipv4_mapped
        return source == self.ip and addr[1] == self.port


def _skip_name(wire: bytes, at: int) -> int:
    while True:
        length = wire[at]
        if length == 0:
            return at + 1
        if length & 0xC0 == 0xC0:
            return at + 2
        if length & 0xC0:
            raise Rejected("malformed")
        at += length + 1


def _records(wire: bytes, at: int) -> tuple[list[tuple[int, int, int, int, int]], bool]:
    """Each record but OPT as (start, end, section, type, TTL offset), and whether no other
    record follows an OPT record (then dropping OPT shifts no offset a pointer may use)."""
    an, ns, ar = struct.unpack_from(">HHH", wire, 6)
    spans: list[tuple[int, int, int, int, int]] = []
    opt_seen = after_opt = False
    for index in range(an + ns + ar):
        section = 0 if index < an else 1 if index < an + ns else 2
        record = at
        try:
            at = _skip_name(wire, at)
            rtype, _, _, rdlength = struct.unpack_from(">HHIH", wire, at)
        except (IndexError, struct.error):
            raise Rejected("malformed") from None
        ttl_at = at + 4
        at += 10 + rdlength
        if at > len(wire):
            raise Rejected("malformed")
        if rtype == OPT and section == 2:
            opt_seen = True
            continue
        after_opt = after_opt or opt_seen
        spans.append((record, at, section, rtype, ttl_at))
    return spans, not after_opt


def check_header(wire: bytes, qid: int, question: bytes) -> None:
    """Raise Rejected unless `wire` answers query `qid` for `question` (name, type, class)."""
    end = 12 + len(question)
    if len(wire) < end:
        raise Rejected("malformed")
    if wire[0] << 8 | wire[1] != qid:
        raise Rejected("id")
    if not wire[2] & 0x80 or wire[2] & 0x78 or wire[4:6] != b"\x00\x01":
        raise Rejected("question")
    got = wire[12:end]
    # Names compare case-insensitively (an upstream may not echo 0x20); length bytes are < 64.
    if got[:-4].lower() != question[:-4].lower() or got[-4:] != question[-4:]:
        raise Rejected("question")


def _flags(rcode: int, ad: bool) -> tuple[bytes, ...]:
    """Response flag bytes indexed by RD | wants-AD << 1 | CD << 2 | TC << 3 (AA never set)."""
    out = []
    for index in range(16):
        high = 0x80 | (0x02 if index & 8 else 0) | (index & 1)
        low = 0x80 | (0x20 if ad and index & 2 else 0) | (0x10 if index & 4 else 0) | rcode
        out.append(bytes((high, low)))
    return tuple(out)


class Entry:
    """An upstream answer as the cache keeps it: the records after the question (no OPT),
    where each record ends and where its TTL sits, so a response for any client is the
    client's ID, flags and question spliced in front, with TTLs aged by the seconds held."""

    __slots__ = (
        "_age",
        "_aged",
        "ad",
        "body",
        "counts",
        "counts_edns",
        "ends",
        "expires",
        "flags",
        "rcode",
        "sections",
        "stored",
        "ttl",
        "ttls",
    )

    def __init__(self, wire: bytes, question: bytes, now: float) -> None:
        """`wire` has passed check_header; raises Rejected when it is malformed."""
        try:
            message = DNSRecord.parse(wire)  # the whole message must decode, not only its walk
        except Exception:  # dnslib raises many types on hostile input
            raise Rejected("malformed") from None
        spans, opt_last = _records(wire, 12 + len(question))
        if not opt_last:  # a record after OPT: dropping OPT would shift the offsets after it
            message.ar = [rr for rr in message.ar if rr.rtype != OPT]
            wire = bytes(message.pack())
            spans, _ = _records(wire, 12 + len(question))
        flags = wire[2] << 8 | wire[3]
        self.rcode = flags & 0x0F
        self.ad = bool(flags & 0x20)
        self.flags = _flags(self.rcode, self.ad)
        self.body = b"".join(wire[s:e] for s, e, _, _, _ in spans)
        sections = [0, 0, 0]
        ends: list[int] = []
        ttls: list[tuple[int, int]] = []
        offset = 0
        lowest: int | None = None
        negative_ttl: int | None = None
        for s, e, section, rtype, ttl_at in spans:
            sections[section] += 1
            ttl = struct.unpack_from(">I", wire, ttl_at)[0]
            ttl = 0 if ttl >= 2**31 else ttl  # RFC 2181 8: a TTL with the top bit set means 0
            ttls.append((ttl_at - s + offset, ttl))
            offset += e - s
            ends.append(offset)
            lowest = ttl if lowest is None else min(lowest, ttl)
            if rtype == SOA and section == 1 and negative_ttl is None:
                minimum = struct.unpack_from(">I", wire, e - 4)[0]
                negative_ttl = min(ttl, minimum)
        self.sections = tuple(sections)
        self.ends = ends
        self.ttls = ttls
        self.counts = counts(*sections)
        self.counts_edns = counts(sections[0], sections[1], sections[2] + 1)
        negative = self.rcode == NXDOMAIN or (self.rcode == NOERROR and sections[0] == 0)
        if negative:  # RFC 2308 5: cache by the SOA; without one, do not cache
            ttl = min(negative_ttl, lowest or 0, MAX_NEGATIVE_TTL) if negative_ttl else 0
        else:
            ttl = min(lowest or 0, MAX_POSITIVE_TTL)
        self.ttl = ttl
        self.stored = now
        self.expires = now + ttl
        self._age = 0
        self._aged = self.body

    def body_at(self, now: float) -> bytes:
        """The records with every TTL lowered by the whole seconds the entry has been held."""
        age = int(now - self.stored)
        if age == self._age:
            return self._aged
        data = bytearray(self.body)
        for at, ttl in self.ttls:
            struct.pack_into(">I", data, at, max(0, ttl - age))
        self._age, self._aged = age, bytes(data)
        return self._aged

    def response(
        self, qid: bytes, index: int, question: bytes, edns: bool, room: int, now: float
    ) -> bytes:
        """The client's response; records that do not fit `room` are cut from the end, with
        TC=1 when the cut reaches the answer or authority section (RFC 2181 9)."""
        body = self.body_at(now)
        head = self.counts_edns if edns else self.counts
        if len(body) > room:
            kept = bisect.bisect_right(self.ends, room)
            body = body[: self.ends[kept - 1]] if kept else b""
            an, ns, _ = self.sections
            kept_an = min(an, kept)
            kept_ns = min(ns, kept - kept_an)
            kept_ar = kept - kept_an - kept_ns
            head = counts(kept_an, kept_ns, kept_ar + edns)
            if kept < an + ns:
                index |= 8
        tail = _OPT_RECORD if edns else b""
        return b"".join((qid, self.flags[index], head, question, body, tail))


def _servfail(qid: bytes, index: int, question: bytes, edns: bool) -> bytes:
    high = 0x80 | (index & 1)
    low = 0x80 | (0x10 if index & 4 else 0) | SERVFAIL
    tail = _OPT_RECORD if edns else b""
    return b"".join((qid, bytes((high, low)), counts(0, 0, int(edns)), question, tail))


_OPT_RECORD = b"\x00" + struct.pack(">HHIH", OPT, UPSTREAM_PAYLOAD, 0, 0)


class _Exchange(asyncio.DatagramProtocol):
    """One UDP query on its own connected socket (a fresh random source port)."""

    def __init__(self, upstream: Upstream, qid: int, question: bytes, stats: ForwardStats):
        self.upstream = upstream
        self.qid = qid
        self.question = question
        self.stats = stats
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self.answer.done():
            return
        try:
            if not self.upstream.sent_by(addr):
                raise Rejected("address")
            check_header(data, self.qid, self.question)
        except Rejected as lie:  # dropped: the real answer may still come
            self.stats.upstream_failures[self.upstream.label, lie.reason] += 1
            log.debug("dropped a reply from %s: %s", addr, lie.reason)
            return
        self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc or ConnectionError("socket closed"))


# the embedded DNS server of a Docker container's resolv.conf (user-defined networks)
DOCKER_DNS = ipaddress.ip_address("127.0.0.11")


class Forwarder:
    def __init__(
        self, upstreams: Sequence[tuple[str, int]], timeout: float = 2.0, cache_size: int = 10000
    ) -> None:
        if not upstreams:
            raise ValueError("forwarding needs at least one upstream")
        self.upstreams = [Upstream(host, port) for host, port in upstreams]
        self.timeout = timeout
        self.cache_size = cache_size
        self.cache: dict[bytes, Entry] = {}
        self.stats = ForwardStats()
        self._inflight: dict[bytes, asyncio.Future[Entry | None]] = {}
        self._pending = 0
        self._closed = False

    def exclude_self(self, host: str, port: int) -> None:
        """Drop upstreams that are this server's own DNS listener (a resolv.conf naming
        127.0.0.1 on the machine discovery serves): forwarding to them would loop."""
        ours = ipaddress.ip_address(host.partition("%")[0])

        def is_us(upstream: Upstream) -> bool:
            if upstream.port != port:
                return False
            if ours.is_unspecified:
                if upstream.ip == DOCKER_DNS:
                    return False  # a NAT rule in the container sends it to dockerd, not to us
                return upstream.ip.is_loopback or upstream.ip.is_unspecified
            return upstream.ip == ours

        looping = [u for u in self.upstreams if is_us(u)]
        if not looping:
            return
        labels = ", ".join(u.label for u in looping)
        if len(looping) == len(self.upstreams):
            raise ConfigError(
                f"--upstream {labels} is this server's own DNS listener: queries would loop"
                " (name the resolvers this machine used before discovery)"
            )
        log.warning("--upstream %s is this server's own DNS listener: not used", labels)
        self.upstreams = [u for u in self.upstreams if not is_us(u)]

    # the fast path: a warm entry, no parsing

    def cached(self, q: bytes, key: bytes, question: bytes, edns: bool, room: int) -> bytes | None:
        """The response from a live cache entry that fits, or None (the slow path decides).
        The query has RD, AD as it likes, CD=0 and no DO bit."""
        entry = self.cache.get(key)
        if entry is None:
            return None
        now = time.monotonic()
        if now >= entry.expires:
            return None
        body = entry.body_at(now)
        if len(body) > room:
            return None
        stats = self.stats
        stats.queries += 1
        stats.cache_hits += 1
        flags = entry.flags[(q[2] & 1) | (q[3] & 0x20) >> 4]
        if edns:
            return b"".join((q[:2], flags, entry.counts_edns, question, body, _OPT_RECORD))
        return b"".join((q[:2], flags, entry.counts, question, body))

    # the slow path

    def forward(
        self,
        qid: bytes,
        question: bytes,
        *,
        rd: bool,
        ad: bool,
        cd: bool,
        do: bool,
        edns: bool,
        room: int,
    ) -> Pending:
        """A coroutine producing the response to a query for `question` (name as sent, type,
        class) that fits `room` bytes after the question."""
        index = int(rd) | int(ad or do) << 1 | int(cd) << 2
        return self._respond(qid, question, index, do, cd, edns, room)

    async def _respond(
        self, qid: bytes, question: bytes, index: int, do: bool, cd: bool, edns: bool, room: int
    ) -> bytes:
        self.stats.queries += 1
        key = question[:-4].lower() + question[-4:]
        cacheable = not do and not cd and self.cache_size > 0
        entry = self.cache.get(key) if cacheable else None
        if entry is not None and time.monotonic() < entry.expires:
            self.stats.cache_hits += 1
        else:
            entry = await self._resolve(key, question, do, cd, cacheable)
        if entry is None:
            self.stats.servfail += 1
            return _servfail(qid, index, question, edns)
        return entry.response(qid, index, question, edns, room, time.monotonic())

    async def _resolve(
        self, key: bytes, question: bytes, do: bool, cd: bool, cacheable: bool
    ) -> Entry | None:
        if cacheable:
            pending = self._inflight.get(key)
            if pending is not None:  # the same question is on its way: share its answer
                return await asyncio.shield(pending)
        if self._pending >= MAX_PENDING or self._closed:
            self.stats.overloaded += 1
            return None
        future: asyncio.Future[Entry | None] = asyncio.get_running_loop().create_future()
        if cacheable:
            self._inflight[key] = future
        self._pending += 1
        entry: Entry | None = None
        try:
            entry = await self._ask(question, do, cd)
            if entry is not None and cacheable and entry.ttl > 0:
                self._store(key, entry)
        finally:
            self._pending -= 1
            if self._inflight.get(key) is future:
                del self._inflight[key]
            future.set_result(entry)  # waiters get None (SERVFAIL) if we were cancelled
        return entry

    def _store(self, key: bytes, entry: Entry) -> None:
        cache = self.cache
        cache.pop(key, None)
        while len(cache) >= self.cache_size:
            del cache[next(iter(cache))]  # the oldest entry
        cache[key] = entry

    def _order(self) -> list[Upstream]:
        """Upstreams that are up, in the configured order; those down only as a last resort."""
        up = [u for u in self.upstreams if u.up]
        return up + [u for u in self.upstreams if not u.up]

    async def _ask(self, question: bytes, do: bool, cd: bool) -> Entry | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2 * self.timeout
        for upstream in self._order():
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            entry = await self._ask_one(upstream, question, do, cd, min(self.timeout, remaining))
            if entry is not None:
                return entry
        return None

    async def _ask_one(
        self, upstream: Upstream, question: bytes, do: bool, cd: bool, timeout: float
    ) -> Entry | None:
        """One upstream's answer (NOERROR or NXDOMAIN), or None after recording why not."""
        stats = self.stats
        stats.upstream_queries[upstream.label] += 1
        try:
            wire = await self.exchange(upstream, question, do=do, cd=cd, timeout=timeout)
            entry = Entry(wire, question, time.monotonic())
        except (TimeoutError, OSError, Rejected) as error:
            reason = error.reason if isinstance(error, Rejected) else _reason(error)
            stats.upstream_failures[upstream.label, reason] += 1
            self._failed(upstream, reason)
            return None
        self._answered(upstream)
        if entry.rcode not in (NOERROR, NXDOMAIN):
            # Alive but no use (SERVFAIL, REFUSED, ...): the next upstream may know.
            stats.upstream_failures[upstream.label, "rcode"] += 1
            return None
        return entry

    async def exchange(
        self, upstream: Upstream, question: bytes, *, do: bool, cd: bool, timeout: float
    ) -> bytes:
        """The upstream's checked answer: over UDP, then over TCP when UDP's is truncated."""
        qid = secrets.randbits(16)
        flags = 0x0120 | (0x0010 if cd else 0)  # RD, AD (tell us what you validated), CD
        opt = b"\x00" + struct.pack(">HHIH", OPT, UPSTREAM_PAYLOAD, 0x8000 if do else 0, 0)
        query = struct.pack(">HHHHHH", qid, flags, 1, 0, 0, 1) + question + opt
        async with asyncio.timeout(timeout):
            wire = await self._udp(upstream, query, qid, question)
            if wire[2] & 0x02:  # TC: ask again over TCP (RFC 7766)
                wire = await self._tcp(upstream, query, qid, question)
        return wire

    async def _udp(self, upstream: Upstream, query: bytes, qid: int, question: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: _Exchange(upstream, qid, question, self.stats),
            remote_addr=(upstream.host, upstream.port),
        )
        try:
            transport.sendto(query)
            return await protocol.answer
        finally:
            transport.close()

    async def _tcp(self, upstream: Upstream, query: bytes, qid: int, question: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(upstream.host, upstream.port)
        try:
            writer.write(len(query).to_bytes(2, "big") + query)
            size = int.from_bytes(await reader.readexactly(2), "big")
            wire = await reader.readexactly(size)
        except asyncio.IncompleteReadError:
            raise Rejected("malformed") from None
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        check_header(wire, qid, question)
        return wire

    # health

    def _answered(self, upstream: Upstream) -> None:
        upstream.failures = 0
        if not upstream.up:
            log.info("upstream %s answers again", upstream.label)
        upstream.up = True

    def _failed(self, upstream: Upstream, reason: str) -> None:
        upstream.failures += 1
        if upstream.up and upstream.failures >= FAILURES_TO_DOWN:
            upstream.up = False
            log.warning("upstream %s is down (%s): probing it in the background", upstream.label,
                        reason)  # fmt: skip
        if not upstream.up and upstream.probe is None and not self._closed:
            upstream.probe = asyncio.get_running_loop().create_task(
                self._probe(upstream), name=f"probe {upstream.label}"
            )

    async def _probe(self, upstream: Upstream) -> None:
        try:
            while not upstream.up:
                await asyncio.sleep(PROBE_INTERVAL)
                try:
                    await self.exchange(
                        upstream, _PROBE_QUESTION, do=False, cd=False, timeout=self.timeout
                    )
                except (TimeoutError, OSError, Rejected):
                    continue
                self._answered(upstream)
        finally:
            upstream.probe = None

    async def close(self) -> None:
        self._closed = True
        probes = [u.probe for u in self.upstreams if u.probe is not None]
        for task in probes:
            task.cancel()
        for task in probes:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _reason(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, ConnectionRefusedError):
        return "refused"
    return "unreachable"
