"""The store contract: one suite, run unchanged against the embedded store and a real etcd.

Then etcd-only tests: etcd killed, hung (SIGSTOP) and restarted under a live store, several
endpoints, authentication with token expiry, and mutual TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import etcd_support  # tests/ is on sys.path: pytest's rootdir conftest, tests/ no package
import grpc
import pytest
from aetcd import rpc

from discovery.store.base import (
    Compacted,
    Delete,
    Event,
    EventType,
    KeyValue,
    LeaseExists,
    LeaseNotFound,
    Put,
    Store,
    StoreError,
    StoreUnavailable,
)
from discovery.store.connection import EtcdConnection
from discovery.store.embedded import EmbeddedStore
from discovery.store.etcd import EtcdStore

EtcdServer = etcd_support.EtcdServer
open_etcd_store = etcd_support.open_etcd_store
etcd_server = etcd_support.etcd_server  # the fixtures
etcd_store = etcd_support.etcd_store

P = b"/t/v1/instances/"
UNKNOWN_LEASE = 0x1234_5678_9ABC
EXPIRY_WAIT = 10.0  # generous bound on "a 2 s lease expires" (measured: about 2.5 s on etcd)


# fixtures and helpers


@pytest.fixture(params=["embedded", "etcd"])
def backend(request: pytest.FixtureRequest) -> EtcdServer | None:
    if request.param == "etcd":
        server: EtcdServer = request.getfixturevalue("etcd_server")
        return server
    return None


@pytest.fixture
async def store(backend: EtcdServer | None) -> AsyncIterator[Store]:
    if backend is None:
        embedded = EmbeddedStore()
        try:
            yield embedded
        finally:
            await embedded.close()
    else:
        async with open_etcd_store(backend) as etcd:
            yield etcd


class Watch:
    """An open store watch, read event by event with a timeout."""

    def __init__(self, stream: AsyncIterator[list[Event]]) -> None:
        self.stream = stream
        self.pending: list[Event] = []
        self.batches: list[list[Event]] = []

    async def next_batch(self, within: float = 5.0) -> list[Event]:
        batch = await asyncio.wait_for(anext(self.stream), within)
        self.batches.append(batch)
        return batch

    async def take(self, count: int, within: float = 5.0) -> list[Event]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while len(self.pending) < count:
            self.pending.extend(await self.next_batch(max(0.01, deadline - loop.time())))
        taken, self.pending = self.pending[:count], self.pending[count:]
        return taken


@contextlib.asynccontextmanager
async def watching(store: Store, prefix: bytes, start_revision: int) -> AsyncIterator[Watch]:
    stream = store.watch(prefix, start_revision)
    try:
        yield Watch(stream)
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


def summary(events: list[Event]) -> list[tuple[EventType, bytes, bytes, int, int]]:
    return [(e.type, e.key, e.value, e.mod_revision, e.lease) for e in events]


async def assert_lease_unknown(store: Store, lease: int) -> None:
    """Every lease call on a lease the store does not know raises LeaseNotFound."""
    for call in (store.keepalive, store.time_to_live, store.revoke):
        with pytest.raises(LeaseNotFound):
            await call(lease)


async def wait_for_delete(watch: Watch, key: bytes, within: float) -> Event:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        (event,) = await watch.take(1, max(0.01, deadline - loop.time()))
        if event.type is EventType.DELETE and event.key == key:
            return event


# the contract


async def test_grant_put_get(store: Store) -> None:
    lease = await store.grant(10)
    result = await store.put(P + b"a", b"one", lease)
    assert result.prev is None
    assert await store.get(P + b"a") == KeyValue(P + b"a", b"one", result.revision, lease)
    assert await store.get(P + b"missing") is None
    assert 0 < await store.time_to_live(lease) <= 10
    plain = await store.put(P + b"b", b"two")
    assert plain.revision > result.revision
    assert await store.get(P + b"b") == KeyValue(P + b"b", b"two", plain.revision, 0)
    assert await store.revision() == plain.revision


async def test_grant_with_a_chosen_id_succeeds_once_while_the_lease_lives(store: Store) -> None:
    chosen = 0x5EED_0000_0042
    assert await store.grant(10, chosen) == chosen
    with pytest.raises(LeaseExists):
        await store.grant(10, chosen)  # what a second worker of the same node sees
    assert await store.keepalive(chosen) == 10
    picked = await store.grant(10)
    assert picked not in (0, chosen)
    await store.revoke(chosen)
    assert await store.grant(10, chosen) == chosen  # gone: the ID can be granted again


async def test_put_returns_previous_value(store: Store) -> None:
    lease = await store.grant(10)
    first = await store.put(P + b"a", b"one", lease)
    second = await store.put(P + b"a", b"two")
    assert second.revision > first.revision
    assert second.prev == KeyValue(P + b"a", b"one", first.revision, lease)
    third = await store.put(P + b"a", b"three", lease)
    assert third.prev == KeyValue(P + b"a", b"two", second.revision, 0)


async def test_delete_returns_previous_value_or_none(store: Store) -> None:
    put = await store.put(P + b"a", b"one")
    before = await store.revision()
    assert await store.delete(P + b"a") == KeyValue(P + b"a", b"one", put.revision, 0)
    assert await store.revision() == before + 1
    assert await store.get(P + b"a") is None
    assert await store.delete(P + b"a") is None
    assert await store.delete(P + b"never") is None
    assert await store.revision() == before + 1  # deleting nothing writes nothing


async def test_txn_creates_only_when_absent_at_one_revision(store: Store) -> None:
    lease = await store.grant(10)
    start = await store.revision()
    async with watching(store, P, start + 1) as watch:
        made = await store.txn(
            {P + b"a": 0, P + b"b": 0}, [Put(P + b"a", b"1", lease), Put(P + b"b", b"2", lease)]
        )
        assert made.succeeded and made.revision == start + 1
        events = await watch.take(2)
    assert {(e.key, e.mod_revision, e.lease) for e in events} == {
        (P + b"a", made.revision, lease),
        (P + b"b", made.revision, lease),
    }
    # one key present: nothing is written
    again = await store.txn({P + b"c": 0, P + b"a": 0}, [Put(P + b"c", b"3")])
    assert not again.succeeded and again.revision == made.revision
    assert await store.get(P + b"c") is None
    assert await store.revision() == made.revision


async def test_txn_compares_mod_revisions_and_deletes(store: Store) -> None:
    first = await store.put(P + b"a", b"1")
    await store.put(P + b"b", b"2")
    stale = await store.txn({P + b"a": first.revision - 1}, [Delete(P + b"a")])
    assert not stale.succeeded
    gone = await store.txn(
        {P + b"a": first.revision}, [Delete(P + b"a"), Delete(P + b"b"), Delete(P + b"none")]
    )
    assert gone.succeeded and gone.revision == await store.revision()
    assert await store.get(P + b"a") is None and await store.get(P + b"b") is None
    # no condition at all: always applies
    plain = await store.txn({}, [Put(P + b"c", b"3")])
    assert plain.succeeded and (await store.get(P + b"c")) == KeyValue(
        P + b"c", b"3", plain.revision, 0
    )


async def test_txn_keys_die_with_their_lease(store: Store) -> None:
    lease = await store.grant(10)
    await store.txn({}, [Put(P + b"a", b"1", lease), Put(P + b"b", b"2", lease)])
    await store.revoke(lease)
    assert (await store.load(P)).items == []
    with pytest.raises(LeaseNotFound):
        await store.txn({}, [Put(P + b"c", b"1", UNKNOWN_LEASE)])
    assert await store.get(P + b"c") is None


async def test_load_returns_the_prefix_at_one_revision(store: Store) -> None:
    lease = await store.grant(30)
    written = {}
    for name in (b"ns/svc/b", b"ns/svc/a", b"ns/other/c", b"\xff\x00"):
        written[P + name] = (await store.put(P + name, b"v-" + name, lease)).revision
    outside = [P[:-1], P[:-1] + b"z", b"/t/v1/instancez/x", b"/t/v0/instances/a", b"/s"]
    for key in outside:
        await store.put(key, b"outside")

    snapshot = await store.load(P)
    assert snapshot.revision == await store.revision()
    assert snapshot.items == [
        KeyValue(key, b"v-" + key[len(P) :], revision, lease)
        for key, revision in sorted(written.items())
    ]
    sub = await store.load(P + b"ns/svc/")
    assert [kv.key for kv in sub.items] == [P + b"ns/svc/a", P + b"ns/svc/b"]
    empty = await store.load(b"/nothing/here/")
    assert empty.items == [] and empty.revision == snapshot.revision
    everything = await store.load(b"")
    assert {kv.key for kv in everything.items} == set(written) | set(outside)


async def test_prefix_ending_in_0xff_selects_only_its_keys(store: Store) -> None:
    prefix = b"/t/a\xff"
    inside = [prefix, prefix + b"\x00", prefix + b"\xff\xff"]
    outside = [b"/t/a", b"/t/a\xfe", b"/t/b", b"/t/b\xff", b"/t/b\xff\x01"]
    start = await store.revision() + 1
    for key in outside + inside:
        await store.put(key, b"v")
    assert [kv.key for kv in (await store.load(prefix)).items] == sorted(inside)
    async with watching(store, prefix, start) as watch:
        events = await watch.take(len(inside))
        await store.put(b"/t/b\xff", b"again")
        await store.put(prefix, b"again")
        events += await watch.take(1)
    assert [e.key for e in events] == [*inside, prefix]


async def test_watch_replays_history_then_delivers_live_events(store: Store) -> None:
    lease = await store.grant(30)
    await store.put(P + b"old", b"before R")
    a = await store.put(P + b"a", b"1", lease)
    b = await store.put(P + b"b", b"2")
    await store.put(b"/elsewhere", b"not watched")
    deleted = await store.delete(P + b"a")
    assert deleted is not None
    delete_revision = await store.revision()
    start = a.revision

    async with watching(store, P, start) as watch:
        replay = await watch.take(3)
        assert summary(replay) == [
            (EventType.PUT, P + b"a", b"1", a.revision, lease),
            (EventType.PUT, P + b"b", b"2", b.revision, 0),
            (EventType.DELETE, P + b"a", b"", delete_revision, 0),
        ]
        live_put = await store.put(P + b"c", b"3", lease)
        await store.put(b"/elsewhere", b"still not watched")
        live_update = await store.put(P + b"b", b"2b")
        await store.delete(P + b"c")
        live = await watch.take(3)
        assert summary(live) == [
            (EventType.PUT, P + b"c", b"3", live_put.revision, lease),
            (EventType.PUT, P + b"b", b"2b", live_update.revision, 0),
            (EventType.DELETE, P + b"c", b"", await store.revision(), 0),
        ]
        revisions = [e.mod_revision for e in replay + live]
        assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)
        assert all(batch for batch in watch.batches)

    async with watching(store, P, delete_revision) as watch:  # a later start skips earlier events
        (first,) = await watch.take(1)
        assert (first.type, first.key, first.mod_revision) == (
            EventType.DELETE,
            P + b"a",
            delete_revision,
        )


async def test_revoke_deletes_the_lease_keys_and_the_watch_sees_it(store: Store) -> None:
    lease = await store.grant(30)
    other = await store.grant(30)
    await store.put(P + b"a", b"1", lease)
    await store.put(P + b"b", b"2", lease)
    kept = await store.put(P + b"c", b"3", other)
    start = await store.revision() + 1
    async with watching(store, P, start) as watch:
        await store.revoke(lease)
        events = await watch.take(2)
        assert {(e.type, e.key) for e in events} == {
            (EventType.DELETE, P + b"a"),
            (EventType.DELETE, P + b"b"),
        }
        assert all(e.mod_revision == start for e in events)  # one revision for the revoke
    assert await store.get(P + b"a") is None
    assert await store.get(P + b"b") is None
    assert await store.get(P + b"c") == KeyValue(P + b"c", b"3", kept.revision, other)
    await assert_lease_unknown(store, lease)


async def test_lease_expires_on_its_own(store: Store) -> None:
    lease = await store.grant(2)
    granted = time.monotonic()
    put = await store.put(P + b"a", b"1", lease)
    async with watching(store, P, put.revision + 1) as watch:
        event = await wait_for_delete(watch, P + b"a", EXPIRY_WAIT)
    elapsed = time.monotonic() - granted
    assert event.mod_revision > put.revision
    assert 1.5 <= elapsed < EXPIRY_WAIT
    assert await store.get(P + b"a") is None
    await assert_lease_unknown(store, lease)


async def test_keepalive_extends_the_lease(store: Store) -> None:
    lease = await store.grant(2)
    await store.put(P + b"a", b"1", lease)
    until = time.monotonic() + 3.0
    while time.monotonic() < until:
        assert await store.keepalive(lease) == 2
        await asyncio.sleep(0.5)  # heartbeat interval, well inside the 2 s TTL
    assert (await store.get(P + b"a")) is not None
    assert await store.time_to_live(lease) > 0


async def test_keepalive_many_renews_each_and_names_unknown_ones(store: Store) -> None:
    leases = [await store.grant(ttl) for ttl in (2, 3, 2)]
    await store.put(P + b"a", b"1", leases[0])
    await store.revoke(leases[1])
    assert await store.keepalive_many([]) == []
    until = time.monotonic() + 3.0
    while time.monotonic() < until:  # past the 2 s TTL: only the renewals keep them
        batch = [leases[0], leases[1], UNKNOWN_LEASE, leases[2], leases[0]]
        assert await store.keepalive_many(batch) == [2, 0, 0, 2, 2]
        await asyncio.sleep(0.5)
    assert (await store.get(P + b"a")) is not None
    assert await store.time_to_live(leases[2]) > 0


async def test_unknown_lease_raises_lease_not_found(store: Store) -> None:
    await assert_lease_unknown(store, UNKNOWN_LEASE)
    before = await store.revision()
    with pytest.raises(LeaseNotFound):
        await store.put(P + b"a", b"1", UNKNOWN_LEASE)
    assert await store.get(P + b"a") is None
    assert await store.revision() == before


async def test_watch_from_a_compacted_revision_raises_compacted(store: Store) -> None:
    for i in range(5):
        await store.put(P + b"k%d" % i, b"v")
    current = await store.revision()
    await store.compact(current)
    with pytest.raises(Compacted) as raised:
        async with watching(store, P, current - 2) as watch:
            await watch.next_batch()
    assert raised.value.compact_revision == current

    async with watching(store, P, current) as watch:  # the compaction revision itself is kept
        (event,) = await watch.take(1)
        assert (event.key, event.mod_revision) == (P + b"k4", current)

    await store.compact(current)  # again: a no-op
    await store.compact(current + 100)  # a future revision: compacts up to now
    assert await store.revision() == current
    await store.put(P + b"after", b"v")
    snapshot = await store.load(P)
    assert len(snapshot.items) == 6


async def test_watch_ends_when_the_store_closes(store: Store) -> None:
    stream = store.watch(P, await store.revision() + 1)
    reader = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.2)  # let the watch start
    await store.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(reader, 5)
    with pytest.raises(StoreError):
        await store.get(P + b"a")


# etcd only


def elapsed_since(start: float) -> float:
    return time.monotonic() - start


async def assert_unavailable(call: Callable[[], Awaitable[Any]], within: float) -> None:
    start = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await call()
    assert elapsed_since(start) < within


async def test_etcd_killed_calls_raise_unavailable_within_the_timeout(
    etcd_server: EtcdServer,
) -> None:
    async with open_etcd_store(etcd_server, request_timeout=2.0) as store:
        lease = await store.grant(30)
        await store.put(P + b"a", b"1", lease)
        etcd_server.stop()
        calls: list[Callable[[], Awaitable[Any]]] = [
            lambda: store.get(P + b"a"),
            lambda: store.put(P + b"a", b"2"),
            lambda: store.delete(P + b"a"),
            lambda: store.load(P),
            lambda: store.revision(),
            lambda: store.grant(5),
            lambda: store.keepalive(lease),
            lambda: store.time_to_live(lease),
            lambda: store.revoke(lease),
            lambda: store.compact(1),
        ]
        for call in calls:
            await assert_unavailable(call, within=2.5)

        async def first_batch() -> list[Event]:
            async with watching(store, P, 1) as watch:
                return await watch.next_batch()

        await assert_unavailable(first_batch, within=2.5)


async def test_etcd_killed_breaks_an_open_watch(etcd_server: EtcdServer) -> None:
    async with open_etcd_store(etcd_server) as store:
        put = await store.put(P + b"a", b"1")
        async with watching(store, P, put.revision) as watch:
            await watch.take(1)
            reader = asyncio.ensure_future(watch.next_batch(within=10))
            await asyncio.sleep(0.1)
            etcd_server.stop()
            start = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await reader
            assert elapsed_since(start) < 2.0


async def test_etcd_restarted_the_same_store_works_again(etcd_server: EtcdServer) -> None:
    async with open_etcd_store(etcd_server) as store:
        lease = await store.grant(60)
        put = await store.put(P + b"a", b"1", lease)
        etcd_server.stop()
        with pytest.raises(StoreUnavailable):
            await store.get(P + b"a")
        await asyncio.to_thread(etcd_server.start)
        # the first call after the restart already works: no store re-creation, no retry
        assert await store.get(P + b"a") == KeyValue(P + b"a", b"1", put.revision, lease)
        assert await store.keepalive(lease) == 60  # leases survive a restart
        async with watching(store, P, put.revision + 1) as watch:  # resume after last seen
            again = await store.put(P + b"b", b"2")
            (event,) = await watch.take(1)
            assert (event.key, event.mod_revision) == (P + b"b", again.revision)


async def test_etcd_restarted_while_idle_first_call_works(etcd_server: EtcdServer) -> None:
    async with open_etcd_store(etcd_server) as store:
        await store.put(P + b"a", b"1")
        etcd_server.stop()
        await asyncio.sleep(1.5)  # no call while etcd is down: the channel sees it by itself
        await asyncio.to_thread(etcd_server.start)
        assert (await store.get(P + b"a")) is not None


async def test_etcd_hung_calls_and_watch_raise_unavailable(etcd_server: EtcdServer) -> None:
    async with open_etcd_store(etcd_server, request_timeout=1.0) as store:
        put = await store.put(P + b"a", b"1")
        lease = await store.grant(60)
        assert await store.keepalive(lease) == 60  # the lease stream is open
        async with watching(store, P, put.revision) as watch:
            await watch.take(1)
            reader = asyncio.ensure_future(watch.next_batch(within=10))
            await asyncio.sleep(0.1)
            etcd_server.pause()  # SIGSTOP: sockets stay open, nothing answers
            try:
                start = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    await reader  # no error from gRPC: found by the idle probe
                assert elapsed_since(start) < 3.0  # request_timeout of silence + probe timeout
                await assert_unavailable(lambda: store.put(P + b"b", b"2"), within=3.0)
                await assert_unavailable(lambda: store.keepalive(lease), within=3.0)
                await assert_unavailable(lambda: store.keepalive_many([lease]), within=3.0)
            finally:
                etcd_server.resume()
        # etcd answers again: the same store recovers, renewals on a new stream too
        assert (await store.get(P + b"a")) is not None
        assert await store.keepalive(lease) == 60
        assert await store.keepalive_many([lease, lease]) == [60, 60]


async def test_etcd_several_endpoints_skip_a_dead_one(etcd_server: EtcdServer) -> None:
    (dead_port,) = etcd_support.free_ports(1)
    endpoints = [("127.0.0.1", dead_port), etcd_server.endpoint]
    store = EtcdStore(endpoints, request_timeout=2.0, dial_timeout=2.0)
    try:
        start = time.monotonic()
        await store.put(P + b"a", b"1")
        assert elapsed_since(start) < 2.0
        assert (await store.get(P + b"a")) is not None
        lease = await store.grant(30)
        assert await store.keepalive(lease) == 30  # the lease stream goes where gRPC went
    finally:
        await store.close()


async def test_etcd_no_endpoint_answers(tmp_path: Path) -> None:
    ports = etcd_support.free_ports(2)
    store = EtcdStore([("127.0.0.1", port) for port in ports], dial_timeout=1.0)
    try:
        await assert_unavailable(lambda: store.revision(), within=1.5)
        await assert_unavailable(lambda: store.revision(), within=1.5)
    finally:
        await store.close()


async def _enable_auth(server: EtcdServer, user: str, password: str, prefix: bytes) -> None:
    """Root user, and a user that may read and write only under prefix; auth on."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.client_port}") as channel:
        auth = rpc.AuthStub(channel)
        await auth.UserAdd(rpc.AuthUserAddRequest(name="root", password="rootpw"))
        await auth.RoleAdd(rpc.AuthRoleAddRequest(name="root"))
        await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"))
        await auth.UserAdd(rpc.AuthUserAddRequest(name=user, password=password))
        await auth.RoleAdd(rpc.AuthRoleAddRequest(name="discovery"))
        permission = rpc.Permission(
            permType=rpc.Permission.READWRITE,
            key=prefix,
            range_end=prefix[:-1] + bytes([prefix[-1] + 1]),
        )
        await auth.RoleGrantPermission(
            rpc.AuthRoleGrantPermissionRequest(name="discovery", perm=permission)
        )
        await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user=user, role="discovery"))
        await auth.AuthEnable(rpc.AuthEnableRequest())


