"""Slow and greedy HTTP clients against a real server process: half-sent headers (slowloris),
half-sent bodies, too many connections, thousands of parked long polls. Each shows the server
still answering everyone else, and giving back what the slow clients held."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import dns.asyncquery
import dns.message
import pytest
from conftest import Client, make_config
from needs import unavailable
from prometheus_client.parser import text_string_to_metric_families
from test_cli import Process, clean_env, serve
from waiting import eventually

from discovery.model import InstanceKey
from discovery.registry import Registry
from discovery.server import Server, run_server
from discovery.store.base import Event, EventType, Snapshot

NS = "default"
LONG_POLLS = 5000
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def base(server: Process) -> str:
    return "http://{}:{}".format(*server.http)


async def metrics(session: aiohttp.ClientSession, server: Process) -> dict[str, float]:
    async with session.get(base(server) + "/metrics") as response:
        text = await response.text()
    return {
        sample.name + json.dumps(sample.labels, sort_keys=True): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def refused(samples: dict[str, float], reason: str) -> float:
    return samples.get(f'discovery_http_refused_total{{"reason": "{reason}"}}', 0.0)


async def until_metric(
    session: aiohttp.ClientSession, server: Process, name: str, want: float, within: float
) -> None:
    """Another process's state: poll its /metrics (there is no event to await)."""
    deadline = time.monotonic() + within
    while (have := (await metrics(session, server)).get(name + "{}")) != want:
        assert time.monotonic() < deadline, f"{name} is {have}, not {want}, after {within} s"
        await asyncio.sleep(0.1)


async def timed_get(session: aiohttp.ClientSession, url: str) -> float:
    started = time.perf_counter()
    async with session.get(url) as response:
        assert response.status == 200, await response.text()
        await response.read()
    return time.perf_counter() - started


async def closed_by_server(connection: Connection, within: float) -> bytes:
    """What the server sent before it closed the connection (fails if it stays open)."""
    reader, _ = connection
    data = b""
    async with asyncio.timeout(within):
        while chunk := await reader.read(65536):
            data += chunk
    return data


@contextlib.asynccontextmanager
async def opened(
    server: Process, count: int, send: Callable[[int], bytes] | None = None
) -> AsyncIterator[list[Connection]]:
    """`count` connections, each sent send(i) as soon as it is open."""
    connections: list[Connection] = []
    try:
        for i in range(count):
            connections.append(await asyncio.open_connection(*server.http))
            if send is not None:
                connections[-1][1].write(send(i))
        yield connections
    finally:
        for _, writer in connections:
            writer.close()
        for _, writer in connections:
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def test_slowloris_is_closed_and_others_are_answered() -> None:
    async with serve("--http-header-timeout", "2") as server, aiohttp.ClientSession() as session:
        async with opened(server, 300) as slow:
            for _, writer in slow:  # a request line and one header, never the blank line
                writer.write(b"GET /v1/services HTTP/1.1\r\nHost: localhost\r\n")
            healthz = base(server) + "/healthz"
            for _ in range(3):  # trickle: a byte each, every half second
                latency = max([await timed_get(session, healthz) for _ in range(10)])
                assert latency < 1.0, f"a normal request took {latency:.2f} s beside slowloris"
                for _, writer in slow:
                    writer.write(b"X")
                await asyncio.sleep(0.5)  # the trickle's pace, not a wait for the server
            started = time.monotonic()
            sent = await asyncio.gather(*(closed_by_server(c, within=10) for c in slow))
            assert not any(sent), "a half-sent request got an answer"
            assert time.monotonic() - started < 10
        samples = await metrics(session, server)
        assert refused(samples, "header_timeout") == 300
        assert samples["discovery_http_connections{}"] == 1  # the scrape's own


async def test_idle_connection_is_closed_after_the_header_timeout() -> None:
    async with serve("--http-header-timeout", "1") as server:
        async with opened(server, 1) as (silent,):
            await closed_by_server(silent, within=5)


async def test_half_sent_body_is_408_and_closed() -> None:
    async with serve("--http-body-timeout", "1") as server, aiohttp.ClientSession() as session:
        async with opened(server, 20) as slow:
            for _, writer in slow:
                writer.write(
                    b"PUT /v1/services/default/web/instances/web-1 HTTP/1.1\r\nHost: localhost\r\n"
                    b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"addr'
                )
            latency = await timed_get(session, base(server) + "/healthz")
            assert latency < 1.0
            answers = await asyncio.gather(*(closed_by_server(c, within=8) for c in slow))
        for answer in answers:
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408"), answer
            assert b"application/problem+json" in head
            assert json.loads(body)["status"] == 408
        samples = await metrics(session, server)
        assert refused(samples, "body_timeout") == 20
        assert not [k for k in samples if '"status": "5' in k]


