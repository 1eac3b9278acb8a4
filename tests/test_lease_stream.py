"""LeaseStream's HTTP/2 layer against a scripted peer.

Real etcd (tests/test_store_contract.py) only ever sends the frames of a happy exchange: never
padding, CONTINUATION, tiny flow-control windows, PING, GOAWAY, odd trailers or garbage. Here
a small asyncio TCP server speaks HTTP/2 through h2 on the server side (client_side=False): it
reads what the client sends as h2 events and answers through h2's API, so h2 checks the client's
side of the protocol (preface, SETTINGS, request headers, flow control) as it goes. What h2
never sends (PRIORITY, CONTINUATION, PUSH_PROMISE, padded or prioritised HEADERS, unknown
frame types, unsolicited acknowledgements) is serialized with hyperframe and written raw;
malformed frames and fuzz input are bytes put together below.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote

import hpack
import pytest
from aetcd import rpc
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    DataReceived,
    Event,
    PingAckReceived,
    PingReceived,
    RemoteSettingsChanged,
    RequestReceived,
    SettingsAcknowledged,
    WindowUpdated,
)
from h2.settings import SettingCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from discovery.store.base import StoreError, StoreUnavailable
from discovery.store.leasestream import LeaseStream, StreamUnauthenticated

DATA, HEADERS = 0, 1
END_STREAM = ACK = 0x1
END_HEADERS, PADDED = 0x4, 0x8
RESPONSE = [(":status", "200"), ("content-type", "application/grpc")]
BOUND = 5.0  # safety net on every wait: a stalled exchange fails instead of hanging
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# Frames h2 would not send, and gRPC messages.


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """Any frame, malformed ones included: a 9-byte head and the payload as given."""
    head = len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big")
    return head + payload


def headers_frame(
    block: bytes,
    flags: set[str],
    *,
    stream: int = 1,
    pad: int | None = None,
    priority: bool = False,
) -> bytes:
    """A HEADERS frame, optionally PADDED and with PRIORITY fields (weight 16 on stream 0)."""
    flags = set(flags)
    if pad is not None:
        flags.add("PADDED")
    if priority:
        flags.add("PRIORITY")
    return bytes(
        HeadersFrame(stream, block, flags=flags, pad_length=pad or 0, stream_weight=15).serialize()
    )


def continuation(fragment: bytes, flags: set[str]) -> bytes:
    return bytes(ContinuationFrame(1, fragment, flags=flags).serialize())


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


def data_bytes(events: list[Event]) -> bytes:
    """The client's DATA on stream 1 among events."""
    sent = [event for event in events if isinstance(event, DataReceived)]
    assert all(event.stream_id == 1 for event in sent), sent
    return b"".join(event.data or b"" for event in sent)


