"""DNS over UDP and TCP (RFC 7766): framing and the limits on each client; every answer
comes from the resolver.

An answer is bytes, None (drop the query), or a coroutine (a forwarded query): the latter runs
as a task and its response is sent when it is ready, out of order on TCP (RFC 7766 6.2.1.1).

Limits: open TCP connections in all and per client address, a deadline for each TCP message
from its first byte (a client trickling bytes cannot hold a connection), an idle timeout
between messages, and optionally queries per second per client address. Every refusal is
counted by reason in `refusals` (plain integers, read by metrics.py at scrape time).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, cast

log = logging.getLogger(__name__)

Answerer = Callable[[bytes, bool], bytes | Coroutine[Any, Any, bytes] | None]
UDP_BUFFER = 4 * 1024 * 1024  # room for bursts while the loop is busy
# the reasons of discovery_dns_refused_total: each a limit that refused a client
REFUSAL_REASONS = ("tcp_connections", "tcp_client_connections", "tcp_message_timeout", "rate_limit")


@dataclass(frozen=True, slots=True)
class TcpLimits:
    idle_timeout: float = 10.0  # between whole messages
    message_timeout: float = 2.0  # from a message's first byte to its last
    max_connections: int = 1024
    max_per_client: int = 16


class RateLimiter:
    """Queries per second per client address: a token bucket holding one second's worth.
    The table of addresses is bounded (a flood from spoofed addresses cannot grow it)."""

    MAX_CLIENTS = 65536

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(rate, 1.0)
        self.buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, when)

    def allow(self, address: str) -> bool:
        now = time.monotonic()
        bucket = self.buckets.get(address)
        if bucket is None:
            if len(self.buckets) >= self.MAX_CLIENTS:
                self._prune(now)
            tokens = self.burst
        else:
            tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        if tokens < 1.0:
            self.buckets[address] = (tokens, now)
            return False
        self.buckets[address] = (tokens - 1.0, now)
        return True

    def _prune(self, now: float) -> None:
        """Forget clients whose bucket has filled up again (they lose nothing by it)."""
        full = [
            a for a, (t, at) in self.buckets.items() if t + (now - at) * self.rate >= self.burst
        ]
        for address in full:
            del self.buckets[address]
        if len(self.buckets) >= self.MAX_CLIENTS:
            self.buckets.clear()


try:
    from . import _batch  # recvmmsg/sendmmsg, compiled at install time where a compiler is
except ImportError:  # pragma: no cover - the pure-Python loop serves instead
    _batch = None  # type: ignore[assignment]

UDP_IO = ("mmsg", "loop")  # how the UDP listener reads and writes (--dns-udp-io)
BATCH = 64  # datagrams answered per wake-up at most: TCP and HTTP get their turn in between
DATAGRAM = 65536  # room for any datagram, so none is cut short
WRITE_CHUNK = 65536  # TCP answers written together at most (then a paused client stops reading)


def udp_io_default() -> str:
    """recvmmsg/sendmmsg where the extension was built, else the pure-Python loop."""
    return "mmsg" if _batch is not None else "loop"


class UdpListener:
    """DNS over UDP on a non-blocking socket the loop watches (`add_reader`): each wake-up
    reads and answers up to BATCH datagrams, rather than one callback per datagram. `mmsg`
    reads them with one recvmmsg and sends the answers with one sendmmsg (the `_batch`
    extension); `loop` calls recvfrom and sendto for each, in pure Python. Answers the socket
    has no room for wait in order, and meanwhile nothing is read (the kernel's receive buffer
    holds the queries), so memory stays bounded."""

    def __init__(
        self,
        sock: socket.socket,
        answer: Answerer,
        refusals: Counter[str] | None = None,
        limiter: RateLimiter | None = None,
        io: str = "",
    ) -> None:
        io = io or udp_io_default()
        if io not in UDP_IO:
            raise ValueError(f"UDP I/O {io!r}: one of {', '.join(UDP_IO)}")
        if io == "mmsg" and _batch is None:
            raise ValueError("UDP I/O 'mmsg': the discovery.dns._batch extension is not built")
        self.io = io
        self.sock = sock
        self.fd = sock.fileno()
        self.answer = answer
        self.refusals: Counter[str] = Counter() if refusals is None else refusals
        self.limiter = limiter
        self.backlog: deque[tuple[bytes, Any]] = deque()  # answers waiting for buffer room
        self.pending: set[asyncio.Task[bytes]] = set()  # forwarded queries
        self.loop: asyncio.AbstractEventLoop | None = None
        self.reading = False

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, option, UDP_BUFFER)
            except OSError:
                pass
        self._reading(True)

    def close(self) -> None:
        if self.loop is not None:
            self._reading(False)
            if self.backlog:
                self.loop.remove_writer(self.fd)
            self.loop = None
        self.backlog.clear()
        for task in self.pending:
            task.cancel()
        self.sock.close()

    def _reading(self, on: bool) -> None:
        if self.loop is None or on == self.reading:
            return
        self.reading = on
        if on:
            self.loop.add_reader(self.fd, self._mmsg if self.io == "mmsg" else self._loop)
        else:
            self.loop.remove_reader(self.fd)

    def _loop(self) -> None:
        recvfrom = self.sock.recvfrom
        sendto = self.sock.sendto
        answer = self.answer
        limiter = self.limiter
        for _ in range(BATCH):
            try:
                data, addr = recvfrom(DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                log.debug("UDP socket error: %s", error)
                return
            if limiter is not None and not limiter.allow(addr[0]):
                self.refusals["rate_limit"] += 1
                continue
            try:
                response = answer(data, False)
            except Exception:  # one bad packet must never take the listener down
                log.exception("failed to answer a UDP query from %s", addr[0])
                continue
            if response is None:
                continue
            if response.__class__ is not bytes:
                self._forwarded(cast(Coroutine[Any, Any, bytes], response), addr)
                continue
            try:
                sendto(response, addr)
            except (BlockingIOError, InterruptedError):
                self._wait_for_room([(response, addr)])
                return
            except OSError as error:
                log.debug("UDP socket error: %s", error)

    def _mmsg(self) -> None:
        try:
            received = _batch.recv(self.fd, BATCH)
        except OSError as error:
            log.debug("UDP socket error: %s", error)
            return
        answer = self.answer
        limiter = self.limiter
        out: list[tuple[bytes, bytes]] = []
        for data, name in received:
            if limiter is not None and not limiter.allow(_host(name)):
                self.refusals["rate_limit"] += 1
                continue
            try:
                response = answer(data, False)
            except Exception:  # one bad packet must never take the listener down
                log.exception("failed to answer a UDP query from %s", _host(name))
                continue
            if response is None:
                continue
            if response.__class__ is bytes:
                out.append((response, name))
            else:
                self._forwarded(cast(Coroutine[Any, Any, bytes], response), name)
        if out:
            sent = _batch.send(self.fd, out, 0)
            if sent < len(out):
                self._wait_for_room(out[sent:])

    def _send(self, response: bytes, addr: Any) -> None:
        """One answer, now or after those waiting for room."""
        if self.backlog:
            self.backlog.append((response, addr))
            return
        if self.io == "mmsg":
            if not _batch.send(self.fd, [(response, addr)], 0):
                self._wait_for_room([(response, addr)])
            return
        try:
            self.sock.sendto(response, addr)
        except (BlockingIOError, InterruptedError):
            self._wait_for_room([(response, addr)])
        except OSError as error:
            log.debug("UDP socket error: %s", error)

    def _wait_for_room(self, answers: list[tuple[bytes, Any]]) -> None:
        """The socket's send buffer is full: write when it has room, read nothing till then."""
        self.backlog.extend(answers)
        if self.loop is not None and self.reading:
            self._reading(False)
            self.loop.add_writer(self.fd, self._flush)

    def _flush(self) -> None:
        backlog = self.backlog
        if self.io == "mmsg":
            for _ in range(_batch.send(self.fd, list(backlog), 0)):
                backlog.popleft()
        else:
            while backlog:
                try:
                    self.sock.sendto(*backlog[0])
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as error:
                    log.debug("UDP socket error: %s", error)
                backlog.popleft()
        if not backlog and self.loop is not None:
            self.loop.remove_writer(self.fd)
            self._reading(True)

    def _forwarded(self, response: Coroutine[Any, Any, bytes], addr: Any) -> None:
        task = asyncio.ensure_future(response)
        self.pending.add(task)
        task.add_done_callback(functools.partial(self._send_later, addr))

    def _send_later(self, addr: Any, task: asyncio.Task[bytes]) -> None:
        self.pending.discard(task)
        response = _result(task)
        if response is not None and self.loop is not None:
            self._send(response, addr)


