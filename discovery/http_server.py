"""The HTTP listener around aiohttp's protocol: a cap on open connections and a deadline for
a request's headers, which aiohttp does not have (a half-sent request would hold its socket
until the keep-alive timer, an hour by default in aiohttp 3.14).

The body's deadline is the handlers' (api.read_json): they read it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from ssl import SSLContext
from typing import cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from .metrics import Metrics

log = logging.getLogger(__name__)


class _MalformedRequests(logging.Filter):
    """aiohttp answers a request it cannot parse (a NUL in a header, an overlong line) with 400
    itself, then logs it at ERROR with a traceback: a client's error, which SPEC says never shows
    as one. Such a record becomes one line at debug level."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            log.debug("malformed HTTP request answered 400: %s", str(error).strip())
            return False
        return True


logging.getLogger("aiohttp.server").addFilter(_MalformedRequests())

# What a connection over the cap gets before it is closed: a short answer, not silence.
_BUSY_BODY = (
    b'{"title": "Too many connections", "status": 503, "detail": "this server holds its '
    b'limit of HTTP connections (--http-max-connections): retry later"}'
)
BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/problem+json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
    + str(len(_BUSY_BODY)).encode()
    + b"\r\n\r\n"
    + _BUSY_BODY
)


# The guard of each admitted connection, by aiohttp's handler (request.protocol)
_GUARDS: dict[RequestHandler, _Guarded] = {}


def when_gone(protocol: object, callback: Callable[[], object]) -> Callable[[], None]:
    """Call `callback` when the connection of `protocol` (a request's) closes; returns the
    function that forgets it. aiohttp cancels no handler when its client leaves: a parked
    long poll would otherwise hold its slot and memory until its wait ends."""
    guard = _GUARDS.get(protocol)  # type: ignore[call-overload]
    if guard is None:
        return _nothing
    guard.gone.append(callback)

    def forget() -> None:
        with contextlib.suppress(ValueError):
            guard.gone.remove(callback)

    return forget


def _nothing() -> None:
    pass


class HttpConnections:
    """The open HTTP connections of one listener, and the limits on them."""

    def __init__(self, limit: int, header_timeout: float, metrics: Metrics) -> None:
        self.limit = limit
        self.header_timeout = header_timeout
        self.metrics = metrics
        self.open = 0

    def factory(self, make_handler: Callable[[], RequestHandler]) -> Callable[[], _Guarded]:
        return lambda: _Guarded(self, make_handler())


class _Guarded(asyncio.Protocol):
    """aiohttp's RequestHandler, counted, and closed when a request's headers take longer than
    the deadline from its first byte (or from the connection's start)."""

    def __init__(self, connections: HttpConnections, inner: RequestHandler) -> None:
        self.connections = connections
        self.inner = inner
        self.admitted = False
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._parsed = 0  # requests whose headers have been read
        self.gone: list[Callable[[], object]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it
        self.transport = transport
        connections = self.connections
        if connections.open >= connections.limit:
            connections.metrics.http_refused.labels(reason="connections").inc()
            transport.write(BUSY)
            transport.close()
            return
        connections.open += 1
        self.admitted = True
        _GUARDS[self.inner] = self
        self.inner.connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.connections.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        inner = self.inner
        # aiohttp's own state (3.9-3.14): the handler waits for a request's headers
        if inner._request_in_progress or inner._messages:
            return
        self.connections.metrics.http_refused.labels(reason="header_timeout").inc()
        log.debug("closing an HTTP connection: no complete request headers in time")
        inner.force_close()

    def data_received(self, data: bytes) -> None:
        inner = self.inner
        idle = not inner._request_in_progress and not inner._messages
        inner.data_received(data)
        parsed = inner._request_count
        if parsed != self._parsed:
            self._parsed = parsed
            self._disarm()
        elif idle:
            self._arm()  # the first bytes of a request: its headers' deadline starts

    def eof_received(self) -> None:
        if self.admitted:
            self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.admitted:
            self.admitted = False
            self.connections.open -= 1
            _GUARDS.pop(self.inner, None)
            self.inner.connection_lost(exc)
            gone, self.gone = self.gone, []
            for callback in gone:
                callback()


class GuardedSite(web.SockSite):
    """web.SockSite serving through HttpConnections (the rest of the runner unchanged:
    shutdown still closes every connection aiohttp knows)."""

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        connections: HttpConnections,
        *,
        ssl_context: SSLContext | None = None,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, sock, ssl_context=ssl_context, backlog=backlog)
        self.connections = connections

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.connections.factory(server),
            sock=self._sock,
            ssl=self._ssl_context,
            backlog=self._backlog,
        )
