"""Listings a page at a time (`?limit=&after=`, `next`, a Link header), the client and
`discovery check` following the pages, and the instance limits per service and namespace."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import etcd_support
import pytest
from conftest import Client, make_config
from hypothesis import given, settings
from hypothesis import strategies as st
from test_api import assert_problem, settle
from test_check import check, replica_config, url

from discovery.client import DiscoveryClient
from discovery.model import InstanceKey
from discovery.registry import Registry
from discovery.server import run_server
from discovery.store.base import Event, EventType, Snapshot

etcd_server = etcd_support.etcd_server  # the fixture


async def pages(client: Client, path: str, key: str, limit: int | None) -> list[Any]:
    """Every entry of a listing, following `next`; checks the Link header on the way."""
    entries: list[Any] = []
    after = None
    while True:
        params = {} if limit is None else {"limit": str(limit)}
        if after is not None:
            params["after"] = after
        status, body, headers = await client.request("GET", path, params=params)
        assert status == 200, body
        entries.extend(body[key])
        after = body["next"]
        if after is None:
            assert "Link" not in headers
            return entries
        assert len(body[key]) == (limit or 500)
        link = headers["Link"]
        assert link.endswith('>; rel="next"') and "after=" in link, link


async def register_many(client: Client, count: int, **more: Any) -> None:
    async def one(i: int) -> None:
        svc = more.get("svc", f"s{i:03d}")  # one service, or one service each
        address = f"10.9.{i // 250}.{i % 250 + 1}"
        tags = ["even"] if i % 2 == 0 else []
        await client.register("default", svc, f"i{i:04d}", address=address, ttl=60, tags=tags)

    for start in range(0, count, 50):
        await asyncio.gather(*(one(i) for i in range(start, min(count, start + 50))))


async def test_services_a_page_at_a_time(client: Client) -> None:
    await register_many(client, 25)
    await client.register("other", "zz", "z-1", address="10.8.0.1")
    await settle(client)
    listed = await pages(client, "/v1/services", "services", 10)
    names = [(s["namespace"], s["service"]) for s in listed]
    assert names == sorted(names) and len(names) == len(set(names)) == 26
    assert all(s["instances"] == 1 for s in listed)
    _, body, _ = await client.request("GET", "/v1/services")
    assert len(body["services"]) == 26 and body["next"] is None


async def test_instances_and_the_registry_a_page_at_a_time(client: Client) -> None:
    await register_many(client, 37, svc="big")
    await settle(client)
    path = "/v1/services/default/big"
    instances = await pages(client, path, "instances", 5)
    assert [i["name"] for i in instances] == [f"i{i:04d}" for i in range(37)]
    even = await pages(client, path + "?tag=even", "instances", 4)
    assert [i["name"] for i in even] == [f"i{i:04d}" for i in range(0, 37, 2)]
    everything = await pages(client, "/v1/registry", "instances", 7)
    assert [i["name"] for i in everything] == [f"i{i:04d}" for i in range(37)]


async def test_the_default_page_is_500_and_the_client_follows_pages(client: Client) -> None:
    await register_many(client, 620, svc="huge")
    await settle(client)
    status, body, _ = await client.request("GET", "/v1/services/default/huge")
    assert status == 200 and len(body["instances"]) == 500 and body["next"] == "i0499"
    status, body, _ = await client.request("GET", "/v1/registry")
    assert len(body["instances"]) == 500 and body["next"] == "default/huge/i0499"
    async with DiscoveryClient([client.base]) as discovery:
        names = [i.name for i in await discovery.instances("default", "huge")]
    assert names == [f"i{i:04d}" for i in range(620)]


@pytest.mark.parametrize(
    ("query", "field"),
    [("limit=0", "limit"), ("limit=5001", "limit"), ("limit=x", "limit"), ("after=a/b/c", "after")],
)
async def test_bad_page_arguments(client: Client, query: str, field: str) -> None:
    for path in ("/v1/services", "/v1/services/default/web"):
        assert_problem(await client.request("GET", f"{path}?{query}"), 400, field)
    assert_problem(await client.request("GET", "/v1/registry?after=a/b"), 400, "after")


@pytest.mark.etcd
async def test_check_follows_the_registry_pages(etcd_server: etcd_support.EtcdServer) -> None:
    async with run_server(replica_config(etcd_server.endpoint)) as a:
        assert await a.registry.wait(lambda: a.registry.synced, 15)
        async with aiohttp.ClientSession() as session:
            client = Client(a, session)
            await register_many(client, 540, svc="web")
            await settle(client)
        code, out = await check("--etcd", etcd_server.client_url, "--replica", url(a))
    assert code == 0, out
    assert ": equal (revision" in out


# limits


@pytest.fixture
async def small() -> AsyncIterator[Client]:
    config = make_config(max_instances_per_service=3, max_instances_per_namespace=5)
    async with run_server(config) as server, aiohttp.ClientSession() as session:
        await server.registry.wait(lambda: server.registry.synced, 5)
        yield Client(server, session)


async def test_instances_per_service_and_namespace_are_capped(small: Client) -> None:
    body = json.dumps({"address": "10.0.0.9"}).encode()
    for i in range(3):
        await small.register("ns", "a", f"a-{i}", expect=201, address=f"10.0.0.{i + 1}")
    problem = assert_problem(
        await small.request("PUT", "/v1/services/ns/a/instances/a-3", data=body), 409
    )
    assert "--max-instances-per-service" in problem["detail"]
    await small.register("ns", "a", "a-0", expect=200, address="10.0.1.1")  # an update is fine
    for i in range(2):
        await small.register("ns", "b", f"b-{i}", expect=201, address=f"10.0.2.{i + 1}")
    problem = assert_problem(
        await small.request("PUT", "/v1/services/ns/c/instances/c-0", data=body), 409
    )
    assert "--max-instances-per-namespace" in problem["detail"]
    await small.register("other", "c", "c-0", expect=201, address="10.0.3.1")  # another ns
    status, _, _ = await small.request("DELETE", "/v1/services/ns/a/instances/a-1")
    assert status == 204
    await small.register("ns", "a", "a-3", expect=201, address="10.0.0.4")  # room again
    _, text, _ = await small.request("GET", "/metrics")
    assert 'discovery_http_refused_total{reason="instances_per_service"} 1.0' in text
    assert 'discovery_http_refused_total{reason="instances_per_namespace"} 1.0' in text


# the registry's orders, kept as names come and go


_ops = st.lists(
    st.tuples(st.booleans(), st.sampled_from("abcd"), st.sampled_from("wxyz")), max_size=40
)


@given(ops=_ops)
@settings(max_examples=150, deadline=None)
def test_the_registry_keeps_its_orders_as_names_come_and_go(
    ops: list[tuple[bool, str, str]],
) -> None:
    registry = Registry("/d/")
    registry.load(Snapshot(1, []))
    registry.sorted_services()  # sorted once: from here on kept in order
    for revision, (put, service, name) in enumerate(ops, start=2):
        key = InstanceKey("ns", service, name).store_key("/d/")
        value = json.dumps({"address": "10.0.0.1"}).encode()
        event = Event(EventType.PUT if put else EventType.DELETE, key, value, revision, 0)
        for known in registry.services():
            registry.sorted_names(known)  # cached: kept in order below
        registry.apply([event])
        assert registry.sorted_services() == sorted(registry.services())
        for service_key, instances in registry.services().items():
            assert registry.sorted_names(service_key) == sorted(instances)
        assert registry.namespace_size("ns") == sum(map(len, registry.services().values()))