class Connection:
    """The peer's end of one client connection: h2 as the server, plus raw frames on demand.

    The peer never acknowledges the client's DATA by itself: its receive windows open only
    when a test opens them, so a client that sent beyond them fails in h2 here.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.h2.initiate_connection()
        self.flush()
        self.events: deque[Event] = deque()
        self.opening: list[Event] = []
        self._pings = 0

    def flush(self) -> None:
        """Write what h2 has to send."""
        out = self.h2.data_to_send()
        if out:
            self.writer.write(out)

    def inject(self, *frames: bytes) -> None:
        """Write frames h2 would not send, after everything h2 has queued."""
        self.flush()
        self.writer.write(b"".join(frames))

    def respond(self, pairs: list[tuple[str, str]] = RESPONSE) -> None:
        self.h2.send_headers(1, pairs)
        self.flush()

    def data(self, payload: bytes, pad: int | None = None) -> None:
        self.h2.send_data(1, payload, pad_length=pad)
        self.flush()

    def trailers(self, pairs: list[tuple[str, str]]) -> None:
        self.h2.send_headers(1, pairs, end_stream=True)
        self.flush()

    def block(self, pairs: list[tuple[str, str]]) -> bytes:
        """A header block from h2's own encoder: HPACK state stays one per connection."""
        return bytes(self.h2.encoder.encode(pairs))

    async def next_event(self) -> Event:
        while not self.events:
            received = await asyncio.wait_for(self.reader.read(65536), BOUND)
            if not received:
                raise ConnectionResetError("the client closed the connection")
            self.events.extend(self.h2.receive_data(received))
            self.flush()  # h2's own answers: SETTINGS acknowledgements
        return self.events.popleft()

    async def handshake(self) -> list[Event]:
        """The events of the client's opening: up to its request and its SETTINGS ACK."""
        held: list[Event] = []
        while not (
            any(isinstance(event, RequestReceived) for event in self.opening)
            and any(isinstance(event, SettingsAcknowledged) for event in self.opening)
        ):
            event = await self.next_event()
            (held if isinstance(event, DataReceived) else self.opening).append(event)
        self.events.extendleft(reversed(held))
        return self.opening

    async def requests(self, count: int) -> list[int]:
        """The lease IDs of the next `count` requests on stream 1."""
        stream_data = b""
        while len(leases_in_prefix(stream_data)) < count:
            event = await self.next_event()
            if isinstance(event, DataReceived):
                assert event.stream_id == 1 and event.stream_ended is None, event
                stream_data += event.data or b""
        return leases_in(stream_data)

    async def barrier(self) -> list[Event]:
        """Every event from the client before it answers the second of two PINGs.

        The client reads frames in order, and h2 answers a PING as it reads it; what else
        that read calls for (DATA a WINDOW_UPDATE lets through) leaves in the next loop turn,
        with the PING ACK in front. So the second PING, sent when the first is answered, is
        answered after everything caused by the frames written before the first.
        """
        seen = []
        for _ in range(2):
            self._pings += 1
            token = b"barrier" + bytes((self._pings,))
            self.h2.ping(token)
            self.flush()
            while True:
                event = await self.next_event()
                if isinstance(event, PingAckReceived) and event.ping_data == token:
                    break
                seen.append(event)
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
        """A client whose request the peer has read (and answered: :status 200)."""
        stream = self.client(timeout=timeout)
        connection = await self.accept()
        await connection.handshake()
        if respond:
            connection.respond()
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

    assert isinstance(opening[0], RemoteSettingsChanged)
    announced = {code: change.new_value for code, change in opening[0].changed_settings.items()}
    assert announced[SettingCodes.ENABLE_PUSH] == 0
    assert announced[SettingCodes.INITIAL_WINDOW_SIZE] >= 1 << 20
    (request,) = [event for event in opening if isinstance(event, RequestReceived)]
    assert request.stream_id == 1 and request.stream_ended is None  # it streams
    received = list(request.headers or ())
    headers = dict(received)
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
    if token:  # never indexed: the token stays out of the server's HPACK table
        (pair,) = [pair for pair in received if pair[0] == b"token"]
        assert isinstance(pair, hpack.NeverIndexedHeaderTuple), pair
    # the connection's receive window opened along with the stream's
    assert connection.h2.outbound_flow_control_window >= 1 << 20
    assert await connection.requests(1) == [7]

    later = [stream.send(lease) for lease in (8, 9, 2**63 - 1)]  # one loop turn
    sent = [event for event in await connection.barrier() if isinstance(event, DataReceived)]
    assert len(sent) == 1, "the requests of one loop turn leave in one DATA frame"
    assert sent[0].stream_id == 1 and sent[0].stream_ended is None
    assert leases_in(sent[0].data or b"") == [8, 9, 2**63 - 1]

    connection.respond()
    connection.data(answer(7, 70) + answer(2**63 - 1, 5))
    assert await settled(first) == 70
    assert await settled(later[2]) == 5
    assert not later[0].done() and not later[1].done()


# Answers.