async def test_connection_cap() -> None:
    async with serve("--http-max-connections", "40") as server:
        async with opened(server, 40) as held:
            async with opened(server, 1) as (extra,):
                answer = await closed_by_server(extra, within=5)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503"), answer
            assert b"Retry-After: 1" in head
            assert json.loads(body)["status"] == 503
            held[0][1].close()  # one leaves: a new client gets in again
            await held[0][1].wait_closed()
            async with aiohttp.ClientSession() as session:
                deadline = time.monotonic() + 5
                while True:  # the server sees the close a moment later
                    try:
                        samples = await metrics(session, server)
                        break
                    except aiohttp.ServerDisconnectedError:
                        assert time.monotonic() < deadline
                        await asyncio.sleep(0.05)
        assert refused(samples, "connections") >= 1


async def test_file_limit_is_raised_to_the_hard_limit() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard <= 512:
        unavailable(f"needs a finite hard descriptor limit above 512 (have {hard})")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c",
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (512, resource.getrlimit("
        "resource.RLIMIT_NOFILE)[1]))\n"
        "from discovery.cli import main\n"
        "sys.argv = ['discovery', 'serve', '--dns', '127.0.0.1:0', '--http', '127.0.0.1:0',"
        " '--cni-socket', '']\n"
        "sys.exit(main())\n",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env=clean_env(),
    )  # fmt: skip
    process = Process(proc)
    try:
        await process.read_until_listening()
        limits = (await asyncio.to_thread(Path(f"/proc/{proc.pid}/limits").read_text)).splitlines()
        line = next(line for line in limits if line.startswith("Max open files"))
        assert line.split()[3:5] == [str(hard), str(hard)], line
        assert any(f"open file limit {hard}" in line for line in process.stderr)
    finally:
        proc.kill()
        await proc.wait()
        if process.drain is not None:
            await process.drain


# long polls


async def register_many(session: aiohttp.ClientSession, server: Process, count: int) -> float:
    """Registrations per second, 20 at a time, into one service nobody polls."""
    queue = iter(range(count))

    async def worker() -> None:
        for i in queue:
            url = f"{base(server)}/v1/services/{NS}/busy/instances/b-{i}"
            body = {"address": f"10.77.{i // 250}.{i % 250 + 1}", "ttl": 60}
            async with session.put(url, json=body) as response:
                assert response.status in (200, 201), await response.text()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(20)))
    return count / (time.perf_counter() - started)


async def dns_latencies(server: Process, count: int) -> list[float]:
    query = dns.message.make_query(f"quiet.{NS}.svc.cluster.local", "A")
    host, port = server.dns
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        answer = await dns.asyncquery.udp(query, host, port=port, timeout=2)
        assert answer.answer, answer
        latencies.append(time.perf_counter() - started)
    return latencies


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


