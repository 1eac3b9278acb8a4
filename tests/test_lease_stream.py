"""LeaseStream's HTTP/2 layer against a scripted peer.

Real etcd (tests/test_store_contract.py) only ever sends the frames of a happy exchange: never
padding, CONTINUATION, tiny flow-control windows, PING, GOAWAY, odd trailers or garbage. Here
a small asyncio TCP server written below reads what the client sends and writes back frames
built by hand, so each of those cases is one scripted exchange on a real socket.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import hpack
import pytest
from aetcd import rpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from discovery.store.base import StoreError, StoreUnavailable
from discovery.store.leasestream import LeaseStream, StreamUnauthenticated

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
ENABLE_PUSH, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE = 2, 4, 5
DEFAULT_WINDOW = 65535
PRIORITY_FIELDS = (0).to_bytes(4, "big") + bytes((15,))  # depends on stream 0, weight 16
RESPONSE = [(":status", "200"), ("content-type", "application/grpc")]
BOUND = 5.0  # safety net on every wait: a stalled exchange fails instead of hanging
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# Frames, built and read by hand.


@dataclass(frozen=True)
class Frame:
    kind: int
    flags: int
    stream: int
    payload: bytes


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    head = len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big")
    return head + payload


def data(payload: bytes, flags: int = 0) -> bytes:
    return frame(DATA, flags, 1, payload)


def padded(payload: bytes, pad: int) -> bytes:
    """A PADDED frame's payload: pad length, the content, then `pad` zero bytes."""
    return bytes((pad,)) + payload + bytes(pad)


def settings_frame(*pairs: tuple[int, int]) -> bytes:
    body = b"".join(ident.to_bytes(2, "big") + value.to_bytes(4, "big") for ident, value in pairs)
    return frame(SETTINGS, 0, 0, body)


def settings_of(payload: bytes) -> dict[int, int]:
    return {
        int.from_bytes(payload[at : at + 2], "big"): int.from_bytes(payload[at + 2 : at + 6], "big")
        for at in range(0, len(payload), 6)
    }


def window_update(stream: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream, increment.to_bytes(4, "big"))


def grpc(message: bytes, compressed: int = 0) -> bytes:
    return bytes((compressed,)) + len(message).to_bytes(4, "big") + message


def answer(lease: int, ttl: int) -> bytes:
    """One LeaseKeepAliveResponse as a gRPC message."""
    return grpc(rpc.LeaseKeepAliveResponse(ID=lease, TTL=ttl).SerializeToString())


def leases_in(stream_data: bytes) -> list[int]:
    """The lease IDs of the LeaseKeepAliveRequests in a stream's DATA, whole messages only."""
    leases, at = [], 0
    while at < len(stream_data):
        assert stream_data[at] == 0, "a compressed request"
        size = int.from_bytes(stream_data[at + 1 : at + 5], "big")
        message = stream_data[at + 5 : at + 5 + size]
        assert len(message) == size, "a request cut short"
        leases.append(rpc.LeaseKeepAliveRequest.FromString(message).ID)
        at += 5 + size
    return leases


def leases_in_prefix(stream_data: bytes) -> list[int]:
    """leases_in, for the whole messages at the start of DATA that may end mid-message."""
    at = 0
    while len(stream_data) - at >= 5:
        size = int.from_bytes(stream_data[at + 1 : at + 5], "big")
        if len(stream_data) - at - 5 < size:
            break
        at += 5 + size
    return leases_in(stream_data[:at])