async def test_answers_settle_their_own_futures(peer: Peer) -> None:
    stream, connection = await peer.open()
    one, two = stream.send(1), stream.send(2)
    assert await connection.requests(2) == [1, 2]
    connection.data(answer(2, 20))
    connection.data(answer(1, 10))
    assert await settled(two) == 20
    assert await settled(one) == 10


def each_byte(connection: Connection, both: bytes) -> None:
    for i in range(len(both)):
        connection.data(both[i : i + 1])


def padded_then_plain(connection: Connection, both: bytes) -> None:
    connection.data(both[:3], pad=9)
    connection.data(both[3:])


def empty_around(connection: Connection, both: bytes) -> None:
    connection.data(b"")
    connection.data(both)
    connection.data(b"")


DELIVERIES: dict[str, Callable[[Connection, bytes], None]] = {
    "both in one DATA frame": lambda c, both: c.data(both),
    "one DATA frame per byte": each_byte,
    "padded": lambda c, both: c.data(both, pad=7),
    "padded, padding length 0": lambda c, both: c.data(both, pad=0),
    "padded, 255 bytes of padding": lambda c, both: c.data(both, pad=255),
    "padded then plain, split mid-message": padded_then_plain,
    "empty DATA frames around": empty_around,
}


@pytest.mark.parametrize("delivery", DELIVERIES.values(), ids=DELIVERIES.keys())
async def test_answers_in_any_data_framing(
    peer: Peer, delivery: Callable[[Connection, bytes], None]
) -> None:
    stream, connection = await peer.open()
    one, two = stream.send(1), stream.send(2)
    delivery(connection, answer(1, 10) + answer(2, 20))
    assert await settled(one) == 10
    assert await settled(two) == 20


async def test_a_message_split_across_data_frames_waits_for_its_end(peer: Peer) -> None:
    stream, connection = await peer.open()
    future = stream.send(1)
    message = answer(1, 10)
    connection.data(message[:4])  # not even the whole length prefix
    await connection.barrier()
    assert not future.done()
    connection.data(message[4:-1])
    await connection.barrier()
    assert not future.done()
    connection.data(message[-1:])
    assert await settled(future) == 10


def per_byte(block: bytes, end: set[str]) -> list[bytes]:
    return [
        headers_frame(block[:1], end),
        *(continuation(block[i : i + 1], set()) for i in range(1, len(block))),
        continuation(b"", {"END_HEADERS"}),
    ]


HEADER_SHAPES: dict[str, Callable[[bytes, set[str]], list[bytes]]] = {
    "plain": lambda block, end: [headers_frame(block, {"END_HEADERS"} | end)],
    "PRIORITY": lambda block, end: [headers_frame(block, {"END_HEADERS"} | end, priority=True)],
    "PADDED": lambda block, end: [headers_frame(block, {"END_HEADERS"} | end, pad=9)],
    "PADDED and PRIORITY": lambda block, end: [
        headers_frame(block, {"END_HEADERS"} | end, pad=6, priority=True)
    ],
    "HEADERS + CONTINUATION": lambda block, end: [
        headers_frame(block[:1], end),
        continuation(block[1:], {"END_HEADERS"}),
    ],
    "one CONTINUATION per byte": per_byte,
    "PADDED and PRIORITY + CONTINUATION": lambda block, end: [
        headers_frame(b"", end, pad=3, priority=True),
        continuation(block, {"END_HEADERS"}),
    ],
    "an empty HEADERS fragment + CONTINUATION": lambda block, end: [
        headers_frame(b"", end),
        continuation(block, {"END_HEADERS"}),
    ],
}


