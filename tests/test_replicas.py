"""Replicas sharing one real etcd: every replica answers what etcd holds, through outages.

Two in-process replicas (A and B) run against one etcd process started by the fixtures. No
mocks: etcd is killed and restarted for real, compacted for real, and a small TCP proxy in this
file cuts replica B off from etcd. Waits await cache changes (`Cache.wait`); only states that
raise no event (store health in /readyz) are polled, always with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import dns.rcode
import etcd_support  # tests/ is on sys.path: pytest's rootdir conftest, tests/ no package
import pytest
from conftest import Client, make_config
from waiting import eventually

from discovery.config import HostPort
from discovery.model import InstanceKey, Registration, decode_registration, instances_prefix
from discovery.server import run_server
from discovery.store.base import Snapshot
from discovery.store.etcd import EtcdStore

pytestmark = pytest.mark.etcd

EtcdServer = etcd_support.EtcdServer
open_etcd_store = etcd_support.open_etcd_store
etcd_server = etcd_support.etcd_server  # the fixture

ZONE = "cluster.local"
PREFIX = "/discovery/"
HOST = "127.0.0.1"

# (ns, svc, inst, address, ports, lease, mod_revision): what a replica answers for one key
Record = tuple[str, str, str, str, tuple[tuple[str, int, str], ...], int, int]


def path(ns: str, svc: str, inst: str) -> str:
    return f"/v1/services/{ns}/{svc}/instances/{inst}"


def fqdn(ns: str, svc: str, inst: str | None = None) -> str:
    service = f"{svc}.{ns}.svc.{ZONE}"
    return service if inst is None else f"{inst}.{service}"


def live(client: Client, ns: str, svc: str, inst: str) -> bool:
    return inst in client.server.registry.instances((ns, svc))


def report(what: str, seconds: float) -> None:
    """Measured figures, shown with `pytest -s`."""
    print(f"\n[replicas] {what}: {seconds * 1000:.1f} ms")


# replicas and the view of etcd


def replica_config(endpoint: tuple[str, int], **overrides: Any) -> Any:
    settings: dict[str, Any] = {
        "etcd": (HostPort(*endpoint),),
        "min_ttl": 1,
        # roomy: a loaded machine must not turn a slow answer into a 503 (the hung-etcd test
        # sets 1 s, to see writes fail in time)
        "etcd_request_timeout": 3.0,
        "etcd_dial_timeout": 3.0,
    }
    settings.update(overrides)
    return make_config(**settings)


@contextlib.asynccontextmanager
async def replica(
    endpoint: tuple[str, int], session: aiohttp.ClientSession, **overrides: Any
) -> AsyncIterator[Client]:
    async with run_server(replica_config(endpoint, **overrides)) as server:
        yield Client(server, session)


async def synced(*clients: Client, within: float = 10.0) -> None:
    for client in clients:
        assert await client.wait_cache(lambda c=client: c.server.registry.synced, within), (
            "the replica never finished its first load"
        )


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def etcd(etcd_server: EtcdServer) -> AsyncIterator[EtcdStore]:
    """A client of our own, to read etcd's contents and compact it."""
    async with open_etcd_store(etcd_server) as store:
        yield store


@pytest.fixture
async def pair(
    etcd_server: EtcdServer, session: aiohttp.ClientSession
) -> AsyncIterator[tuple[Client, Client]]:
    async with (
        replica(etcd_server.endpoint, session) as a,
        replica(etcd_server.endpoint, session) as b,
    ):
        await synced(a, b)
        yield a, b


def etcd_instances(snapshot: Snapshot) -> dict[InstanceKey, tuple[Registration, int, int]]:
    """What etcd holds under the prefix: registration, lease and mod revision per instance."""
    held = {}
    for kv in snapshot.items:
        key = InstanceKey.from_store_key(PREFIX, kv.key)
        spec = decode_registration(kv.value)
        assert key is not None and spec is not None, kv
        held[key] = (spec, kv.lease, kv.mod_revision)
    return held


def _ports(spec: Registration) -> tuple[tuple[str, int, str], ...]:
    return tuple((p.name, p.port, p.protocol) for p in spec.ports)


def etcd_records(snapshot: Snapshot) -> set[Record]:
    return {
        (k.namespace, k.service, k.name, spec.address, _ports(spec), lease, revision)
        for k, (spec, lease, revision) in etcd_instances(snapshot).items()
    }


def cache_records(client: Client) -> set[Record]:
    registry = client.server.registry
    records = {
        (ns, svc, name, i.spec.address, _ports(i.spec), i.lease, i.revision)
        for (ns, svc), instances in registry.services().items()
        for name, i in instances.items()
    }
    assert registry.instance_count() == len(records), "the indexes disagree"
    return records