class Connection:
    """The peer's end of one client connection: reads frames, writes what the test scripts."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.encoder = hpack.Encoder()  # one per connection: HPACK state is per connection
        self.decoder = hpack.Decoder()
        self.opening: list[Frame] = []
        self._pings = 0

    async def _read(self, size: int) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(size), BOUND)

    async def next_frame(self) -> Frame:
        head = await self._read(9)
        stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
        return Frame(head[3], head[4], stream, await self._read(int.from_bytes(head[:3], "big")))

    async def handshake(self) -> list[Frame]:
        """The preface, then every frame up to and including the request's HEADERS."""
        assert await self._read(len(PREFACE)) == PREFACE
        while not self.opening or self.opening[-1].kind != HEADERS:
            self.opening.append(await self.next_frame())
        return self.opening

    async def requests(self, count: int) -> list[int]:
        """The lease IDs of the next `count` requests on stream 1."""
        stream_data = b""
        while len(leases_in_prefix(stream_data)) < count:
            got = await self.next_frame()
            if got.kind == DATA:
                assert (got.stream, got.flags) == (1, 0), got
                stream_data += got.payload
        return leases_in(stream_data)

    def block(self, pairs: list[tuple[str, str]]) -> bytes:
        return bytes(self.encoder.encode(pairs))

    def headers(self, pairs: list[tuple[str, str]], flags: int = END_HEADERS) -> bytes:
        return frame(HEADERS, flags, 1, self.block(pairs))

    def trailers(self, pairs: list[tuple[str, str]]) -> bytes:
        return self.headers(pairs, END_HEADERS | END_STREAM)

    def send(self, *frames: bytes) -> None:
        self.writer.write(b"".join(frames))

    async def barrier(self) -> list[Frame]:
        """Every frame the client sends before it answers a PING sent now.

        The client reads frames in order, so when the answer comes it has dealt with
        everything written before the PING.
        """
        self._pings += 1
        token = b"barrier" + bytes((self._pings,))
        self.send(frame(PING, 0, 0, token))
        seen = []
        while (got := await self.next_frame()) != Frame(PING, ACK, 0, token):
            seen.append(got)
        return seen

    async def closed_by_client(self) -> None:
        """Returns once the client has closed the connection (EOF or reset)."""
        with contextlib.suppress(ConnectionError):
            while await asyncio.wait_for(self.reader.read(65536), BOUND):
                pass

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


class Peer:
    """A scripted HTTP/2 server on a free loopback port, and the clients the test opens."""

    def __init__(self) -> None:
        self.port = 0
        self.loop_errors: list[dict[str, Any]] = []
        self.failures = 0
        self.streams: list[LeaseStream] = []
        self.connections: list[Connection] = []
        self._accepted: asyncio.Queue[Connection] = asyncio.Queue()

    def connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = Connection(reader, writer)
        self.connections.append(connection)
        self._accepted.put_nowait(connection)

    def client(self, *, token: str | None = None, timeout: float = 30.0) -> LeaseStream:
        stream = LeaseStream(
            object(),
            "127.0.0.1",
            self.port,
            ssl_context=None,
            token=token,
            timeout=timeout,
            on_failure=self._failed,
        )
        self.streams.append(stream)
        return stream

    def _failed(self) -> None:
        self.failures += 1

    async def accept(self) -> Connection:
        return await asyncio.wait_for(self._accepted.get(), BOUND)

    async def open(
        self, *, respond: bool = True, timeout: float = 30.0
    ) -> tuple[LeaseStream, Connection]:
        """A client whose request HEADERS the peer has read (and answered: :status 200)."""
        stream = self.client(timeout=timeout)
        connection = await self.accept()
        await connection.handshake()
        if respond:
            connection.send(connection.headers(RESPONSE))
        return stream, connection


@contextlib.asynccontextmanager
async def scripted_peer() -> AsyncIterator[Peer]:
    """A Peer listening; on the way out no exception may have reached the event loop.

    The handler stays for the rest of the loop's life: closing the streams below fails calls
    that nobody awaits any more, and their unretrieved errors are no finding.
    """
    loop = asyncio.get_running_loop()
    peer = Peer()
    loop.set_exception_handler(lambda _loop, context: peer.loop_errors.append(context))
    server = await asyncio.start_server(peer.connected, "127.0.0.1", 0)
    peer.port = server.sockets[0].getsockname()[1]
    try:
        yield peer
        assert peer.loop_errors == [], "an exception escaped into the event loop"
    finally:
        for stream in peer.streams:
            stream.close(StoreUnavailable("test over"))
        for connection in peer.connections:
            await connection.close()
        server.close()
        await server.wait_closed()


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    async with scripted_peer() as running:
        yield running


async def settled(future: asyncio.Future[int]) -> int:
    return await asyncio.wait_for(future, BOUND)