@pytest.mark.parametrize("shape", HEADER_SHAPES.values(), ids=HEADER_SHAPES.keys())
@pytest.mark.parametrize("status", ["200", "503"])
async def test_response_headers_in_any_shape(
    peer: Peer, shape: Callable[[bytes, set[str]], list[bytes]], status: str
) -> None:
    """The block is read whole: 200 lets the answer through, 503 fails the stream."""
    stream, connection = await peer.open(respond=False)
    future = stream.send(1)
    block = connection.block([(":status", status), ("content-type", "application/grpc")])
    # h2 has not sent these headers itself, so the answer goes raw too
    connection.inject(*shape(block, set()), frame(DATA, 0, 1, answer(1, 10)))
    if status == "200":
        assert await settled(future) == 10
    else:
        with pytest.raises(StoreUnavailable, match="HTTP status 503"):
            await settled(future)


@pytest.mark.parametrize("shape", HEADER_SHAPES.values(), ids=HEADER_SHAPES.keys())
async def test_trailers_in_any_shape(
    peer: Peer, shape: Callable[[bytes, set[str]], list[bytes]]
) -> None:
    stream, connection = await peer.open()
    future = stream.send(1)
    block = connection.block([("grpc-status", "16"), ("grpc-message", "invalid auth token")])
    connection.inject(*shape(block, {"END_STREAM"}))
    with pytest.raises(StreamUnauthenticated, match="invalid auth token"):
        await settled(future)


@pytest.mark.parametrize("ttl", [0, -1])
async def test_a_lease_etcd_does_not_know_gets_its_ttl(peer: Peer, ttl: int) -> None:
    stream, connection = await peer.open()
    future = stream.send(5)
    connection.data(answer(5, ttl))
    assert await settled(future) == ttl


async def test_answers_for_one_lease_settle_its_futures_in_order(peer: Peer) -> None:
    stream, connection = await peer.open()
    futures = [stream.send(5) for _ in range(3)]
    other = stream.send(6)
    connection.data(answer(5, 10) + answer(6, 60) + answer(5, 20))
    connection.data(answer(5, 30))
    assert [await settled(future) for future in futures] == [10, 20, 30]
    assert await settled(other) == 60


async def test_a_cancelled_future_still_takes_its_answer(peer: Peer) -> None:
    stream, connection = await peer.open()
    cancelled = stream.send(5)
    cancelled.cancel()
    waiting = stream.send(5)
    assert await connection.requests(2) == [5, 5]
    connection.data(answer(5, 1) + answer(99, 1))  # 99: nobody waits for it
    await connection.barrier()
    assert not waiting.done(), "the cancelled call's answer went to the next caller"
    connection.data(answer(5, 2))
    assert await settled(waiting) == 2
    assert not stream.broken


ENDS: dict[str, Callable[[H2Connection], None]] = {
    "trailers": lambda h2: h2.send_headers(1, [("grpc-status", "14")], end_stream=True),
    "GOAWAY": lambda h2: h2.close_connection(error_code=0, last_stream_id=1),
    "RST_STREAM": lambda h2: h2.reset_stream(1, error_code=2),
}


@pytest.mark.parametrize("end", ENDS.values(), ids=ENDS.keys())
async def test_answers_before_the_end_still_count(
    peer: Peer, end: Callable[[H2Connection], None]
) -> None:
    """Answers read together with the frame that ends the stream are delivered first."""
    stream, connection = await peer.open()
    answered, unanswered = stream.send(1), stream.send(2)
    connection.h2.send_data(1, answer(1, 10))
    end(connection.h2)
    connection.flush()  # one write: the client reads both together
    assert await settled(answered) == 10
    with pytest.raises(StoreUnavailable):
        await settled(unanswered)


# Control frames.


async def test_settings_are_acknowledged_once(peer: Peer) -> None:
    stream, connection = await peer.open()
    connection.inject(bytes(SettingsFrame(0, flags={"ACK"}).serialize()))  # acknowledges nothing
    connection.h2.update_settings({SettingCodes.MAX_FRAME_SIZE: 1 << 20})
    seen = await connection.barrier()
    acknowledged = [event for event in seen if isinstance(event, SettingsAcknowledged)]
    assert len(acknowledged) == 1
    assert acknowledged[0].changed_settings[SettingCodes.MAX_FRAME_SIZE].new_value == 1 << 20
    assert not stream.broken