@pytest.fixture
def auth_etcd_server(tmp_path: Path) -> Any:
    server = EtcdServer(
        tmp_path / "etcd",
        binary=etcd_support.require_etcd(),
        extra_args=["--auth-token-ttl", "1"],  # simple tokens expire after 1 s unused
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_etcd_auth_logs_in_again_when_the_token_expires(
    auth_etcd_server: EtcdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _enable_auth(auth_etcd_server, "disc", "secret", P)
    logins = 0
    login = EtcdConnection.login

    async def counting(self: EtcdConnection) -> None:
        nonlocal logins
        logins += 1
        await login(self)

    monkeypatch.setattr(EtcdConnection, "login", counting)
    async with open_etcd_store(auth_etcd_server, user="disc", password="secret") as store:
        put = await store.put(P + b"a", b"1")
        assert await store.revision() == put.revision
        lease = await store.grant(60)
        assert await store.keepalive(lease) == 60  # the lease stream carries the token
        assert await store.keepalive_many([lease]) == [60]
        await asyncio.sleep(2.5)  # the token expires (simple token, TTL 1 s, not used)
        assert (await store.get(P + b"a")) is not None  # re-login, same call succeeds
        assert logins == 2
        await asyncio.sleep(2.5)
        async with watching(store, P, put.revision) as watch:  # a watch opened on a stale token
            (event,) = await watch.take(1)
            assert event.key == P + b"a"
            assert logins == 3
            await asyncio.sleep(2.5)  # an established watch outlives its token
            later = await store.put(P + b"b", b"2")
            (event,) = await watch.take(1)
            assert event.mod_revision == later.revision
        with pytest.raises(StoreError) as raised:  # outside the user's prefix: refused
            await store.put(b"/other", b"x")
        assert not isinstance(raised.value, StoreUnavailable)
    async with open_etcd_store(auth_etcd_server, user="disc", password="wrong") as store:
        with pytest.raises(StoreError) as raised:
            await store.revision()
        assert not isinstance(raised.value, StoreUnavailable)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
async def test_etcd_mutual_tls(tmp_path: Path) -> None:
    tls = etcd_support.make_tls_files(tmp_path / "tls")
    server = EtcdServer(tmp_path / "etcd", binary=etcd_support.require_etcd(), tls=tls)
    await asyncio.to_thread(server.start)
    try:
        async with open_etcd_store(server) as store:  # ca, cert and key from server.tls
            lease = await store.grant(30)
            assert await store.keepalive(lease) == 30  # the lease stream: TLS with ALPN h2
            put = await store.put(P + b"a", b"1")
            async with watching(store, P, put.revision) as watch:
                (event,) = await watch.take(1)
                assert event.key == P + b"a"
        async with open_etcd_store(server, ca=tls.ca) as store:  # no client certificate
            with pytest.raises(StoreUnavailable):
                await store.revision()
        plaintext = EtcdStore([server.endpoint], dial_timeout=1.0)  # no TLS to a TLS port
        try:
            with pytest.raises(StoreUnavailable):
                await plaintext.revision()
        finally:
            await plaintext.close()
    finally:
        server.stop()


async def test_etcd_keepalives_beyond_the_flow_control_windows(etcd_server: EtcdServer) -> None:
    """20,000 renewals in flight at once: about 300 KB of requests, over HTTP/2's default
    64 KiB windows, so the lease stream must wait for etcd's WINDOW_UPDATEs; and answers in
    request order for leases renewed many times each.

    Every renewal's deadline starts when it is queued, and the last one is answered only after
    all 20,000 went through etcd and this process: about 1 s on a quiet machine here, over the
    fixture's 2.5 s on a loaded one (with the HTTP/2 framing by hand as well as with h2). The
    deadline is not what this test is about, so it gets room."""
    async with open_etcd_store(etcd_server, request_timeout=30.0) as store:
        leases = [await store.grant(ttl) for ttl in range(30, 130)]
        calls = [store.keepalive(leases[i % len(leases)]) for i in range(20_000)]
        ttls = await asyncio.gather(*calls)
        assert ttls == [30 + i % len(leases) for i in range(20_000)]
        await store.revoke(leases[0])
        with pytest.raises(LeaseNotFound):
            await store.keepalive(leases[0])
        assert await store.keepalive(leases[1]) == 31  # the stream survives a refusal


async def test_etcd_cancelled_keepalives_leave_the_stream_in_step(etcd_store: EtcdStore) -> None:
    """Callers that give up still take their answers: later renewals get their own."""
    short, long = await etcd_store.grant(30), await etcd_store.grant(90)
    tasks = [asyncio.ensure_future(etcd_store.keepalive(short)) for _ in range(50)]
    await asyncio.sleep(0)
    for task in tasks:
        task.cancel()
    assert await etcd_store.keepalive(long) == 90
    assert await etcd_store.keepalive(short) == 30


async def test_etcd_an_expired_lease_does_not_hold_back_the_renewals_behind_it(
    etcd_server: EtcdServer,
) -> None:
    """etcd serves a keepalive stream one request at a time and holds the renewal of a lease
    that has expired, but is not revoked yet, until it is revoked; it revokes at most 1,000
    expired leases a second. With 2,500 leases expiring together, the last ones wait about
    two seconds for their revoke, and a renewal of one of them held every renewal behind it
    on the stream as long (or failed the stream after the request timeout): live leases went
    unrenewed, expired in turn, and heartbeats collapsed in a cascade. Now the live ones are
    renewed, and the expired one answered 0, before etcd revokes it (its key still there)."""
    async with open_etcd_store(etcd_server, request_timeout=2.0) as store:
        gate = asyncio.Semaphore(64)

        async def grant(ttl: int) -> int:
            async with gate:
                return await store.grant(ttl)

        live = await asyncio.gather(*(grant(60) for _ in range(200)))
        dying = await asyncio.gather(*(grant(8) for _ in range(2_500)))
        last = dying[-1]
        await store.put(b"/t/last", b"", last)
        # renewed together, they expire together, within 8 s from now; the last one renewed
        # is about the last one etcd revokes
        assert min(await store.keepalive_many(dying)) == 8
        renewed = time.monotonic()
        await asyncio.sleep(8.2)  # until every one of them has expired (a time, not an event)
        ttls = await store.keepalive_many([last, *live])
        took = time.monotonic() - renewed - 8.2
        assert ttls == [0] + [60] * len(live)
        assert await store.get(b"/t/last") is not None, (
            f"the renewals took {took:.2f} s: they waited until etcd had revoked the expired lease"
        )