# The request.


@pytest.mark.parametrize("token", [None, "tok"])
async def test_request_headers_and_messages(peer: Peer, token: str | None) -> None:
    stream = peer.client(token=token)
    first = stream.send(7)  # before the connection is up: leaves right after the HEADERS
    connection = await peer.accept()
    opening = await connection.handshake()

    assert opening[0].kind == SETTINGS and (opening[0].flags, opening[0].stream) == (0, 0)
    assert settings_of(opening[0].payload)[ENABLE_PUSH] == 0
    request = opening[-1]
    assert (request.stream, request.flags) == (1, END_HEADERS)  # not END_STREAM: it streams
    headers = dict(connection.decoder.decode(request.payload, raw=True))
    assert (
        headers.items()
        >= {
            b":method": b"POST",
            b":scheme": b"http",
            b":path": b"/etcdserverpb.Lease/LeaseKeepAlive",
            b":authority": f"127.0.0.1:{peer.port}".encode(),
            b"content-type": b"application/grpc",
            b"te": b"trailers",
        }.items()
    )
    assert headers.get(b"token") == (token.encode() if token else None)
    assert await connection.requests(1) == [7]

    later = [stream.send(lease) for lease in (8, 9, 2**63 - 1)]  # one loop turn
    sent = [got for got in await connection.barrier() if got.kind == DATA]
    assert len(sent) == 1, "the requests of one loop turn leave in one DATA frame"
    assert (sent[0].stream, sent[0].flags) == (1, 0)
    assert leases_in(sent[0].payload) == [8, 9, 2**63 - 1]

    connection.send(connection.headers(RESPONSE), data(answer(7, 70) + answer(2**63 - 1, 5)))
    assert await settled(first) == 70
    assert await settled(later[2]) == 5
    assert not later[0].done() and not later[1].done()


# Answers.


async def test_answers_settle_their_own_futures(peer: Peer) -> None:
    stream, connection = await peer.open()
    one, two = stream.send(1), stream.send(2)
    assert await connection.requests(2) == [1, 2]
    connection.send(data(answer(2, 20)), data(answer(1, 10)))
    assert await settled(two) == 20
    assert await settled(one) == 10


DELIVERIES: dict[str, Callable[[bytes], list[bytes]]] = {
    "both in one DATA frame": lambda both: [data(both)],
    "one DATA frame per byte": lambda both: [data(both[i : i + 1]) for i in range(len(both))],
    "padded": lambda both: [data(padded(both, 7), PADDED)],
    "padded, padding length 0": lambda both: [data(padded(both, 0), PADDED)],
    "padded, 255 bytes of padding": lambda both: [data(padded(both, 255), PADDED)],
    "padded then plain, split mid-message": lambda both: [
        data(padded(both[:3], 9), PADDED),
        data(both[3:]),
    ],
    "empty DATA frames around": lambda both: [data(b""), data(both), data(b"")],
}


@pytest.mark.parametrize("delivery", DELIVERIES.values(), ids=DELIVERIES.keys())
async def test_answers_in_any_data_framing(
    peer: Peer, delivery: Callable[[bytes], list[bytes]]
) -> None:
    stream, connection = await peer.open()
    one, two = stream.send(1), stream.send(2)
    connection.send(*delivery(answer(1, 10) + answer(2, 20)))
    assert await settled(one) == 10
    assert await settled(two) == 20


async def test_a_message_split_across_data_frames_waits_for_its_end(peer: Peer) -> None:
    stream, connection = await peer.open()
    future = stream.send(1)
    message = answer(1, 10)
    connection.send(data(message[:4]))  # not even the whole length prefix
    await connection.barrier()
    assert not future.done()
    connection.send(data(message[4:-1]))
    await connection.barrier()
    assert not future.done()
    connection.send(data(message[-1:]))
    assert await settled(future) == 10


