"""etcd's LeaseKeepAlive stream, spoken directly: gRPC over HTTP/2 on the event loop.

A heartbeat is one lease renewal, one message each way on a LeaseKeepAlive stream. Through
grpc.aio every message is an operation handed between the event loop and gRPC's own threads:
measured under heartbeat load, about 12 context switches and 7 futex calls per renewal, which
cost this process more than the HTTP request that asked for it. This module speaks the one
stream itself on a plain asyncio connection: the renewals of one loop turn leave in one DATA
frame and one write, and the answers of one read are settled together. Everything else still
goes through grpc.aio.

HTTP/2 (RFC 9113) is h2's: frames, HPACK, SETTINGS and their acknowledgements, PING answers,
flow control both ways. This module only feeds it the bytes read, writes what it has to send
once per loop turn, and turns its events into answers and failures: GOAWAY, RST_STREAM, a
status other than 200 and a protocol error end the stream; the trailers' `grpc-status` says
how. The gRPC messages inside the DATA (a 5-byte length prefix and a protobuf) are framed here.

What h2 costs: etcd sends every answer in a DATA frame of its own, and h2 handles each frame
on its own (parse, two state machines, windows, an event): about twice the CPU per renewal of
the former hand framing (docs/etcd-benchmarks.md). So one kind of frame skips h2: once h2 has
reported the response headers with status 200, a complete, unpadded DATA frame of the stream
that does not end it is read here (its payload appended to the messages, its length counted
against the windows, which are topped up with WINDOW_UPDATE frames per 64 KiB as h2 would).
Every other frame, and every byte before the response headers, goes to h2 in the order read.
What this side can batch, it does: one send_data per loop turn, encoded requests reused.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from typing import cast
from urllib.parse import unquote

import hpack
from aetcd import rpc
from google.protobuf.message import DecodeError
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings

from .base import StoreError, StoreUnavailable

_STREAM = 1  # the one stream of a connection
_RECEIVE_WINDOW = 1 << 20  # what this side lets etcd send ahead, per stream and connection
_ACKNOWLEDGE = 1 << 16  # DATA read before it is handed back to h2's window accounting
_REQUESTS_KEPT = 1 << 15  # encoded requests kept for reuse (a lease is renewed again and again)
_DEFAULT_WINDOW = 65535
_MAX_MESSAGE = 1 << 20
_UNAUTHENTICATED = 16  # grpc-status
_RETRYABLE = frozenset({1, 2, 4, 13, 14})  # cancelled, unknown, deadline, internal, unavailable
_PATH = b"/etcdserverpb.Lease/LeaseKeepAlive"
_FRAME_HEAD = 9  # length (3), type (1), flags (1), stream (4)
_DATA = 0
_PADDED_OR_END_STREAM = 0x08 | 0x01
_OUR_STREAM = _STREAM.to_bytes(4, "big")
_HEADER_BLOCK = frozenset({0x1, 0x5, 0x9})  # HEADERS, PUSH_PROMISE, CONTINUATION
_END_HEADERS = 0x4
_WINDOW_UPDATE_HEAD = (4).to_bytes(3, "big") + b"\x08\x00"  # length 4, WINDOW_UPDATE, no flags


class StreamUnauthenticated(StoreError):
    """etcd refused the auth token: log in again and open a new stream."""


def _request(lease: int) -> bytes:
    """One LeaseKeepAliveRequest as a gRPC message (uncompressed, length-prefixed)."""
    message = bytes(rpc.LeaseKeepAliveRequest(ID=lease).SerializeToString())
    return b"\x00" + len(message).to_bytes(4, "big") + message


class LeaseStream(asyncio.Protocol):
    """One LeaseKeepAlive stream on its own connection to one etcd member.

    `send` returns a future for the lease's TTL (0 or less: etcd does not know the lease).
    A connection failure, a stream that ends, a protocol error or an answer later than
    `timeout` + 0.5 s fails every pending renewal and sets `broken`; the store then opens a
    new stream. `on_failure` runs when the member looks unusable (no connection, a late
    answer, the connection or the stream broken, a gRPC status such as UNAVAILABLE, e.g.
    "no leader"): the store drops the member, so that the next call dials the next one.
    etcd answers a stream's requests in order and holds back the answer for a lease that has
    expired but is not revoked yet until it is revoked (under a second): the answers behind
    it wait as long.
    """

    def __init__(
        self,
        client: object,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        token: str | None,
        timeout: float,
        on_failure: Callable[[], None],
    ) -> None:
        self.client = client
        self.broken = False
        self.endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._timeout = timeout
        self._bound = timeout + 0.5  # as for every other call (EtcdStore._call)
        self._on_failure = on_failure
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._waiting: dict[int, deque[asyncio.Future[int]]] = {}
        # every request in the order sent, with its deadline; answered ones leave from the left
        self._deadlines: deque[tuple[float, asyncio.Future[int]]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._outbox = bytearray()  # gRPC messages not yet in a DATA frame
        self._requests: dict[int, bytes] = {}  # lease -> its encoded request
        self._unsent = b""  # what h2 had to send after a read (acknowledgements, window updates)
        self._flush_soon = False
        self._messages = bytearray()  # the stream's DATA not yet parsed into messages
        self._unacknowledged = 0  # DATA bytes read, not yet acknowledged to h2
        self._frames = bytearray()  # bytes read, not yet a complete frame
        self._responded = False  # h2 reported the response headers, status 200
        self._in_header_block = False  # a header block without END_HEADERS yet: all to h2
        self._read_here = 0  # DATA bytes read past h2, not yet given back to etcd's windows
        self._h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self._h2.local_settings = Settings(
            client=True,
            initial_values={
                SettingCodes.ENABLE_PUSH: 0,
                SettingCodes.INITIAL_WINDOW_SIZE: _RECEIVE_WINDOW,
                SettingCodes.MAX_CONCURRENT_STREAMS: 100,
                SettingCodes.MAX_HEADER_LIST_SIZE: H2Connection.DEFAULT_MAX_HEADER_LIST_SIZE,
            },
        )
        self._headers: list[tuple[bytes, bytes]] = [
            (b":method", b"POST"),
            (b":scheme", b"https" if ssl_context is not None else b"http"),
            (b":path", _PATH),
            (b":authority", self.endpoint.encode()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ]
        if token:  # never indexed: the token stays out of etcd's HPACK table
            self._headers.append(hpack.NeverIndexedHeaderTuple(b"token", token.encode()))
        self._opening = asyncio.ensure_future(self._open(host, port, ssl_context))

    async def _open(self, host: str, port: int, ssl_context: ssl.SSLContext | None) -> None:
        try:
            async with asyncio.timeout(self._bound):
                await self._loop.create_connection(
                    lambda: self,
                    host,
                    port,
                    ssl=ssl_context,
                    server_hostname=host if ssl_context is not None else None,
                )
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            self._fail(f"no connection within {self._bound} s")
        except Exception as error:  # OSError, ssl.SSLError, a host that does not resolve, …
            self._fail(str(error) or type(error).__name__)

    # the caller's side

    def send(self, lease: int) -> asyncio.Future[int]:
        """A future for the lease's TTL (0 or less: not found), or the error of the stream."""
        if self.broken:
            raise StoreUnavailable(f"etcd {self.endpoint}: keepalive stream closed")
        future: asyncio.Future[int] = self._loop.create_future()
        waiting = self._waiting.get(lease)
        if waiting is None:
            waiting = self._waiting[lease] = deque()
        waiting.append(future)  # cancelled futures stay: they still take their answer
        self._deadlines.append((self._loop.time() + self._bound, future))
        if self._timer is None:
            self._timer = self._loop.call_at(self._deadlines[0][0], self._check_deadlines)
        request = self._requests.get(lease)
        if request is None:  # protobuf's encoding costs more than the rest of a send
            if len(self._requests) >= _REQUESTS_KEPT:
                self._requests.clear()
            request = self._requests[lease] = _request(lease)
        self._outbox += request
        self._flush_later()
        return future

    def _fail(self, reason: str) -> None:
        """Close with StoreUnavailable, and let the store drop this member."""
        if not self.broken:
            self.close(StoreUnavailable(f"etcd {self.endpoint}: {reason}"))
            self._on_failure()

    def close(self, error: Exception) -> None:
        """Fail every pending renewal with error and close the connection."""
        if self.broken:
            return
        self.broken = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadlines.clear()
        waiting, self._waiting = self._waiting, {}
        for futures in waiting.values():
            for future in futures:
                if not future.done():
                    future.set_exception(error)
        if self._opening is not asyncio.current_task():
            self._opening.cancel()
        if self._transport is not None:
            self._transport.abort()

    def _check_deadlines(self) -> None:
        self._timer = None
        deadlines = self._deadlines
        while deadlines and deadlines[0][1].done():
            deadlines.popleft()
        if not deadlines:
            return
        deadline = deadlines[0][0]
        if deadline > self._loop.time():
            self._timer = self._loop.call_at(deadline, self._check_deadlines)
            return
        self._fail(f"no answer within {self._timeout} s")

    def _flush_later(self) -> None:
        if not self._flush_soon:
            self._flush_soon = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Hand queued messages to h2 as far as etcd's windows allow; write what h2 has, once."""
        self._flush_soon = False
        transport = self._transport
        if transport is None or self.broken:
            return
        connection = self._h2
        outbox = self._outbox
        try:
            while outbox:
                size = min(
                    len(outbox),
                    connection.local_flow_control_window(_STREAM),
                    connection.max_outbound_frame_size,
                )
                if size <= 0:
                    break  # wait for WINDOW_UPDATE
                connection.send_data(_STREAM, bytes(outbox[:size]))
                del outbox[:size]
        except ProtocolError as error:  # the stream can no longer carry data
            self._fail(f"keepalive stream: HTTP/2 protocol error: {error}")
            return
        data = connection.data_to_send()
        if self._unsent:
            data, self._unsent = self._unsent + data, b""
        if data:
            transport.write(data)

    # the connection's side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        if self.broken:
            self._transport.abort()
            return
        tls = transport.get_extra_info("ssl_object")
        if tls is not None and tls.selected_alpn_protocol() != "h2":
            self._fail("TLS without HTTP/2 (ALPN h2 not selected): not an etcd gRPC endpoint")
            return
        connection = self._h2
        connection.initiate_connection()
        connection.increment_flow_control_window(_RECEIVE_WINDOW - _DEFAULT_WINDOW)
        connection.send_headers(_STREAM, self._headers)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._fail(f"{exc or 'connection closed'}")

    def data_received(self, data: bytes) -> None:
        """Complete frames in the order read: the stream's plain DATA frames here, runs of
        every other frame through h2."""
        frames = self._frames
        frames += data
        size = len(frames)
        at = start = 0  # frames[start:at] is a run for h2
        read_here = 0
        messages = self._messages
        while size - at >= _FRAME_HEAD:
            length = int.from_bytes(frames[at : at + 3], "big")
            if length > self._h2.max_inbound_frame_size:
                at = size  # h2 refuses it: hand it over now, not after 16 MiB
                break
            end = at + _FRAME_HEAD + length
            if end > size:
                break
            kind = frames[at + 3]
            if kind in _HEADER_BLOCK:
                self._in_header_block = not frames[at + 4] & _END_HEADERS
            elif (
                kind == _DATA
                and not frames[at + 4] & _PADDED_OR_END_STREAM
                and frames[at + 5 : at + 9] == _OUR_STREAM
                and self._responded
                and not self._in_header_block
            ):
                if start < at and not self._through_h2(bytes(frames[start:at])):
                    return
                messages += frames[at + _FRAME_HEAD : end]
                read_here += length
                start = end
            at = end
        run = bytes(frames[start:at])
        del frames[:at]
        if read_here:
            self._read_here += read_here
            if self._read_here >= _ACKNOWLEDGE:
                increment = self._read_here.to_bytes(4, "big")
                self._unsent += b"".join(
                    (_WINDOW_UPDATE_HEAD, b"\x00\x00\x00\x00", increment,
                     _WINDOW_UPDATE_HEAD, _OUR_STREAM, increment)
                )  # fmt: skip
                self._read_here = 0
        if run:
            self._through_h2(run)  # it parses the messages and flushes as below
            return
        self._parse_messages()
        if self.broken:
            return
        if self._unsent:
            self._flush_later()

    def _through_h2(self, data: bytes) -> bool:
        """Hand frames to h2 and act on its events; False once the stream is over."""
        connection = self._h2
        try:
            events = connection.receive_data(data)
        except ProtocolError as error:
            self._fail(f"keepalive stream: HTTP/2 protocol error: {error}")
            return False
        received = 0
        more_window = False
        messages = self._messages
        for event in events:
            if isinstance(event, DataReceived):  # first: nearly every event is one
                messages += event.data or b""
                received += event.flow_controlled_length or 0
                if event.stream_ended is not None:
                    self._parse_messages()
                    self._fail("keepalive stream: the stream ended without trailers")
                    return False
            elif isinstance(event, ResponseReceived):
                headers = dict(event.headers or ())
                status = headers.get(b":status", b"none")
                if status != b"200":
                    self._fail(f"keepalive stream: HTTP status {status.decode(errors='replace')}")
                    return False
                if event.stream_ended is not None:  # a trailers-only answer
                    self._end(headers)
                    return False
                self._responded = True
            elif isinstance(event, TrailersReceived):
                self._end(dict(event.headers or ()))
                return False
            elif isinstance(event, StreamReset):
                self._parse_messages()  # answers that came before the end still count
                self._fail(f"keepalive stream: stream reset (HTTP/2 error {event.error_code})")
                return False
            elif isinstance(event, ConnectionTerminated):
                # Even a graceful GOAWAY (etcd shutting down) ends this stream here: the renewals
                # in flight fail with StoreUnavailable and the next one dials the next member.
                reason = (event.additional_data or b"").decode(errors="replace")
                self._parse_messages()
                self._fail(
                    f"keepalive stream: etcd closed the connection (GOAWAY) {reason}".strip()
                )
                return False
            elif isinstance(event, WindowUpdated | RemoteSettingsChanged):
                more_window = True
            # h2 has answered PING and SETTINGS itself; the other events need nothing here
        if received:
            self._unacknowledged += received
            if self._unacknowledged >= _ACKNOWLEDGE:  # h2 sends WINDOW_UPDATE past half a window
                connection.acknowledge_received_data(self._unacknowledged, _STREAM)
                self._unacknowledged = 0
        self._parse_messages()
        if self.broken:
            return False
        unsent = connection.data_to_send()
        if unsent:
            self._unsent += unsent
        if self._unsent or (more_window and self._outbox):
            self._flush_later()
        return True

    def _end(self, headers: dict[bytes, bytes]) -> None:
        """The trailers (or a trailers-only answer): the stream is over, and why."""
        code_text = headers.get(b"grpc-status", b"2")
        code = int(code_text) if code_text.isdigit() and len(code_text) < 10 else 2
        message = unquote(headers.get(b"grpc-message", b"").decode(errors="replace"))
        message = message or f"grpc-status {code}"
        self._parse_messages()
        if self.broken:
            return
        if code in _RETRYABLE:
            self._fail(f"keepalive stream ended: {message}")
        elif code == 0:  # ended without an error: open a new stream on the same member
            self.close(StoreUnavailable(f"etcd {self.endpoint}: keepalive stream ended: {message}"))
        elif code == _UNAUTHENTICATED:
            self.close(StreamUnauthenticated(f"etcd {self.endpoint}: {message}"))
        else:
            self.close(StoreError(f"etcd {self.endpoint}: {message}"))

    def _parse_messages(self) -> None:
        data = self._messages
        at = 0
        waiting_of = self._waiting
        while len(data) - at >= 5:
            if data[at]:
                self._fail("compressed message")
                return
            size = int.from_bytes(data[at + 1 : at + 5], "big")
            if size > _MAX_MESSAGE:
                self._fail("message too large")
                return
            if len(data) - at - 5 < size:
                break
            message = bytes(data[at + 5 : at + 5 + size])
            try:
                response = rpc.LeaseKeepAliveResponse.FromString(message)
            except DecodeError:
                self._fail("undecodable message")
                return
            at += 5 + size
            waiting = waiting_of.get(response.ID)
            if not waiting:
                continue  # an answer nobody waits for any more
            future = waiting.popleft()
            if not waiting:
                del waiting_of[response.ID]
            if not future.done():
                future.set_result(int(response.TTL))
        del data[:at]
        deadlines = self._deadlines
        while deadlines and deadlines[0][1].done():
            deadlines.popleft()
