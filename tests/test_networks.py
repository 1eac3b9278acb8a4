"""Networks, node blocks and attachments through the HTTP API, and the DNS names they make.

On the embedded store in-process; on a real etcd with two nodes allocating at once, and with
a node process killed (its lease ends: its block, attachments and names go everywhere).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import signal
from typing import Any

import aiohttp
import dns.rcode
import etcd_support
import pytest
from conftest import Client
from test_cli import serve
from test_replicas import replica, session, synced

from discovery.net.records import NetworkKeys
from discovery.store.etcd import EtcdStore

etcd_server = etcd_support.etcd_server
EtcdServer = etcd_support.EtcdServer
open_etcd_store = etcd_support.open_etcd_store
_fixtures = (session,)  # imported for pytest


async def node_put(
    session: aiohttp.ClientSession, http: tuple[str, int], path: str, body: Any
) -> tuple[int, Any]:
    """A PUT to a node started as a process, retried while it is still loading (503)."""
    url = f"http://{http[0]}:{http[1]}{path}"
    async with asyncio.timeout(10):
        while True:
            async with session.put(url, json=body) as response:
                data = await response.json(content_type=None)
                if response.status != 503:
                    return response.status, data
            await asyncio.sleep(0.05)


async def put_network(client: Client, name: str = "pods", **body: Any) -> dict[str, Any]:
    body = {"subnet": "10.244.0.0/16", "node_prefix": 28, **body}
    status, data, _ = await client.request("PUT", f"/v1/networks/{name}", json=body)
    assert status in (200, 201), data
    return data  # type: ignore[no-any-return]


async def attach(
    client: Client, cid: str, ifname: str = "eth0", net: str = "pods", **body: Any
) -> tuple[int, Any]:
    path = f"/v1/networks/{net}/attachments/{cid}/{ifname}"
    status, data, _ = await client.request("PUT", path, json=body if body else None)
    return status, data


async def detach(client: Client, cid: str, ifname: str = "eth0", net: str = "pods") -> int:
    path = f"/v1/networks/{net}/attachments/{cid}/{ifname}"
    status, _, _ = await client.request("DELETE", path)
    return status


# the API on the embedded store


async def test_networks_are_created_listed_validated_and_deleted(client: Client) -> None:
    status, data, _ = await client.request(
        "PUT", "/v1/networks/pods", json={"subnet": "10.244.0.0/16", "node_prefix": 24}
    )
    assert status == 201
    assert data["subnet"] == "10.244.0.0/16" and data["backend"] == "bridge"
    assert data["mtu"] == 1500 and data["blocks"] == [] and data["attachments"] == 0
    status, data, _ = await client.request(
        "PUT", "/v1/networks/pods", json={"subnet": "10.244.0.0/16", "backend": "vxlan"}
    )
    assert status == 200 and data["mtu"] == 1450
    status, data, _ = await client.request("GET", "/v1/networks")
    assert [n["name"] for n in data["networks"]] == ["pods"]
    bad = [
        ({"subnet": "fd00::/64"}, "subnet"),
        ({"subnet": "10.244.0.1/16"}, "subnet"),
        ({"subnet": "nonsense"}, "subnet"),
        ({"subnet": "10.0.0.0/16", "node_prefix": 8}, "node_prefix"),
        ({"subnet": "10.0.0.0/16", "node_prefix": 31}, "node_prefix"),
        ({"subnet": "10.0.0.0/16", "backend": "ipip"}, "backend"),
        ({"subnet": "10.0.0.0/16", "colour": "red"}, "colour"),
        ({"subnet": "10.0.0.0/16", "vni": 2**24}, "vni"),
    ]
    for body, field in bad:
        status, data, headers = await client.request("PUT", "/v1/networks/other", json=body)
        assert status == 400, (body, data)
        assert headers["Content-Type"].startswith("application/problem+json")
        assert [e["field"] for e in data["errors"]] == [field], data
    status, data, _ = await client.request(
        "PUT", "/v1/networks/Bad_Name", json={"subnet": "10.0.0.0/8"}
    )
    assert status == 400
    assert (await client.request("GET", "/v1/networks/nosuch"))[0] == 404
    assert (await client.request("DELETE", "/v1/networks/pods"))[0] == 204
    assert (await client.request("DELETE", "/v1/networks/pods"))[0] == 404
    assert (await client.request("GET", "/v1/networks/pods"))[0] == 404


async def test_an_attachment_gets_an_address_a_name_and_a_pointer(client: Client) -> None:
    await put_network(client)
    status, first = await attach(client, "4f3c2b1a0d9e8f7a", name="web-a")
    assert status == 201, first
    block = ipaddress.ip_network(first["subnet"])
    address = ipaddress.ip_address(first["address"])
    assert block.prefixlen == first["prefix_len"] == 28
    assert address in block and address in ipaddress.ip_network("10.244.0.0/16")
    assert address not in (block.network_address, block.broadcast_address)
    assert first["gateway"] == str(block.network_address + 1) != first["address"]
    assert first["routes"] == [{"dst": "10.244.0.0/16", "gw": first["gateway"]}]
    assert first["node"] == client.server.config.node and first["mtu"] == 1500
    # the same call again: the same answer, 200
    status, again = await attach(client, "4f3c2b1a0d9e8f7a", name="web-a")
    assert status == 200 and again == first
    status, got, _ = await client.request(
        "GET", "/v1/networks/pods/attachments/4f3c2b1a0d9e8f7a/eth0"
    )
    assert status == 200 and got == first
    listed = (await client.request("GET", "/v1/networks/pods/attachments"))[1]
    assert listed["attachments"] == [first]

    assert await client.addresses("web-a.pods.net.cluster.local") == {first["address"]}
    ptr = await client.query(ipaddress.ip_address(first["address"]).reverse_pointer, "PTR")
    assert [rr.to_text() for rrset in ptr.answer for rr in rrset] == [
        "web-a.pods.net.cluster.local."
    ]
    # the default name: the first 12 characters of the container ID
    status, second = await attach(client, "ABCDEF0123456789xyz")
    assert status == 201 and second["name"] == "abcdef012345"
    assert await client.addresses("abcdef012345.pods.net.cluster.local") == {second["address"]}
    assert second["address"] != first["address"]
    empty = await client.query("pods.net.cluster.local")  # an empty non-terminal
    assert empty.rcode() == dns.rcode.NOERROR and not empty.answer

    assert await detach(client, "4f3c2b1a0d9e8f7a") == 204
    assert await detach(client, "4f3c2b1a0d9e8f7a") == 204  # CNI DEL is idempotent
    assert await detach(client, "never-attached") == 204
    gone = await client.query("web-a.pods.net.cluster.local")
    assert gone.rcode() == dns.rcode.NXDOMAIN
    status, _, _ = await client.request(
        "GET", "/v1/networks/pods/attachments/4f3c2b1a0d9e8f7a/eth0"
    )
    assert status == 404


async def test_freed_addresses_come_back_only_after_the_rest_of_the_block(client: Client) -> None:
    await put_network(client, node_prefix=29)  # .2 … .6: five addresses per block
    taken = []
    for i in range(5):
        status, data = await attach(client, f"c{i}")
        assert status == 201, data
        taken.append(data["address"])
    assert taken == [f"10.244.0.{i}" for i in range(2, 7)]  # never .0, .1 (gateway), .7
    status, data = await attach(client, "c5")
    assert status == 507, data
    assert "pods" in data["detail"] and data["title"]
    keys = NetworkKeys(client.server.config.etcd_prefix)
    stored = await client.server.store.load(keys.attachments("pods"))
    assert len(stored.items) == 5  # nothing written for the refused one
    # a crash-looping container: its freed address is not handed straight back
    assert await detach(client, "c1") == 204
    assert await detach(client, "c3") == 204
    _, data = await attach(client, "c1-again")
    assert data["address"] == "10.244.0.3"  # after the cursor (.6): wraps to the first free
    _, data = await attach(client, "c3-again")
    assert data["address"] == "10.244.0.5"


async def test_allocations_at_once_share_transactions_and_keep_every_rule(client: Client) -> None:
    await put_network(client, node_prefix=28)  # .2 … .14: thirteen addresses per block
    # the same container ten times at once: one allocation, the same answer for all
    same = await asyncio.gather(*(attach(client, "twice") for _ in range(10)))
    assert sorted(status for status, _ in same) == [200] * 9 + [201], same
    assert len({json.dumps(data, sort_keys=True) for _, data in same}) == 1
    assert same[0][1]["address"] == "10.244.0.2"
    # fifteen more at once into the twelve left: handed out in order from the cursor, never
    # the network, gateway or broadcast address; the three too many are refused, unwritten
    results = await asyncio.gather(*(attach(client, f"c{i:02d}") for i in range(15)))
    statuses = [status for status, _ in results]
    assert sorted(statuses) == [201] * 12 + [507] * 3, results
    addresses = sorted(
        (ipaddress.ip_address(data["address"]) for status, data in results if status == 201),
    )
    assert [str(a) for a in addresses] == [f"10.244.0.{i}" for i in range(3, 15)]
    keys = NetworkKeys(client.server.config.etcd_prefix)
    stored = await client.server.store.load(keys.attachments("pods"))
    assert len(stored.items) == 13
    assert len({kv.mod_revision for kv in stored.items}) < 13  # fewer transactions
    addressed = await client.server.store.load(keys.address("pods", ""))
    assert len(addressed.items) == 13
    for status, data in results:
        if status == 201:
            assert await client.addresses(f"{data['name']}.pods.net.cluster.local") == {
                data["address"]
            }


async def test_a_container_with_a_service_is_an_instance_while_attached(client: Client) -> None:
    await put_network(client)
    service = {
        "namespace": "shop",
        "service": "cart",
        "ports": [{"name": "http", "port": 8080}],
    }
    status, data = await attach(client, "cart0container", name="cart-0", service=service)
    assert status == 201, data
    assert await client.addresses("cart.shop.svc.cluster.local") == {data["address"]}
    srv = await client.query("_http._tcp.cart.shop.svc.cluster.local", "SRV")
    assert [rr.to_text() for rrset in srv.answer for rr in rrset] == [
        "0 100 8080 cart-0.cart.shop.svc.cluster.local."
    ]
    status, listing, _ = await client.request("GET", "/v1/services/shop/cart")
    assert [i["name"] for i in listing["instances"]] == ["cart-0"]
    ptr = await client.query(ipaddress.ip_address(data["address"]).reverse_pointer, "PTR")
    assert {rr.to_text() for rrset in ptr.answer for rr in rrset} == {
        "cart-0.pods.net.cluster.local.",
        "cart-0.cart.shop.svc.cluster.local.",
    }
    # a registration may not take an attached instance's name, nor the other way round
    status, conflict = await attach(client, "other", name="cart-x", service={**service})
    assert status == 201, conflict
    assert await detach(client, "other") == 204
    await client.register("shop", "cart", "cart-9", address="10.9.9.9")
    status, conflict = await attach(client, "nine", service={**service, "instance": "cart-9"})
    assert status == 409, conflict
    assert await detach(client, "cart0container") == 204
    assert await client.addresses("cart-0.cart.shop.svc.cluster.local") == set()
    assert await client.addresses("cart.shop.svc.cluster.local") == {"10.9.9.9"}


async def test_conflicts_and_bad_paths(client: Client) -> None:
    await put_network(client)
    status, data = await attach(client, "abc", name="same")
    assert status == 201
    status, data = await attach(client, "def", name="same")
    assert status == 409 and "same" in data["detail"]
    # subnet and node_prefix cannot change under attachments, nor the network go
    status, data, _ = await client.request(
        "PUT", "/v1/networks/pods", json={"subnet": "10.245.0.0/16", "node_prefix": 28}
    )
    assert status == 409, data
    status, data, _ = await client.request(
        "PUT", "/v1/networks/pods", json={"subnet": "10.244.0.0/16", "node_prefix": 28, "mtu": 1400}
    )
    assert status == 200 and data["mtu"] == 1400  # other fields may change
    assert (await client.request("DELETE", "/v1/networks/pods"))[0] == 409
    status, data = await attach(client, "abc", net="nosuch")
    assert status == 404 and "nosuch" in data["detail"]
    for cid, ifname in (("has space", "eth0"), ("ok", "a" * 16), ("-x", "eth0")):
        status, data = await attach(client, cid, ifname)
        assert status in (400, 404), (cid, ifname, data)
    status, data = await attach(client, "_leading", name="Not_A_Label")
    assert status == 400
    status, data = await attach(client, "x.y", name="fine", colour="red")
    assert status == 400 and data["errors"][0]["field"] == "colour"
    assert await detach(client, "abc") == 204
    assert (await client.request("DELETE", "/v1/networks/pods"))[0] == 204


# on etcd: several nodes


@pytest.mark.etcd
async def test_two_nodes_allocating_at_once_never_share_an_address(
    etcd_server: EtcdServer, session: aiohttp.ClientSession
) -> None:
    async with (
        replica(etcd_server.endpoint, session, node="n1") as a,
        replica(etcd_server.endpoint, session, node="n2") as b,
    ):
        await synced(a, b)
        await put_network(a, node_prefix=24)
        assert await b.wait_cache(lambda: b.server.registry.network("pods") is not None)
        results = await asyncio.gather(
            *(attach(node, f"{node.server.config.node}-c{i}") for node in (a, b) for i in range(30))
        )
        assert all(status == 201 for status, _ in results), results
        addresses = [data["address"] for _, data in results]
        assert len(set(addresses)) == 60
        by_node: dict[str, set[str]] = {}
        for _, data in results:
            by_node.setdefault(data["node"], set()).add(data["subnet"])
        assert len(by_node["n1"]) == len(by_node["n2"]) == 1 and by_node["n1"] != by_node["n2"]
        # every replica names every container
        total = 60
        for client in (a, b):
            assert await client.wait_cache(
                lambda c=client: len(c.server.registry.attachments("pods")) == total
            )
        assert await a.addresses("n2-c7.pods.net.cluster.local") == {results[37][1]["address"]}
        _, network, _ = await b.request("GET", "/v1/networks/pods")
        assert sorted(blk["node"] for blk in network["blocks"]) == ["n1", "n2"]
        assert network["attachments"] == 60


@pytest.mark.etcd
async def test_many_allocations_at_once_on_etcd_from_two_nodes_and_two_workers(
    etcd_server: EtcdServer, session: aiohttp.ClientSession
) -> None:
    """Concurrent allocations are committed in groups: every address distinct, never a
    reserved one, each node's block handed out in order. Two workers of one node share its
    block and lease, so their groups collide and fall back to one transaction each."""
    lease = 0x5EED
    async with (
        replica(etcd_server.endpoint, session, node="n1") as a,
        replica(etcd_server.endpoint, session, node="n2", node_lease=lease) as b,
        replica(etcd_server.endpoint, session, node="n2", node_lease=lease) as c,
    ):
        await synced(a, b, c)
        await put_network(a, node_prefix=24)
        for other in (b, c):
            assert await other.wait_cache(lambda o=other: o.server.registry.network("pods"))
        # n1 alone first: its group transactions hand out its block in cursor order
        results = await asyncio.gather(*(attach(a, f"a{i}") for i in range(60)))
        assert all(status == 201 for status, _ in results), results
        assert sorted(ipaddress.ip_address(data["address"]).packed[3] for _, data in results) == (
            list(range(2, 62))
        )
        keys = NetworkKeys(a.server.config.etcd_prefix)
        async with open_etcd_store(etcd_server) as etcd:
            stored = await etcd.load(keys.attachments("pods"))
        assert len({kv.mod_revision for kv in stored.items}) < 60  # fewer transactions
        # then all three at once: n1 again, and n2's two workers in one block
        callers = [(node, f"{name}{i}") for node, name in ((a, "x"), (b, "y"), (c, "z"))
                   for i in range(40)]  # fmt: skip
        results += await asyncio.gather(*(attach(node, cid) for node, cid in callers))
        assert all(status == 201 for status, _ in results), results
        addresses = [ipaddress.ip_address(data["address"]) for _, data in results]
        assert len(set(addresses)) == 180
        for _, data in results:
            block = ipaddress.ip_network(data["subnet"])
            assert data["node"] == ("n1" if data["container_id"][0] in "ax" else "n2")
            address = ipaddress.ip_address(data["address"])
            assert address in block and block.prefixlen == 24
            assert address not in (block.network_address, block.network_address + 1)
            assert address != block.broadcast_address
        n1 = sorted(
            ipaddress.ip_address(data["address"]).packed[3]
            for _, data in results
            if data["node"] == "n1"
        )
        assert n1 == list(range(2, 102))  # n1's block in cursor order, no gap
        async with open_etcd_store(etcd_server) as etcd:
            held = await etcd.load(keys.address("pods", ""))
            assert len(held.items) == 180
        for client in (a, b, c):
            assert await client.wait_cache(
                lambda c=client: len(c.server.registry.attachments("pods")) == 180
            )


@pytest.mark.etcd
async def test_a_killed_node_loses_its_block_and_names_everywhere(
    etcd_server: EtcdServer, session: aiohttp.ClientSession
) -> None:
    endpoint = f"http://{etcd_server.endpoint[0]}:{etcd_server.endpoint[1]}"
    # the restart below must come back within the TTL: a process start takes several seconds
    # on a loaded machine (with 5 s the lease sometimes ended first)
    node_ttl = 10
    async with replica(etcd_server.endpoint, session, node="n1") as a:
        await synced(a)
        await put_network(a, node_prefix=24)
        async with serve("--etcd", endpoint, "--node", "n2", "--node-ttl", str(node_ttl)) as n2:
            status, data = await node_put(
                session, n2.http, "/v1/networks/pods/attachments/victim/eth0", {"name": "victim"}
            )
            assert status == 201, data
            assert await a.wait_cache(
                lambda: a.server.registry.attachment("pods", "victim", "eth0") is not None
            )
            assert await a.addresses("victim.pods.net.cluster.local") == {data["address"]}
            # a restart within the TTL takes the lease over: nothing is lost
            assert await n2.stop(signal.SIGKILL) == -signal.SIGKILL
        async with serve("--etcd", endpoint, "--node", "n2", "--node-ttl", str(node_ttl)) as n2:
            held = a.server.registry.attachment("pods", "victim", "eth0")
            assert held is not None
            lease = held.lease
            # past the TTL the keys are still there: the restarted node renews them
            assert not await a.wait_cache(
                lambda: a.server.registry.attachment("pods", "victim", "eth0") is None,
                node_ttl + 2,
            )
            block = [b for b in a.server.registry.blocks("pods").values() if b.node == "n2"]
            assert [b.lease for b in block] == [lease]
            loop = asyncio.get_running_loop()
            assert await n2.stop(signal.SIGKILL) == -signal.SIGKILL
            killed = loop.time()
        assert await a.wait_cache(
            lambda: a.server.registry.attachment("pods", "victim", "eth0") is None,
            node_ttl + 5,
        )
        gone_after = loop.time() - killed
        assert gone_after < node_ttl + 1
        assert [b for b in a.server.registry.blocks("pods").values() if b.node == "n2"] == []
        answer = await a.query("victim.pods.net.cluster.local")
        assert answer.rcode() == dns.rcode.NXDOMAIN
        async with open_etcd_store(etcd_server) as etcd:
            assert isinstance(etcd, EtcdStore)
            keys = NetworkKeys(a.server.config.etcd_prefix)
            left = await etcd.load(keys.root)
            assert not [kv.key for kv in left.items if b"/n2" in kv.value or b"victim" in kv.key]
