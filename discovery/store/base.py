"""The store interface: a revisioned key-value store with leases and ordered watches.

Both implementations (embedded and etcd) follow etcd v3 semantics: every write bumps a
global revision; a key bound to a lease is deleted when the lease expires or is revoked;
a watch from revision R delivers every later put and delete in revision order.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol


def being_cancelled() -> bool:
    """Whether the current task is being cancelled, as opposed to having caught a
    CancelledError that belongs to something else (gRPC cancels the calls of a channel being
    closed; a future awaited on another task's behalf can be cancelled). The first must
    propagate; the second is an error like any other."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


class StoreError(Exception):
    """Base class of every error a store raises."""


class StoreUnavailable(StoreError):
    """The store cannot be reached or did not answer in time."""


class LeaseNotFound(StoreError):
    """The lease has expired, was revoked, or never existed."""


class LeaseExists(StoreError):
    """A grant asked for a lease ID that is alive already."""


class Compacted(StoreError):
    """The requested watch start revision has been compacted away."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted up to {compact_revision}")
        self.compact_revision = compact_revision


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int
    lease: int


class EventType(enum.Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class Event:
    type: EventType
    key: bytes
    value: bytes
    mod_revision: int
    lease: int


@dataclass(frozen=True, slots=True)
class PutResult:
    revision: int
    prev: KeyValue | None


@dataclass(frozen=True, slots=True)
class Put:
    """A write inside a transaction (bound to the lease when not 0)."""

    key: bytes
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    """A delete inside a transaction (a key that does not exist is no error)."""

    key: bytes


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int  # the store revision after the transaction (unchanged when it failed)


@dataclass(frozen=True, slots=True)
class Snapshot:
    revision: int
    items: list[KeyValue]


class Store(Protocol):
    async def grant(self, ttl: int, lease_id: int = 0) -> int:
        """A new lease that expires ttl seconds from now unless kept alive: with the given
        ID (raises LeaseExists while a lease has it), or one the store picks (0)."""

    async def keepalive(self, lease: int) -> int:
        """Renew the lease; returns its TTL. Raises LeaseNotFound."""

    async def keepalive_many(self, leases: Sequence[int]) -> list[int]:
        """Renew every lease at once; the TTL of each in order, 0 for a lease the store does
        not know. Raises StoreUnavailable when the store cannot be reached (then some leases
        may have been renewed: renewing again is harmless)."""

    async def time_to_live(self, lease: int) -> int:
        """Seconds left on the lease. Raises LeaseNotFound."""

    async def revoke(self, lease: int) -> None:
        """Revoke the lease and delete every key bound to it. Raises LeaseNotFound."""

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> PutResult:
        """Write the key (bound to the lease when not 0); returns the previous value."""

    async def get(self, key: bytes) -> KeyValue | None: ...

    async def delete(self, key: bytes) -> KeyValue | None:
        """Delete the key; returns what it held, or None when it did not exist."""

    async def txn(self, expect: Mapping[bytes, int], ops: Sequence[Put | Delete]) -> TxnResult:
        """Apply ops atomically, at one new revision, when every key in expect has that
        mod_revision (0: the key must not exist); otherwise change nothing.

        A key appears at most once in ops. Raises LeaseNotFound for an unknown lease in a Put.
        """

    async def load(self, prefix: bytes) -> Snapshot:
        """Every key under the prefix, at one revision."""

    def watch(self, prefix: bytes, start_revision: int) -> AsyncIterator[list[Event]]:
        """Batches of events under the prefix from start_revision on, in revision order.

        Raises Compacted when start_revision is no longer available and
        StoreUnavailable when the stream breaks.
        """

    async def compact(self, revision: int) -> None:
        """Forget history before revision."""

    async def revision(self) -> int:
        """The current store revision (one round trip: also a health probe)."""

    async def close(self) -> None: ...
