"""discovery.client against real servers: the embedded store, restarts on the same ports, a
503-answering front, two replicas on etcd; SRV picking against the real DNS listener."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import etcd_support
import pytest
from aiohttp import web
from conftest import make_config
from waiting import eventually

from discovery.client import (
    DiscoveryClient,
    DiscoveryError,
    Instance,
    Refused,
    SyncClient,
    Target,
    Unavailable,
    pick,
    resolve,
    txt_problems,
)
from discovery.config import HostPort
from discovery.server import Server, run_server
from discovery.testing import free_ports

NS, SVC = "default", "web"
etcd_server = etcd_support.etcd_server  # the fixture


def url(server: Server) -> str:
    return "http://{}:{}".format(*server.http_address)


def live(server: Server, inst: str, svc: str = SVC) -> bool:
    return inst in server.registry.instances((NS, svc))


async def wait_live(server: Server, inst: str, present: bool = True, within: float = 10) -> None:
    registry = server.registry
    assert await registry.wait(lambda: live(server, inst) is present, within), (inst, present)


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    async with run_server(make_config(min_ttl=1)) as running:
        await running.registry.wait(lambda: running.registry.synced, 5)
        yield running


@contextlib.asynccontextmanager
async def server_on(ports: tuple[int, int], **overrides: Any) -> AsyncIterator[Server]:
    """A server on fixed ports (dns, http): a restart comes back where clients look."""
    config = make_config(
        dns=HostPort("127.0.0.1", ports[0]), http=HostPort("127.0.0.1", ports[1]), **overrides
    )
    async with run_server(config) as running:
        await running.registry.wait(lambda: running.registry.synced, 5)
        yield running


# registration


async def test_registration_registers_heartbeats_and_deregisters(server: Server) -> None:
    async with DiscoveryClient(url(server)) as client:
        registration = client.registration(
            NS, SVC, "web-1", address="10.1.2.3", ports=[("http", 8080)], ttl=2,
            metadata={"version": "1.4.2"},
        )  # fmt: skip
        async with registration as reg:
            assert reg.healthy and reg.registrations == 1
            await wait_live(server, "web-1")
            # a 2 s lease outlives several TTLs on heartbeats alone
            await eventually(lambda: _true(reg.heartbeats >= 7), "7 heartbeats", within=15)
            assert live(server, "web-1") and reg.registrations == 1 and reg.missed == 0
            instances = await client.instances(NS, SVC)
            assert [i.name for i in instances] == ["web-1"]
            assert instances[0].metadata == {"version": "1.4.2"}
            assert instances[0].ports[0].port == 8080
        assert not live(server, "web-1"), "deregistered on exit, not left to expire"
        assert not reg.healthy


async def _true(value: bool) -> bool:
    return value


async def test_cancelled_task_deregisters(server: Server) -> None:
    async with DiscoveryClient(url(server)) as client:
        entered = asyncio.Event()

        async def service() -> None:
            async with client.registration(NS, SVC, "web-2", address="10.1.2.4", ttl=30):
                entered.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(service())
        await entered.wait()
        assert live(server, "web-2")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not live(server, "web-2")


async def test_refused_registration_raises_a_clear_error(server: Server) -> None:
    async with DiscoveryClient(url(server)) as client:
        with pytest.raises(Refused) as caught:
            async with client.registration(NS, SVC, "Bad_Name", address="10.0.0.1"):
                pass
        assert caught.value.status == 400 and "name" in str(caught.value)
        with pytest.raises(Refused, match="address"):
            await client.register(NS, SVC, "web-3", address="999.1.1.1")


@pytest.mark.parametrize(
    "metadata",
    [{"a=b": "x"}, {"ключ": "x"}, {"tab\there": "x"}, {"k": "v" * 300}],
    ids=["equals", "non-ascii-key", "control", "too-long"],
)
async def test_metadata_that_txt_cannot_carry_is_refused_before_sending(
    server: Server, metadata: dict[str, str]
) -> None:
    assert txt_problems(metadata)
    async with DiscoveryClient(url(server)) as client:
        with pytest.raises(ValueError, match="TXT"):
            client.registration(NS, SVC, "web-4", address="10.0.0.4", metadata=metadata)
    assert not live(server, "web-4")
    # values may be any UTF-8 (RFC 6763 6.5: opaque), keys printable ASCII without '='
    assert not txt_problems({"version": "1.4 ünïcode = fine", "k~!": ""})


async def test_server_restart_re_registers_within_one_heartbeat(tmp_path: Any) -> None:
    """The embedded store forgets everything on restart: the next heartbeat gets 404 and the
    client registers again at once, one copy only."""
    ports = free_ports(2)
    dns_port, http_port = ports[0], ports[1]
    async with DiscoveryClient(f"http://127.0.0.1:{http_port}") as client:
        async with server_on((dns_port, http_port)) as first:
            reg = client.registration(NS, SVC, "web-5", address="10.1.2.5", ttl=3)
            await reg.start()
            await wait_live(first, "web-5")
        assert reg.registrations == 1
        try:
            async with server_on((dns_port, http_port)) as second:
                loop = asyncio.get_running_loop()
                started = loop.time()
                await wait_live(second, "web-5", within=10)
                took = loop.time() - started
                assert took < reg.interval + 0.5, f"back after {took:.2f} s"
                await eventually(lambda: _true(reg.registrations == 2), "the answer read")
                assert list(second.registry.instances((NS, SVC))) == ["web-5"]
                assert reg.healthy
        finally:
            await reg.stop()


class Front:
    """A real HTTP server in front of a discovery server that forwards every call, or answers
    503 with Retry-After while `failing` is set (what a replica says when etcd is away)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.failing = False
        self.without_batches = False  # set: POST /v1/heartbeats is 404, as on an older server
        self.batch_limit: int | None = None  # set: larger batches get 413
        self.hold_answers: asyncio.Event | None = None  # set: answers wait for it
        self.delete_delay = 0.0  # seconds each DELETE waits before it is forwarded
        self.forwarded = asyncio.Event()
        self.seen: collections.Counter[str] = collections.Counter()
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def handle(self, request: web.Request) -> web.Response:
        kind = "heartbeat" if request.path.endswith("/heartbeat") else request.method
        if request.path == "/v1/heartbeats":
            kind = "batch"
            self.seen["batched"] += len((await request.json())["instances"])
        self.seen[kind + (" 503" if self.failing else "")] += 1
        if kind == "batch" and self.without_batches:
            return web.json_response(
                {"title": "Not Found", "status": 404, "detail": "Not Found"},
                status=404, content_type="application/problem+json",
            )  # fmt: skip
        if kind == "batch" and self.batch_limit is not None:
            if len((await request.json())["instances"]) > self.batch_limit:
                return web.json_response(
                    {"title": "Too many instances", "status": 413, "detail": "the limit"},
                    status=413, content_type="application/problem+json",
                )  # fmt: skip
        if self.failing:
            return web.json_response(
                {"title": "Store unavailable", "status": 503, "detail": "etcd is away"},
                status=503, headers={"Retry-After": "2"}, content_type="application/problem+json",
            )  # fmt: skip
        assert self._session is not None
        if kind == "DELETE" and self.delete_delay:
            await asyncio.sleep(self.delete_delay)  # a slow server (one DELETE at a time)
        async with self._session.request(
            request.method, self.target + request.path_qs, data=await request.read(),
            headers={"Content-Type": request.headers.get("Content-Type", "application/json")},
        ) as upstream:  # fmt: skip
            body = await upstream.read()
        self.forwarded.set()
        if self.hold_answers is not None:
            await self.hold_answers.wait()
        headers = {k: v for k, v in upstream.headers.items() if k in ("X-Discovery-Index",)}
        return web.Response(
            body=body, status=upstream.status, headers=headers, content_type=upstream.content_type
        )

    async def __aenter__(self) -> Front:
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = "http://{}:{}".format(*self._runner.addresses[0][:2])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None and self._session is not None
        await self._runner.cleanup()
        await self._session.close()


