"""The etcd store: the Store interface on an etcd v3 cluster, over gRPC.

On top of its own connections (connection.py: a grpc.aio channel and aetcd's generated stubs)
this module adds what a long-running server needs: TLS, a bounded dial, a re-login when the
auth token expires, rotation over several endpoints, a bound on every call, and a watch that
raises instead of hanging when etcd dies or stops answering.

Failures map onto the store errors: connection errors and timeouts raise StoreUnavailable
(never a raw grpc exception), "requested lease not found" raises LeaseNotFound and a
compacted watch start raises Compacted.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
from aetcd import rpc

from .base import (
    Compacted,
    Delete,
    Event,
    EventType,
    KeyValue,
    LeaseNotFound,
    Put,
    PutResult,
    Snapshot,
    StoreError,
    StoreUnavailable,
    TxnResult,
)
from .connection import EtcdConnection, Unauthenticated
from .leasestream import LeaseStream, StreamUnauthenticated

T = TypeVar("T")
log = logging.getLogger(__name__)

_LOAD_PAGE = 5_000  # keys per Range request when loading a prefix
_SWEEP_FLOOR = 4_096  # leases remembered before the first sweep of lapse times
_FORGET_AFTER = 60.0  # seconds past its lapse a lease is forgotten (etcd revoked it by then)


def _range_end(prefix: bytes) -> bytes:
    """The range_end that selects exactly the keys starting with prefix.

    Not aetcd.utils.prefix_range_end: for a prefix ending in 0xff it keeps the trailing bytes
    (b"a\xff" -> b"b\xff"), a range that reaches keys outside the prefix.
    """
    for i in reversed(range(len(prefix))):
        if prefix[i] < 0xFF:
            return prefix[:i] + bytes([prefix[i] + 1])
    return b"\0"  # b"" or only 0xff bytes: every key from prefix on


def _range_start(prefix: bytes) -> bytes:
    return prefix or b"\0"


def _kv(kv: Any) -> KeyValue:
    return KeyValue(bytes(kv.key), bytes(kv.value), int(kv.mod_revision), int(kv.lease))


def _event(event: Any) -> Event:
    kind = EventType.DELETE if event.type == rpc.Event.DELETE else EventType.PUT
    kv = event.kv
    return Event(kind, bytes(kv.key), bytes(kv.value), int(kv.mod_revision), int(kv.lease))


class EtcdStore:
    """The Store interface on etcd (v3 API, 3.4 or later).

    endpoints: (host, port) pairs of cluster members; one connection at a time, to the first
    that answers; after a StoreUnavailable the next call dials the next endpoint.
    ca/cert/key: PEM files; any of them switches to TLS (ca alone: server-verified TLS;
    cert+key: mutual TLS). user/password: etcd authentication, with a re-login once when the
    token has expired. Connecting (dial and login) is bounded by dial_timeout and every
    request by request_timeout; a watch that hears nothing for request_timeout probes etcd
    and raises StoreUnavailable when the probe fails.
    """

    def __init__(
        self,
        endpoints: list[tuple[str, int]],
        *,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        user: str | None = None,
        password: str | None = None,
        dial_timeout: float = 5.0,
        request_timeout: float = 5.0,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        if (user is None) != (password is None):
            raise ValueError("user and password go together")
        if (cert is None) != (key is None):
            raise ValueError("cert and key go together")
        self._endpoints = list(endpoints)
        self._user = user
        self._password = password
        self._dial_timeout = dial_timeout
        self._request_timeout = request_timeout
        self._credentials: grpc.ChannelCredentials | None = None
        self._ssl: ssl.SSLContext | None = None
        if ca is not None or cert is not None:
            # the same trust for the lease stream, which has its own connection (HTTP/2)
            self._ssl = ssl.create_default_context(cafile=ca)
            if cert is not None and key is not None:
                self._ssl.load_cert_chain(cert, key)
            self._ssl.set_alpn_protocols(["h2"])
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=Path(ca).read_bytes() if ca else None,
                private_key=Path(key).read_bytes() if key else None,
                certificate_chain=Path(cert).read_bytes() if cert else None,
            )
        self._client: EtcdConnection | None = None
        self._next = 0  # index of the endpoint to dial first
        self._connect_lock = asyncio.Lock()
        self._closed = False
        self._keepalives: LeaseStream | None = None
        # lease -> loop time from which etcd may count it expired: the send time of its last
        # grant or renewal from here plus its TTL (etcd starts the TTL when the request arrives)
        self._lapses: dict[int, float] = {}
        self._sweep_at = _SWEEP_FLOOR
        self._closing: set[asyncio.Future[None]] = set()  # connections being closed

    # connection

    async def _connection(self) -> EtcdConnection:
        self._check_open()
        conn = self._client
        if conn is not None and conn.healthy:
            return conn
        async with self._connect_lock:
            self._check_open()
            conn = self._client
            if conn is not None:
                if conn.healthy:
                    return conn
                await self._drop(conn)
            return await self._dial()

    async def _dial(self) -> EtcdConnection:
        """Connect to the first endpoint that answers, starting at self._next."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._dial_timeout
        errors = []
        for attempt in range(len(self._endpoints)):
            index = (self._next + attempt) % len(self._endpoints)
            host, port = self._endpoints[index]
            conn = EtcdConnection(
                host,
                port,
                credentials=self._credentials,
                user=self._user,
                password=self._password,
                timeout=self._request_timeout,
            )
            try:
                async with asyncio.timeout_at(deadline):
                    await conn.connect()
            except TimeoutError:
                errors.append(f"{conn.endpoint}: no connection within the dial timeout")
            except StoreUnavailable as e:
                errors.append(str(e))
            except BaseException:  # e.g. wrong user or password
                await conn.close()
                raise
            else:
                if self._closed:
                    await conn.close()
                    self._check_open()
                self._next = index
                self._client = conn
                return conn
            await conn.close()
            if loop.time() >= deadline:
                break
        self._next = (self._next + 1) % len(self._endpoints)
        raise StoreUnavailable("cannot connect to etcd: " + "; ".join(errors))

    def _release(self, conn: EtcdConnection) -> bool:
        """Stop using a failed connection (the next call dials the next endpoint); False
        when it was released already."""
        if self._client is not conn:
            return False
        self._client = None
        self._next = (self._next + 1) % len(self._endpoints)
        return True

    async def _drop(self, conn: EtcdConnection) -> None:
        """Forget a failed connection and close it."""
        self._release(conn)
        await conn.close()

    def _forget(self, conn: EtcdConnection) -> None:
        """_drop for callers that cannot await: released at once, closed in the background
        (EtcdStore.close waits for it)."""
        if self._release(conn):
            closing = asyncio.ensure_future(conn.close())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    async def _call(self, op: Callable[[EtcdConnection], Awaitable[T]]) -> T:
        """Run one request: bounded in time, errors mapped, one re-login on an expired token.

        A connection that failed is closed by its request() and replaced by the next call.
        """
        conn = await self._connection()
        relogged = False
        while True:
            try:
                async with conn.request():
                    return await op(conn)
            except Unauthenticated:
                if self._user is None or relogged:
                    raise
                relogged = True
                await conn.login()
            except StoreUnavailable:
                self._check_open()
                raise

    # leases

    async def grant(self, ttl: int, lease_id: int = 0) -> int:
        request = rpc.LeaseGrantRequest(TTL=ttl, ID=lease_id)
        sent = asyncio.get_running_loop().time()
        response = await self._call(lambda c: c.lease.LeaseGrant(request, **c.call_args))
        if response.error:
            raise StoreError(f"lease grant failed: {response.error}")
        self._note(int(response.ID), sent, int(response.TTL))
        return int(response.ID)

    async def keepalive(self, lease: int) -> int:
        """Renew the lease over the shared LeaseKeepAlive stream (leasestream.py).

        Every caller writes its request on one long-lived bidirectional stream and waits for
        the answer with its lease ID (answers for one ID come back in request order), instead
        of opening a stream per call. Bounded by request_timeout (one timer per stream, not
        one per call); a broken or silent stream fails every pending call with
        StoreUnavailable and the next call opens a new one. A lease that may have expired
        is asked about first, off the stream (see keepalive_many).
        """
        ttl = (await self.keepalive_many([lease]))[0]
        if ttl <= 0:
            raise LeaseNotFound(f"lease {lease:x} not found")
        return ttl

    async def keepalive_many(self, leases: Sequence[int]) -> list[int]:
        """Renew every lease on the shared LeaseKeepAlive stream: all requests written at
        once, the answers awaited together (one round trip for the batch, not one each).

        etcd serves a stream one request at a time, and holds the renewal of a lease that
        has expired but is not revoked yet until it is revoked: at most 1,000 revocations a
        second, so with many leases expired at once, seconds. Every renewal behind it on
        the stream waits as long, and their leases can expire meanwhile: a cascade. So a
        lease that may have expired by now (as far as this process renewed it: its
        lapse time has passed) is not sent on the stream but asked about with
        LeaseTimeToLive, which etcd answers at once: renewed only when it still has a
        second or more (another replica renewed it), else 0 like an unknown one.
        """
        if not leases:
            return []
        now = asyncio.get_running_loop().time()
        lapses = self._lapses
        doubtful = sorted({lease for lease in leases if lapses.get(lease, now + 1) <= now})
        if not doubtful:
            return await self._renew_many(leases)
        remaining = await asyncio.gather(*(self._remaining(lease) for lease in doubtful))
        lapsed = {lease for lease, left in zip(doubtful, remaining, strict=True) if left < 1}
        for lease in lapsed:
            lapses.pop(lease, None)
        alive = [lease for lease in leases if lease not in lapsed]
        ttl_of = dict(zip(alive, await self._renew_many(alive), strict=True)) if alive else {}
        return [ttl_of.get(lease, 0) for lease in leases]

    async def _remaining(self, lease: int) -> int:
        """Whole seconds etcd gives the lease: 0 or less when it has expired or has under a
        second left, -1 when etcd does not know it (revoked)."""
        request = rpc.LeaseTimeToLiveRequest(ID=lease, keys=False)
        try:
            response = await self._call(lambda c: c.lease.LeaseTimeToLive(request, **c.call_args))
        except LeaseNotFound:
            return -1
        return int(response.TTL)

    async def _renew_many(self, leases: Sequence[int]) -> list[int]:
        relogged = False
        loop = asyncio.get_running_loop()
        while True:
            conn = await self._connection()
            sent = loop.time()
            try:
                stream = self._lease_stream(conn)
                futures = [stream.send(lease) for lease in leases]
            except StoreUnavailable:
                self._check_open()
                raise
            answers = await asyncio.gather(*futures, return_exceptions=True)
            failures = [a for a in answers if isinstance(a, BaseException)]
            if not failures:
                ttls = [max(0, int(ttl)) for ttl in answers if not isinstance(ttl, BaseException)]
                for lease, ttl in zip(leases, ttls, strict=True):
                    self._note(lease, sent, ttl)
                return ttls
            if any(isinstance(f, StreamUnauthenticated) for f in failures):
                if self._user is None or relogged:
                    raise StoreError(f"etcd {conn.endpoint}: keepalive unauthenticated")
                relogged = True
                await conn.login()
                continue  # renewing a lease twice is harmless
            self._check_open()
            raise failures[0]

    def _note(self, lease: int, sent: float, ttl: int) -> None:
        """Remember when the lease may lapse (ttl 0: it is gone); now and then forget the
        leases long past that (revoked by now, so a renewal of one is answered at once)."""
        lapses = self._lapses
        if ttl > 0:
            lapses[lease] = sent + ttl
        else:
            lapses.pop(lease, None)
        if len(lapses) >= self._sweep_at:
            old = sent - _FORGET_AFTER
            for stale in [lease for lease, lapse in lapses.items() if lapse < old]:
                del lapses[stale]
            self._sweep_at = max(_SWEEP_FLOOR, 2 * len(lapses))

    def _lease_stream(self, conn: EtcdConnection) -> LeaseStream:
        stream = self._keepalives
        if stream is None or stream.client is not conn or stream.broken:
            if stream is not None:
                stream.close(StoreUnavailable("keepalive stream replaced"))
            stream = self._keepalives = LeaseStream(
                conn,
                conn.host,
                conn.port,
                ssl_context=self._ssl,
                token=conn.token,
                timeout=self._request_timeout,
                on_failure=lambda: self._forget(conn),
            )
        return stream

    async def time_to_live(self, lease: int) -> int:
        ttl = await self._remaining(lease)
        if ttl < 0:
            raise LeaseNotFound(f"lease {lease:x} not found")
        return ttl

    async def revoke(self, lease: int) -> None:
        self._lapses.pop(lease, None)
        request = rpc.LeaseRevokeRequest(ID=lease)
        await self._call(lambda c: c.lease.LeaseRevoke(request, **c.call_args))

    # keys

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> PutResult:
        request = rpc.PutRequest(key=key, value=value, lease=lease, prev_kv=True)
        response = await self._call(lambda c: c.kv.Put(request, **c.call_args))
        prev = _kv(response.prev_kv) if response.HasField("prev_kv") else None
        return PutResult(int(response.header.revision), prev)

    async def get(self, key: bytes) -> KeyValue | None:
        request = rpc.RangeRequest(key=key)
        response = await self._call(lambda c: c.kv.Range(request, **c.call_args))
        return _kv(response.kvs[0]) if response.kvs else None

    async def delete(self, key: bytes) -> KeyValue | None:
        request = rpc.DeleteRangeRequest(key=key, prev_kv=True)
        response = await self._call(lambda c: c.kv.DeleteRange(request, **c.call_args))
        return _kv(response.prev_kvs[0]) if response.prev_kvs else None

    async def txn(self, expect: Mapping[bytes, int], ops: Sequence[Put | Delete]) -> TxnResult:
        """One etcd Txn: compare each key's mod_revision (0 matches a missing key), then the
        ops. etcd refuses a key that appears twice in ops (StoreError)."""
        request = rpc.TxnRequest()
        # filled in place: a group commit's transaction carries dozens of ops, and building
        # each message apart and copying it in costs three times as much
        compares = request.compare
        for key, revision in expect.items():
            compare = compares.add()
            compare.key = key
            compare.target = rpc.Compare.MOD
            compare.result = rpc.Compare.EQUAL
            compare.mod_revision = revision
        success = request.success
        for op in ops:
            if isinstance(op, Put):
                put = success.add().request_put
                put.key = op.key
                put.value = op.value
                put.lease = op.lease
            else:
                success.add().request_delete_range.key = op.key
        response = await self._call(lambda c: c.kv.Txn(request, **c.call_args))
        return TxnResult(bool(response.succeeded), int(response.header.revision))

    async def load(self, prefix: bytes, at: int = 0) -> Snapshot:
        """Every key under the prefix at one revision (the current one, or `at`: raises
        Compacted when it is gone), in pages pinned to that revision."""
        end = _range_end(prefix)
        for _ in range(3):
            items: list[KeyValue] = []
            start, revision = _range_start(prefix), at
            try:
                while True:
                    page = await self._range_page(start, end, revision)
                    revision = revision or int(page.header.revision)
                    items.extend(_kv(kv) for kv in page.kvs)
                    if not page.more or not page.kvs:
                        return Snapshot(revision, items)
                    start = bytes(page.kvs[-1].key) + b"\0"
            except _PageCompacted:
                if at:
                    raise Compacted(at) from None
                continue  # compacted between two pages: start again at a newer revision
        raise StoreUnavailable("load: the revision kept being compacted while paging")

    async def _range_page(self, start: bytes, end: bytes, revision: int) -> Any:
        request = rpc.RangeRequest(key=start, range_end=end, revision=revision, limit=_LOAD_PAGE)

        async def op(c: EtcdConnection) -> Any:
            try:
                return await c.kv.Range(request, **c.call_args)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.OUT_OF_RANGE and revision:
                    raise _PageCompacted from e
                raise

        return await self._call(op)

    async def revision(self) -> int:
        """The current revision, from the member's status (needs no key permission).

        Raises StoreUnavailable when the member has no leader (it cannot serve writes).
        """
        request = rpc.StatusRequest()
        response = await self._call(lambda c: c.maintenance.Status(request, **c.call_args))
        if not response.leader:
            raise StoreUnavailable("etcd has no leader")
        return int(response.header.revision)

    async def compact(self, revision: int) -> None:
        """Forget history before revision; like the embedded store, an already compacted
        revision is a no-op and a future one compacts up to the current revision."""
        request = rpc.CompactionRequest(revision=revision)

        async def op(c: EtcdConnection) -> bool:
            try:
                await c.kv.Compact(request, **c.call_args)
            except grpc.aio.AioRpcError as e:
                details = e.details() or ""
                if e.code() == grpc.StatusCode.OUT_OF_RANGE and "compacted" in details:
                    return True
                if e.code() == grpc.StatusCode.OUT_OF_RANGE and "future" in details:
                    return False
                raise
            return True

        if not await self._call(op):
            await self.compact(min(revision, await self.revision()))

    # watches

    async def watch(self, prefix: bytes, start_revision: int) -> AsyncIterator[list[Event]]:
        """Batches of events (one per etcd watch response) from start_revision on.

        Each watch has its own gRPC stream. The stream requires a leader (etcd cancels it
        when its member loses quorum); after request_timeout of silence the store is probed
        and a failed probe raises StoreUnavailable, so a hung etcd cannot stall the watch.
        Ends without error when the store is closed.
        """
        conn = await self._connection()
        call = await self._open_watch(conn, prefix, start_revision)
        try:
            while True:
                try:
                    response = await self._read_watch(conn, call)
                except StoreError:
                    if self._closed:
                        return
                    raise
                if response is grpc.aio.EOF:
                    raise StoreUnavailable(f"etcd {conn.endpoint}: watch stream ended")
                if response.compact_revision:
                    raise Compacted(int(response.compact_revision))
                if response.canceled:
                    raise StoreUnavailable(f"watch canceled by etcd: {response.cancel_reason}")
                if response.events:
                    yield [_event(e) for e in response.events]
        finally:
            call.cancel()

    async def _read_watch(self, conn: EtcdConnection, call: Any) -> Any:
        """The watch stream's next response; the member is probed after every
        request_timeout of silence (the read itself stays pending: the stream lives on)."""
        read = asyncio.ensure_future(call.read())
        try:
            done, _ = await asyncio.wait({read}, timeout=self._request_timeout)
            while not done:
                await self._probe(conn)
                done, _ = await asyncio.wait({read}, timeout=self._request_timeout)
        except BaseException:
            read.cancel()
            raise
        async with conn.request("watch", bounded=False):
            return read.result()

    async def _open_watch(self, conn: EtcdConnection, prefix: bytes, start_revision: int) -> Any:
        """A watch stream whose create request etcd accepted."""
        create = rpc.WatchRequest(
            create_request=rpc.WatchCreateRequest(
                key=_range_start(prefix),
                range_end=_range_end(prefix),
                start_revision=start_revision,
            )
        )
        relogged = False
        while True:
            metadata = (*(conn.metadata or ()), ("hasleader", "true"))
            call = conn.watch.Watch(metadata=metadata)
            try:
                async with conn.request("watch create"):
                    await call.write(create)
                    response = await call.read()
            except BaseException:
                call.cancel()
                raise
            if response is grpc.aio.EOF:
                call.cancel()
                raise StoreUnavailable(f"etcd {conn.endpoint}: watch stream ended")
            if response.created and not response.canceled:
                return call
            call.cancel()
            if response.compact_revision:
                raise Compacted(int(response.compact_revision))
            # an expired auth token shows up as "permission denied": log in again, once
            if self._user is not None and not relogged:
                relogged = True
                await conn.login()
                continue
            raise StoreError(f"etcd refused the watch: {response.cancel_reason}")

    async def _probe(self, conn: EtcdConnection) -> None:
        """Raise StoreUnavailable unless etcd answers on the watch's connection."""
        if self._client is not conn or conn.closed:
            # another call dropped the connection: the watch's stream is gone with it
            raise StoreUnavailable(f"etcd {conn.endpoint}: connection closed")
        try:
            async with conn.request("watch probe"):
                response = await conn.maintenance.Status(rpc.StatusRequest(), **conn.call_args)
        except Unauthenticated:
            return  # the token expired; the connection itself is fine
        if not response.leader:
            raise StoreUnavailable("etcd has no leader")

    # lifecycle

    async def close(self) -> None:
        self._closed = True
        if self._keepalives is not None:
            self._keepalives.close(StoreError("store is closed"))
            self._keepalives = None
        async with self._connect_lock:
            conn, self._client = self._client, None
        if conn is not None:
            await conn.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("store is closed")


class _PageCompacted(Exception):
    """A load page's pinned revision was compacted away."""
