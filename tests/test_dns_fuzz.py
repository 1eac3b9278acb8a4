"""Hostile bytes at the real UDP and TCP listeners of one running server.

Hypothesis cannot use function-scoped async fixtures inside @given, so the server runs
in a background thread on its own event loop for the whole module, and each example
talks to it with plain blocking sockets. After every example a normal query over UDP
and over TCP must still get the registered instance: the server never crashes or stalls.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import struct
import threading
from collections.abc import Iterator

import aiohttp
import dns.message
import pytest
from conftest import Client, make_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from discovery.server import run_server

ZONE = "cluster.local"
SERVICE = f"web.default.svc.{ZONE}"
ADDRESS = "10.1.2.3"
TIMEOUT = 3.0
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class ErrorLog(logging.Handler):
    """Collects every error the server logs, e.g. an exception swallowed by a listener."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> list[str]:
        messages = [self.format(record) for record in self.records]
        self.records.clear()
        return messages


class ThreadedServer:
    """A real server on free ports, running on its own loop in a daemon thread."""

    def __init__(self) -> None:
        self.dns_address: tuple[str, int] = ("", 0)
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="fuzz-server", daemon=True)

    def __enter__(self) -> ThreadedServer:
        self._thread.start()
        if not self.ready.wait(10) or self.error is not None:
            raise RuntimeError("server thread did not start") from self.error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        assert not self._thread.is_alive(), "server did not shut down"

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as error:  # reported to the main thread through `ready`
            self.error = error
            self.ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with run_server(make_config()) as server:
            await server.registry.wait(lambda: server.registry.synced, 5)
            async with aiohttp.ClientSession() as session:
                client = Client(server, session)
                await client.register("default", "web", "web-1", address=ADDRESS, ttl=3600)
                assert await client.wait_cache(
                    lambda: ("default", "web") in server.registry.services()
                )
            self.dns_address = server.dns_address
            self.ready.set()
            await self._stop.wait()


@pytest.fixture(scope="module")
def running() -> Iterator[ThreadedServer]:
    with ThreadedServer() as server:
        yield server


@pytest.fixture(scope="module")
def errors() -> Iterator[ErrorLog]:
    handler = ErrorLog()
    logger = logging.getLogger("discovery")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


# Building queries by hand, so that every field can be wrong.


def wire_name(labels: list[bytes]) -> bytes:
    return b"".join(bytes((len(label),)) + label for label in labels) + b"\x00"


def header(
    qid: int, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0
) -> bytes:
    return struct.pack(">HHHHHH", qid, flags, qd, an, ns, ar)


def opt_record(
    payload: int = 1232, version: int = 0, rdata: bytes = b"", rdlen: int | None = None
) -> bytes:
    size = len(rdata) if rdlen is None else rdlen
    return b"\x00" + struct.pack(">HHBBHH", 41, payload, 0, version, 0, size) + rdata


NAMES = [
    SERVICE,
    f"web-1.{SERVICE}",
    f"_http._tcp.{SERVICE}",
    f"WeB.DeFaUlT.svc.{ZONE}",
    f"nope.default.svc.{ZONE}",
    ZONE,
    f"dns-version.{ZONE}",
    "3.2.1.10.in-addr.arpa",
    "example.org",
    "",
]
TYPES = [1, 2, 6, 12, 16, 28, 33, 41, 251, 252, 255, 65535]

ids = st.integers(0, 0xFFFF)
garbage = st.binary(min_size=1, max_size=64)


@st.composite
def valid_queries(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from(NAMES))
    labels = [part.encode() for part in name.split(".")] if name else []
    question = wire_name(labels) + struct.pack(">HH", draw(st.sampled_from(TYPES)), 1)
    edns = draw(st.booleans())
    extra = opt_record(draw(st.integers(0, 0xFFFF))) if edns else b""
    return header(draw(ids), ar=int(edns)) + question + extra


