"""The embedded store: in-process, single node, etcd semantics, nothing kept across restarts."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

from .base import (
    Compacted,
    Delete,
    Event,
    EventType,
    KeyValue,
    LeaseExists,
    LeaseNotFound,
    Put,
    PutResult,
    Snapshot,
    StoreError,
    TxnResult,
)

_END: list[Event] = []  # queued to a watch when the store closes


@dataclass(slots=True)
class _Lease:
    ttl: int
    deadline: float
    timer: asyncio.TimerHandle | None = None
    keys: set[bytes] = field(default_factory=set)


class EmbeddedStore:
    def __init__(self, history: int = 100_000) -> None:
        self._revision = 1
        self._compacted = 0  # events with a revision at or below this are gone
        self._kv: dict[bytes, KeyValue] = {}
        self._leases: dict[int, _Lease] = {}
        self._lease_ids = itertools.count(0x694D_0000_0001)
        self._history: deque[Event] = deque()
        self._history_limit = history
        self._watches: set[tuple[bytes, asyncio.Queue[list[Event]]]] = set()
        self._closed = False

    # leases

    async def grant(self, ttl: int, lease_id: int = 0) -> int:
        self._check_open()
        if lease_id in self._leases:
            raise LeaseExists(f"lease {lease_id:x} exists")
        while not lease_id or lease_id in self._leases:
            lease_id = next(self._lease_ids)
        lease = _Lease(ttl=ttl, deadline=0.0)
        self._leases[lease_id] = lease
        self._arm(lease_id, lease)
        return lease_id

    async def keepalive(self, lease: int) -> int:
        self._check_open()
        found = self._lease(lease)
        self._arm(lease, found)
        return found.ttl

    async def keepalive_many(self, leases: Sequence[int]) -> list[int]:
        self._check_open()
        ttls = []
        for lease_id in leases:
            lease = self._leases.get(lease_id)
            if lease is None:
                ttls.append(0)
            else:
                self._arm(lease_id, lease)
                ttls.append(lease.ttl)
        return ttls

    async def time_to_live(self, lease: int) -> int:
        self._check_open()
        return max(0, math.ceil(self._lease(lease).deadline - time.monotonic()))

    async def revoke(self, lease: int) -> None:
        self._check_open()
        self._lease(lease)
        self._drop_lease(lease)

    def _lease(self, lease: int) -> _Lease:
        found = self._leases.get(lease)
        if found is None:
            raise LeaseNotFound(f"lease {lease:x} not found")
        return found

    def _arm(self, lease_id: int, lease: _Lease) -> None:
        if lease.timer is not None:
            lease.timer.cancel()
        loop = asyncio.get_running_loop()
        lease.deadline = time.monotonic() + lease.ttl
        lease.timer = loop.call_later(lease.ttl, self._drop_lease, lease_id)

    def _drop_lease(self, lease_id: int) -> None:
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return
        if lease.timer is not None:
            lease.timer.cancel()
        if not lease.keys:
            return
        self._revision += 1
        events = []
        for key in sorted(lease.keys):
            del self._kv[key]
            events.append(Event(EventType.DELETE, key, b"", self._revision, 0))
        self._publish(events)

    # keys

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> PutResult:
        self._check_open()
        if lease:
            self._lease(lease)
        prev = self._kv.get(key)
        if prev is not None and prev.lease and prev.lease in self._leases:
            self._leases[prev.lease].keys.discard(key)
        self._revision += 1
        self._kv[key] = KeyValue(key, value, self._revision, lease)
        if lease:
            self._leases[lease].keys.add(key)
        self._publish([Event(EventType.PUT, key, value, self._revision, lease)])
        return PutResult(self._revision, prev)

    async def get(self, key: bytes) -> KeyValue | None:
        self._check_open()
        return self._kv.get(key)

    async def delete(self, key: bytes) -> KeyValue | None:
        self._check_open()
        prev = self._kv.pop(key, None)
        if prev is None:
            return None
        if prev.lease in self._leases:
            self._leases[prev.lease].keys.discard(key)
        self._revision += 1
        self._publish([Event(EventType.DELETE, key, b"", self._revision, 0)])
        return prev

    async def txn(self, expect: Mapping[bytes, int], ops: Sequence[Put | Delete]) -> TxnResult:
        self._check_open()
        for key, revision in expect.items():
            current = self._kv.get(key)
            if (current.mod_revision if current is not None else 0) != revision:
                return TxnResult(False, self._revision)
        keys = [op.key for op in ops]
        if len(set(keys)) != len(keys):
            raise StoreError("a key appears twice in one transaction")
        for op in ops:
            if isinstance(op, Put) and op.lease:
                self._lease(op.lease)
        events = []
        revision = self._revision + 1
        for op in ops:
            prev = self._kv.get(op.key)
            if prev is not None and prev.lease in self._leases:
                self._leases[prev.lease].keys.discard(op.key)
            if isinstance(op, Put):
                self._kv[op.key] = KeyValue(op.key, op.value, revision, op.lease)
                if op.lease:
                    self._leases[op.lease].keys.add(op.key)
                events.append(Event(EventType.PUT, op.key, op.value, revision, op.lease))
            elif prev is not None:
                del self._kv[op.key]
                events.append(Event(EventType.DELETE, op.key, b"", revision, 0))
        if events:  # like etcd: a transaction that changes nothing keeps the revision
            self._revision = revision
            self._publish(events)
        return TxnResult(True, self._revision)

    async def load(self, prefix: bytes) -> Snapshot:
        self._check_open()
        items = [kv for key, kv in sorted(self._kv.items()) if key.startswith(prefix)]
        return Snapshot(self._revision, items)

    async def revision(self) -> int:
        self._check_open()
        return self._revision

    async def compact(self, revision: int) -> None:
        self._check_open()
        self._compact_to(min(revision, self._revision))

    def _compact_to(self, revision: int) -> None:
        self._compacted = max(self._compacted, revision - 1)
        while self._history and self._history[0].mod_revision <= self._compacted:
            self._history.popleft()

    # watches

    def _publish(self, events: list[Event]) -> None:
        self._history.extend(events)
        if len(self._history) > self._history_limit:
            self._compact_to(self._history[len(self._history) - self._history_limit].mod_revision)
        for prefix, queue in self._watches:
            batch = [e for e in events if e.key.startswith(prefix)]
            if batch:
                queue.put_nowait(batch)

    async def watch(self, prefix: bytes, start_revision: int) -> AsyncIterator[list[Event]]:
        self._check_open()
        if start_revision <= self._compacted:
            raise Compacted(self._compacted + 1)
        queue: asyncio.Queue[list[Event]] = asyncio.Queue()
        replay = [
            e
            for e in self._history
            if e.mod_revision >= start_revision and e.key.startswith(prefix)
        ]
        entry = (prefix, queue)
        self._watches.add(entry)
        try:
            if replay:
                yield replay
            while True:
                batch = await queue.get()
                if batch is _END:
                    return
                yield batch
        finally:
            self._watches.discard(entry)

    async def close(self) -> None:
        self._closed = True
        for lease in self._leases.values():
            if lease.timer is not None:
                lease.timer.cancel()
        for _, queue in self._watches:
            queue.put_nowait(_END)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("store is closed")
