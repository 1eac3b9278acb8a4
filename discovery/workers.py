"""`--workers N` the way uvicorn runs workers: the parent binds the listening sockets and
starts N processes, each running the same Server on those sockets (the kernel hands each
datagram and connection to one of them); it restarts a worker that dies, stops them all
on SIGTERM or SIGINT and passes SIGHUP on (each re-reads the auth file and the TLS files).
Each worker keeps its own registry by watching etcd, so more than one worker needs --etcd
(Config refuses it otherwise).

No polling on either side: the parent waits on each worker's pidfd, a worker on its
parent's pidfd (a worker must not outlive its parent, even one killed with SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import secrets
import signal
import time
from multiprocessing.process import BaseProcess

from .config import Config, Sockets
from .server import Server

log = logging.getLogger(__name__)

STOP_TIMEOUT = 15.0  # seconds workers get to finish after SIGTERM before SIGKILL
QUICK_EXIT = 1.0  # a worker that dies sooner than this after its start is restarted...
RESTART_DELAY = 1.0  # ...this much later, so one that cannot start does not spin


def run_worker(config: Config, sockets: Sockets, parent: int, number: int) -> None:
    """A worker process's entry point (multiprocessing, spawn)."""
    config.setup_logging()
    config.setup_event_loop()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_worker(config, sockets, parent, number))


async def _serve_worker(config: Config, sockets: Sockets, parent: int, number: int) -> None:
    try:
        parent_fd = os.pidfd_open(parent)
    except ProcessLookupError:
        log.warning("worker %d: the parent process is gone before the start", number)
        return
    try:
        if os.getppid() != parent:  # it died (its pid maybe reused) before pidfd_open
            log.warning("worker %d: the parent process is gone before the start", number)
            return
        if number:  # one process per node writes the overlay; the others read the kernel
            config = dataclasses.replace(config, overlay_observe=True)
        server = Server(config)
        loop = asyncio.get_running_loop()

        def orphaned() -> None:
            loop.remove_reader(parent_fd)
            log.warning("worker %d: the parent process is gone: stopping", number)
            server.request_stop()

        loop.add_reader(parent_fd, orphaned)
        log.info("worker %d started (pid %d)", number, os.getpid())
        try:
            await server.serve(sockets)
        finally:
            loop.remove_reader(parent_fd)
    finally:
        os.close(parent_fd)


@dataclasses.dataclass
class _Worker:
    number: int
    process: BaseProcess
    pidfd: int
    started: float
    exited: asyncio.Future[int | None]


class Supervisor:
    """The parent of the worker processes: starts N, restarts one that dies, stops all."""

    def __init__(self, config: Config, sockets: Sockets) -> None:
        if config.node_lease == 0:
            # One node, one lease: the workers grant it under one ID (see NodeLease).
            config = dataclasses.replace(config, node_lease=secrets.randbits(62) + 1)
        self.config = config
        self.sockets = sockets
        self.workers: dict[int, _Worker] = {}
        self._context = multiprocessing.get_context("spawn")
        self._stopping = False
        self._stop = asyncio.Event()

    def run(self) -> int:
        """Supervise until SIGTERM or SIGINT; the exit code of the command."""
        self.config.setup_event_loop()
        try:
            asyncio.run(self._run())
        finally:
            self.sockets.close()
        return 0

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        try:
            for number in range(self.config.workers):
                self._spawn(number)
            log.info("%d worker processes serve the sockets", self.config.workers)
            await self._stop.wait()
        finally:
            log.info("stopping the workers")
            await self._stop_all()

    def _reload(self) -> None:
        """SIGHUP: each worker re-reads the auth file and the TLS files (one still starting
        reads them anyway)."""
        log.info("SIGHUP: passing it to %d workers", len(self.workers))
        for worker in self.workers.values():
            _signal(worker, signal.SIGHUP)

    def _spawn(self, number: int) -> None:
        if self._stopping:
            return
        process = self._context.Process(
            target=run_worker,
            args=(self.config, self.sockets, os.getpid(), number),
            name=f"discovery-worker-{number}",
        )
        process.start()
        assert process.pid is not None
        loop = asyncio.get_running_loop()
        pidfd = os.pidfd_open(process.pid)
        worker = _Worker(number, process, pidfd, time.monotonic(), loop.create_future())
        self.workers[number] = worker
        loop.add_reader(worker.pidfd, self._reap, worker)

    def _reap(self, worker: _Worker) -> None:
        """The worker's pidfd is readable: it has exited."""
        loop = asyncio.get_running_loop()
        loop.remove_reader(worker.pidfd)
        os.close(worker.pidfd)
        worker.process.join()  # at once: it has exited
        code = worker.process.exitcode
        worker.exited.set_result(code)
        if self.workers.get(worker.number) is worker:
            del self.workers[worker.number]
        if self._stopping:
            return
        lived = time.monotonic() - worker.started
        delay = RESTART_DELAY if lived < QUICK_EXIT else 0.0
        log.warning(
            "worker %d (pid %d) exited with %s: restarting%s",
            worker.number,
            worker.process.pid,
            code,
            f" in {delay:.0f} s" if delay else "",
        )
        loop.call_later(delay, self._spawn, worker.number)

    async def _stop_all(self) -> None:
        self._stopping = True
        workers = list(self.workers.values())
        for worker in workers:
            _signal(worker, signal.SIGTERM)
        exits = [worker.exited for worker in workers]
        if not exits:
            return
        _, pending = await asyncio.wait(exits, timeout=STOP_TIMEOUT)
        for worker in workers:
            if not worker.exited.done():
                log.warning("worker %d did not stop in time: killing it", worker.number)
                _signal(worker, signal.SIGKILL)
        if pending:
            await asyncio.wait(pending)


def _signal(worker: _Worker, signum: int) -> None:
    """Signal through the pidfd (open until the worker is reaped): never a process that
    reused the pid."""
    if not worker.exited.done():
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(worker.pidfd, signum)