HEADER_SHAPES: dict[str, Callable[[bytes, int], list[bytes]]] = {
    "plain": lambda block, end: [frame(HEADERS, END_HEADERS | end, 1, block)],
    "PRIORITY": lambda block, end: [
        frame(HEADERS, END_HEADERS | PRIORITY_FLAG | end, 1, PRIORITY_FIELDS + block)
    ],
    "PADDED": lambda block, end: [frame(HEADERS, END_HEADERS | PADDED | end, 1, padded(block, 9))],
    "PADDED and PRIORITY": lambda block, end: [
        frame(
            HEADERS,
            END_HEADERS | PADDED | PRIORITY_FLAG | end,
            1,
            bytes((6,)) + PRIORITY_FIELDS + block + bytes(6),
        )
    ],
    "HEADERS + CONTINUATION": lambda block, end: [
        frame(HEADERS, end, 1, block[:1]),
        frame(CONTINUATION, END_HEADERS, 1, block[1:]),
    ],
    "one CONTINUATION per byte": lambda block, end: [
        frame(HEADERS, end, 1, block[:1]),
        *(frame(CONTINUATION, 0, 1, block[i : i + 1]) for i in range(1, len(block))),
        frame(CONTINUATION, END_HEADERS, 1, b""),
    ],
    "PADDED and PRIORITY + CONTINUATION": lambda block, end: [
        frame(HEADERS, PADDED | PRIORITY_FLAG | end, 1, bytes((3,)) + PRIORITY_FIELDS + bytes(3)),
        frame(CONTINUATION, END_HEADERS, 1, block),
    ],
    "an empty HEADERS fragment + CONTINUATION": lambda block, end: [
        frame(HEADERS, end, 1, b""),
        frame(CONTINUATION, END_HEADERS, 1, block),
    ],
}


@pytest.mark.parametrize("shape", HEADER_SHAPES.values(), ids=HEADER_SHAPES.keys())
@pytest.mark.parametrize("status", ["200", "503"])
async def test_response_headers_in_any_shape(
    peer: Peer, shape: Callable[[bytes, int], list[bytes]], status: str
) -> None:
    """The block is read whole: 200 lets the answer through, 503 fails the stream."""
    stream, connection = await peer.open(respond=False)
    future = stream.send(1)
    block = connection.block([(":status", status), ("content-type", "application/grpc")])
    connection.send(*shape(block, 0), data(answer(1, 10)))
    if status == "200":
        assert await settled(future) == 10
    else:
        with pytest.raises(StoreUnavailable, match="HTTP status 503"):
            await settled(future)


@pytest.mark.parametrize("shape", HEADER_SHAPES.values(), ids=HEADER_SHAPES.keys())
async def test_trailers_in_any_shape(
    peer: Peer, shape: Callable[[bytes, int], list[bytes]]
) -> None:
    stream, connection = await peer.open()
    future = stream.send(1)
    block = connection.block([("grpc-status", "16"), ("grpc-message", "invalid auth token")])
    connection.send(*shape(block, END_STREAM))
    with pytest.raises(StreamUnauthenticated, match="invalid auth token"):
        await settled(future)


@pytest.mark.parametrize("ttl", [0, -1])
async def test_a_lease_etcd_does_not_know_gets_its_ttl(peer: Peer, ttl: int) -> None:
    stream, connection = await peer.open()
    future = stream.send(5)
    connection.send(data(answer(5, ttl)))
    assert await settled(future) == ttl


async def test_answers_for_one_lease_settle_its_futures_in_order(peer: Peer) -> None:
    stream, connection = await peer.open()
    futures = [stream.send(5) for _ in range(3)]
    other = stream.send(6)
    connection.send(data(answer(5, 10) + answer(6, 60) + answer(5, 20)), data(answer(5, 30)))
    assert [await settled(future) for future in futures] == [10, 20, 30]
    assert await settled(other) == 60


async def test_a_cancelled_future_still_takes_its_answer(peer: Peer) -> None:
    stream, connection = await peer.open()
    cancelled = stream.send(5)
    cancelled.cancel()
    waiting = stream.send(5)
    assert await connection.requests(2) == [5, 5]
    connection.send(data(answer(5, 1) + answer(99, 1)))  # 99: nobody waits for it
    await connection.barrier()
    assert not waiting.done(), "the cancelled call's answer went to the next caller"
    connection.send(data(answer(5, 2)))
    assert await settled(waiting) == 2
    assert not stream.broken