async def in_sync(clients: Iterable[Client], etcd: EtcdStore, within: float = 15.0) -> Snapshot:
    """Wait until every replica's cache reaches etcd's revision, then compare them exactly.

    A lease may expire between the read of etcd and the comparison: then read again.
    """
    clients = list(clients)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        snapshot = await etcd.load(instances_prefix(PREFIX))
        for client in clients:
            cache = client.server.registry
            target = snapshot.revision
            reached = await cache.wait(
                lambda c=cache, r=target: c.revision >= r, max(0.0, deadline - loop.time())
            )
            assert reached, (
                f"replica at revision {cache.revision}, etcd at {snapshot.revision}, "
                f"store healthy={cache.store_healthy}"
            )
        if all(c.server.registry.revision == snapshot.revision for c in clients):
            break
        assert loop.time() < deadline, "etcd kept changing while the replicas were compared"
    expected = etcd_records(snapshot)
    for name, client in zip("AB", clients, strict=False):
        actual = cache_records(client)
        assert actual == expected, (
            f"replica {name} at revision {snapshot.revision}: "
            f"ghosts {sorted(actual - expected)}, missing {sorted(expected - actual)}"
        )
    return snapshot


# HTTP and DNS helpers


async def metric(client: Client, name: str) -> float:
    status, body, _ = await client.request("GET", "/metrics")
    assert status == 200
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def readyz(client: Client) -> tuple[int, Any]:
    status, body, _ = await client.request("GET", "/readyz")
    return status, body


async def store_state(client: Client, state: str, within: float = 10.0) -> float:
    """Wait until /readyz reports the store as `state` ("ok" or "degraded"); always 200."""

    async def check() -> bool:
        status, body = await readyz(client)
        assert status == 200, body
        return bool(body["store"] == state)

    return await eventually(check, f"/readyz store={state}", within)


async def answer(client: Client, name: str, rdtype: str = "A") -> tuple[int, set[str]]:
    response = await client.query(name, rdtype)
    return response.rcode(), {rr.to_text() for rrset in response.answer for rr in rrset}


async def assert_unavailable(client: Client, method: str, url: str, **kwargs: Any) -> None:
    status, body, headers = await client.request(method, url, **kwargs)
    assert status == 503, (method, url, status, body)
    assert headers["Content-Type"].startswith("application/problem+json"), headers
    assert int(headers["Retry-After"]) >= 1
    assert body["status"] == 503 and body["title"] and body["detail"]


# 1. register on one replica, resolve on the other; heartbeats, expiry and delete across them


