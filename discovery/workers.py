"""`--workers N`: N processes answering DNS on one port (SO_REUSEPORT).

The first process runs everything (HTTP API, store, DNS). Each further process is a DNS
worker with its own cache and watcher. With etcd a worker watches etcd itself; with the
embedded store, which lives in the first process, a worker reads it through a feed: a
Unix socket over which the first process serves `load`, `watch` and `revision`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import pickle
import signal
import struct
import tempfile
from collections.abc import AsyncIterator
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

from .config import Config, HostPort
from .store.base import Compacted, Event, Snapshot, Store, StoreError, StoreUnavailable

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">I")


async def _send(writer: asyncio.StreamWriter, message: object) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(_HEADER.pack(len(data)) + data)
    await writer.drain()


async def _receive(reader: asyncio.StreamReader) -> Any:
    size = _HEADER.unpack(await reader.readexactly(_HEADER.size))[0]
    return pickle.loads(await reader.readexactly(size))  # our own process, our own socket


class FeedServer:
    """Serves the read side of the first process's store to DNS workers."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.directory = tempfile.mkdtemp(prefix="discovery-feed-")
        self.path = os.path.join(self.directory, "feed.sock")
        self._server: asyncio.AbstractServer | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, self.path)
        os.chmod(self.path, 0o600)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            op, prefix, start = await _receive(reader)
            if op == "load":
                await _send(writer, ("ok", await self.store.load(prefix)))
            elif op == "revision":
                await _send(writer, ("ok", await self.store.revision()))
            elif op == "watch":
                try:
                    async for batch in self.store.watch(prefix, start):
                        await _send(writer, ("events", batch))
                except Compacted as error:
                    await _send(writer, ("compacted", error.compact_revision))
        except (asyncio.IncompleteReadError, ConnectionError, StoreError):
            pass
        except asyncio.CancelledError:
            pass  # shutdown: the task ends here, its stream callback must not see the cancel
        finally:
            self._handlers.discard(task)
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
            os.rmdir(self.directory)


class FeedStore:
    """A worker's view of the first process's embedded store: read side only."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def _call(self, op: str, prefix: bytes = b"", start: int = 0) -> Any:
        try:
            reader, writer = await asyncio.open_unix_connection(self.path)
        except OSError as error:
            raise StoreUnavailable(f"feed unreachable: {error}") from None
        try:
            await _send(writer, (op, prefix, start))
            _, value = await _receive(reader)
            return value
        except (asyncio.IncompleteReadError, ConnectionError) as error:
            raise StoreUnavailable(f"feed closed: {error}") from None
        finally:
            writer.close()

    async def load(self, prefix: bytes) -> Snapshot:
        snapshot: Snapshot = await self._call("load", prefix)
        return snapshot

    async def revision(self) -> int:
        revision: int = await self._call("revision")
        return revision

    async def watch(self, prefix: bytes, start_revision: int) -> AsyncIterator[list[Event]]:
        try:
            reader, writer = await asyncio.open_unix_connection(self.path)
        except OSError as error:
            raise StoreUnavailable(f"feed unreachable: {error}") from None
        try:
            await _send(writer, ("watch", prefix, start_revision))
            while True:
                kind, value = await _receive(reader)
                if kind == "compacted":
                    raise Compacted(value)
                yield value
        except (asyncio.IncompleteReadError, ConnectionError) as error:
            raise StoreUnavailable(f"feed closed: {error}") from None
        finally:
            writer.close()

    async def _read_only(self, *args: object) -> Any:
        raise StoreError("a DNS worker does not write to the store")

    grant = keepalive = time_to_live = revoke = _read_only
    put = get = delete = compact = _read_only

    async def close(self) -> None:
        pass


def _worker_main(config: Config, feed_path: str | None, number: int) -> None:
    from .cli import _install_loop, _setup_logging

    _setup_logging(config.log_level)
    _install_loop()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run_worker(config, feed_path, number))


async def _run_worker(config: Config, feed_path: str | None, number: int) -> None:

    from .server import Server

    store = FeedStore(feed_path) if feed_path else None
    server = Server(config, store=store, http=False)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_stop)
    log.info("DNS worker %d starting", number)
    orphaned = asyncio.create_task(_stop_when_orphaned(server))
    try:
        await server.serve()
    finally:
        orphaned.cancel()


async def _stop_when_orphaned(server: Server) -> None:
    """A worker must not outlive the first process (even one killed with SIGKILL)."""
    parent = os.getppid()
    while os.getppid() == parent:  # noqa: ASYNC110 - no event exists for a parent's death
        await asyncio.sleep(1.0)
    log.warning("the first process is gone: DNS worker stopping")
    server.request_stop()


class Supervisor:
    """Starts the DNS workers, restarts one that dies, stops them all on shutdown."""

    def __init__(self, config: Config, dns: tuple[str, int], feed: FeedServer | None) -> None:
        # Workers bind the port the first process got (it may have asked for port 0).
        self.config = dataclasses.replace(config, dns=HostPort(dns[0], dns[1]))
        self.feed = feed
        self.processes: dict[int, BaseProcess] = {}
        self._context = multiprocessing.get_context("spawn")
        self._monitor: asyncio.Task[None] | None = None

    def _spawn(self, number: int) -> None:
        path = self.feed.path if self.feed is not None else None
        process = self._context.Process(
            target=_worker_main,
            args=(self.config, path, number),
            daemon=True,
            name=f"discovery-dns-{number}",
        )
        process.start()
        self.processes[number] = process

    async def start(self) -> None:
        for number in range(1, self.config.workers):
            self._spawn(number)
        self._monitor = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for number, process in list(self.processes.items()):
                if not process.is_alive():
                    log.warning("DNS worker %d exited (%s): restarting", number, process.exitcode)
                    self._spawn(number)

    async def stop(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        for process in self.processes.values():
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        loop = asyncio.get_running_loop()
        for process in self.processes.values():
            await loop.run_in_executor(None, process.join, 10)
            if process.is_alive():
                process.kill()