@pytest.mark.timeout(600)  # 5,000 connections made one by one on a loaded machine
async def test_thousands_of_parked_long_polls_cost_other_services_nothing() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2 * LONG_POLLS + 1000:
        unavailable(f"needs a descriptor limit of {2 * LONG_POLLS + 1000} (hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2 * LONG_POLLS + 1000), hard))
    args = ("--http-long-polls-per-client", str(LONG_POLLS), "--http-max-connections", "10000")
    async with serve(*args) as server, aiohttp.ClientSession() as session:
        for i in range(50):  # the services the polls watch, and one the DNS queries ask for
            url = f"{base(server)}/v1/services/{NS}/watched-{i}/instances/w-1"
            body = {"address": f"10.78.0.{i + 1}", "ttl": 3600}  # none expires mid-test
            async with session.put(url, json=body) as response:
                assert response.status == 201
        async with session.put(
            f"{base(server)}/v1/services/{NS}/quiet/instances/q-1",
            json={"address": "10.79.0.1", "ttl": 3600},
        ) as response:
            assert response.status == 201
        async with session.get(f"{base(server)}/v1/services/{NS}/quiet") as response:
            index = response.headers["X-Discovery-Index"]
        baseline_rate = await register_many(session, server, 300)
        baseline_dns = await dns_latencies(server, 200)

        def poll(i: int) -> bytes:
            path = f"/v1/services/{NS}/watched-{i % 50}?index={index}&wait=120s"
            return f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()

        async with opened(server, LONG_POLLS, poll) as polls:
            await until_metric(session, server, "discovery_http_long_polls", LONG_POLLS, 60)
            rate = await register_many(session, server, 300)
            latencies = await dns_latencies(server, 200)
            assert not any(reader.at_eof() or reader._buffer for reader, _ in polls), (
                "a registration elsewhere answered a parked long poll"
            )
            assert rate > baseline_rate / 3, (
                f"registrations {rate:.0f}/s with {LONG_POLLS} parked polls, "
                f"{baseline_rate:.0f}/s without"
            )
            assert p99(latencies) < max(3 * p99(baseline_dns), 0.05), (
                f"DNS p99 {p99(latencies) * 1000:.1f} ms with parked polls, "
                f"{p99(baseline_dns) * 1000:.1f} ms without"
            )
            # a change to a watched service answers exactly its polls
            url = f"{base(server)}/v1/services/{NS}/watched-7/instances/w-2"
            async with session.put(url, json={"address": "10.78.1.7"}) as response:
                assert response.status == 201
            woken = [polls[i] for i in range(7, LONG_POLLS, 50)]
            for reader, _ in woken:
                async with asyncio.timeout(10):
                    head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200"), head
            assert not any(
                reader.at_eof() or reader._buffer
                for i, (reader, _) in enumerate(polls)
                if i % 50 != 7
            )
        # every poll gone (their clients left): nothing stays parked
        await until_metric(session, server, "discovery_http_long_polls", 0, 150)
        await until_metric(session, server, "discovery_http_long_poll_clients", 0, 5)


def parked_polls(server: Server, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:  # the server's own state: nothing to await
        return sum(server.long_polls.values()) == count

    return check


@pytest.fixture
async def capped() -> AsyncIterator[Client]:
    async with run_server(make_config(http_long_polls_per_client=3)) as server:
        async with aiohttp.ClientSession() as session:
            await server.registry.wait(lambda: server.registry.synced, 5)
            yield Client(server, session)


async def test_long_polls_per_client_are_capped(capped: Client) -> None:
    server: Server = capped.server
    await capped.register("default", "web", "web-1", address="10.0.0.1")
    index = server.registry.revision
    paths = [f"/v1/services/default/web?index={index}&wait=60s", f"/v1/services?index={index}"]
    paths.append(f"/v1/registry?index={index}&wait=60s")
    parked = [asyncio.create_task(capped.request("GET", path)) for path in paths]
    await eventually(parked_polls(server, 3), "three polls parked", within=5)
    status, body, headers = await capped.request("GET", paths[0])
    assert status == 429 and headers["Content-Type"].startswith("application/problem+json")
    assert headers["Retry-After"] == "5" and "--http-long-polls-per-client" in body["detail"]
    status, _, _ = await capped.request("GET", "/v1/services/default/web?index=0")
    assert status == 200  # a poll that does not wait is no poll
    await capped.register("default", "web", "web-2", address="10.0.0.2")  # wakes all three
    assert [status for status, _, _ in await asyncio.gather(*parked)] == [200, 200, 200]
    assert not server.long_polls
    status, text, _ = await capped.request("GET", "/metrics")
    assert 'discovery_http_refused_total{reason="long_polls"} 1.0' in text


async def test_a_long_poll_whose_client_leaves_ends(capped: Client) -> None:
    server: Server = capped.server
    await capped.register("default", "web", "web-1", address="10.0.0.1")
    path = f"/v1/services/default/web?index={server.registry.revision}&wait=60s"
    _, writer = await asyncio.open_connection(*server.http_address)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    await eventually(parked_polls(server, 1), "the poll parked", within=5)
    assert server.registry.service_waiters() == 1
    writer.close()
    await writer.wait_closed()
    await eventually(parked_polls(server, 0), "the poll ended", within=5)
    assert server.registry.service_waiters() == 0
    _, text, _ = await capped.request("GET", "/metrics")  # the client leaving is counted
    assert 'route="/v1/services/{ns}/{svc}",status="499"} 1.0' in text, text


async def test_waiters_on_one_service_sleep_through_changes_to_others() -> None:
    registry = Registry("/d/")
    registry.load(Snapshot(1, []))
    woken: list[str] = []

    async def poll(service: str) -> None:
        key = ("ns", service)
        if await registry.wait_service(key, lambda: registry.service_revision(key) > 1, 30):
            woken.append(service)

    tasks = [asyncio.create_task(poll(f"s{i % 100}")) for i in range(2000)]
    await asyncio.sleep(0)  # every poll parks
    assert registry.service_waiters() == 2000
    for revision in range(2, 52):  # fifty changes to a service nobody waits on
        registry.apply([_put(revision, "other", f"o-{revision}")])
    await asyncio.sleep(0)
    assert woken == [] and registry.service_waiters() == 2000
    registry.apply([_put(52, "s7", "x")])
    await asyncio.gather(*(t for i, t in enumerate(tasks) if i % 100 == 7))
    assert woken == ["s7"] * 20 and registry.service_waiters() == 1980
    registry.close()
    await asyncio.gather(*tasks)
    assert registry.service_waiters() == 0 and not registry._service_waiters


async def test_waiters_that_give_up_leave_nothing_behind() -> None:
    registry = Registry("/d/")
    registry.load(Snapshot(1, []))
    await asyncio.gather(
        *(registry.wait_service(("ns", f"s{i}"), lambda: False, 0.01) for i in range(500)),
        *(registry.reached(10**9 + i, 0.01) for i in range(500)),
    )
    assert not registry._service_waiters
    assert len(registry._reaching) < 64 + 1  # compacted: not one entry per poll that gave up


def _put(revision: int, service: str, name: str) -> Event:
    key = InstanceKey("ns", service, name).store_key("/d/")
    value = json.dumps({"address": "10.0.0.1"}).encode()
    return Event(EventType.PUT, key, value, revision, 0)
