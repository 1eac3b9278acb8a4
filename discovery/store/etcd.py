"""The etcd store: the Store interface on an etcd v3 cluster, over gRPC with aetcd.

aetcd provides the generated gRPC stubs and the client skeleton; on top of it this module adds
what a long-running server needs: TLS, a bounded dial, a re-login when the auth token expires,
rotation over several endpoints, a bound on every call, and a watch that raises instead of
hanging when etcd dies or stops answering.

Failures map onto the store errors: connection errors and timeouts raise StoreUnavailable
(never a raw grpc or aetcd exception), "requested lease not found" raises LeaseNotFound and a
compacted watch start raises Compacted.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aetcd
import grpc
from aetcd import rpc

from .base import (
    Compacted,
    Event,
    EventType,
    KeyValue,
    LeaseNotFound,
    PutResult,
    Snapshot,
    StoreError,
    StoreUnavailable,
)
from .leasestream import LeaseStream, StreamUnauthenticated

T = TypeVar("T")
log = logging.getLogger(__name__)

# gRPC codes that mean "etcd is unreachable or did not answer": the call may be retried,
# on another endpoint. etcd itself answers UNAVAILABLE for "no leader" and "request timed out".
_UNAVAILABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)
_LEASE_NOT_FOUND = "requested lease not found"
_LOAD_PAGE = 5_000  # keys per Range request when loading a prefix
_CHANNEL_OPTIONS = {
    "grpc.max_receive_message_length": 64 * 1024 * 1024,
    # A restarted etcd is found again quickly (gRPC's default backoff grows to 120 s).
    "grpc.initial_reconnect_backoff_ms": 500,
    "grpc.max_reconnect_backoff_ms": 2_000,
}


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


def _target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Client(aetcd.Client):  # type: ignore[misc]  # aetcd has no type hints
    """aetcd's client with what it lacks: TLS, a dial bounded in time, and re-login.

    connect() follows aetcd.Client.connect (same attributes and stubs) but opens a secure
    channel when credentials are given, and fails fast when the endpoint refuses.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None,
        password: str | None,
        timeout: float,
        credentials: grpc.ChannelCredentials | None,
    ) -> None:
        super().__init__(
            host=host,
            port=port,
            username=username,
            password=password,
            timeout=timeout,
            options=dict(_CHANNEL_OPTIONS),
        )
        self._credentials = credentials
        self.watchstub: Any = None

    @property
    def endpoint(self) -> str:
        return _target(self._host, self._port)

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        options = list(self._options.items())
        if self._credentials is not None:
            self.channel = rpc.secure_channel(self.endpoint, self._credentials, options=options)
        else:
            self.channel = rpc.insecure_channel(self.endpoint, options=options)
        await self._wait_ready()
        if self._username is not None:
            await self.authenticate()
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self.watchstub = rpc.WatchStub(self.channel)
        self._connected.set()

    async def _wait_ready(self) -> None:
        """Until the channel is connected; raise as soon as a connection attempt fails."""
        state = self.channel.get_state(try_to_connect=True)
        while state != grpc.ChannelConnectivity.READY:
            if state in (
                grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                grpc.ChannelConnectivity.SHUTDOWN,
            ):
                raise aetcd.exceptions.ConnectionFailedError(f"cannot connect to {self.endpoint}")
            await self.channel.wait_for_state_change(state)
            state = self.channel.get_state(try_to_connect=True)

    async def authenticate(self) -> None:
        """Log in (again) and use the new token for every later call."""
        request = rpc.AuthenticateRequest(name=self._username, password=self._password)
        response = await rpc.AuthStub(self.channel).Authenticate(request, timeout=self._timeout)
        self.metadata = (("token", response.token),)

    @property
    def healthy(self) -> bool:
        """False once the channel has seen its connection fail (etcd died or went away)."""
        if self.channel is None:
            return False
        state = self.channel.get_state()
        return state not in (
            grpc.ChannelConnectivity.TRANSIENT_FAILURE,
            grpc.ChannelConnectivity.SHUTDOWN,
        )


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
        self._client: _Client | None = None
        self._next = 0  # index of the endpoint to dial first
        self._connect_lock = asyncio.Lock()
        self._closed = False
        self._keepalives: LeaseStream | None = None
        self._closing: set[asyncio.Future[None]] = set()  # connections being closed

    # connection

    async def _connection(self) -> _Client:
        self._check_open()
        client = self._client
        if client is not None and client.healthy:
            return client
        async with self._connect_lock:
            self._check_open()
            client = self._client
            if client is not None:
                if client.healthy:
                    return client
                await self._drop(client)
            return await self._dial()

    async def _dial(self) -> _Client:
        """Connect to the first endpoint that answers, starting at self._next."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._dial_timeout
        errors = []
        for attempt in range(len(self._endpoints)):
            index = (self._next + attempt) % len(self._endpoints)
            host, port = self._endpoints[index]
            client = _Client(
                host,
                port,
                username=self._user,
                password=self._password,
                timeout=self._request_timeout,
                credentials=self._credentials,
            )
            try:
                async with asyncio.timeout_at(deadline):
                    await client.connect()
            except TimeoutError:
                errors.append(f"{client.endpoint}: no connection within the dial timeout")
            except grpc.aio.AioRpcError as e:
                if e.code() not in _UNAVAILABLE:  # e.g. wrong user or password
                    await client.close()
                    raise StoreError(f"etcd {client.endpoint}: {e.details()}") from e
                errors.append(f"{client.endpoint}: {e.details()}")
            except aetcd.exceptions.ClientError as e:
                errors.append(str(e))
            else:
                if self._closed:
                    await client.close()
                    self._check_open()
                self._next = index
                self._client = client
                return client
            await client.close()
            if loop.time() >= deadline:
                break
        self._next = (self._next + 1) % len(self._endpoints)
        raise StoreUnavailable("cannot connect to etcd: " + "; ".join(errors))

    def _release(self, client: _Client) -> bool:
        """Stop using a failed connection (the next call dials the next endpoint); False
        when it was released already."""
        if self._client is not client:
            return False
        self._client = None
        self._next = (self._next + 1) % len(self._endpoints)
        return True

    async def _drop(self, client: _Client) -> None:
        """Forget a failed connection and close it."""
        self._release(client)
        await client.close()

    def _forget(self, client: _Client) -> None:
        """_drop for callers that cannot await: released at once, closed in the background
        (EtcdStore.close waits for it)."""
        if self._release(client):
            closing = asyncio.ensure_future(client.close())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    async def _failure(self, client: _Client, error: grpc.aio.AioRpcError) -> StoreError:
        """The store error for a failed call, dropping the connection if it is broken."""
        code, details = error.code(), error.details() or ""
        if _LEASE_NOT_FOUND in details:
            return LeaseNotFound(details)
        if code in _UNAVAILABLE:
            await self._drop(client)
            return StoreUnavailable(f"etcd {client.endpoint}: {code.name}: {details}")
        return StoreError(f"etcd {client.endpoint}: {code.name}: {details}")

    async def _call(self, op: Callable[[_Client], Awaitable[T]]) -> T:
        """Run one request: bounded in time, errors mapped, one re-login on an expired token."""
        client = await self._connection()
        relogged = False
        while True:
            try:
                async with asyncio.timeout(self._request_timeout + 0.5):
                    return await op(client)
            except TimeoutError:
                await self._drop(client)
                raise StoreUnavailable(
                    f"etcd {client.endpoint}: no answer within {self._request_timeout} s"
                ) from None
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # we are being cancelled
                # gRPC cancels the calls of a channel being closed (store closed or rotated)
                self._check_open()
                raise StoreUnavailable(f"etcd {client.endpoint}: connection closed") from None
            except grpc.aio.AioRpcError as e:
                if (
                    e.code() == grpc.StatusCode.UNAUTHENTICATED
                    and self._user is not None
                    and not relogged
                ):
                    relogged = True
                    await self._relogin(client)
                    continue
                raise await self._failure(client, e) from e

    async def _relogin(self, client: _Client) -> None:
        """A new auth token for the connection (the old one expired)."""
        try:
            async with asyncio.timeout(self._request_timeout + 0.5):
                await client.authenticate()
        except TimeoutError:
            await self._drop(client)
            raise StoreUnavailable(f"etcd {client.endpoint}: login timed out") from None
        except grpc.aio.AioRpcError as e:
            raise await self._failure(client, e) from e

    def _timeout_args(self, client: _Client) -> dict[str, Any]:
        return {"timeout": self._request_timeout, "metadata": client.metadata}

    # leases

    async def grant(self, ttl: int) -> int:
        async def op(c: _Client) -> Any:
            return await c.leasestub.LeaseGrant(
                rpc.LeaseGrantRequest(TTL=ttl), **self._timeout_args(c)
            )

        response = await self._call(op)
        if response.error:
            raise StoreError(f"lease grant failed: {response.error}")
        return int(response.ID)

    async def keepalive(self, lease: int) -> int:
        """Renew the lease over the shared LeaseKeepAlive stream (leasestream.py).

        Every caller writes its request on one long-lived bidirectional stream and waits for
        the answer with its lease ID (answers for one ID come back in request order), instead
        of opening a stream per call. Bounded by request_timeout (one timer per stream, not
        one per call); a broken or silent stream fails every pending call with
        StoreUnavailable and the next call opens a new one.
        """
        relogged = False
        while True:
            client = await self._connection()
            try:
                ttl = await self._lease_stream(client).send(lease)
            except StreamUnauthenticated:
                if self._user is None or relogged:
                    raise StoreError(f"etcd {client.endpoint}: keepalive unauthenticated") from None
                relogged = True
                await self._relogin(client)
                continue
            except StoreUnavailable:
                self._check_open()
                raise
            if ttl <= 0:
                raise LeaseNotFound(f"lease {lease:x} not found")
            return ttl

    def _lease_stream(self, client: _Client) -> LeaseStream:
        stream = self._keepalives
        if stream is None or stream.client is not client or stream.broken:
            if stream is not None:
                stream.close(StoreUnavailable("keepalive stream replaced"))
            stream = self._keepalives = LeaseStream(
                client,
                client._host,
                client._port,
                ssl_context=self._ssl,
                token=client.metadata[0][1] if client.metadata else None,
                timeout=self._request_timeout,
                on_failure=lambda: self._forget(client),
            )
        return stream

    async def time_to_live(self, lease: int) -> int:
        async def op(c: _Client) -> Any:
            return await c.leasestub.LeaseTimeToLive(
                rpc.LeaseTimeToLiveRequest(ID=lease, keys=False), **self._timeout_args(c)
            )

        response = await self._call(op)
        if response.TTL < 0:
            raise LeaseNotFound(f"lease {lease:x} not found")
        return int(response.TTL)

    async def revoke(self, lease: int) -> None:
        async def op(c: _Client) -> Any:
            return await c.leasestub.LeaseRevoke(
                rpc.LeaseRevokeRequest(ID=lease), **self._timeout_args(c)
            )

        await self._call(op)

    # keys

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> PutResult:
        async def op(c: _Client) -> Any:
            request = rpc.PutRequest(key=key, value=value, lease=lease, prev_kv=True)
            return await c.kvstub.Put(request, **self._timeout_args(c))

        response = await self._call(op)
        prev = _kv(response.prev_kv) if response.HasField("prev_kv") else None
        return PutResult(int(response.header.revision), prev)

    async def get(self, key: bytes) -> KeyValue | None:
        async def op(c: _Client) -> Any:
            return await c.kvstub.Range(rpc.RangeRequest(key=key), **self._timeout_args(c))

        response = await self._call(op)
        return _kv(response.kvs[0]) if response.kvs else None

    async def delete(self, key: bytes) -> KeyValue | None:
        async def op(c: _Client) -> Any:
            request = rpc.DeleteRangeRequest(key=key, prev_kv=True)
            return await c.kvstub.DeleteRange(request, **self._timeout_args(c))

        response = await self._call(op)
        return _kv(response.prev_kvs[0]) if response.prev_kvs else None

    async def load(self, prefix: bytes) -> Snapshot:
        """Every key under the prefix at one revision, in pages pinned to that revision."""
        end = _range_end(prefix)
        for _ in range(3):
            items: list[KeyValue] = []
            start, revision = _range_start(prefix), 0
            try:
                while True:
                    page = await self._range_page(start, end, revision)
                    revision = revision or int(page.header.revision)
                    items.extend(_kv(kv) for kv in page.kvs)
                    if not page.more or not page.kvs:
                        return Snapshot(revision, items)
                    start = bytes(page.kvs[-1].key) + b"\0"
            except _PageCompacted:
                continue  # compacted between two pages: start again at a newer revision
        raise StoreUnavailable("load: the revision kept being compacted while paging")

    async def _range_page(self, start: bytes, end: bytes, revision: int) -> Any:
        async def op(c: _Client) -> Any:
            request = rpc.RangeRequest(
                key=start, range_end=end, revision=revision, limit=_LOAD_PAGE
            )
            try:
                return await c.kvstub.Range(request, **self._timeout_args(c))
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.OUT_OF_RANGE and revision:
                    raise _PageCompacted from e
                raise

        return await self._call(op)

    async def revision(self) -> int:
        """The current revision, from the member's status (needs no key permission).

        Raises StoreUnavailable when the member has no leader (it cannot serve writes).
        """

        async def op(c: _Client) -> Any:
            return await c.maintenancestub.Status(rpc.StatusRequest(), **self._timeout_args(c))

        response = await self._call(op)
        if not response.leader:
            raise StoreUnavailable("etcd has no leader")
        return int(response.header.revision)

    async def compact(self, revision: int) -> None:
        """Forget history before revision; like the embedded store, an already compacted
        revision is a no-op and a future one compacts up to the current revision."""

        async def op(c: _Client) -> bool:
            try:
                await c.kvstub.Compact(
                    rpc.CompactionRequest(revision=revision), **self._timeout_args(c)
                )
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
        client = await self._connection()
        call = await self._open_watch(client, prefix, start_revision)
        read: asyncio.Future[Any] | None = None
        try:
            while True:
                read = asyncio.ensure_future(call.read())
                done, _ = await asyncio.wait({read}, timeout=self._request_timeout)
                while not done:
                    await self._probe(client)
                    done, _ = await asyncio.wait({read}, timeout=self._request_timeout)
                if read.cancelled():  # gRPC cancels streams of a channel being closed
                    if self._closed:
                        return
                    raise StoreUnavailable(f"etcd {client.endpoint}: watch stream closed")
                try:
                    response = read.result()
                except grpc.aio.AioRpcError as e:
                    if self._closed:
                        return
                    raise await self._failure(client, e) from e
                finally:
                    read = None
                if response is grpc.aio.EOF:
                    raise StoreUnavailable(f"etcd {client.endpoint}: watch stream ended")
                if response.compact_revision:
                    raise Compacted(int(response.compact_revision))
                if response.canceled:
                    raise StoreUnavailable(f"watch canceled by etcd: {response.cancel_reason}")
                if response.events:
                    yield [_event(e) for e in response.events]
        finally:
            if read is not None:
                read.cancel()
            call.cancel()

    async def _open_watch(self, client: _Client, prefix: bytes, start_revision: int) -> Any:
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
            metadata = (*(client.metadata or ()), ("hasleader", "true"))
            call = client.watchstub.Watch(metadata=metadata)
            try:
                async with asyncio.timeout(self._request_timeout):
                    await call.write(create)
                    response = await call.read()
            except TimeoutError:
                call.cancel()
                await self._drop(client)
                raise StoreUnavailable(
                    f"etcd {client.endpoint}: watch not created in time"
                ) from None
            except asyncio.CancelledError:
                call.cancel()
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                self._check_open()
                raise StoreUnavailable(f"etcd {client.endpoint}: connection closed") from None
            except grpc.aio.AioRpcError as e:
                call.cancel()
                raise await self._failure(client, e) from e
            except BaseException:
                call.cancel()
                raise
            if response is grpc.aio.EOF:
                call.cancel()
                raise StoreUnavailable(f"etcd {client.endpoint}: watch stream ended")
            if response.created and not response.canceled:
                return call
            call.cancel()
            if response.compact_revision:
                raise Compacted(int(response.compact_revision))
            # an expired auth token shows up as "permission denied": log in again, once
            if self._user is not None and not relogged:
                relogged = True
                await self._relogin(client)
                continue
            raise StoreError(f"etcd refused the watch: {response.cancel_reason}")

    async def _probe(self, client: _Client) -> None:
        """Raise StoreUnavailable unless etcd answers on the watch's connection."""

        async def op(c: _Client) -> Any:
            return await c.maintenancestub.Status(rpc.StatusRequest(), **self._timeout_args(c))

        if self._client is not client or client.maintenancestub is None:
            # another call dropped the connection (aetcd's close() unsets the stubs): the
            # watch's stream is gone with it
            raise StoreUnavailable(f"etcd {client.endpoint}: connection closed")
        try:
            async with asyncio.timeout(self._request_timeout + 0.5):
                response = await op(client)
        except TimeoutError:
            await self._drop(client)
            raise StoreUnavailable(f"etcd {client.endpoint}: watch probe timed out") from None
        except grpc.aio.UsageError:  # the channel is closing
            raise StoreUnavailable(f"etcd {client.endpoint}: connection closed") from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being cancelled
            # another call timed out and closed the connection: gRPC cancelled this one
            raise StoreUnavailable(f"etcd {client.endpoint}: connection closed") from None
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                return  # the token expired; the connection itself is fine
            raise await self._failure(client, e) from e
        if not response.leader:
            raise StoreUnavailable("etcd has no leader")

    # lifecycle

    async def close(self) -> None:
        self._closed = True
        if self._keepalives is not None:
            self._keepalives.close(StoreError("store is closed"))
            self._keepalives = None
        async with self._connect_lock:
            client, self._client = self._client, None
        if client is not None:
            await client.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("store is closed")


class _PageCompacted(Exception):
    """A load page's pinned revision was compacted away."""
