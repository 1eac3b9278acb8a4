"""The UDP listener reads and answers many datagrams per wake-up (recvmmsg/sendmmsg through the
`_batch` extension, or recvfrom/sendto in a pure-Python loop): in bursts of interleaved valid,
malformed and oversized packets, every packet gets exactly the answer the full path gives it
(none when the full path drops it), sent to the client that asked, whatever the mode.

Bursts are sent without yielding to the event loop, so they wait in the socket's buffer and
the listener's first wake-up finds up to a whole batch of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import dns.edns
import dns.message
import dns.rcode
import pytest
from conftest import Client, make_config
from needs import unavailable
from test_fast_path import EXISTING, MISSING, OUTSIDE, assert_same, make_resolver, parse, summary
from waiting import eventually

from discovery.cli import build_parser, config_from
from discovery.config import ConfigError, env_name
from discovery.dns import transport
from discovery.dns.resolver import Resolver
from discovery.dns.transport import BATCH, RateLimiter, UdpListener
from discovery.server import run_server

RESOLVER = make_resolver()
CLIENTS = 3
WEB = ("default", "web")
QUEUE = int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text())  # a Unix socket's datagrams
BURST = 90  # per burst, over all clients: more than one batch, less than the socket buffers


@pytest.fixture(params=transport.UDP_IO)
def io(request: pytest.FixtureRequest) -> str:
    if request.param == "mmsg" and transport.udp_io_default() != "mmsg":
        unavailable("the discovery.dns._batch extension is not built (a C compiler, python3-dev)")
    return str(request.param)


@contextlib.asynccontextmanager
async def listening(
    io: str, resolver: Resolver = RESOLVER, limiter: RateLimiter | None = None
) -> AsyncIterator[tuple[UdpListener, tuple[str, int]]]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    listener = UdpListener(sock, resolver.answer, Counter(), limiter, io)
    listener.start()
    try:
        yield listener, sock.getsockname()
    finally:
        listener.close()


def _query(name: str, qtype: str, **edns: object) -> bytes:
    return dns.message.make_query(name, qtype, **edns).to_wire()  # type: ignore[arg-type]


def packets(seed: int) -> list[bytes]:
    """Valid queries of every shape the fast and the full path serve, malformed packets, and
    datagrams far over any DNS size, shuffled."""
    rng = random.Random(seed)
    names = EXISTING + MISSING + OUTSIDE
    valid = []
    for _ in range(120):
        name = rng.choice(names)
        name = name.upper() if rng.random() < 0.2 else name
        qtype = rng.choice(["A", "AAAA", "SRV", "PTR", "SOA", "NS", "TXT", "ANY", "MX"])
        shape = rng.randrange(4)
        if shape == 0:
            valid.append(_query(name, qtype))
        elif shape == 1:
            payload = rng.choice([512, 1232, 4096, 65535])
            valid.append(_query(name, qtype, use_edns=0, payload=payload))
        elif shape == 2:  # a DNS cookie, as dig sends one
            cookie = dns.edns.GenericOption(dns.edns.COOKIE, rng.randbytes(8))
            valid.append(_query(name, qtype, use_edns=0, payload=1232, options=[cookie]))
        else:
            valid.append(_query(name, qtype, use_edns=0, payload=1232, want_dnssec=True))
    big = f"s100.sized.svc.{'cluster.local'}"  # answers over 512 and 1232 bytes: TC
    valid += [_query(big, "A"), _query(big, "SRV", use_edns=0, payload=1232)]
    malformed = [
        b"",
        b"\x00",
        rng.randbytes(11),  # shorter than a header: dropped
        rng.randbytes(12),
        b"\x12\x34\x81\x00" + bytes(8),  # a response (QR=1): dropped
        b"\x12\x34\x28\x00\x00\x01" + bytes(6) + b"\x01a\x00\x00\x01\x00\x01",  # UPDATE: NOTIMP
        b"\x12\x34\x01\x00\x00\x02" + bytes(6) + b"\x01a\x00\x00\x01\x00\x01",  # QDCOUNT 2
        _query("web.default.svc.cluster.local", "A")[:-3],  # the question cut short
        _query("web.default.svc.cluster.local", "A", use_edns=0)[:-4],  # the OPT record cut
        _query("web.default.svc.cluster.local", "A", use_edns=1),  # BADVERS
        # an EDNS option that runs past the end of the OPT record: FORMERR
        _query("web.default.svc.cluster.local", "A", use_edns=0)[:-2] + b"\x00\x04\x00\x0a\x00\x08",
    ]
    malformed += [rng.randbytes(rng.randrange(12, 300)) for _ in range(25)]
    valid_wire = _query("web.default.svc.cluster.local", "A")
    malformed += [
        valid[rng.randrange(len(valid))][: rng.randrange(12, 40)] for _ in range(10)
    ]  # truncated anywhere
    padding = struct.pack(">HH", dns.edns.PADDING, 3000) + bytes(3000)
    oversized = [
        valid_wire + rng.randbytes(2000),  # trailing garbage
        with_opt(_query("a.web.default.svc.cluster.local", "A"), padding),  # 3 kB, valid
        _query("web.default.svc.cluster.local", "SRV", use_edns=0, payload=65535)
        + bytes(60_000),
        rng.randbytes(20_000),
    ]
    everything = valid + malformed + oversized
    rng.shuffle(everything)
    return everything


def with_opt(query: bytes, options: bytes) -> bytes:
    """A query without EDNS given an OPT record (payload 1232) holding `options`."""
    opt = b"\x00" + struct.pack(">HHIH", 41, 1232, 0, len(options)) + options
    return query[:10] + b"\x00\x01" + query[12:] + opt


def with_id(packet: bytes, qid: int) -> bytes:
    """The packet with its first two bytes set to `qid` (what a reply is matched by)."""
    if len(packet) < 2:
        return packet
    return struct.pack(">H", qid) + packet[2:]


def check_answer(packet: bytes, got: bytes) -> None:
    """`got` is what the full path answers `packet` (the fast path's spelling of it: additional
    records, compared as sets)."""
    full = RESOLVER.answer_full(packet, False)
    assert isinstance(full, bytes), f"answered {packet[:40]!r}, which the full path drops"
    if RESOLVER._fast(packet, False) is not None:
        assert_same(packet, False, got)
    else:
        assert got == full or summary(parse(got)) == summary(parse(full))
    assert len(got) <= 1232


async def exchange(
    address: tuple[str, int], burst: list[bytes], clients: list[socket.socket]
) -> list[dict[int, bytes]]:
    """Send `burst` round-robin from `clients` in one go; return each client's answers by ID
    once every answer the full path gives has come (and a moment for strays)."""
    expected = [set[int]() for _ in clients]
    for i, packet in enumerate(burst):
        client = i % len(clients)
        qid = i // len(clients)
        if isinstance(RESOLVER.answer_full(packet, False), bytes):
            expected[client].add(qid)
        clients[client].sendto(packet, address)  # no await: the burst queues in the kernel
    got: list[dict[int, bytes]] = [{} for _ in clients]

    def drain() -> None:
        for n, client in enumerate(clients):
            with contextlib.suppress(BlockingIOError):
                while True:
                    data = client.recv(65535)
                    qid = struct.unpack(">H", data[:2])[0]
                    assert qid not in got[n], f"two answers to query {qid} of client {n}"
                    got[n][qid] = data

    async def complete() -> bool:
        drain()
        return all(expected[n] <= set(got[n]) for n in range(len(clients)))

    await eventually(complete, "every answer of the burst")
    # nothing more must come: a reply to a dropped packet would show up by now
    await asyncio.sleep(0.05)
    drain()
    for n in range(len(clients)):
        assert set(got[n]) == expected[n]
    return got


@pytest.fixture
def clients() -> Iterator[list[socket.socket]]:
    made = []
    for _ in range(CLIENTS):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        made.append(sock)
    yield made
    for sock in made:
        sock.close()


async def test_bursts_of_good_and_bad_packets_get_the_full_paths_answers(
    io: str, clients: list[socket.socket]
) -> None:
    everything = packets(seed=14)
    async with listening(io) as (listener, address):
        for start in range(0, len(everything), BURST):
            burst = everything[start : start + BURST]
            # the ID says which packet a reply answers: unique per client within a burst
            burst = [with_id(p, i // CLIENTS) for i, p in enumerate(burst)]
            got = await exchange(address, burst, clients)
            for i, packet in enumerate(burst):
                answer = got[i % CLIENTS].get(i // CLIENTS)
                if answer is not None:
                    check_answer(packet, answer)
        assert listener.reading and not listener.backlog
    assert BURST > BATCH  # a burst takes more than one wake-up


async def test_a_flood_over_the_rate_limit_is_cut_per_client(
    io: str, clients: list[socket.socket]
) -> None:
    limiter = RateLimiter(10)
    wire = _query("web.default.svc.cluster.local", "A")
    async with listening(io, limiter=limiter) as (listener, address):
        flooder = clients[0]
        other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # limits count per address
        other.bind(("127.0.0.2", 0))
        other.setblocking(False)
        clients.append(other)  # closed with the others
        for i in range(60):
            flooder.sendto(with_id(wire, i), address)
        other.sendto(with_id(wire, 999), address)
        answered: set[int] = set()

        async def others_answer() -> bool:
            for sock in (flooder, other):
                with contextlib.suppress(BlockingIOError):
                    while True:
                        answered.add(struct.unpack(">H", sock.recv(65535)[:2])[0])
            return 999 in answered

        await eventually(others_answer, "the other client's answer")
        await eventually(
            lambda: _true(listener.refusals["rate_limit"] + len(answered) - 1 >= 60),
            "the flood answered or refused",
        )
        flood_answers = len(answered - {999})
        assert 10 <= flood_answers <= 12  # one second's worth (and what refilled meanwhile)
        assert listener.refusals["rate_limit"] == 60 - flood_answers


async def test_ipv6_clients_are_answered_and_limited_by_their_address(io: str) -> None:
    limiter = RateLimiter(100)
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.bind(("::1", 0))
    listener = UdpListener(sock, RESOLVER.answer, Counter(), limiter, io)
    listener.start()
    client = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    client.bind(("::1", 0))
    client.setblocking(False)
    try:
        wire = _query("web.default.svc.cluster.local", "AAAA")
        client.sendto(wire, sock.getsockname()[:2])
        got: list[bytes] = []

        async def answered() -> bool:
            with contextlib.suppress(BlockingIOError):
                got.append(client.recv(65535))
            return bool(got)

        await eventually(answered, "the answer over IPv6")
        check_answer(wire, got[0])
        assert list(limiter.buckets) == ["::1"]  # the key TCP connections from ::1 use too
    finally:
        listener.close()
        client.close()


async def _true(value: bool) -> bool:
    return value


async def test_answers_wait_while_the_socket_is_full_and_none_is_lost(io: str) -> None:
    """A Unix datagram socket refuses more than its receiver's queue holds (EAGAIN), as a UDP
    socket does when its send buffer is full: answers wait in order, the listener reads
    nothing meanwhile, and once the client reads, every answer comes."""
    with tempfile.TemporaryDirectory() as directory:
        server_path, client_path = Path(directory, "s"), Path(directory, "c")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        server.bind(str(server_path))
        client = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        client.bind(str(client_path))
        client.setblocking(False)
        listener = UdpListener(server, RESOLVER.answer, Counter(), None, io)
        listener.start()
        try:
            wire = _query("web.default.svc.cluster.local", "A")
            sent = 0
            while not listener.backlog:  # more queries than the client's queue holds answers
                assert sent < 100 * QUEUE, "the listener never ran out of room"
                try:
                    client.sendto(with_id(wire, sent), str(server_path))
                    sent += 1
                except BlockingIOError:  # the listener's queue is full: its turn to read
                    await asyncio.sleep(0)
            assert not listener.reading  # the queries left wait in the kernel
            got: list[int] = []

            async def all_read() -> bool:
                with contextlib.suppress(BlockingIOError):
                    while True:
                        got.append(struct.unpack(">H", client.recv(65535)[:2])[0])
                return len(got) >= sent

            await eventually(all_read, "every answer")
            assert got == list(range(sent))  # every answer, in order
            assert listener.reading and not listener.backlog
        finally:
            listener.close()
            client.close()


async def test_a_server_answers_on_either_io(io: str) -> None:
    async with run_server(make_config(dns_udp_io=io)) as server:
        await server.registry.wait(lambda: server.registry.synced, 5)
        assert server._udp is not None and server._udp.io == io
        async with aiohttp.ClientSession() as session:
            client = Client(server, session)
            await client.register("default", "web", "a", address="10.0.0.1", ttl=60)
            assert await client.wait_cache(lambda: bool(server.registry.instances(WEB)))
            assert await client.addresses("web.default.svc.cluster.local") == {"10.0.0.1"}
            response = await client.query("nope.default.svc.cluster.local", edns=True)
            assert response.rcode() == dns.rcode.NXDOMAIN and response.edns == 0


def test_the_udp_io_flag() -> None:
    parser = build_parser()
    flag = "--dns-udp-io"
    assert config_from(parser.parse_args(["serve", flag, "loop"]), {}).dns_udp_io == "loop"
    from_env = config_from(parser.parse_args(["serve"]), {env_name(flag): "loop"})
    assert from_env.dns_udp_io == "loop"
    assert config_from(parser.parse_args(["serve"]), {}).dns_udp_io == ""
    with pytest.raises(ConfigError, match=flag):
        config_from(parser.parse_args(["serve", flag, "epoll"]), {})
