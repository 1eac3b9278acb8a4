"""Keeps the registry equal to the store: load at revision R, watch from R+1, forever."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

from .registry import Registry
from .store.base import (
    Compacted,
    Event,
    Store,
    StoreError,
    StoreUnavailable,
    being_cancelled,
)

log = logging.getLogger(__name__)

COALESCE_AFTER = 0.0005  # an apply this long means a burst is on: gather the next batches
COALESCE_MAX = 0.020  # for at most this long (it adds to the propagation delay)


class Backoff:
    """Capped exponential backoff with full jitter."""

    def __init__(self, initial: float = 0.1, cap: float = 5.0) -> None:
        self.initial = initial
        self.cap = cap
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.initial * 2**self.attempt)
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


class Watcher:
    def __init__(
        self, store: Store, registry: Registry, prefix: bytes, probe_interval: float = 1.0
    ) -> None:
        self.store = store
        self.registry = registry
        self.prefix = prefix
        self.probe_interval = probe_interval
        self.reloads = 0
        self.resumes = 0
        self.failures = 0
        self._needs_load = True

    async def run(self) -> None:
        """Load and watch until cancelled or the store closes."""
        backoff = Backoff()
        while True:
            try:
                if self._needs_load:
                    snapshot = await self.store.load(self.prefix)
                    self.registry.load(snapshot)
                    self._needs_load = False
                    log.info(
                        "loaded %d records at revision %d", len(snapshot.items), snapshot.revision
                    )
                    self.registry.mark_contact(True)
                # no contact mark before the watch answers: resuming is not reaching the store
                await self._follow(backoff)
                return  # the store closed the stream: we are shutting down
            except Compacted as error:
                self.reloads += 1
                self._needs_load = True
                log.warning("watch history compacted (%s): reloading the registry", error)
            except (Exception, asyncio.CancelledError) as error:
                if isinstance(error, asyncio.CancelledError) and being_cancelled():
                    raise  # any other CancelledError is a stray one
                if not isinstance(error, StoreError):
                    # A bug, not an outage: start over from a full load rather than die.
                    log.exception("watch failed unexpectedly: reloading the registry")
                    self.failures += 1
                    self._needs_load = True
                self.resumes += 1
                self.registry.mark_contact(False)
                delay = backoff.next_delay()
                log.warning(
                    "store unreachable (%s): serving the last known state, retrying in %.2fs",
                    error,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _follow(self, backoff: Backoff) -> None:
        """Apply the watch from the registry's revision on until the stream ends or fails.

        A pump task receives the stream; batches that arrived while the registry was busy are
        applied together, so a burst rebuilds each touched service once per pass rather
        than once per event. An idle watch applies each event as soon as it arrives.
        """
        queue: asyncio.Queue[list[Event] | BaseException | None] = asyncio.Queue()

        async def pump() -> None:
            try:
                async for batch in self.store.watch(self.prefix, self.registry.revision + 1):
                    queue.put_nowait(batch)
                queue.put_nowait(None)
            except (Exception, asyncio.CancelledError) as error:
                if isinstance(error, asyncio.CancelledError) and being_cancelled():
                    raise
                queue.put_nowait(error)

        pumping = asyncio.create_task(pump(), name="watch-pump")
        busy = 0.0  # seconds the last apply took
        try:
            while True:
                item = await queue.get()
                if busy > COALESCE_AFTER:
                    # A burst: changes arrive faster than they are applied. Let the next
                    # ones queue up for as long as the last apply took, then take them all.
                    await asyncio.sleep(min(busy, COALESCE_MAX))
                events: list[Event] = []
                while isinstance(item, list):
                    events.extend(item)
                    if queue.empty():
                        break
                    item = queue.get_nowait()
                if events:
                    started = time.perf_counter()
                    self.registry.apply(events)
                    busy = time.perf_counter() - started
                    self.registry.mark_contact(True)
                    backoff.reset()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
        finally:
            pumping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pumping

    async def probe(self) -> None:
        """Tell whether the store answers, so readiness and metrics can say how stale we are."""
        while True:
            try:
                await self.store.revision()
                self.registry.mark_contact(True)
            except StoreUnavailable:
                self.registry.mark_contact(False)
            except StoreError:
                return  # closed
            await asyncio.sleep(self.probe_interval)