async def test_503_backs_off_and_keeps_the_lease(server: Server) -> None:
    async with Front(url(server)) as front, DiscoveryClient(front.url) as client:
        async with client.registration(NS, SVC, "web-6", address="10.1.2.6", ttl=6) as reg:
            lease = reg.lease
            await eventually(lambda: _true(reg.heartbeats >= 1), "a heartbeat")
            front.failing = True
            await eventually(lambda: _true(not reg.healthy), "unhealthy on 503", within=10)
            # several retries inside one heartbeat interval, but no hot loop
            await eventually(lambda: _true(front.seen["batch 503"] >= 3), "retries")
            await asyncio.sleep(0)  # let the count settle for the bound below
            front.failing = False
            await reg.wait_healthy(10)
            assert reg.lease == lease and reg.registrations == 1, "the lease was kept"
            assert front.seen["PUT 503"] == 0, "no re-register while the lease lived"
            assert front.seen["batch 503"] < 60
            assert live(server, "web-6")


async def test_heartbeats_of_many_registrations_share_calls(server: Server) -> None:
    async with Front(url(server)) as front, DiscoveryClient(front.url) as client:
        regs = [
            client.registration(NS, SVC, f"b-{i}", address=f"10.4.0.{i + 1}", ttl=3)
            for i in range(40)
        ]
        await asyncio.gather(*(reg.start() for reg in regs))
        try:
            await eventually(lambda: _true(all(r.heartbeats >= 3 for r in regs)), "3 each")
            beats = sum(r.heartbeats for r in regs)
            assert front.seen["heartbeat"] == 0, "no single heartbeat while batches work"
            assert front.seen["batch"] <= beats / 5, (front.seen, beats)
            assert all(r.registrations == 1 and r.missed == 0 and r.healthy for r in regs)
            # one lease lost (deleted behind the client's back): its result is 404, it alone
            # registers again, the others keep their leases
            assert await client.deregister(NS, SVC, "b-3")
            await eventually(lambda: _true(regs[3].registrations == 2), "b-3 registered again")
            await wait_live(server, "b-3")
            assert all(r.registrations == 1 for r in regs if r is not regs[3])
        finally:
            await asyncio.gather(*(reg.stop() for reg in regs))
        assert not server.registry.instances((NS, SVC))


