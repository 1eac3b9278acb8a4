"""etcd's LeaseKeepAlive stream, spoken directly: gRPC over HTTP/2 on the event loop.

A heartbeat is one lease renewal, one message each way on a LeaseKeepAlive stream. Through
grpc.aio every message is an operation handed between the event loop and gRPC's own threads:
measured under heartbeat load, about 12 context switches and 7 futex calls per renewal, which
cost this process more than the HTTP request that asked for it. This module speaks the one
stream itself on a plain asyncio connection: the renewals of one loop turn leave in one DATA
frame and one write, and the answers of one read are settled together. Everything else still
goes through grpc.aio; only this stream, whose messages are two varints, is hand-framed.

What it implements of HTTP/2 (RFC 9113) is what one client stream needs: the preface and
SETTINGS (acknowledged), flow control both ways, PING answers, GOAWAY and RST_STREAM as
failures, header blocks through HPACK (with CONTINUATION) to read `:status` and `grpc-status`.
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

from .base import StoreError, StoreUnavailable

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PUSH_PROMISE, _PING, _GOAWAY = 0, 1, 3, 4, 5, 6, 7
_WINDOW_UPDATE, _CONTINUATION = 8, 9
_END_STREAM, _ACK, _END_HEADERS, _PADDED, _PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
_SETTINGS_INITIAL_WINDOW, _SETTINGS_MAX_FRAME = 4, 5
_STREAM = 1  # the one stream of a connection
_DEFAULT_WINDOW = 65535
_RECEIVE_WINDOW = 1 << 20  # what this side lets etcd send ahead, per stream and connection
_MAX_FRAME = 16384  # largest frame this side sends (the protocol's minimum maximum)
_MAX_MESSAGE = 1 << 20
_UNAUTHENTICATED = 16  # grpc-status
_RETRYABLE = frozenset({1, 2, 4, 13, 14})  # cancelled, unknown, deadline, internal, unavailable
_PATH = "/etcdserverpb.Lease/LeaseKeepAlive"


class StreamUnauthenticated(StoreError):
    """etcd refused the auth token: log in again and open a new stream."""


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload
    )


def _window_update(stream: int, increment: int) -> bytes:
    return _frame(_WINDOW_UPDATE, 0, stream, increment.to_bytes(4, "big"))


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
        self._flush_soon = False
        self._send_window = _DEFAULT_WINDOW  # connection and stream: etcd's allowance to us
        self._stream_window = _DEFAULT_WINDOW
        self._peer_initial = _DEFAULT_WINDOW
        self._peer_max_frame = _MAX_FRAME
        self._unacknowledged = 0  # DATA bytes read since the last WINDOW_UPDATE
        self._input = bytearray()
        self._messages = bytearray()  # the stream's DATA payload not yet parsed into messages
        self._block = bytearray()  # a header block waiting for its CONTINUATION frames
        self._continuing = False  # until END_HEADERS: the block's fragments may be empty
        self._block_ends_stream = False
        self._decoder = hpack.Decoder()
        headers = [
            (":method", "POST"),
            (":scheme", "https" if ssl_context is not None else "http"),
            (":path", _PATH),
            (":authority", self.endpoint),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        if token:
            headers.append(("token", token))
        # Literals only: valid whatever header table size etcd announces.
        self._headers = hpack.Encoder().encode(
            [hpack.NeverIndexedHeaderTuple(name, value) for name, value in headers]
        )
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
        self._outbox += _request(lease)
        if not self._flush_soon:
            self._flush_soon = True
            self._loop.call_soon(self._flush)
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

    def _flush(self) -> None:
        """Put queued messages in DATA frames, as far as etcd's flow-control windows allow."""
        self._flush_soon = False
        transport = self._transport
        if transport is None or self.broken or not self._outbox:
            return
        frames = []
        outbox = self._outbox
        while outbox:
            size = min(len(outbox), self._send_window, self._stream_window, self._peer_max_frame)
            if size <= 0:
                break  # wait for WINDOW_UPDATE
            frames.append(_frame(_DATA, 0, _STREAM, bytes(outbox[:size])))
            del outbox[:size]
            self._send_window -= size
            self._stream_window -= size
        if frames:
            transport.write(b"".join(frames))

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
        settings = (
            (2).to_bytes(2, "big") + (0).to_bytes(4, "big")  # ENABLE_PUSH 0
            + _SETTINGS_INITIAL_WINDOW.to_bytes(2, "big") + _RECEIVE_WINDOW.to_bytes(4, "big")
        )  # fmt: skip
        self._transport.write(
            _PREFACE
            + _frame(_SETTINGS, 0, 0, settings)
            + _window_update(0, _RECEIVE_WINDOW - _DEFAULT_WINDOW)
            + _frame(_HEADERS, _END_HEADERS, _STREAM, self._headers)
        )
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._fail(f"{exc or 'connection closed'}")

    def data_received(self, data: bytes) -> None:
        buffer = self._input
        buffer += data
        at = 0
        try:
            while len(buffer) - at >= 9:
                length = int.from_bytes(buffer[at : at + 3], "big")
                end = at + 9 + length
                if end > len(buffer):
                    if length > _MAX_FRAME:
                        raise _ProtocolError("frame larger than announced")
                    break
                kind, flags = buffer[at + 3], buffer[at + 4]
                stream = int.from_bytes(buffer[at + 5 : at + 9], "big") & 0x7FFFFFFF
                self._frame(kind, flags, stream, bytes(buffer[at + 9 : end]))
                at = end
                if self.broken:
                    return
        except _ProtocolError as error:
            self._parse_messages()  # answers that came before the failure still count
            self._fail(f"keepalive stream: {error}")
            return
        del buffer[:at]
        self._parse_messages()
        if self._unacknowledged >= _RECEIVE_WINDOW // 2 and self._transport is not None:
            increment, self._unacknowledged = self._unacknowledged, 0
            self._transport.write(_window_update(0, increment) + _window_update(_STREAM, increment))

    def _frame(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if self._continuing and kind != _CONTINUATION:
            raise _ProtocolError("header block interrupted")
        if kind == _DATA:
            self._unacknowledged += len(payload)
            if stream == _STREAM:
                self._messages += _unpad(flags, payload)
                if flags & _END_STREAM:
                    raise _ProtocolError("the stream ended without trailers")
        elif kind == _HEADERS:
            if stream != _STREAM:
                raise _ProtocolError("headers on an unknown stream")
            payload = _unpad(flags, payload)
            if flags & _PRIORITY:
                payload = payload[5:]
            self._block += payload
            self._block_ends_stream = bool(flags & _END_STREAM)
            self._continuing = True
            if flags & _END_HEADERS:
                self._headers_done()
        elif kind == _CONTINUATION:
            if not self._continuing or stream != _STREAM:
                raise _ProtocolError("unexpected CONTINUATION")
            self._block += payload
            if flags & _END_HEADERS:
                self._headers_done()
        elif kind == _SETTINGS:
            if not flags & _ACK:
                self._settings(payload)
        elif kind == _WINDOW_UPDATE:
            increment = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            if stream == 0:
                self._send_window += increment
            elif stream == _STREAM:
                self._stream_window += increment
            self._flush()
        elif kind == _PING:
            if not flags & _ACK and self._transport is not None:
                self._transport.write(_frame(_PING, _ACK, 0, payload))
        elif kind == _GOAWAY:
            # Even a graceful GOAWAY (etcd shutting down) ends this stream here: the renewals
            # in flight fail with StoreUnavailable and the next one dials the next member.
            reason = payload[8:].decode(errors="replace")
            raise _ProtocolError(f"etcd closed the connection (GOAWAY) {reason}".strip())
        elif kind == _RST_STREAM:
            if stream == _STREAM:
                code = int.from_bytes(payload[:4], "big")
                raise _ProtocolError(f"stream reset (HTTP/2 error {code})")
        elif kind == _PUSH_PROMISE:
            raise _ProtocolError("unexpected PUSH_PROMISE")
        # PRIORITY and unknown frame types are ignored (RFC 9113 5.5)

    def _settings(self, payload: bytes) -> None:
        for at in range(0, len(payload) - 5, 6):
            ident = int.from_bytes(payload[at : at + 2], "big")
            value = int.from_bytes(payload[at + 2 : at + 6], "big")
            if ident == _SETTINGS_INITIAL_WINDOW:
                self._stream_window += value - self._peer_initial
                self._peer_initial = value
            elif ident == _SETTINGS_MAX_FRAME:
                self._peer_max_frame = min(value, _MAX_FRAME)
        if self._transport is not None:
            self._transport.write(_frame(_SETTINGS, _ACK, 0))
        self._flush()

    def _headers_done(self) -> None:
        block, self._block = bytes(self._block), bytearray()
        self._continuing = False
        try:
            headers = dict(self._decoder.decode(block, raw=True))
        except hpack.HPACKError as error:
            raise _ProtocolError(f"bad header block: {error}") from None
        status = headers.get(b":status")
        if status is not None and status != b"200":
            raise _ProtocolError(f"HTTP status {status.decode(errors='replace')}")
        if not self._block_ends_stream:
            return
        # trailers (or a trailers-only answer): the stream is over, and why
        code_text = headers.get(b"grpc-status", b"2")
        code = int(code_text) if code_text.isdigit() and len(code_text) < 10 else 2
        message = unquote(headers.get(b"grpc-message", b"").decode(errors="replace"))
        message = message or f"grpc-status {code}"
        self._parse_messages()
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


class _ProtocolError(Exception):
    pass


def _unpad(flags: int, payload: bytes) -> bytes:
    if not flags & _PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise _ProtocolError("bad padding")
    return payload[1 : len(payload) - payload[0]]
