"""DNS over TCP (RFC 7766) and truncation, against a real server on free ports."""

from __future__ import annotations

import asyncio
import select
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import aiohttp
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from conftest import Client, make_config

from discovery.server import Server, run_server

SERVICE = "web.default.svc.cluster.local"
ADDRESS = "10.1.2.3"

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]
ClientFactory = Callable[..., AbstractAsyncContextManager[Client]]


@pytest.fixture
def serving() -> ClientFactory:
    """A server with config overrides and one registered instance, as a client."""

    @asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[Client]:
        async with run_server(make_config(**overrides)) as server:
            await server.registry.wait(lambda: server.registry.synced, 5)
            async with aiohttp.ClientSession() as session:
                client = Client(server, session)
                await client.register("default", "web", "web-1", address=ADDRESS, ttl=60)
                assert await client.wait_cache(lambda: visible(server, "web") == 1)
                yield client

    return start


def visible(server: Server, service: str) -> int:
    return len(server.registry.instances(("default", service)))


def query(name: str = SERVICE, rdtype: str = "A", qid: int | None = None) -> dns.message.Message:
    message = dns.message.make_query(name, rdtype)
    if qid is not None:
        message.id = qid
    return message


def framed(message: dns.message.Message) -> bytes:
    wire = message.to_wire()
    return len(wire).to_bytes(2, "big") + wire


async def connect(client: Client) -> Connection:
    reader, writer = await asyncio.open_connection(*client.dns)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


async def read_response(reader: asyncio.StreamReader) -> dns.message.Message:
    async with asyncio.timeout(3):
        size = int.from_bytes(await reader.readexactly(2), "big")
        return dns.message.from_wire(await reader.readexactly(size))


async def closed_by_server(reader: asyncio.StreamReader, within: float = 5.0) -> bool:
    """True once the server has closed (EOF or reset) with nothing more sent."""
    async with asyncio.timeout(within):
        try:
            return await reader.read() == b""
        except ConnectionResetError:
            return True


def addresses(response: dns.message.Message) -> set[str]:
    return {rr.to_text() for rrset in response.answer for rr in rrset}


async def ask(connection: Connection, message: dns.message.Message) -> dns.message.Message:
    reader, writer = connection
    writer.write(framed(message))
    await writer.drain()
    return await read_response(reader)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except ConnectionError:
        pass  # the server may already have reset it


async def test_pipelined_queries_in_one_write_are_all_answered(client: Client) -> None:
    await client.register("default", "web", "web-1", address=ADDRESS, ttl=60)
    await client.register("default", "api", "api-1", address="10.9.9.9", ttl=60)
    assert await client.wait_cache(lambda: visible(client.server, "api") == 1)
    names = [SERVICE, "api.default.svc.cluster.local", "nope.default.svc.cluster.local"] * 3
    queries = [query(name, qid=1000 + i) for i, name in enumerate(names)]
    reader, writer = await connect(client)
    writer.write(b"".join(framed(q) for q in queries))
    await writer.drain()
    responses = [await read_response(reader) for _ in queries]
    await close(writer)
    assert [r.id for r in responses] == [q.id for q in queries]
    expected = {SERVICE: {ADDRESS}, "api.default.svc.cluster.local": {"10.9.9.9"}}
    for name, response in zip(names, responses, strict=True):
        assert str(response.question[0].name) == name + "."
        assert addresses(response) == expected.get(name, set())
        nx = name not in expected
        assert response.rcode() == (dns.rcode.NXDOMAIN if nx else dns.rcode.NOERROR)


async def test_query_sent_byte_by_byte_is_answered(client: Client) -> None:
    await client.register("default", "web", "web-1", address=ADDRESS, ttl=60)
    assert await client.wait_cache(lambda: visible(client.server, "web") == 1)
    reader, writer = await connect(client)
    first, second = query(qid=7), query(qid=8)
    stream = framed(first) + framed(second)
    for i in range(len(stream)):
        writer.write(stream[i : i + 1])
        await writer.drain()
        await asyncio.sleep(0)  # let the server read this byte on its own
    responses = [await read_response(reader), await read_response(reader)]
    await close(writer)
    assert [r.id for r in responses] == [7, 8]
    assert [addresses(r) for r in responses] == [{ADDRESS}, {ADDRESS}]


async def test_idle_connection_is_closed_after_the_timeout(serving: ClientFactory) -> None:
    async with serving(tcp_idle_timeout=0.5) as client:
        connection = await connect(client)
        assert addresses(await ask(connection, query())) == {ADDRESS}
        answered = time.monotonic()
        assert await closed_by_server(connection[0])
        idle = time.monotonic() - answered
        await close(connection[1])
        assert 0.4 <= idle < 4, idle
        # The listener itself is unaffected.
        assert addresses(await client.query(SERVICE, tcp=True)) == {ADDRESS}