async def test_a_server_without_the_batch_route_gets_one_call_per_heartbeat(
    server: Server,
) -> None:
    async with Front(url(server)) as front, DiscoveryClient(front.url) as client:
        front.without_batches = True
        async with client.registration(NS, SVC, "old-1", address="10.4.1.1", ttl=3) as reg:
            await eventually(lambda: _true(reg.heartbeats >= 3), "3 heartbeats", within=10)
            assert front.seen["batch"] == 1, "asked once, then one call per heartbeat"
            assert front.seen["heartbeat"] >= 3
            assert reg.registrations == 1 and reg.missed == 0 and reg.healthy
    async with Front(url(server)) as front, DiscoveryClient(front.url, heartbeat_batch=1) as one:
        async with one.registration(NS, SVC, "old-2", address="10.4.1.2", ttl=3) as reg:
            await eventually(lambda: _true(reg.heartbeats >= 2), "2 heartbeats", within=10)
            assert front.seen["batch"] == 0 and front.seen["heartbeat"] >= 2


async def test_a_batch_over_the_server_limit_is_split(server: Server) -> None:
    async with Front(url(server)) as front, DiscoveryClient(front.url) as client:
        front.batch_limit = 4
        regs = [
            client.registration(NS, SVC, f"s-{i}", address=f"10.4.2.{i + 1}", ttl=3)
            for i in range(20)
        ]
        await asyncio.gather(*(reg.start() for reg in regs))
        try:
            await eventually(lambda: _true(all(r.heartbeats >= 2 for r in regs)), "2 each")
            assert client.heartbeats.size <= 4
            assert all(r.registrations == 1 and r.missed == 0 for r in regs)
            assert front.seen["heartbeat"] == 0
        finally:
            await asyncio.gather(*(reg.stop() for reg in regs))


async def test_cancelled_while_the_first_register_call_is_in_flight(server: Server) -> None:
    """The server took the registration but the answer never came back: cancelling the task
    that enters the registration still takes it back."""
    async with Front(url(server)) as front, DiscoveryClient(front.url) as client:
        front.hold_answers = asyncio.Event()

        async def service() -> None:
            async with client.registration(NS, SVC, "web-9", address="10.1.2.9", ttl=30):
                pytest.fail("the answer was held back: never entered")

        task = asyncio.create_task(service())
        await front.forwarded.wait()
        assert live(server, "web-9"), "the server has it, the client does not know yet"
        task.cancel()
        front.hold_answers.set()  # the DELETE goes through
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not live(server, "web-9")


