"""Hostile DNS clients against a real server: trickling TCP, too many connections from one
address, an amplification attempt, a flood over the rate limit. Each test shows the limit
holding and another client still answered within its normal latency.

Other clients come from other loopback addresses (127.0.0.2 …): per-client limits count by
address.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import statistics
import time

import dns.asyncquery
import dns.flags
import dns.message
import pytest
from conftest import Client
from test_dns_tcp import (
    ADDRESS,
    SERVICE,
    ClientFactory,
    addresses,
    ask,
    close,
    closed_by_server,
    connect,
    framed,
    query,
    register_many,
    serving,
)

__all__ = ["serving"]  # a fixture, used by name

TRICKLERS = 300  # well over the per-client cap; every one a descriptor in this process


async def refused(client: Client, reason: str) -> float:
    status, body, _ = await client.request("GET", "/metrics")
    assert status == 200
    found = re.search(rf'^discovery_dns_refused_total{{reason="{reason}"}} (\S+)$', body, re.M)
    assert found, f"no discovery_dns_refused_total for {reason}"
    return float(found.group(1))


async def latencies(client: Client, count: int, tcp: bool) -> list[float]:
    """Seconds per answered query of a well-behaved client (from 127.0.0.1)."""
    times = []
    for i in range(count):
        started = time.monotonic()
        message = query(qid=i)
        host, port = client.dns
        if tcp:
            response = await dns.asyncquery.tcp(message, host, port=port, timeout=3)
        else:
            response = await dns.asyncquery.udp(message, host, port=port, timeout=3)
        assert addresses(response) == {ADDRESS}
        times.append(time.monotonic() - started)
    return times


async def trickle(client: Client, source: str, every: float, stop: asyncio.Event) -> float | None:
    """Open a connection from `source` and send a query one byte every `every` seconds;
    the seconds until the server closed it after the first byte, None if it never
    accepted (refused at a cap) or outlived `stop`."""
    try:
        reader, writer = await asyncio.open_connection(*client.dns, local_addr=(source, 0))
    except OSError:
        return None
    stream = framed(query()) * 10
    started = time.monotonic()
    try:
        for i in range(len(stream)):
            writer.write(stream[i : i + 1])
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every):
                    if await reader.read(1) == b"":
                        return time.monotonic() - started
            if stop.is_set():
                return None
    except ConnectionError:
        return time.monotonic() - started
    finally:
        writer.close()
    return None


async def test_tricklers_are_cut_at_the_message_deadline(serving: ClientFactory) -> None:
    """A query trickled one byte at a time is cut when its deadline passes, however often
    bytes arrive; tricklers over the per-client cap are refused outright; a normal client
    is answered over TCP and UDP as quickly as before."""
    async with serving(tcp_message_timeout=1.0, tcp_max_connections_per_client=16) as client:
        before = await latencies(client, 10, tcp=True)
        stop = asyncio.Event()
        tricklers = [
            asyncio.create_task(trickle(client, "127.0.0.2", 0.2, stop)) for _ in range(TRICKLERS)
        ]
        await asyncio.sleep(0.3)  # they are connected and trickling
        during = await latencies(client, 20, tcp=True) + await latencies(client, 20, tcp=False)
        results = await asyncio.gather(*tricklers)
        stop.set()
        cut = [seconds for seconds in results if seconds is not None]
        # 16 held a slot and were cut near the deadline; the rest were refused at once
        assert len(cut) == TRICKLERS, "every trickler was closed by the server"
        assert max(cut) < 4.0, f"a trickler kept its slot {max(cut):.1f} s"
        assert await refused(client, "tcp_client_connections") >= TRICKLERS - 16
        assert await refused(client, "tcp_message_timeout") >= 16
        assert statistics.median(during) < max(10 * statistics.median(before), 0.2)


async def test_per_client_cap_leaves_room_for_other_clients(serving: ClientFactory) -> None:
    async with serving(tcp_max_connections_per_client=2) as client:
        first, second = await connect(client), await connect(client)
        assert addresses(await ask(first, query(qid=1))) == {ADDRESS}
        assert addresses(await ask(second, query(qid=2))) == {ADDRESS}
        third = await connect(client)
        with contextlib.suppress(ConnectionError):
            third[1].write(framed(query(qid=3)))
            await third[1].drain()
        assert await closed_by_server(third[0])
        await close(third[1])
        other = await asyncio.open_connection(*client.dns, local_addr=("127.0.0.2", 0))
        assert addresses(await ask(other, query(qid=4))) == {ADDRESS}
        for _, writer in (first, second, other):
            await close(writer)
        assert await refused(client, "tcp_client_connections") == 1


async def test_idle_timeout_is_not_reset_by_single_bytes(serving: ClientFactory) -> None:
    """The old hole: each byte reset the idle timer, so one byte every few seconds held a
    connection for ever."""
    async with serving(tcp_idle_timeout=30, tcp_message_timeout=0.8) as client:
        stop = asyncio.Event()
        seconds = await trickle(client, "127.0.0.1", 0.1, stop)
        assert seconds is not None and 0.7 <= seconds < 3.0, seconds
        assert await refused(client, "tcp_message_timeout") == 1
        assert addresses(await client.query(SERVICE, tcp=True)) == {ADDRESS}


async def test_amplification_attempt_gets_at_most_1232_bytes(client: Client) -> None:
    """A small query advertising 65,535 bytes for a large service: the answer stays within
    the 1,232 bytes the server advertises (TC=1, the records that fit)."""
    await register_many(client, "big", 200)
    message = dns.message.make_query(
        "big.default.svc.cluster.local", "A", use_edns=0, payload=65535
    )
    wire = message.to_wire()
    assert len(wire) < 64
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)
        for _ in range(20):
            sock.sendto(wire, client.dns)
            data = await asyncio.to_thread(sock.recv, 65535)
            assert len(data) <= 1232
            response = dns.message.from_wire(data)
            assert response.flags & dns.flags.TC
            assert 0 < len(addresses(response)) < 200
    over_tcp = await client.query("big.default.svc.cluster.local", "A", tcp=True)
    assert len(addresses(over_tcp)) == 200


async def test_rate_limit_drops_a_flood_and_spares_others(serving: ClientFactory) -> None:
    async with serving(dns_rate_limit=20) as client:
        wire = query().to_wire()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flood:
            flood.bind(("127.0.0.3", 0))
            flood.settimeout(0.5)
            started = time.monotonic()
            for i in range(200):
                flood.sendto(bytes((i >> 8, i & 0xFF)) + wire[2:], client.dns)
            answered = 0
            with contextlib.suppress(TimeoutError):
                while True:
                    await asyncio.to_thread(flood.recv, 4096)
                    answered += 1
            elapsed = time.monotonic() - started
        assert 0 < answered <= 20 + 20 * elapsed + 1
        assert await refused(client, "rate_limit") >= 200 - answered
        # another address is not held back by the flood
        assert await latencies(client, 5, tcp=False)


@pytest.mark.parametrize("reason", ["tcp_connections", "tcp_message_timeout", "rate_limit"])
async def test_every_refusal_reason_is_on_metrics(client: Client, reason: str) -> None:
    assert await refused(client, reason) == 0
