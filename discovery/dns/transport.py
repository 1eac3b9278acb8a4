"""DNS over UDP and TCP (RFC 7766): framing only; every answer comes from the resolver.

An answer is bytes, None (drop the query), or a coroutine (a forwarded query): the latter runs
as a task and its response is sent when it is ready, out of order on TCP (RFC 7766 6.2.1.1).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any, cast

log = logging.getLogger(__name__)

Answerer = Callable[[bytes, bool], bytes | Coroutine[Any, Any, bytes] | None]
UDP_BUFFER = 4 * 1024 * 1024  # room for bursts while the loop is busy


class UdpResponder(asyncio.DatagramProtocol):
    def __init__(self, answer: Answerer) -> None:
        self.answer = answer
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: set[asyncio.Task[bytes]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, option, UDP_BUFFER)
                except OSError:
                    pass

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            response = self.answer(data, False)
        except Exception:  # one bad packet must never take the listener down
            log.exception("failed to answer a UDP query from %s", addr)
            return
        if response is None or self.transport is None:
            return
        if isinstance(response, bytes):
            self.transport.sendto(response, addr)
            return
        task = asyncio.ensure_future(response)
        self.pending.add(task)
        task.add_done_callback(functools.partial(self._send_later, addr))

    def _send_later(self, addr: tuple[str, int], task: asyncio.Task[bytes]) -> None:
        self.pending.discard(task)
        response = _result(task)
        if response is not None and self.transport is not None:
            self.transport.sendto(response, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP socket error: %s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        for task in self.pending:
            task.cancel()


def _result(task: asyncio.Task[bytes]) -> bytes | None:
    if task.cancelled():
        return None
    error = task.exception()
    if error is not None:
        log.error("failed to answer a forwarded query", exc_info=error)
        return None
    return task.result()


class TcpConnections:
    """Live TCP connections: the cap on their number and the idle timeout."""

    def __init__(self, answer: Answerer, idle_timeout: float, max_connections: int) -> None:
        self.answer = answer
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.open: set[TcpResponder] = set()
        self.refused = 0

    def protocol(self) -> TcpResponder:
        return TcpResponder(self)

    def close_all(self) -> None:
        for connection in list(self.open):
            connection.close(grace=False)


class TcpResponder(asyncio.Protocol):
    """One client connection: length-prefixed queries, pipelined, answered in order."""

    def __init__(self, owner: TcpConnections) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.idle: asyncio.TimerHandle | None = None
        self.paused = False
        self.pending: set[asyncio.Task[bytes]] = set()
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if len(self.owner.open) >= self.owner.max_connections:
            self.owner.refused += 1
            self.transport.abort()
            return
        self.owner.open.add(self)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.open.discard(self)
        if self.idle is not None:
            self.idle.cancel()
        self.transport = None
        for task in self.pending:
            task.cancel()

    def _arm(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        loop = asyncio.get_running_loop()
        self.idle = loop.call_later(self.owner.idle_timeout, self.close)

    def close(self, grace: bool = True) -> None:
        """Close once pending answers are written; reset if the client does not read them
        within one idle timeout (or at once without grace), so it cannot hold a slot."""
        if self.transport is None:
            return
        self.transport.close()
        if self.transport.get_write_buffer_size():
            if not grace:
                self._reset()
                return
            if self.idle is not None:
                self.idle.cancel()
            loop = asyncio.get_running_loop()
            self.idle = loop.call_later(self.owner.idle_timeout, self._reset)

    def _reset(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._arm()
        self._drain()

    def _drain(self) -> None:
        buffer = self.buffer
        while not self.paused and self.transport is not None and len(buffer) >= 2:
            size = buffer[0] << 8 | buffer[1]
            if len(buffer) < 2 + size:
                return
            query = bytes(buffer[2 : 2 + size])
            del buffer[: 2 + size]
            try:
                response = self.owner.answer(query, True)
            except Exception:
                log.exception("failed to answer a TCP query")
                response = None
            if response is None:
                self.close()  # RFC 7766 6.2.4: close rather than leave a query unanswered
                return
            if isinstance(response, bytes):
                self.transport.write(len(response).to_bytes(2, "big") + response)
                continue
            task = asyncio.ensure_future(response)
            self.pending.add(task)
            task.add_done_callback(self._write_later)

    def _write_later(self, task: asyncio.Task[bytes]) -> None:
        self.pending.discard(task)
        response = _result(task)
        if response is not None and self.transport is not None:
            self.transport.write(len(response).to_bytes(2, "big") + response)
        if self.eof and not self.pending:
            self.close()

    def pause_writing(self) -> None:
        # The client is not reading its answers: stop reading its queries until it does.
        self.paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.transport is not None:
            self.transport.resume_reading()
            self._drain()

    def eof_received(self) -> bool | None:
        if self.pending:  # forwarded answers are still to come: close after the last
            self.eof = True
            return True
        return None  # close once pending answers are written


async def open_listeners(
    udp_sock: socket.socket,
    tcp_sock: socket.socket,
    answer: Answerer,
    idle_timeout: float,
    max_connections: int,
) -> tuple[asyncio.DatagramTransport, asyncio.Server, TcpConnections]:
    """Serve UDP and TCP on sockets bound already (by this process or its parent)."""
    loop = asyncio.get_running_loop()
    connections = TcpConnections(answer, idle_timeout, max_connections)
    udp, _ = await loop.create_datagram_endpoint(lambda: UdpResponder(answer), sock=udp_sock)
    try:
        tcp = await loop.create_server(connections.protocol, sock=tcp_sock, backlog=1024)
    except BaseException:
        udp.close()
        raise
    return udp, tcp, connections