async def test_registrations_stopped_together_all_deregister(server: Server) -> None:
    """More registrations stopped at once than the client has connections: each DELETE's
    timeout (a heartbeat interval here, 1 s) starts once it has its turn, so none times out.
    Before, they all started at once and queued for the pool: with 12 DELETEs of 0.4 s over
    2 connections, the last 8 timed out and their instances stayed until their leases ran
    out (a process holding 10,000 lost half of them that way)."""
    async with Front(url(server)) as front, DiscoveryClient(front.url, connections=2) as client:
        regs = [
            client.registration(NS, SVC, f"d-{i}", address=f"10.1.3.{i + 1}", ttl=3)
            for i in range(12)
        ]
        await asyncio.gather(*(reg.start() for reg in regs))
        assert all(live(server, f"d-{i}") for i in range(12))
        front.delete_delay = 0.4
        await asyncio.gather(*(reg.stop() for reg in regs))
        assert front.seen["DELETE"] == 12
        assert [i for i in range(12) if live(server, f"d-{i}")] == []


async def test_fails_over_to_the_next_url(server: Server) -> None:
    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    async with DiscoveryClient([dead, url(server)]) as client:
        async with client.registration(NS, SVC, "web-7", address="10.1.2.7", ttl=30) as reg:
            assert reg.healthy and live(server, "web-7")
            assert client.url == url(server), "later calls go to the server that answered"
        assert not live(server, "web-7")


async def test_no_server_at_all_is_unavailable_not_a_traceback() -> None:
    dead = [f"http://127.0.0.1:{port}" for port in free_ports(2)]
    async with DiscoveryClient(dead, timeout=2) as client:
        with pytest.raises(Unavailable, match="no server answered"):
            await client.instances(NS, SVC)
        reg = client.registration(NS, SVC, "web-8", address="10.1.2.8", ttl=3)
        await reg.start()  # keeps trying in the background
        assert not reg.healthy and reg.last_error
        await reg.stop()
    with pytest.raises(ValueError, match="http"):
        DiscoveryClient("localhost:8080")


# watching


async def test_watch_yields_each_new_set_and_survives_a_restart() -> None:
    ports = free_ports(2)
    async with DiscoveryClient(f"http://127.0.0.1:{ports[1]}") as client:
        seen: asyncio.Queue[list[Instance]] = asyncio.Queue()

        async def watch() -> None:
            async for instances in client.watch(NS, SVC, wait=30):
                await seen.put(instances)

        async with server_on((ports[0], ports[1])) as first:
            task = asyncio.create_task(watch())
            try:
                assert await asyncio.wait_for(seen.get(), 10) == []
                await client.register(NS, SVC, "a", address="10.0.0.1", ttl=30)
                assert [i.name for i in await asyncio.wait_for(seen.get(), 10)] == ["a"]
                await client.register(NS, SVC, "b", address="10.0.0.2", ttl=30)
                assert [i.name for i in await asyncio.wait_for(seen.get(), 10)] == ["a", "b"]
                assert first.registry.revision > 0
            except BaseException:
                task.cancel()
                raise
        try:
            # the new server starts from revision 0 and holds nothing
            async with server_on((ports[0], ports[1])):
                assert await asyncio.wait_for(seen.get(), 15) == []
                await client.register(NS, SVC, "c", address="10.0.0.3", ttl=30)
                assert [i.name for i in await asyncio.wait_for(seen.get(), 10)] == ["c"]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# SRV (RFC 2782)


def test_pick_lowest_priority_then_by_weight() -> None:
    rng = random.Random(7)
    targets = [
        Target("a", 1, priority=10, weight=60),
        Target("b", 2, priority=10, weight=30),
        Target("c", 3, priority=10, weight=10),
        Target("backup", 4, priority=20, weight=100),
    ]
    counts = collections.Counter(pick(targets, rng).host for _ in range(20000))
    assert "backup" not in counts
    assert counts["a"] / 20000 == pytest.approx(0.6, abs=0.02)
    assert counts["b"] / 20000 == pytest.approx(0.3, abs=0.02)
    assert counts["c"] / 20000 == pytest.approx(0.1, abs=0.02)
    # weight 0 only when it is all there is (then evenly), else almost never
    zeros = [Target("z1", 1, weight=0), Target("z2", 2, weight=0)]
    assert set(collections.Counter(pick(zeros, rng).host for _ in range(200))) == {"z1", "z2"}
    mixed = [Target("z", 1, weight=0), Target("w", 2, weight=1000)]
    assert collections.Counter(pick(mixed, rng).host for _ in range(2000))["z"] < 20
    with pytest.raises(ValueError):
        pick([])