@st.composite
def mutated_queries(draw: st.DrawFn) -> bytes:
    packet = bytearray(draw(valid_queries()))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "append", "counts", "label"]))
        if kind == "flip" and packet:
            for bit in draw(st.lists(st.integers(0, len(packet) * 8 - 1), min_size=1, max_size=8)):
                packet[bit // 8] ^= 1 << (bit % 8)
        elif kind == "truncate":
            del packet[draw(st.integers(0, max(0, len(packet) - 1))) :]
        elif kind == "append":
            packet += draw(garbage)
        elif kind == "counts" and len(packet) >= 12:
            packet[4:12] = struct.pack(">HHHH", *draw(st.tuples(ids, ids, ids, ids)))
        elif kind == "label" and len(packet) > 12:
            packet[12] = draw(st.integers(64, 255))  # no such label length, or a pointer
    return bytes(packet)


@st.composite
def pointer_loops(draw: st.DrawFn) -> bytes:
    """A question name that never ends: pointers to itself or to each other."""
    loop = draw(
        st.sampled_from(
            [
                b"\xc0\x0c",  # points at itself
                b"\x03web\xc0\x0c",  # a label, then back to the start
                b"\xc0\x0e\xc0\x0c",  # two pointers pointing at each other
                b"\x03web\xc0\x12\x00",  # forward pointer into its own type field
                b"\xff\xff",  # pointer beyond the packet
            ]
        )
    )
    edns = draw(st.booleans())
    return (
        header(draw(ids), ar=int(edns))
        + loop
        + struct.pack(">HH", 1, 1)
        + (opt_record() if edns else b"")
    )


@st.composite
def long_names(draw: st.DrawFn) -> bytes:
    """Well-formed labels adding up to more than 255 bytes, or one label longer than 63."""
    size = draw(st.integers(40, 63))
    count = draw(st.integers(3, 8))
    labels = [b"a" * size] * count + [part.encode() for part in SERVICE.split(".")]
    if draw(st.booleans()):
        labels[0] = b"b" * draw(st.integers(64, 255))  # length byte is then a pointer/reserved
    name = b"".join(bytes((len(label) & 0xFF,)) + label for label in labels) + b"\x00"
    return header(draw(ids)) + name + struct.pack(">HH", 1, 1)


@st.composite
def garbage_options(draw: st.DrawFn) -> bytes:
    """OPT carrying random option bytes, with a right or a wrong RDLENGTH."""
    rdata = draw(st.binary(max_size=80))
    rdlen = draw(st.one_of(st.none(), st.integers(0, 0xFFFF)))
    version = draw(st.sampled_from([0, 0, 1, 255]))
    question = wire_name([p.encode() for p in SERVICE.split(".")]) + struct.pack(">HH", 1, 1)
    opts = draw(st.integers(1, 3))
    return (
        header(draw(ids), ar=opts)
        + question
        + opt_record(draw(st.integers(0, 0xFFFF)), version, rdata, rdlen) * opts
    )


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    """A packet with QR=1: must be dropped, never answered (no reflection loops)."""
    packet = bytearray(draw(valid_queries()))
    packet[2] |= 0x80
    return bytes(packet)


packets = st.one_of(
    st.binary(max_size=600),
    valid_queries(),
    mutated_queries(),
    pointer_loops(),
    long_names(),
    garbage_options(),
    responses(),
)


# Checks.


def probe(qid: int) -> dns.message.Message:
    query = dns.message.make_query(SERVICE, "A")
    query.id = qid
    return query


def other_id(packet: bytes) -> int:
    taken = int.from_bytes(packet[:2].ljust(2, b"\x00"), "big")
    return (taken + 1 + random.randrange(0xFFFE)) % 0x10000


def check_answer(wire: bytes, query: dns.message.Message) -> None:
    response = dns.message.from_wire(wire)
    assert response.id == query.id
    assert response.rcode() == 0, response
    addresses = {rr.to_text() for rrset in response.answer for rr in rrset}
    assert addresses == {ADDRESS}, response


def check_reply(reply: bytes, packet: bytes) -> None:
    """What any reply to a fuzz packet must be: a parsable response carrying its ID."""
    assert len(reply) >= 12, reply
    assert packet[2] & 0x80 == 0, "a response packet was answered"
    assert reply[:2] == packet[:2], (reply, packet)
    assert reply[2] & 0x80, "QR=0 in a reply"
    dns.message.from_wire(reply)  # raises on anything dnspython cannot read


def recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    """`size` bytes, or None at a clean EOF before the first byte."""
    data = bytearray()
    while len(data) < size:
        try:
            chunk = sock.recv(size - len(data))
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            assert not data, f"connection closed inside a message after {len(data)} bytes"
            return None
        data += chunk
    return bytes(data)


def read_framed(sock: socket.socket) -> list[bytes]:
    """Every length-prefixed message until the server closes the connection."""
    messages = []
    while (prefix := recv_exactly(sock, 2)) is not None:
        body = recv_exactly(sock, int.from_bytes(prefix, "big"))
        assert body is not None, "connection closed after a length prefix"
        messages.append(body)
    return messages


def frames(stream: bytes) -> list[bytes]:
    """The messages the server sees in a byte stream, framed as RFC 7766 says."""
    out = []
    while len(stream) >= 2:
        size = int.from_bytes(stream[:2], "big")
        if len(stream) < 2 + size:
            break
        out.append(stream[2 : 2 + size])
        stream = stream[2 + size :]
    return out


def framed(message: bytes) -> bytes:
    return len(message).to_bytes(2, "big") + message


def still_serving(address: tuple[str, int], errors: ErrorLog) -> None:
    """A normal query over UDP and over TCP gets the registered instance."""
    query = probe(random.randrange(0x10000))
    with socket.create_connection(address, timeout=TIMEOUT) as sock:
        sock.sendall(framed(query.to_wire()))
        prefix = recv_exactly(sock, 2)
        assert prefix is not None, "TCP probe got no answer"
        body = recv_exactly(sock, int.from_bytes(prefix, "big"))
        assert body is not None
        check_answer(body, query)
    query = probe(random.randrange(0x10000))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(address)
        sock.send(query.to_wire())
        check_answer(sock.recv(65535), query)
    assert errors.take() == []


@FUZZ
@given(packet=packets)
def test_udp_listener_survives_hostile_packets(
    running: ThreadedServer, errors: ErrorLog, packet: bytes
) -> None:
    query = probe(other_id(packet))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(running.dns_address)
        sock.send(packet)
        # One loop answers datagrams in order: any reply to the fuzz packet comes first.
        sock.send(query.to_wire())
        replies = []
        while (data := sock.recv(65535))[:2] != query.id.to_bytes(2, "big"):
            replies.append(data)
        check_answer(data, query)
    assert len(replies) <= 1, replies
    for reply in replies:
        check_reply(reply, packet)
    if len(packet) < 12 or packet[2] & 0x80:
        assert replies == [], "a runt or a response packet must be dropped"
    else:
        assert len(replies) == 1, "a query with a readable header gets an answer (FORMERR)"
    still_serving(running.dns_address, errors)


tcp_cases = st.one_of(
    st.tuples(st.just("framed"), packets, st.just(0)),
    st.tuples(st.just("wrong-length"), packets, st.integers(0, 0xFFFF)),
    st.tuples(st.just("half-sent"), packets, st.integers(0, 599)),
    st.tuples(st.just("pipelined"), st.lists(packets, min_size=2, max_size=5), st.just(0)),
    st.tuples(st.just("raw"), st.binary(max_size=600), st.just(0)),
)


@FUZZ
@given(case=tcp_cases)
def test_tcp_listener_survives_hostile_streams(
    running: ThreadedServer, errors: ErrorLog, case: tuple[str, bytes | list[bytes], int]
) -> None:
    mode, payload, number = case
    query = probe(random.randrange(0x10000))
    follow_up = b""
    if mode == "framed":
        assert isinstance(payload, bytes)
        stream = framed(payload)
        follow_up = framed(query.to_wire())  # the same connection must go on answering
    elif mode == "wrong-length":
        assert isinstance(payload, bytes)
        size = number if number != len(payload) else number + 1
        stream = (size & 0xFFFF).to_bytes(2, "big") + payload
    elif mode == "half-sent":
        assert isinstance(payload, bytes)
        stream = framed(payload)[: min(number, len(payload) + 1)]
    elif mode == "pipelined":
        assert isinstance(payload, list)
        stream = b"".join(framed(p) for p in payload)
    else:
        assert isinstance(payload, bytes)
        stream = payload
    with socket.create_connection(running.dns_address, timeout=TIMEOUT) as sock:
        sock.sendall(stream + follow_up)
        if mode == "half-sent":
            sock.close()  # hang up in the middle of a message
            still_serving(running.dns_address, errors)
            return
        sock.shutdown(socket.SHUT_WR)
        replies = read_framed(sock)  # a stall shows as a timeout here
    sent = frames(stream)
    if follow_up and replies:  # the fuzz message was answered: so is the next query
        assert len(replies) == 2, replies
        check_answer(replies.pop(), query)
    answerable = 0  # answered in order until the first one that is dropped: then closed
    while answerable < len(sent) and len(sent[answerable]) >= 12 and not sent[answerable][2] & 0x80:
        answerable += 1
    assert len(replies) == answerable, (replies, sent)
    for reply, packet in zip(replies, sent, strict=False):
        check_reply(reply, packet)
    still_serving(running.dns_address, errors)


def test_fuzz_server_answers_between_examples(running: ThreadedServer, errors: ErrorLog) -> None:
    """The probe itself works, so a passing fuzz run means something."""
    still_serving(running.dns_address, errors)