@pytest.mark.parametrize("ending", ["trailers", "GOAWAY", "RST_STREAM"])
async def test_answers_before_the_end_still_count(peer: Peer, ending: str) -> None:
    """Answers read together with the frame that ends the stream are delivered first."""
    stream, connection = await peer.open()
    answered, unanswered = stream.send(1), stream.send(2)
    end = {
        "trailers": connection.trailers([("grpc-status", "14")]),
        "GOAWAY": frame(GOAWAY, 0, 0, (1).to_bytes(4, "big") + bytes(4)),
        "RST_STREAM": frame(RST_STREAM, 0, 1, (2).to_bytes(4, "big")),
    }[ending]
    connection.send(data(answer(1, 10)) + end)
    assert await settled(answered) == 10
    with pytest.raises(StoreUnavailable):
        await settled(unanswered)


# Control frames.


async def test_settings_are_acknowledged_once(peer: Peer) -> None:
    stream, connection = await peer.open()
    connection.send(frame(SETTINGS, ACK, 0), settings_frame((MAX_FRAME_SIZE, 1 << 20)))
    seen = await connection.barrier()
    assert [got for got in seen if got.kind == SETTINGS] == [Frame(SETTINGS, ACK, 0, b"")]
    assert not stream.broken


async def test_ping_is_answered_with_its_payload(peer: Peer) -> None:
    stream, connection = await peer.open()
    connection.send(frame(PING, 0, 0, b"\x00\xffpeer\x01\x02"), frame(PING, ACK, 0, b"ack-only"))
    seen = await connection.barrier()
    assert [got for got in seen if got.kind == PING] == [
        Frame(PING, ACK, 0, b"\x00\xffpeer\x01\x02")
    ]
    assert not stream.broken


def data_bytes(frames: list[Frame]) -> bytes:
    return b"".join(got.payload for got in frames if got.kind == DATA and got.stream == 1)


async def test_requests_wait_for_the_stream_window(peer: Peer) -> None:
    stream, connection = await peer.open()
    connection.send(settings_frame((INITIAL_WINDOW_SIZE, 20)))
    assert Frame(SETTINGS, ACK, 0, b"") in await connection.barrier()
    futures = [stream.send(lease) for lease in range(1, 7)]  # 7 bytes each
    sent = data_bytes(await connection.barrier())
    assert len(sent) == 20

    connection.send(window_update(0, 1000))  # the connection window is not what is short
    assert data_bytes(await connection.barrier()) == b""
    connection.send(window_update(1, 10))
    sent += data_bytes(await connection.barrier())
    assert len(sent) == 30
    connection.send(window_update(1, 1000))
    sent += data_bytes(await connection.barrier())
    assert leases_in(sent) == [1, 2, 3, 4, 5, 6]

    connection.send(data(b"".join(answer(lease, lease * 10) for lease in range(1, 7))))
    assert [await settled(future) for future in futures] == [10, 20, 30, 40, 50, 60]


async def test_requests_wait_for_the_connection_window(peer: Peer) -> None:
    stream, connection = await peer.open()
    connection.send(settings_frame((INITIAL_WINDOW_SIZE, 1 << 20)))
    assert Frame(SETTINGS, ACK, 0, b"") in await connection.barrier()
    leases = [2**62 + n for n in range(4400)]  # 15 bytes each: more than 65,535 in all
    futures = [stream.send(lease) for lease in leases]
    first = [got for got in await connection.barrier() if got.kind == DATA]
    assert sum(len(got.payload) for got in first) == DEFAULT_WINDOW
    assert max(len(got.payload) for got in first) <= 16384  # the default SETTINGS_MAX_FRAME_SIZE

    connection.send(window_update(1, 100_000))  # the stream window is not what is short
    assert data_bytes(await connection.barrier()) == b""
    connection.send(window_update(0, 100_000))
    rest = data_bytes(await connection.barrier())
    assert leases_in(data_bytes(first) + rest) == leases
    for future in futures:
        future.cancel()