async def test_resolve_picks_from_real_srv_answers(server: Server) -> None:
    host, port = server.dns_address
    async with DiscoveryClient(url(server)) as client:
        for name, address, priority in (("p1", "10.0.1.1", 1), ("p2", "10.0.1.2", 2)):
            await client.register(
                NS, "api", name, address=address, ports=[("grpc", 9000 + priority)],
                priority=priority, weight=10, ttl=30,
            )  # fmt: skip
        target = await resolve(
            "_grpc._tcp.api.default.svc.cluster.local", nameserver=host, port=port
        )
        assert (target.host, target.port, target.address) == (
            "p1.api.default.svc.cluster.local", 9001, "10.0.1.1",
        )  # fmt: skip
        await client.deregister(NS, "api", "p1")
        target = await resolve(
            "_grpc._tcp.api.default.svc.cluster.local", nameserver=host, port=port
        )
        assert target.host.startswith("p2.") and target.port == 9002
        with pytest.raises(LookupError):
            await resolve(
                "_grpc._tcp.nothing.default.svc.cluster.local", nameserver=host, port=port
            )


# the synchronous wrapper


async def test_sync_client_in_a_script(server: Server) -> None:
    base = url(server)

    def script() -> tuple[list[str], bool]:
        with SyncClient(base) as client:
            with client.registration(NS, SVC, "sync-1", address="10.2.0.1", ttl=30) as reg:
                names = [i.name for i in client.instances(NS, SVC)]
                healthy = reg.healthy
            return names, healthy

    names, healthy = await asyncio.to_thread(script)
    assert names == ["sync-1"] and healthy
    assert not live(server, "sync-1")


# two replicas on etcd


@pytest.mark.etcd
async def test_watch_and_registration_continue_on_the_other_replica(
    etcd_server: etcd_support.EtcdServer,
) -> None:
    endpoint = (HostPort(*etcd_server.endpoint),)
    config = {"etcd": endpoint, "min_ttl": 1, "etcd_request_timeout": 3.0}
    async with run_server(make_config(**config)) as b:
        a_cm = run_server(make_config(**config))
        a = await a_cm.__aenter__()
        try:
            for replica in (a, b):
                assert await replica.registry.wait(lambda r=replica: r.registry.synced, 10)
            async with DiscoveryClient([url(a), url(b)]) as client:
                seen: asyncio.Queue[list[str]] = asyncio.Queue()

                async def watch() -> None:
                    async for instances in client.watch(NS, SVC, wait=30):
                        await seen.put([i.name for i in instances])

                task = asyncio.create_task(watch())
                try:
                    reg = client.registration(NS, SVC, "r-1", address="10.3.0.1", ttl=3)
                    async with reg:
                        assert await asyncio.wait_for(_until(seen, ["r-1"]), 10)
                        assert client.url == url(a)
                        lease = reg.lease
                        await a_cm.__aexit__(None, None, None)  # replica A goes away
                        a_cm = None
                        await client.register(NS, SVC, "r-2", address="10.3.0.2", ttl=30)
                        assert await asyncio.wait_for(_until(seen, ["r-1", "r-2"]), 10)
                        assert client.url == url(b)
                        # heartbeats reach etcd through B: the same lease, never re-registered
                        beats = reg.heartbeats
                        await eventually(lambda: _true(reg.heartbeats >= beats + 4), "beats")
                        assert reg.lease == lease and reg.registrations == 1
                        assert live(b, "r-1")
                    assert await b.registry.wait(lambda: not live(b, "r-1"), 5)
                finally:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        finally:
            if a_cm is not None:
                await a_cm.__aexit__(None, None, None)


async def _until(queue: asyncio.Queue[list[str]], wanted: list[str]) -> bool:
    while (await queue.get()) != wanted:
        pass
    return True


async def test_closing_the_client_under_open_registrations_ends_them_quietly(
    server: Server,
) -> None:
    client = DiscoveryClient(url(server))
    reg = client.registration(NS, SVC, "web-10", address="10.1.2.10", ttl=2)
    await reg.start()
    task = reg._task
    assert task is not None
    await client.close()
    await asyncio.wait_for(asyncio.shield(task), 10)  # the next heartbeat finds it closed
    assert task.exception() is None and not reg.healthy
    with pytest.raises(DiscoveryError, match="closed"):
        await client.instances(NS, SVC)
    await reg.stop()  # nothing left to do, no error