async def test_register_on_a_resolve_on_b_heartbeat_expiry_delete(
    pair: tuple[Client, Client],
) -> None:
    a, b = pair
    name = fqdn("default", "web", "web-1")

    # a long poll on B is woken by a registration made through A
    status, _, headers = await b.request("GET", "/v1/services/default/web")
    assert status == 200
    index = headers["X-Discovery-Index"]
    poll = asyncio.create_task(b.request("GET", f"/v1/services/default/web?index={index}&wait=10s"))
    started = time.monotonic()
    first = await a.register("default", "web", "web-1", expect=201, address="10.0.0.1", ttl=2,
                             ports=[{"name": "http", "port": 8080}])  # fmt: skip
    assert await b.wait_cache(lambda: live(b, "default", "web", "web-1"))
    assert await answer(b, name) == (dns.rcode.NOERROR, {"10.0.0.1"})
    report("PUT on A -> answered by B", time.monotonic() - started)
    async with asyncio.timeout(2):
        status, body, headers = await poll
    assert status == 200 and [i["name"] for i in body["instances"]] == ["web-1"], body
    assert int(headers["X-Discovery-Index"]) > int(index)
    srv = await b.query(f"_http._tcp.{fqdn('default', 'web')}", "SRV")
    assert [rr.to_text() for rrset in srv.answer for rr in rrset] == [f"0 100 8080 {name}."]

    # heartbeats through B keep A's registration well past its 2 s lease
    last_beat = time.monotonic()
    beats = 0
    while time.monotonic() - started < 5.0:
        await asyncio.sleep(0.5)  # paces the heartbeats, well inside the lease
        last_beat = time.monotonic()
        status, body, _ = await b.request("PUT", path("default", "web", "web-1") + "/heartbeat")
        assert status == 200, body
        assert body["lease"]["id"] == first["lease"]["id"]
        beats += 1
        for client in (a, b):
            assert live(client, "default", "web", "web-1")
    assert beats >= 8
    for client in (a, b):
        assert await answer(client, name) == (dns.rcode.NOERROR, {"10.0.0.1"})

    # no more heartbeats: both replicas drop the name within a second of the lease's end
    expires = last_beat + 2  # etcd renewed the lease after we sent the heartbeat
    gone: dict[str, float] = {}

    async def until_gone(label: str, client: Client) -> None:
        removed = await client.wait_cache(
            lambda: not live(client, "default", "web", "web-1"), timeout=6
        )
        assert removed, f"replica {label} still answers {name}"
        response = await client.query(name)
        gone[label] = time.monotonic() - expires
        assert response.rcode() == dns.rcode.NXDOMAIN, response

    await asyncio.gather(until_gone("A", a), until_gone("B", b))
    for label, lag in gone.items():
        report(f"lease expiry -> NXDOMAIN on {label}", lag)
        assert -0.05 <= lag <= 1.0, (label, lag)

    # DELETE through B removes what A registered, on both
    await a.register("default", "web", "web-2", expect=201, address="10.0.0.2", ttl=30)
    assert await b.wait_cache(lambda: live(b, "default", "web", "web-2"))
    status, _, _ = await b.request("DELETE", path("default", "web", "web-2"))
    assert status == 204
    for client in (a, b):
        assert await client.wait_cache(lambda c=client: not live(c, "default", "web", "web-2"))
        assert (await client.query(fqdn("default", "web", "web-2"))).rcode() == dns.rcode.NXDOMAIN
        assert (await client.query(fqdn("default", "web"))).rcode() == dns.rcode.NXDOMAIN
    status, _, _ = await a.request("DELETE", path("default", "web", "web-2"))
    assert status == 404

    # propagation, PUT sent to A -> B answers over DNS, for a few more names
    lags = []
    for i in range(30):
        sent = time.monotonic()
        await a.register("default", "batch", f"b-{i}", expect=201, address=f"10.0.1.{i + 1}")
        assert await b.wait_cache(lambda i=i: live(b, "default", "batch", f"b-{i}"))
        rcode, addresses = await answer(b, fqdn("default", "batch", f"b-{i}"))
        lags.append(time.monotonic() - sent)
        assert (rcode, addresses) == (dns.rcode.NOERROR, {f"10.0.1.{i + 1}"})
    lags.sort()
    report("PUT on A -> answered by B, median of 30", lags[len(lags) // 2])
    report("PUT on A -> answered by B, max of 30", lags[-1])
    assert lags[-1] < 0.5, lags


# 2. etcd dies: stale but available; writes 503; it comes back: everything resumes by itself


async def test_etcd_down_replicas_serve_stale_then_resume(
    pair: tuple[Client, Client], etcd_server: EtcdServer, etcd: EtcdStore
) -> None:
    a, b = pair
    names = {}
    for i in range(6):
        via = (a, b)[i % 2]
        svc = ("api", "db")[i % 3 % 2]
        inst = f"{svc}-{i}"
        address = f"10.1.0.{i + 1}"
        await via.register("prod", svc, inst, expect=201, address=address, ttl=60)
        names[fqdn("prod", svc, inst)] = {address}
        names.setdefault(fqdn("prod", svc), set()).add(address)
    await in_sync((a, b), etcd)
    for client in (a, b):
        assert await store_state(client, "ok") >= 0

    etcd_server.stop()
    for client in (a, b):
        await store_state(client, "degraded")
        for name, addresses in names.items():
            assert await answer(client, name) == (dns.rcode.NOERROR, addresses), name
        status, body = await readyz(client)
        assert (status, body["status"]) == (200, "ready")
        assert body["seconds_since_store_contact"] is not None
        assert await metric(client, "discovery_store_up") == 0
        assert await metric(client, "discovery_store_last_contact_seconds") > 0
        assert await metric(client, "discovery_watch_revision") == client.server.registry.revision
        # every write needs etcd: 503 with Retry-After, never a 500
        await assert_unavailable(client, "PUT", path("prod", "api", "api-9"),
                                 json={"address": "10.1.0.9"})  # fmt: skip
        await assert_unavailable(client, "PUT", path("prod", "api", "api-0"),
                                 json={"address": "10.1.0.99"})  # fmt: skip
        await assert_unavailable(client, "PUT", path("prod", "api", "api-0") + "/heartbeat")
        await assert_unavailable(client, "PUT", path("prod", "api", "api-7") + "/heartbeat")
        await assert_unavailable(client, "DELETE", path("prod", "db", "db-1"))
        # reads come from memory: one instance, without the expiry only etcd knows
        status, body, _ = await client.request("GET", path("prod", "api", "api-0"))
        assert status == 200, body
        assert body["address"] == "10.1.0.1" and "expires_at" not in body["lease"]
        # and nothing changed in what it answers
        for name, addresses in names.items():
            assert await answer(client, name) == (dns.rcode.NOERROR, addresses), name

    await asyncio.to_thread(etcd_server.start)  # same data dir and ports
    restarted = time.monotonic()
    await b.register("prod", "api", "api-9", expect=201, address="10.1.0.9", ttl=60)
    for label, client in (("A", a), ("B", b)):
        assert await client.wait_cache(lambda c=client: live(c, "prod", "api", "api-9"), 15), (
            f"replica {label} never saw the write made after the restart"
        )
        assert await answer(client, fqdn("prod", "api", "api-9")) == (
            dns.rcode.NOERROR,
            {"10.1.0.9"},
        )
        report(f"etcd healthy again -> new write answered by {label}", time.monotonic() - restarted)
    status, _, _ = await a.request("PUT", path("prod", "api", "api-0") + "/heartbeat")
    assert status == 200  # the lease survived the restart
    status, _, _ = await a.request("DELETE", path("prod", "db", "db-1"))
    assert status == 204
    await in_sync((a, b), etcd)
    for client in (a, b):
        await store_state(client, "ok")
        assert await metric(client, "discovery_store_up") == 1


async def test_etcd_hung_replicas_answer_at_once_and_writes_fail_in_time(
    etcd_server: EtcdServer, etcd: EtcdStore, session: aiohttp.ClientSession
) -> None:
    """SIGSTOP: etcd holds its sockets open and answers nothing, the worst kind of outage."""
    timeouts = {"etcd_request_timeout": 1.0, "etcd_dial_timeout": 1.0}
    async with (
        replica(etcd_server.endpoint, session, **timeouts) as a,
        replica(etcd_server.endpoint, session, **timeouts) as b,
    ):
        await synced(a, b)
        await etcd_hung(a, b, etcd_server, etcd)


async def etcd_hung(a: Client, b: Client, etcd_server: EtcdServer, etcd: EtcdStore) -> None:
    await a.register("prod", "api", "api-1", expect=201, address="10.4.0.1", ttl=60)
    await in_sync((a, b), etcd)
    etcd_server.pause()
    try:
        for client in (a, b):
            await store_state(client, "degraded")
            started = time.monotonic()
            assert await answer(client, fqdn("prod", "api")) == (dns.rcode.NOERROR, {"10.4.0.1"})
            assert time.monotonic() - started < 0.5
            started = time.monotonic()
            await assert_unavailable(client, "PUT", path("prod", "api", "api-2"),
                                     json={"address": "10.4.0.2"})  # fmt: skip
            await assert_unavailable(client, "PUT", path("prod", "api", "api-1") + "/heartbeat")
            elapsed = time.monotonic() - started
            report("hung etcd: two writes answered 503 in", elapsed)
            assert elapsed < 2 * (1.0 + 0.5) + 1.0  # request timeout (+ grace) per write
            status, body = await readyz(client)
            assert status == 200 and body["status"] == "ready", body
    finally:
        etcd_server.resume()
    await b.register("prod", "api", "api-2", expect=201, address="10.4.0.2", ttl=60)
    for client in (a, b):
        assert await client.wait_cache(lambda c=client: live(c, "prod", "api", "api-2"), 15)
        assert await answer(client, fqdn("prod", "api")) == (
            dns.rcode.NOERROR,
            {"10.4.0.1", "10.4.0.2"},
        )
    await in_sync((a, b), etcd)
    for client in (a, b):
        await store_state(client, "ok")


async def test_etcd_flapping_under_writes_nothing_breaks(
    etcd_server: EtcdServer, etcd: EtcdStore, session: aiohttp.ClientSession
) -> None:
    """etcd hangs and comes back again and again while writes pour in through both replicas
    with short timeouts: every answer is a success, a 404 or a 503 (never a 500), the
    watchers only ever resume (no unexpected failure), and both end equal to etcd."""
    rng = random.Random(SEED)
    timeouts = {"etcd_request_timeout": 0.3, "etcd_dial_timeout": 0.3}
    async with (
        replica(etcd_server.endpoint, session, **timeouts) as a,
        replica(etcd_server.endpoint, session, **timeouts) as b,
    ):
        await synced(a, b)
        statuses: dict[int, int] = {}
        stop = asyncio.Event()

        async def writer(client: Client, k: int) -> None:
            while not stop.is_set():
                key = ("flap", f"s{k}", f"i{rng.randrange(8)}")
                op = rng.choice(["register", "heartbeat", "delete"])
                if op == "register":
                    address = f"10.5.{k}.{rng.randrange(1, 255)}"
                    status, body, _ = await client.request(
                        "PUT", path(*key), json={"address": address, "ttl": 30}
                    )
                elif op == "heartbeat":
                    status, body, _ = await client.request("PUT", path(*key) + "/heartbeat")
                else:
                    status, body, _ = await client.request("DELETE", path(*key))
                assert status in (200, 201, 204, 404, 503), (op, key, status, body)
                statuses[status] = statuses.get(status, 0) + 1
                await asyncio.sleep(0.01)

        writers = [asyncio.create_task(writer((a, b)[k % 2], k)) for k in range(4)]
        try:
            deadline = time.monotonic() + 12
            while time.monotonic() < deadline:
                await asyncio.sleep(rng.uniform(0.1, 0.8))  # etcd up
                etcd_server.pause()
                try:
                    await asyncio.sleep(rng.uniform(0.1, 1.2))  # etcd hung
                finally:
                    etcd_server.resume()
        finally:
            stop.set()
            await asyncio.gather(*writers)
        print(f"\n[replicas] flapping etcd: HTTP statuses {dict(sorted(statuses.items()))}")
        assert statuses.get(503) and statuses.get(201), statuses
        await in_sync((a, b), etcd, within=20)
        for client in (a, b):
            watcher = client.server.watcher
            assert watcher.failures == 0, "a watcher failed with something else than an outage"
            assert watcher.resumes > 0
            await store_state(client, "ok")


# 3. a replica that starts while etcd is down


async def test_replica_started_before_etcd_servfails_until_the_first_load(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    server = EtcdServer(tmp_path / "etcd", binary=etcd_support.require_etcd())
    try:
        async with replica(server.endpoint, session) as client:
            for name, rdtype in ((fqdn("default", "web"), "A"), (ZONE, "SOA"),
                                 (f"dns-version.{ZONE}", "TXT")):  # fmt: skip
                assert (await client.query(name, rdtype)).rcode() == dns.rcode.SERVFAIL, name
            assert (await client.query("example.com", "A")).rcode() == dns.rcode.REFUSED
            status, body = await readyz(client)
            assert status == 503 and body["status"] == "loading", body
            status, _, _ = await client.request("GET", "/healthz")
            assert status == 200
            assert await metric(client, "discovery_cache_synced") == 0
            await assert_unavailable(client, "PUT", path("default", "web", "web-1"),
                                     json={"address": "10.0.0.1"})  # fmt: skip

            await asyncio.to_thread(server.start)
            started = time.monotonic()
            await synced(client, within=15)
            report("etcd healthy -> first load", time.monotonic() - started)
            status, body = await readyz(client)
            assert status == 200 and body["status"] == "ready", body
            response = await client.query(ZONE, "SOA")
            assert response.rcode() == dns.rcode.NOERROR
            assert (await client.query(fqdn("default", "web"))).rcode() == dns.rcode.NXDOMAIN
            assert (await client.query("example.com", "A")).rcode() == dns.rcode.REFUSED
            await client.register("default", "web", "web-1", expect=201, address="10.0.0.1")
            assert await client.wait_cache(lambda: live(client, "default", "web", "web-1"))
            assert await answer(client, fqdn("default", "web")) == (
                dns.rcode.NOERROR,
                {"10.0.0.1"},
            )
            await store_state(client, "ok")
    finally:
        server.stop()


# 4. compaction while a replica is cut off from etcd


class CuttableProxy:
    """A TCP proxy in front of etcd. cut() closes every connection and resets new ones at
    once (the replica sees etcd vanish); restore() lets connections through again."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.cut_off = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()
        self._handlers: set[asyncio.Task[Any]] = set()

    @property
    def endpoint(self) -> tuple[str, int]:
        return (HOST, self.port)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        writers = [writer]
        try:
            if self.cut_off:
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                return
            writers.append(up_writer)
            if self.cut_off:
                return
            self._transports.update(w.transport for w in writers)
            pipes = [
                asyncio.create_task(_pipe(reader, up_writer)),
                asyncio.create_task(_pipe(up_reader, writer)),
            ]
            try:
                await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pipe in pipes:
                    pipe.cancel()
                await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            for w in writers:
                self._transports.discard(w.transport)
                w.transport.abort()
            self._handlers.discard(task)

    def cut(self) -> None:
        self.cut_off = True
        for transport in list(self._transports):
            transport.abort()

    def restore(self) -> None:
        self.cut_off = False

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        # the handlers end once their transports are aborted; cancelling them instead trips
        # asyncio's start_server callback on Python 3.11 (it calls exception() on them)
        async with asyncio.timeout(5):
            await asyncio.gather(*self._handlers, return_exceptions=True)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


@pytest.fixture
async def proxy(etcd_server: EtcdServer) -> AsyncIterator[CuttableProxy]:
    proxy = CuttableProxy(etcd_server.endpoint)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


async def test_compaction_while_cut_off_reloads_and_matches_etcd(
    etcd_server: EtcdServer,
    etcd: EtcdStore,
    proxy: CuttableProxy,
    session: aiohttp.ClientSession,
) -> None:
    async with (
        replica(etcd_server.endpoint, session) as a,
        replica(proxy.endpoint, session) as b,
    ):
        await synced(a, b)
        await a.register("shop", "cart", "keep", expect=201, address="10.2.0.1", ttl=60)
        await a.register("shop", "cart", "gone", expect=201, address="10.2.0.2", ttl=60)
        await a.register("shop", "cart", "moved", expect=201, address="10.2.0.3", ttl=60,
                         ports=[{"name": "http", "port": 80}])  # fmt: skip
        await b.register("shop", "pay", "expiring", expect=201, address="10.2.0.4", ttl=2)
        await a.register("shop", "old", "old-1", expect=201, address="10.2.0.6", ttl=60)
        await in_sync((a, b), etcd)
        before = set(cache_records(b))
        reloads = b.server.watcher.reloads
        assert await metric(b, "discovery_watch_reloads_total") == reloads

        proxy.cut()
        await store_state(b, "degraded")
        status, _, _ = await b.request("PUT", path("shop", "cart", "new"),
                                       json={"address": "10.2.0.9"})  # fmt: skip
        assert status == 503
        for gone in (path("shop", "cart", "gone"), path("shop", "old", "old-1")):
            status, _, _ = await a.request("DELETE", gone)
            assert status == 204
        await a.register("shop", "cart", "moved", expect=200, address="10.2.0.33", ttl=60,
                         ports=[{"name": "grpc", "port": 9090}])  # fmt: skip
        await a.register("shop", "cart", "new", expect=201, address="10.2.0.5", ttl=60)
        await a.register("shop", "pay", "fresh", expect=201, address="fd00::5", ttl=60)
        assert await a.wait_cache(lambda: not live(a, "shop", "pay", "expiring"), 6), (
            "the 2 s lease never expired"
        )
        revision = await etcd.revision()
        await etcd.compact(revision)
        # B is still cut off: it serves what it knew, ghosts included
        assert cache_records(b) == before
        assert await answer(b, fqdn("shop", "cart", "gone")) == (dns.rcode.NOERROR, {"10.2.0.2"})
        assert await answer(b, fqdn("shop", "cart", "moved")) == (dns.rcode.NOERROR, {"10.2.0.3"})

        # a long poll on B on a service that changed while B was cut off: the reload wakes it
        index = b.server.registry.revision
        poll = asyncio.create_task(
            b.request("GET", f"/v1/services/shop/cart?index={index}&wait=20s")
        )

        proxy.restore()
        restored = time.monotonic()
        assert await b.wait_cache(lambda: b.server.watcher.reloads > reloads, 15), (
            "B never reloaded after its watch revision was compacted"
        )
        report("proxy restored -> B reloaded", time.monotonic() - restored)
        assert await metric(b, "discovery_watch_reloads_total") == reloads + 1
        async with asyncio.timeout(2):
            status, body, headers = await poll
        assert status == 200, body
        assert int(headers["X-Discovery-Index"]) >= revision, headers
        assert {i["name"] for i in body["instances"]} == {"keep", "moved", "new"}
        snapshot = await in_sync((a, b), etcd)
        assert {(r[1], r[2], r[3]) for r in etcd_records(snapshot)} == {
            ("cart", "keep", "10.2.0.1"),
            ("cart", "moved", "10.2.0.33"),
            ("cart", "new", "10.2.0.5"),
            ("pay", "fresh", "fd00::5"),
        }
        assert a.server.watcher.reloads == 0
        for client in (a, b):
            for gone in (fqdn("shop", "cart", "gone"), fqdn("shop", "old")):
                assert (await client.query(gone)).rcode() == dns.rcode.NXDOMAIN, gone
            assert (await client.query(fqdn("shop", "pay", "expiring"))).rcode() == (
                dns.rcode.NXDOMAIN
            )
            assert await answer(client, fqdn("shop", "cart")) == (
                dns.rcode.NOERROR,
                {"10.2.0.1", "10.2.0.33", "10.2.0.5"},
            )
            assert await answer(client, fqdn("shop", "pay"), "AAAA") == (
                dns.rcode.NOERROR,
                {"fd00::5"},
            )
            srv = await client.query(f"_grpc._tcp.{fqdn('shop', 'cart')}", "SRV")
            assert [rr.port for rrset in srv.answer for rr in rrset] == [9090]
            response = await client.query(f"_http._tcp.{fqdn('shop', 'cart')}", "SRV")
            assert response.rcode() == dns.rcode.NXDOMAIN
            response = await client.query("2.0.2.10.in-addr.arpa", "PTR")
            assert response.rcode() == dns.rcode.NXDOMAIN
        await store_state(b, "ok")


async def test_long_poll_on_a_service_gone_in_a_reload_wakes(
    etcd_server: EtcdServer,
    etcd: EtcdStore,
    proxy: CuttableProxy,
    session: aiohttp.ClientSession,
) -> None:
    async with (
        replica(etcd_server.endpoint, session) as a,
        replica(proxy.endpoint, session) as b,
    ):
        await synced(a, b)
        await a.register("shop", "old", "old-1", expect=201, address="10.3.0.1", ttl=60)
        await in_sync((a, b), etcd)
        reloads = b.server.watcher.reloads
        proxy.cut()
        await store_state(b, "degraded")
        status, _, _ = await a.request("DELETE", path("shop", "old", "old-1"))
        assert status == 204
        await a.register("shop", "new", "new-1", expect=201, address="10.3.0.2", ttl=60)
        await etcd.compact(await etcd.revision())
        index = b.server.registry.revision
        poll = asyncio.create_task(
            b.request("GET", f"/v1/services/shop/old?index={index}&wait=20s")
        )
        proxy.restore()
        assert await b.wait_cache(lambda: b.server.watcher.reloads > reloads, 15)
        await in_sync((a, b), etcd)
        done, _ = await asyncio.wait({poll}, timeout=2)
        if not done:
            poll.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poll
        assert done, "the long poll on shop/old was not woken by the reload that removed it"
        status, body, _ = await poll
        assert (status, body["instances"]) == (200, [])


# 5. a random sequence of everything, compared with etcd after each phase

SEED = int(os.environ.get("DISCOVERY_TEST_SEED", "20240611"))
POOL = [(ns, svc, f"{svc}-{i}") for ns in ("alpha", "beta") for svc in ("api", "db")
        for i in range(4)]  # fmt: skip
LONG_TTL = 300
SHORT_TTL = 2
PORT_CHOICES = [
    {"name": "http", "port": 80, "protocol": "tcp"},
    {"name": "grpc", "port": 9090, "protocol": "tcp"},
    {"name": "dns", "port": 53, "protocol": "udp"},
]


@dataclass
class Known:
    lease: str
    short: bool  # may expire at any moment


class Workload:
    """Random writes through both replicas, with what the API must answer to each."""

    def __init__(self, rng: random.Random, clients: tuple[Client, Client]) -> None:
        self.rng = rng
        self.clients = clients
        self.model: dict[tuple[str, str, str], Known] = {}
        self.counts = {"register": 0, "heartbeat": 0, "delete": 0}

    def _address(self) -> str:
        if self.rng.random() < 0.15:
            return f"fd00::{self.rng.randrange(1, 0xFFFF):x}"
        octets = (self.rng.randrange(256), self.rng.randrange(256), self.rng.randrange(1, 255))
        return "10.{}.{}.{}".format(*octets)

    async def run(
        self, ops: int, short_share: float = 0.0, through: tuple[Client, ...] = ()
    ) -> None:
        for _ in range(ops):
            op = self.rng.choices(["register", "heartbeat", "delete"], [5, 3, 2])[0]
            key = self.rng.choice(POOL)
            via = self.rng.choice(through or self.clients)
            self.counts[op] += 1
            if op == "register":
                short = self.rng.random() < short_share
                body = {
                    "address": self._address(),
                    "ports": self.rng.sample(PORT_CHOICES, self.rng.randrange(4)),
                    "ttl": SHORT_TTL if short else LONG_TTL,
                }
                await self.register(via, key, body, short)
            elif op == "heartbeat":
                await self.heartbeat(via, key)
            else:
                await self.delete(via, key)

    async def register(
        self, via: Client, key: tuple[str, str, str], body: dict[str, Any], short: bool
    ) -> None:
        status, data, _ = await via.request("PUT", path(*key), json=body)
        known = self.model.get(key)
        allowed = {201} if known is None else {200, 201} if known.short else {200}
        assert status in allowed, (SEED, "register", key, status, data)
        self.model[key] = Known(data["lease"]["id"], short)

    async def heartbeat(self, via: Client, key: tuple[str, str, str]) -> None:
        status, data, _ = await via.request("PUT", path(*key) + "/heartbeat")
        known = self.model.get(key)
        if known is None:
            assert status == 404, (SEED, "heartbeat", key, status, data)
        elif known.short:
            assert status in (200, 404), (SEED, "heartbeat", key, status, data)
            if status == 404:
                del self.model[key]
        else:
            assert status == 200, (SEED, "heartbeat", key, status, data)
            assert data["lease"]["id"] == known.lease
        if status == 200:
            assert known is not None and data["lease"]["id"] == known.lease

    async def delete(self, via: Client, key: tuple[str, str, str]) -> None:
        status, data, _ = await via.request("DELETE", path(*key))
        known = self.model.pop(key, None)
        allowed = {404} if known is None else {204, 404} if known.short else {204}
        assert status in allowed, (SEED, "delete", key, status, data)

    def check_model(self, snapshot: Snapshot) -> None:
        """The API's answers were true: etcd holds what the model says must be there."""
        held = {(k.namespace, k.service, k.name): v for k, v in etcd_instances(snapshot).items()}
        for key in POOL:
            known = self.model.get(key)
            if known is None:
                assert key not in held, (SEED, key)
            elif not known.short:
                assert key in held and format(held[key][1], "x") == known.lease, (SEED, key)
            elif key not in held:
                del self.model[key]  # expired

    def forget_short(self) -> None:
        self.model = {k: v for k, v in self.model.items() if not v.short}


async def check_dns(clients: Iterable[Client], snapshot: Snapshot, rng: random.Random) -> None:
    """A sample of names on every replica: present with etcd's address, or NXDOMAIN.

    Only names no lease can take away meanwhile (long leases) are checked as present.
    """
    held = {(k.namespace, k.service, k.name): spec for k, (spec, _, _) in etcd_instances(
        snapshot).items()}  # fmt: skip
    sample = rng.sample(POOL, 8)
    services = sorted({(ns, svc) for ns, svc, _ in POOL})
    for client in clients:
        response = await client.query(ZONE, "SOA")
        serial = response.answer[0][0].serial
        assert snapshot.revision <= serial <= client.server.registry.revision, serial
        for key in sample:
            spec = held.get(key)
            if spec is None:
                assert (await client.query(fqdn(*key))).rcode() == dns.rcode.NXDOMAIN, key
            elif spec.ttl == LONG_TTL:
                rdtype = "AAAA" if ":" in spec.address else "A"
                assert await answer(client, fqdn(*key), rdtype) == (
                    dns.rcode.NOERROR,
                    {spec.address},
                ), key
        for ns, svc in services:
            members = [spec for (n, s, _), spec in held.items() if (n, s) == (ns, svc)]
            if any(spec.ttl != LONG_TTL for spec in members):
                continue
            if not members:
                assert (await client.query(fqdn(ns, svc))).rcode() == dns.rcode.NXDOMAIN
                continue
            for rdtype in ("A", "AAAA"):
                expected = {
                    spec.address for spec in members if (":" in spec.address) == (rdtype == "AAAA")
                }
                assert await answer(client, fqdn(ns, svc), rdtype) == (
                    dns.rcode.NOERROR,
                    expected,
                ), (ns, svc, rdtype)


async def test_random_workload_replicas_match_etcd(
    etcd_server: EtcdServer,
    etcd: EtcdStore,
    proxy: CuttableProxy,
    session: aiohttp.ClientSession,
) -> None:
    async with (
        replica(etcd_server.endpoint, session) as a,
        replica(proxy.endpoint, session) as b,  # B can be cut off from etcd
    ):
        await synced(a, b)
        await random_workload(a, b, etcd_server, etcd, proxy)


async def random_workload(
    a: Client, b: Client, etcd_server: EtcdServer, etcd: EtcdStore, proxy: CuttableProxy
) -> None:
    rng = random.Random(SEED)
    pair = (a, b)
    work = Workload(rng, pair)
    phases: list[tuple[str, float]] = []
    test_started = time.monotonic()

    async def check(phase: str, started: float) -> None:
        snapshot = await in_sync(pair, etcd)
        work.check_model(snapshot)
        await check_dns(pair, snapshot, rng)
        phases.append((phase, time.monotonic() - started))

    async def restart_etcd() -> None:
        etcd_server.stop()
        for client in pair:
            await store_state(client, "degraded")
            await assert_unavailable(client, "PUT", path(*POOL[0]), json={"address": "10.9.9.9"})
        await asyncio.to_thread(etcd_server.start)

    async def expire_short() -> None:
        """Until every short lease of the model has expired on both replicas."""
        shorts = [k for k, v in work.model.items() if v.short]
        for client in pair:
            assert await client.wait_cache(
                lambda c=client: not any(live(c, *k) for k in shorts), timeout=10
            ), "short leases did not expire"
        work.forget_short()

    for round_ in range(3):
        started = time.monotonic()
        await work.run(30)
        await check(f"{round_}: registrations, heartbeats, deletions", started)

        started = time.monotonic()
        await work.run(25, short_share=0.5)
        await check(f"{round_}: with short leases (before expiry)", started)
        await expire_short()
        await check(f"{round_}: short leases expired", started)

        started = time.monotonic()
        await etcd.compact(await etcd.revision())  # replicas are caught up: no reload needed
        await work.run(15)
        await check(f"{round_}: compaction while connected", started)

        # restart, write through the API at once and compact: A's watcher may still be
        # backing off (then it finds its revision compacted and reloads) or not
        started = time.monotonic()
        await restart_etcd()
        await work.run(15, short_share=0.2)
        await etcd.compact(await etcd.revision())
        await work.run(10)
        await check(f"{round_}: etcd restart + compaction", started)

        # B cut off through an etcd restart, writes and a compaction: B must reload
        started = time.monotonic()
        reloads = b.server.watcher.reloads
        proxy.cut()
        await restart_etcd()
        await work.run(20, short_share=0.2, through=(a,))
        compacted = await etcd.revision()
        await etcd.compact(compacted)
        await work.run(10, through=(a,))
        assert b.server.registry.revision < compacted
        proxy.restore()
        await check(f"{round_}: B cut off, etcd restart, compaction", started)
        assert b.server.watcher.reloads == reloads + 1

    started = time.monotonic()
    for key in POOL:
        if key in work.model:
            await work.delete(rng.choice(pair), key)
    await check("final: everything deleted", started)
    snapshot = await etcd.load(instances_prefix(PREFIX))
    assert snapshot.items == []
    for client in pair:
        assert client.server.registry.services() == {}
        assert (await client.query(fqdn("alpha", "api"))).rcode() == dns.rcode.NXDOMAIN
    reloads = (a.server.watcher.reloads, b.server.watcher.reloads)
    total = time.monotonic() - test_started
    print(f"\n[replicas] seed {SEED}, ops {work.counts}, reloads A/B {reloads}, {total:.1f} s")
    for phase, seconds in phases:
        print(f"[replicas]   {phase}: {seconds:.2f} s")