async def test_the_client_reopens_its_receive_window(peer: Peer) -> None:
    stream, connection = await peer.open()
    announced = settings_of(connection.opening[0].payload)[INITIAL_WINDOW_SIZE]
    connection_window = DEFAULT_WINDOW + sum(
        int.from_bytes(got.payload, "big")
        for got in connection.opening
        if got.kind == WINDOW_UPDATE and got.stream == 0
    )
    filler = grpc(b"") * 3276  # empty answers: lease 0, which nobody waits for
    sent = 40 * len(filler)
    assert sent <= min(announced, connection_window), "the peer must stay within the windows"
    connection.send(*[data(filler)] * 40)
    updates = [got for got in await connection.barrier() if got.kind == WINDOW_UPDATE]
    granted = {0: connection_window - sent, 1: announced - sent}
    for update in updates:
        granted[update.stream] += int.from_bytes(update.payload, "big")
    assert granted[0] >= 1 << 19 and granted[1] >= 1 << 19, (granted, updates)
    future = stream.send(3)
    connection.send(data(answer(3, 30)))
    assert await settled(future) == 30


# Endings: every way the stream can end fails the pending calls and breaks the stream.


def close_socket(connection: Connection) -> None:
    connection.writer.close()


ENDINGS: dict[str, tuple[Callable[[Connection], None], type[StoreError], str]] = {
    "grpc-status 16": (
        lambda c: c.send(c.trailers([("grpc-status", "16")])),
        StreamUnauthenticated,
        "grpc-status 16",
    ),
    "grpc-status 14": (
        lambda c: c.send(c.trailers([("grpc-status", "14"), ("grpc-message", "leader lost")])),
        StoreUnavailable,
        "leader lost",
    ),
    "grpc-status 0": (
        lambda c: c.send(c.trailers([("grpc-status", "0")])),
        StoreUnavailable,
        "stream ended",
    ),
    "grpc-status 3, percent-encoded message": (
        lambda c: c.send(
            c.trailers([("grpc-status", "3"), ("grpc-message", quote("bad lease: 100% ✓"))])
        ),
        StoreError,
        "bad lease: 100% ✓",
    ),
    "trailers without grpc-status": (
        lambda c: c.send(c.trailers([("content-type", "application/grpc")])),
        StoreUnavailable,
        "grpc-status 2",
    ),
    "grpc-status of 5000 digits": (
        lambda c: c.send(c.trailers([("grpc-status", "1" * 5000)])),
        StoreUnavailable,
        "grpc-status 2",
    ),
    "DATA with END_STREAM": (
        lambda c: c.send(data(b"", END_STREAM)),
        StoreUnavailable,
        "without trailers",
    ),
    "GOAWAY": (
        lambda c: c.send(frame(GOAWAY, 0, 0, (1).to_bytes(4, "big") + bytes(4) + b"shutdown")),
        StoreUnavailable,
        "GOAWAY",
    ),
    "RST_STREAM": (
        lambda c: c.send(frame(RST_STREAM, 0, 1, (8).to_bytes(4, "big"))),
        StoreUnavailable,
        "HTTP/2 error 8",
    ),
    "PUSH_PROMISE": (
        lambda c: c.send(frame(PUSH_PROMISE, END_HEADERS, 1, (2).to_bytes(4, "big"))),
        StoreUnavailable,
        "PUSH_PROMISE",
    ),
    "HEADERS on another stream": (
        lambda c: c.send(frame(HEADERS, END_HEADERS, 3, c.block(RESPONSE))),
        StoreUnavailable,
        "unknown stream",
    ),
    "a header block interrupted": (
        lambda c: c.send(frame(HEADERS, 0, 1, b"\x88"), data(answer(1, 10))),
        StoreUnavailable,
        "interrupted",
    ),
    "CONTINUATION out of the blue": (
        lambda c: c.send(frame(CONTINUATION, END_HEADERS, 1, b"\x88")),
        StoreUnavailable,
        "unexpected CONTINUATION",
    ),
    "an HPACK index past the tables": (
        lambda c: c.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, b"\xff\x7f")),
        StoreUnavailable,
        "bad header block",
    ),
    "padding longer than the frame": (
        lambda c: c.send(data(b"\x05abc", PADDED)),
        StoreUnavailable,
        "bad padding",
    ),
    "a frame longer than 16384 bytes on its way": (
        lambda c: c.send(frame(DATA, 0, 1, bytes(16385))[:100]),
        StoreUnavailable,
        "frame larger",
    ),
    "a compressed message": (
        lambda c: c.send(data(grpc(b"\x08\x01", compressed=1))),
        StoreUnavailable,
        "compressed",
    ),
    "a message over 1 MiB": (
        lambda c: c.send(data(b"\x00" + (2 << 20).to_bytes(4, "big"))),
        StoreUnavailable,
        "too large",
    ),
    "a message that is no LeaseKeepAliveResponse": (
        lambda c: c.send(data(grpc(b"\xff\xff\xff"))),
        StoreUnavailable,
        "undecodable",
    ),
    "the peer closes the socket": (close_socket, StoreUnavailable, "connection closed"),
}