async def test_activity_keeps_a_connection_open_past_the_timeout(serving: ClientFactory) -> None:
    async with serving(tcp_idle_timeout=0.6) as client:
        connection = await connect(client)
        started = time.monotonic()
        while time.monotonic() - started < 1.5:  # well past one idle timeout in total
            assert addresses(await ask(connection, query())) == {ADDRESS}
            await asyncio.sleep(0.2)  # pacing below the timeout is the point here
        assert addresses(await ask(connection, query())) == {ADDRESS}
        await close(connection[1])


async def test_connection_cap_closes_the_extra_connection(serving: ClientFactory) -> None:
    async with serving(tcp_max_connections=2) as client:
        first, second = await connect(client), await connect(client)
        # An answer on each proves the server has accepted and counted both.
        assert addresses(await ask(first, query(qid=1))) == {ADDRESS}
        assert addresses(await ask(second, query(qid=2))) == {ADDRESS}
        third = await connect(client)
        try:
            third[1].write(framed(query(qid=3)))
            await third[1].drain()
        except ConnectionError:
            pass  # already reset: as good as closed
        assert await closed_by_server(third[0])
        await close(third[1])
        assert addresses(await ask(first, query(qid=4))) == {ADDRESS}
        assert addresses(await ask(second, query(qid=5))) == {ADDRESS}
        await close(first[1])
        await close(second[1])


def flood_until_blocked(sock: socket.socket) -> int:
    """Pipeline queries without reading answers until the server stops reading them."""
    frame = framed(query()) * 64
    sock.settimeout(0.5)  # this long without progress: the server has paused reading
    sent = 0
    try:
        while True:
            sent += sock.send(frame)
    except TimeoutError:
        return sent


def wait_for_close(sock: socket.socket, seconds: float) -> bool:
    """Block (in a thread) until the peer closes its side (FIN), resets or hangs up, not on
    readable data. The server closes a stuck connection after its idle timeout: with a FIN
    when the kernel took every answer by then, else with a reset one timeout later."""
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP)  # and POLLERR / POLLHUP, always reported
    return bool(poller.poll(seconds * 1000))


async def test_client_that_never_reads_is_cut_off(serving: ClientFactory) -> None:
    """A connection stuck on unread answers must not outlive the idle timeout (nor the cap)."""
    async with serving(tcp_idle_timeout=0.5, tcp_max_connections=1) as client:
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(client.dns)
        with stuck:
            assert await asyncio.to_thread(flood_until_blocked, stuck) > 100_000
            started = time.monotonic()
            assert await asyncio.to_thread(wait_for_close, stuck, 5), "never closed"
            assert time.monotonic() - started < 4
        # Its slot is free again.
        assert addresses(await client.query(SERVICE, tcp=True)) == {ADDRESS}


async def test_shutdown_resets_a_client_that_never_reads(serving: ClientFactory) -> None:
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with stuck:
        async with serving(tcp_idle_timeout=30) as client:
            stuck.connect(client.dns)
            assert await asyncio.to_thread(flood_until_blocked, stuck) > 100_000
        # The server is gone: its connection must not linger, holding unread answers.
        assert await asyncio.to_thread(wait_for_close, stuck, 2)


async def register_many(client: Client, service: str, count: int) -> None:
    async def one(i: int) -> None:
        address = f"10.20.{i // 250}.{i % 250 + 1}"
        await client.register("default", service, f"i-{i}", address=address, ttl=60)

    await asyncio.gather(*(one(i) for i in range(count)))
    assert await client.wait_cache(lambda: visible(client.server, service) == count)


async def test_a_hundred_instances_fit_over_tcp(client: Client) -> None:
    await register_many(client, "big", 100)
    response = await client.query("big.default.svc.cluster.local", "A", tcp=True)
    assert not response.flags & dns.flags.TC
    expected = {f"10.20.{i // 250}.{i % 250 + 1}" for i in range(100)}
    assert addresses(response) == expected
    assert sum(len(rrset) for rrset in response.answer) == 100


async def test_a_hundred_instances_over_plain_udp_are_truncated(client: Client) -> None:
    await register_many(client, "big", 100)
    response = await client.query("big.default.svc.cluster.local", "A")
    assert response.flags & dns.flags.TC
    assert response.rcode() == dns.rcode.NOERROR
    assert len(response.to_wire()) <= 512
    assert str(response.question[0].name) == "big.default.svc.cluster.local."
    # RFC 2181 9: a cut set is never silent: TC=1 with the records that fit (never none).
    assert 0 < sum(len(rrset) for rrset in response.answer) < 100


async def test_a_hundred_instances_with_edns_512_are_truncated(client: Client) -> None:
    await register_many(client, "big", 100)
    response = await client.query("big.default.svc.cluster.local", "A", edns=0, payload=512)
    assert response.flags & dns.flags.TC
    assert response.edns == 0  # the OPT record survives truncation