async def test_ping_is_answered_with_its_payload(peer: Peer) -> None:
    stream, connection = await peer.open()
    connection.h2.ping(b"\x00\xffpeer\x01\x02")
    connection.inject(bytes(PingFrame(0, b"ack-only", flags={"ACK"}).serialize()))
    seen = await connection.barrier()
    assert [event.ping_data for event in seen if isinstance(event, PingAckReceived)] == [
        b"\x00\xffpeer\x01\x02"
    ]
    assert not any(isinstance(event, PingReceived) for event in seen), "an ACK was answered"
    assert not stream.broken


async def set_window(connection: Connection, size: int) -> None:
    """The peer's SETTINGS_INITIAL_WINDOW_SIZE, in force once the client acknowledges it."""
    connection.h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: size})
    seen = await connection.barrier()
    assert any(isinstance(event, SettingsAcknowledged) for event in seen)


async def test_requests_wait_for_the_stream_window(peer: Peer) -> None:
    stream, connection = await peer.open()
    await set_window(connection, 20)
    futures = [stream.send(lease) for lease in range(1, 7)]  # 7 bytes each
    sent = data_bytes(await connection.barrier())
    assert len(sent) == 20

    connection.h2.increment_flow_control_window(1000)  # the connection window is not short
    assert data_bytes(await connection.barrier()) == b""
    connection.h2.increment_flow_control_window(10, stream_id=1)
    sent += data_bytes(await connection.barrier())
    assert len(sent) == 30
    connection.h2.increment_flow_control_window(1000, stream_id=1)
    sent += data_bytes(await connection.barrier())
    assert leases_in(sent) == [1, 2, 3, 4, 5, 6]

    connection.data(b"".join(answer(lease, lease * 10) for lease in range(1, 7)))
    assert [await settled(future) for future in futures] == [10, 20, 30, 40, 50, 60]


async def test_requests_wait_for_the_connection_window(peer: Peer) -> None:
    stream, connection = await peer.open()
    await set_window(connection, 1 << 20)
    leases = [2**62 + n for n in range(4400)]  # 15 bytes each: more than 65,535 in all
    futures = [stream.send(lease) for lease in leases]
    first = [event for event in await connection.barrier() if isinstance(event, DataReceived)]
    assert sum(len(event.data or b"") for event in first) == 65535
    assert max(len(event.data or b"") for event in first) <= 16384  # SETTINGS_MAX_FRAME_SIZE

    connection.h2.increment_flow_control_window(100_000, stream_id=1)  # not what is short
    assert data_bytes(await connection.barrier()) == b""
    connection.h2.increment_flow_control_window(100_000)
    rest = data_bytes(await connection.barrier())
    assert leases_in(data_bytes(list(first)) + rest) == leases
    for future in futures:
        future.cancel()


async def test_the_client_reopens_its_receive_window(peer: Peer) -> None:
    stream, connection = await peer.open()
    filler = grpc(b"") * 3276  # empty answers: lease 0, which nobody waits for
    sent = 40 * len(filler)
    assert sent <= connection.h2.local_flow_control_window(1), "the client's windows are small"
    for _ in range(40):
        connection.data(filler)
    seen = await connection.barrier()
    assert {event.stream_id for event in seen if isinstance(event, WindowUpdated)} == {0, 1}
    # without WINDOW_UPDATEs both windows would be down to 1 MiB - 655,200 bytes
    assert connection.h2.local_flow_control_window(1) >= 1 << 19
    future = stream.send(3)
    connection.data(answer(3, 30))
    assert await settled(future) == 30