def _host(name: bytes) -> str:
    """The address in a raw struct sockaddr (IPv4 or IPv6) from the extension."""
    if len(name) >= 24:
        return socket.inet_ntop(socket.AF_INET6, name[8:24])
    return socket.inet_ntop(socket.AF_INET, name[4:8])


def _result(task: asyncio.Task[bytes]) -> bytes | None:
    if task.cancelled():
        return None
    error = task.exception()
    if error is not None:
        log.error("failed to answer a forwarded query", exc_info=error)
        return None
    return task.result()


class TcpConnections:
    """Live TCP connections: the caps on their number, in all and per client, and the
    timeouts."""

    def __init__(
        self,
        answer: Answerer,
        limits: TcpLimits,
        refusals: Counter[str] | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.answer = answer
        self.limits = limits
        self.idle_timeout = limits.idle_timeout
        self.refusals: Counter[str] = Counter() if refusals is None else refusals
        self.limiter = limiter
        self.open: set[TcpResponder] = set()
        self.clients: dict[str, int] = {}  # open connections per client address

    @property
    def refused(self) -> int:
        """Connections closed at a connection cap."""
        return self.refusals["tcp_connections"] + self.refusals["tcp_client_connections"]

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
        self.client: str | None = None  # the address counted against the per-client cap
        self.buffer = bytearray()
        self.idle: asyncio.TimerHandle | None = None
        self.partial = False  # a message has begun: its deadline runs
        self.paused = False
        self.pending: set[asyncio.Task[bytes]] = set()
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        owner = self.owner
        if len(owner.open) >= owner.limits.max_connections:
            self._refuse("tcp_connections")
            return
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        count = owner.clients.get(client, 0)
        if count >= owner.limits.max_per_client:
            self._refuse("tcp_client_connections")
            return
        owner.clients[client] = count + 1
        self.client = client
        owner.open.add(self)
        self._arm(owner.limits.idle_timeout, self.close)

    def _refuse(self, reason: str) -> None:
        self.owner.refusals[reason] += 1
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        owner = self.owner
        owner.open.discard(self)
        if self.client is not None:
            left = owner.clients[self.client] - 1
            if left:
                owner.clients[self.client] = left
            else:
                del owner.clients[self.client]
            self.client = None
        if self.idle is not None:
            self.idle.cancel()
        self.transport = None
        for task in self.pending:
            task.cancel()

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        if self.idle is not None:
            self.idle.cancel()
        loop = asyncio.get_running_loop()
        self.idle = loop.call_later(delay, callback)

    def _late(self) -> None:
        """A message not whole by its deadline: the client trickles, or is gone."""
        self.owner.refusals["tcp_message_timeout"] += 1
        self.close()

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
        self._drain()

    def _drain(self) -> None:
        """Answer every whole message in the buffer, written together (one system call for
        all the answers to one read, up to WRITE_CHUNK bytes at a time, so that a client that
        does not read pauses this loop as before), then time what is left: the idle timeout
        when nothing is, a deadline from now when a message has begun (bytes that do not
        finish it never extend that deadline)."""
        buffer = self.buffer
        answered = False
        at = 0
        out: list[bytes] = []
        waiting = 0  # bytes in out
        while not self.paused and self.transport is not None and len(buffer) - at >= 2:
            size = buffer[at] << 8 | buffer[at + 1]
            if len(buffer) - at < 2 + size:
                break
            query = bytes(buffer[at + 2 : at + 2 + size])
            at += 2 + size
            answered = True
            limiter = self.owner.limiter
            if limiter is not None and not limiter.allow(self.client or ""):
                self.owner.refusals["rate_limit"] += 1
                self._write(out)
                self.close()  # RFC 7766 6.2.4: close rather than leave a query unanswered
                return
            try:
                response = self.owner.answer(query, True)
            except Exception:
                log.exception("failed to answer a TCP query")
                response = None
            if response is None:
                self._write(out)
                self.close()  # RFC 7766 6.2.4: close rather than leave a query unanswered
                return
            if isinstance(response, bytes):
                out.append(len(response).to_bytes(2, "big"))
                out.append(response)
                waiting += len(response)
                if waiting >= WRITE_CHUNK:
                    self._write(out)
                    waiting = 0
                continue
            task = asyncio.ensure_future(response)
            self.pending.add(task)
            task.add_done_callback(self._write_later)
        del buffer[:at]
        self._write(out)
        if self.transport is None or self.transport.is_closing():
            return
        if answered or not self.partial:
            limits = self.owner.limits
            if buffer and not self.paused:
                self.partial = True
                self._arm(limits.message_timeout, self._late)
            else:  # idle, or waiting for the client to read its answers
                self.partial = False
                self._arm(limits.idle_timeout, self.close)

    def _write(self, out: list[bytes]) -> None:
        """Write the framed answers in `out` (and empty it)."""
        if out and self.transport is not None:
            self.transport.write(b"".join(out))
        out.clear()

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
    limits: TcpLimits,
    refusals: Counter[str] | None = None,
    rate_limit: float = 0.0,
    udp_io: str = "",
) -> tuple[UdpListener, asyncio.Server, TcpConnections]:
    """Serve UDP and TCP on sockets bound already (by this process or its parent)."""
    loop = asyncio.get_running_loop()
    counted: Counter[str] = Counter() if refusals is None else refusals
    limiter = RateLimiter(rate_limit) if rate_limit > 0 else None
    connections = TcpConnections(answer, limits, counted, limiter)
    udp = UdpListener(udp_sock, answer, counted, limiter, udp_io)
    udp.start()
    try:
        tcp = await loop.create_server(connections.protocol, sock=tcp_sock, backlog=1024)
    except BaseException:
        udp.close()
        raise
    return udp, tcp, connections