@pytest.mark.parametrize(("script", "failure", "text"), ENDINGS.values(), ids=ENDINGS.keys())
async def test_endings_fail_pending_calls_and_break_the_stream(
    peer: Peer, script: Callable[[Connection], None], failure: type[StoreError], text: str
) -> None:
    stream, connection = await peer.open()
    futures = [stream.send(1), stream.send(2)]
    assert await connection.requests(2) == [1, 2]
    script(connection)
    for future in futures:
        with pytest.raises(StoreError) as raised:
            await settled(future)
        assert type(raised.value) is failure, raised.value
        assert text in str(raised.value)
    assert stream.broken
    # the store is told to drop the member for every ending but a clean one and a refusal
    dropped = failure is StoreUnavailable and text != "stream ended"
    assert peer.failures == (1 if dropped else 0)
    with pytest.raises(StoreUnavailable, match="closed"):
        stream.send(3)
    await connection.closed_by_client()


TRAILERS_ONLY: dict[str, tuple[list[tuple[str, str]], type[StoreError]]] = {
    "grpc-status 16": ([*RESPONSE, ("grpc-status", "16")], StreamUnauthenticated),
    "grpc-status 14": ([*RESPONSE, ("grpc-status", "14")], StoreUnavailable),
    "grpc-status 7": ([*RESPONSE, ("grpc-status", "7")], StoreError),
    ":status 503": ([(":status", "503"), ("grpc-status", "16")], StoreUnavailable),
}


@pytest.mark.parametrize(("pairs", "failure"), TRAILERS_ONLY.values(), ids=TRAILERS_ONLY.keys())
async def test_a_trailers_only_answer(
    peer: Peer, pairs: list[tuple[str, str]], failure: type[StoreError]
) -> None:
    stream, connection = await peer.open(respond=False)
    future = stream.send(1)
    connection.send(connection.trailers(pairs))
    with pytest.raises(StoreError) as raised:
        await settled(future)
    assert type(raised.value) is failure, raised.value
    assert stream.broken


async def test_frames_the_stream_ignores(peer: Peer) -> None:
    """PRIORITY, unknown types, DATA and RST_STREAM on other streams: the stream goes on."""
    stream, connection = await peer.open()
    future = stream.send(1)
    connection.send(
        frame(PRIORITY, 0, 1, PRIORITY_FIELDS),
        frame(0xFA, 0xFF, 1, b"an extension frame"),
        frame(DATA, 0, 3, answer(1, 99)),
        frame(RST_STREAM, 0, 3, (8).to_bytes(4, "big")),
        frame(SETTINGS, 0, 0, (0x99).to_bytes(2, "big") + (7).to_bytes(4, "big")),
    )
    await connection.barrier()
    assert not future.done() and not stream.broken
    connection.send(data(answer(1, 10)))
    assert await settled(future) == 10


# Timeout.


async def test_a_silent_peer_times_out(peer: Peer) -> None:
    stream, connection = await peer.open(timeout=0.2)
    loop = asyncio.get_running_loop()
    sent_at = loop.time()
    future = stream.send(1)
    assert await connection.requests(1) == [1]
    with pytest.raises(StoreUnavailable, match=r"no answer within 0\.2 s"):
        await settled(future)
    waited = loop.time() - sent_at
    assert 0.69 <= waited < 0.7 + 2.0, waited  # timeout + 0.5 s, with room for a slow machine
    assert peer.failures == 1
    assert stream.broken
    await connection.closed_by_client()