async def test_answers_split_across_reads_and_between_other_frames(peer: Peer) -> None:
    """The stream's DATA frames are read past h2 once the response headers are in: frames cut
    anywhere, a PING between two answers and a padded answer all keep their order."""
    stream, connection = await peer.open()
    futures = [stream.send(lease) for lease in (1, 2, 3, 4)]
    assert await connection.requests(4) == [1, 2, 3, 4]
    one, two, three = (frame(DATA, 0, 1, answer(lease, 10 + lease)) for lease in (1, 2, 3))
    four = frame(DATA, PADDED, 1, b"\x03" + answer(4, 14) + b"\x00" * 3)  # h2 reads this one
    ping = bytes(PingFrame(0, b"between!").serialize())
    connection.inject(one + ping + two[:4])
    assert await settled(futures[0]) == 11
    connection.inject(two[4:] + three[:12])
    assert await settled(futures[1]) == 12
    assert not futures[2].done()
    connection.inject(three[12:] + four)
    assert [await settled(f) for f in futures[2:]] == [13, 14]
    seen = await connection.barrier()
    assert b"between!" in [e.ping_data for e in seen if isinstance(e, PingAckReceived)]
    assert not stream.broken


# Endings: every way the stream can end fails the pending calls and breaks the stream.


def close_socket(connection: Connection) -> None:
    connection.writer.close()


def end_stream(connection: Connection) -> None:
    connection.h2.end_stream(1)
    connection.flush()


def goaway(connection: Connection) -> None:
    connection.h2.close_connection(error_code=0, additional_data=b"shutdown", last_stream_id=1)
    connection.flush()


def reset(connection: Connection) -> None:
    connection.h2.reset_stream(1, error_code=8)
    connection.flush()


def push_promise(connection: Connection) -> None:
    block = connection.block([(":method", "GET"), (":path", "/"), (":scheme", "http")])
    promise = PushPromiseFrame(1, promised_stream_id=2, data=block, flags={"END_HEADERS"})
    connection.inject(bytes(promise.serialize()))


