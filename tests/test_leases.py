"""Lease semantics seen from outside: an instance lives exactly as long as its lease."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from conftest import Client, make_config

from discovery.server import run_server

ZONE = "cluster.local"
INST = "/v1/services/default/web/instances/"
WEB = f"web.default.svc.{ZONE}"
WEB_1 = f"web-1.{WEB}"


@pytest.fixture
async def short() -> AsyncIterator[Client]:
    """A server that accepts one-second leases."""
    async with run_server(make_config(min_ttl=1)) as server, aiohttp.ClientSession() as session:
        assert await server.registry.wait(lambda: server.registry.synced, 5)
        yield Client(server, session)


def live(client: Client, name: str = "web-1") -> bool:
    return name in client.server.registry.instances(("default", "web"))


async def settle(client: Client) -> None:
    revision = await client.server.store.revision()
    assert await client.wait_cache(lambda: client.server.registry.revision >= revision)


def ttls(response: dns.message.Message) -> dict[int, int]:
    """The TTL of each answer RRset, by type."""
    return {rrset.rdtype: rrset.ttl for rrset in response.answer}


async def serial(client: Client) -> int:
    response = await client.query(ZONE, "SOA")
    assert response.rcode() == dns.rcode.NOERROR
    return int(response.answer[0][0].serial)


async def test_expiry_removes_the_name_within_a_second(short: Client) -> None:
    ttl = 2
    started = time.monotonic()  # before the lease is granted: elapsed can only be overstated
    await short.register("default", "web", "web-1", expect=201, address="10.0.0.1", ttl=ttl)
    assert await short.wait_cache(lambda: live(short))
    assert await short.addresses(WEB_1) == {"10.0.0.1"}
    assert await short.wait_cache(lambda: not live(short), timeout=5), "the lease never expired"
    elapsed = time.monotonic() - started
    for name in (WEB_1, WEB):
        response = await short.query(name)
        assert response.rcode() == dns.rcode.NXDOMAIN, name
        assert response.authority and response.authority[0].rdtype == dns.rdatatype.SOA
    assert ttl - 0.05 <= elapsed <= ttl + 1.0, elapsed
    status, body, _ = await short.request("GET", "/v1/services/default/web")
    assert (status, body["instances"]) == (200, [])


async def test_heartbeats_keep_the_instance(short: Client) -> None:
    ttl = 2
    first = await short.register("default", "web", "web-1", expect=201, address="10.0.0.1", ttl=ttl)
    assert await short.wait_cache(lambda: live(short))
    revision = short.server.registry.revision
    deadline = time.monotonic() + 3 * ttl
    beats = 0
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)  # paces the heartbeats: well inside the 2 s lease
        status, body, _ = await short.request("PUT", INST + "web-1/heartbeat")
        assert status == 200, body
        assert body["lease"]["id"] == first["lease"]["id"]
        beats += 1
    assert beats >= 10
    assert live(short)
    assert short.server.registry.revision == revision, "the instance was deleted and re-added"
    assert await short.addresses(WEB_1) == {"10.0.0.1"}
    assert await short.addresses(WEB) == {"10.0.0.1"}


async def test_heartbeat_after_expiry_is_404_then_register_again(short: Client) -> None:
    await short.register("default", "web", "web-1", expect=201, address="10.0.0.1", ttl=1)
    assert await short.wait_cache(lambda: live(short))
    assert await short.wait_cache(lambda: not live(short), timeout=5)
    status, body, headers = await short.request("PUT", INST + "web-1/heartbeat")
    assert status == 404, body
    assert headers["Content-Type"].startswith("application/problem+json")
    assert body["status"] == 404 and "register" in body["detail"]
    status, _, _ = await short.request("GET", INST + "web-1")
    assert status == 404
    again = await short.register("default", "web", "web-1", expect=201, address="10.0.0.2", ttl=5)
    assert again["lease"]["ttl"] == 5
    assert await short.wait_cache(lambda: live(short))
    assert await short.addresses(WEB_1) == {"10.0.0.2"}
    status, _, _ = await short.request("PUT", INST + "web-1/heartbeat")
    assert status == 200


async def test_an_expiring_lease_does_not_take_a_reregistration_with_it(short: Client) -> None:
    await short.register("default", "web", "web-1", expect=201, address="10.0.0.1", ttl=1)
    await short.register("default", "web", "web-1", expect=200, address="10.0.0.2", ttl=30)
    await settle(short)
    # the first lease would have expired by now; the key is bound to the second one
    assert not await short.wait_cache(lambda: not live(short), timeout=1.5)
    assert await short.addresses(WEB_1) == {"10.0.0.2"}


async def test_delete_removes_the_name_at_once(client: Client) -> None:
    await client.register("default", "web", "web-1", expect=201, address="10.0.0.1")
    await client.register("default", "web", "web-2", expect=201, address="10.0.0.2")
    assert await client.wait_cache(lambda: live(client) and live(client, "web-2"))
    assert await client.addresses(WEB) == {"10.0.0.1", "10.0.0.2"}
    status, _, _ = await client.request("DELETE", INST + "web-1")
    assert status == 204
    # no wait: the answer after the 204 must already be the new one
    assert (await client.query(WEB_1)).rcode() == dns.rcode.NXDOMAIN
    assert (await client.query("1.0.0.10.in-addr.arpa", "PTR")).rcode() == dns.rcode.NXDOMAIN
    assert await client.addresses(WEB) == {"10.0.0.2"}
    status, _, _ = await client.request("DELETE", INST + "web-2")
    assert status == 204
    assert (await client.query(WEB)).rcode() == dns.rcode.NXDOMAIN


async def test_dns_ttl_never_exceeds_the_lease(short: Client) -> None:
    ports = [{"name": "http", "port": 80}]
    await short.register("default", "web", "web-1", address="10.0.0.1", ttl=2, ports=ports)
    await short.register("default", "web", "web-2", address="10.0.0.2", ttl=30, ports=ports)
    await short.register("default", "api", "api-1", address="10.0.1.1", ttl=4)
    await short.register("default", "api", "api-2", address="10.0.1.2", ttl=3)
    await settle(short)
    a = dns.rdatatype.A
    assert ttls(await short.query(WEB_1)) == {a: 2}
    assert ttls(await short.query(f"web-2.{WEB}")) == {a: 5}  # --dns-ttl caps a longer lease
    assert ttls(await short.query(WEB)) == {a: 2}  # the RRset takes the shortest lease
    srv = await short.query(f"_http._tcp.{WEB}", "SRV")
    assert ttls(srv) == {dns.rdatatype.SRV: 2}
    assert {rrset.name.to_text(): rrset.ttl for rrset in srv.additional} == {
        f"{WEB_1}.": 2, f"web-2.{WEB}.": 5,
    }
    assert ttls(await short.query("1.0.0.10.in-addr.arpa", "PTR")) == {dns.rdatatype.PTR: 2}
    assert ttls(await short.query(f"api.default.svc.{ZONE}")) == {a: 3}
    assert ttls(await short.query(f"api-1.api.default.svc.{ZONE}")) == {a: 4}
    # the short lease leaves: the RRset TTL goes back up
    status, _, _ = await short.request("DELETE", INST + "web-1")
    assert status == 204
    await settle(short)
    assert ttls(await short.query(WEB)) == {a: 5}


async def test_soa_serial_increases_with_each_change(short: Client) -> None:
    serials = [await serial(short)]

    async def changed() -> None:
        await settle(short)
        serials.append(await serial(short))
        assert serials[-1] > serials[-2], serials
        assert serials[-1] == short.server.registry.revision % 2**32

    await short.register("default", "web", "web-1", expect=201, address="10.0.0.1", ttl=1)
    await changed()
    await short.register("default", "web", "web-2", expect=201, address="10.0.0.2")
    await changed()
    await short.register("default", "web", "web-2", expect=200, address="10.0.0.3")
    await changed()
    status, _, _ = await short.request("DELETE", INST + "web-2")
    assert status == 204
    await changed()
    assert await short.wait_cache(lambda: not live(short), timeout=5)  # web-1's lease expires
    serials.append(await serial(short))
    assert serials[-1] > serials[-2], serials
    # negative answers carry the same SOA
    response = await short.query(WEB_1)
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert int(response.authority[0][0].serial) == serials[-1]
    # a heartbeat is not a change
    await short.register("default", "web", "web-4", expect=201, address="10.0.0.4")
    await settle(short)
    before = await serial(short)
    status, _, _ = await short.request("PUT", INST + "web-4/heartbeat")
    assert status == 200
    assert await serial(short) == before