# Fuzz: whatever the peer sends after a valid start, no exception leaves the protocol.


def check_futures(stream: LeaseStream, futures: list[asyncio.Future[int]]) -> None:
    for future in futures:
        if future.done():
            error = future.exception()
            assert error is None or isinstance(error, StoreError), repr(error)
    if stream.broken:
        with pytest.raises(StoreUnavailable):
            stream.send(9)


async def start_exchange(peer: Peer) -> tuple[LeaseStream, Connection, list[asyncio.Future[int]]]:
    stream, connection = await peer.open()
    answered = stream.send(1)
    futures = [stream.send(lease) for lease in (2, 3)]
    connection.send(data(answer(1, 10)))
    assert await settled(answered) == 10
    return stream, connection, futures


async def hostile_bytes(garbage: bytes) -> None:
    async with scripted_peer() as peer:
        stream, connection, futures = await start_exchange(peer)
        connection.send(garbage)
        connection.writer.write_eof()  # everything before EOF reaches data_received first
        await asyncio.wait_for(asyncio.wait(futures), BOUND)
        check_futures(stream, futures)


@FUZZ
@given(garbage=st.binary(max_size=400))
def test_arbitrary_bytes_never_raise_out_of_the_protocol(garbage: bytes) -> None:
    asyncio.run(hostile_bytes(garbage))


header_values = st.one_of(
    st.sampled_from(["200", "503", "0", "3", "14", "16", "application/grpc", "%E2%9C%93", "%"]),
    st.text(max_size=30),
    st.integers(4301, 5000).map(lambda digits: "1" * digits),  # int() refuses past 4300
)
header_names = st.sampled_from([":status", "grpc-status", "grpc-message", "content-type", "x"])
payloads = st.one_of(
    st.binary(max_size=64),
    st.binary(max_size=24).map(grpc),  # a gRPC message whose bytes may not decode
    st.tuples(st.integers(-(2**63), 2**63 - 1), st.integers(-(2**63), 2**63 - 1)).map(
        lambda pair: answer(*pair)
    ),
    st.lists(st.tuples(header_names, header_values), max_size=4).map(
        lambda pairs: bytes(hpack.Encoder().encode(pairs))
    ),
    st.lists(st.tuples(st.integers(0, 8), st.integers(0, 2**32 - 1)), max_size=3).map(
        lambda pairs: b"".join(i.to_bytes(2, "big") + v.to_bytes(4, "big") for i, v in pairs)
    ),
    st.integers(0, 2**32 - 1).map(lambda n: n.to_bytes(4, "big")),
)
hostile_frame = st.builds(
    frame,
    st.integers(0, 10),
    st.sampled_from([0, ACK, END_HEADERS, END_HEADERS | END_STREAM, PADDED]),
    st.one_of(st.sampled_from([0, 1, 3]), st.integers(0, 2**32 - 1)),
    payloads,
) | st.builds(frame, st.integers(0, 10), st.integers(0, 255), st.sampled_from([0, 1]), payloads)
stream_data = st.binary(max_size=24).map(lambda message: data(grpc(message)))
odd_trailers = st.lists(st.tuples(header_names, header_values), max_size=4).map(
    lambda pairs: frame(HEADERS, END_HEADERS | END_STREAM, 1, bytes(hpack.Encoder().encode(pairs)))
)


async def hostile_frames(frames: list[bytes]) -> None:
    async with scripted_peer() as peer:
        stream, connection, futures = await start_exchange(peer)
        connection.send(*frames)
        try:
            await connection.barrier()  # answered: the client has read every frame
        except (asyncio.IncompleteReadError, ConnectionError):
            assert stream.broken, "the client hung up but its stream is not broken"
        check_futures(stream, futures)


@FUZZ
@given(frames=st.lists(hostile_frame | stream_data | odd_trailers, min_size=1, max_size=8))
def test_arbitrary_frames_never_raise_out_of_the_protocol(frames: list[bytes]) -> None:
    asyncio.run(hostile_frames(frames))