ENDINGS: dict[str, tuple[Callable[[Connection], None], type[StoreError], str]] = {
    "grpc-status 16": (
        lambda c: c.trailers([("grpc-status", "16")]),
        StreamUnauthenticated,
        "grpc-status 16",
    ),
    "grpc-status 14": (
        lambda c: c.trailers([("grpc-status", "14"), ("grpc-message", "leader lost")]),
        StoreUnavailable,
        "leader lost",
    ),
    "grpc-status 0": (
        lambda c: c.trailers([("grpc-status", "0")]),
        StoreUnavailable,
        "stream ended",
    ),
    "grpc-status 3, percent-encoded message": (
        lambda c: c.trailers([("grpc-status", "3"), ("grpc-message", quote("bad lease: 100% ✓"))]),
        StoreError,
        "bad lease: 100% ✓",
    ),
    "trailers without grpc-status": (
        lambda c: c.trailers([("content-type", "application/grpc")]),
        StoreUnavailable,
        "grpc-status 2",
    ),
    "grpc-status of 5000 digits": (
        lambda c: c.trailers([("grpc-status", "1" * 5000)]),
        StoreUnavailable,
        "grpc-status 2",
    ),
    "DATA with END_STREAM": (end_stream, StoreUnavailable, "without trailers"),
    "GOAWAY": (goaway, StoreUnavailable, "(GOAWAY) shutdown"),
    "RST_STREAM": (reset, StoreUnavailable, "HTTP/2 error 8"),
    # what follows is against the protocol: h2 on the client's side refuses it
    "PUSH_PROMISE": (push_promise, StoreUnavailable, "protocol error: Received pushed stream"),
    "HEADERS on another stream": (
        lambda c: c.inject(headers_frame(c.block(RESPONSE), {"END_HEADERS"}, stream=3)),
        StoreUnavailable,
        "protocol error: Invalid stream ID",
    ),
    "DATA on a stream never opened": (
        lambda c: c.inject(bytes(DataFrame(3, answer(1, 99)).serialize())),
        StoreUnavailable,
        "protocol error",
    ),
    "a header block interrupted": (
        lambda c: c.inject(headers_frame(b"\x88", set()), frame(DATA, 0, 1, answer(1, 10))),
        StoreUnavailable,
        "protocol error: Invalid frame during header block",
    ),
    "CONTINUATION out of the blue": (
        lambda c: c.inject(continuation(b"\x88", {"END_HEADERS"})),
        StoreUnavailable,
        "protocol error: Invalid input StreamInputs.RECV_CONTINUATION",
    ),
    "an HPACK index past the tables": (
        lambda c: c.inject(headers_frame(b"\xff\x7f", {"END_HEADERS", "END_STREAM"})),
        StoreUnavailable,
        "protocol error: Error decoding header block",
    ),
    "padding longer than the frame": (
        lambda c: c.inject(frame(DATA, PADDED, 1, b"\x05abc")),
        StoreUnavailable,
        "protocol error: Received frame with invalid padding",
    ),
    "a frame longer than 16384 bytes": (
        lambda c: c.inject(frame(DATA, 0, 1, bytes(16385))),
        StoreUnavailable,
        "protocol error: Received overlong frame",
    ),
    # and what is against gRPC
    "a compressed message": (
        lambda c: c.data(grpc(b"\x08\x01", compressed=1)),
        StoreUnavailable,
        "compressed",
    ),
    "a message over 1 MiB": (
        lambda c: c.data(b"\x00" + (2 << 20).to_bytes(4, "big")),
        StoreUnavailable,
        "too large",
    ),
    "a message that is no LeaseKeepAliveResponse": (
        lambda c: c.data(grpc(b"\xff\xff\xff")),
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
    connection.trailers(pairs)
    with pytest.raises(StoreError) as raised:
        await settled(future)
    assert type(raised.value) is failure, raised.value
    assert stream.broken


async def test_frames_the_stream_ignores(peer: Peer) -> None:
    """PRIORITY, unknown types and settings, RST_STREAM on an idle stream: the stream goes on."""
    stream, connection = await peer.open()
    future = stream.send(1)
    connection.inject(
        bytes(PriorityFrame(1, depends_on=0, stream_weight=15).serialize()),
        frame(0xFA, 0xFF, 1, b"an extension frame"),  # hyperframe serializes its length as 0
        bytes(RstStreamFrame(3, error_code=8).serialize()),
        bytes(SettingsFrame(0, settings={0x99: 7}).serialize()),
    )
    await connection.barrier()
    assert not future.done() and not stream.broken
    connection.data(answer(1, 10))
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
    connection.data(answer(1, 10))
    assert await settled(answered) == 10
    return stream, connection, futures


async def hostile_bytes(garbage: bytes) -> None:
    async with scripted_peer() as peer:
        stream, connection, futures = await start_exchange(peer)
        connection.inject(garbage)
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
stream_data = st.binary(max_size=24).map(lambda message: frame(DATA, 0, 1, grpc(message)))
odd_trailers = st.lists(st.tuples(header_names, header_values), max_size=4).map(
    lambda pairs: frame(HEADERS, END_HEADERS | END_STREAM, 1, bytes(hpack.Encoder().encode(pairs)))
)


async def hostile_frames(frames: list[bytes]) -> None:
    async with scripted_peer() as peer:
        stream, connection, futures = await start_exchange(peer)
        connection.inject(*frames)
        try:
            await connection.barrier()  # answered: the client has read every frame
        except (asyncio.IncompleteReadError, ConnectionError):
            assert stream.broken, "the client hung up but its stream is not broken"
        check_futures(stream, futures)


@FUZZ
@given(frames=st.lists(hostile_frame | stream_data | odd_trailers, min_size=1, max_size=8))
def test_arbitrary_frames_never_raise_out_of_the_protocol(frames: list[bytes]) -> None:
    asyncio.run(hostile_frames(frames))
