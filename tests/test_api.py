"""The registration API over real HTTP: writes, reads, long polls, and every error path."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import dns.rcode
import pytest
from aiohttp import web
from conftest import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

PROBLEM = "application/problem+json"
WEB = "/v1/services/default/web"
INST = WEB + "/instances/"
ZONE = "cluster.local"
INSTANCE_ROUTE = "/v1/services/{ns}/{svc}/instances/{inst}"
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


def fqdn(*labels: str) -> str:
    return ".".join((*labels, "svc", ZONE))


def expires(body: dict[str, Any]) -> datetime:
    text = body["lease"]["expires_at"]
    assert RFC3339.match(text), text
    return datetime.fromisoformat(text)


def assert_problem(
    response: tuple[int, Any, dict[str, str]], status: int, field: str | None = None
) -> dict[str, Any]:
    code, body, headers = response
    assert code == status, body
    assert headers["Content-Type"].startswith(PROBLEM)
    assert isinstance(body, dict), body
    assert body["status"] == status
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    if field is not None:
        fields = [error["field"] for error in body["errors"]]
        assert any(field in name for name in fields), (field, fields)
        assert all(isinstance(error["message"], str) for error in body["errors"])
    return body


async def settle(client: Client) -> None:
    """Wait until the cache (and so DNS and every GET) reflects every write so far."""
    revision = await client.server.store.revision()
    assert await client.wait_cache(lambda: client.server.registry.revision >= revision)


async def scrape(client: Client) -> dict[str, float]:
    status, text, _ = await client.request("GET", "/metrics")
    assert status == 200
    return {
        sample.name + json.dumps(sample.labels, sort_keys=True): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture(autouse=True)
async def never_broken(client: Client) -> AsyncIterator[None]:
    """After every test: no request got a 5xx, and the watch still feeds the cache."""
    yield
    errors = {k: v for k, v in (await scrape(client)).items() if '"status": "5' in k}
    assert not errors, errors
    await client.register("guard", "guard", "guard-1", address="192.0.2.1", ttl=30)
    await settle(client)
    assert await client.addresses(fqdn("guard-1", "guard", "guard")) == {"192.0.2.1"}


# register, update, heartbeat, delete


async def test_register_returns_the_stored_instance_and_lease(client: Client) -> None:
    before = datetime.now(UTC)
    body = await client.register(
        "default", "web", "web-1", expect=201,
        address="10.0.0.1", ports=[{"name": "http", "port": 8080, "protocol": "tcp"}],
        ttl=60, priority=10, weight=50, tags=["canary"], metadata={"version": "1.4.2"},
    )
    lease = body.pop("lease")
    assert body == {
        "namespace": "default", "service": "web", "name": "web-1", "address": "10.0.0.1",
        "ports": [{"name": "http", "port": 8080, "protocol": "tcp"}], "ttl": 60,
        "priority": 10, "weight": 50, "tags": ["canary"], "metadata": {"version": "1.4.2"},
    }
    assert isinstance(lease["id"], str) and re.fullmatch(r"[0-9a-f]+", lease["id"])
    assert lease["ttl"] == 60
    delta = (expires({"lease": lease}) - before).total_seconds()
    assert 58 <= delta <= 62
    await settle(client)
    assert await client.addresses(fqdn("web-1", "web", "default")) == {"10.0.0.1"}


async def test_defaults(client: Client) -> None:
    body = await client.register(
        "default", "web", "web-1", expect=201,
        address="10.0.0.1", ports=[{"name": "http", "port": 80}],
    )
    assert body["ttl"] == 30 and body["lease"]["ttl"] == 30
    assert body["ports"] == [{"name": "http", "port": 80, "protocol": "tcp"}]
    assert (body["priority"], body["weight"], body["tags"], body["metadata"]) == (0, 100, [], {})
    bare = await client.register("default", "web", "web-2", expect=201, address="fd00::1")
    assert bare["ports"] == [] and bare["address"] == "fd00::1"


async def test_register_again_updates_dns(client: Client) -> None:
    first = await client.register("default", "web", "web-1", expect=201, address="10.0.0.1")
    await settle(client)
    assert await client.addresses(fqdn("web", "default")) == {"10.0.0.1"}
    second = await client.register("default", "web", "web-1", expect=200, address="10.0.0.2")
    assert second["address"] == "10.0.0.2"
    assert second["lease"]["id"] != first["lease"]["id"]
    await settle(client)
    assert await client.addresses(fqdn("web-1", "web", "default")) == {"10.0.0.2"}
    assert await client.addresses(fqdn("web", "default")) == {"10.0.0.2"}
    old_ptr = await client.query("1.0.0.10.in-addr.arpa", "PTR")
    assert old_ptr.rcode() == dns.rcode.NXDOMAIN
    # moved to IPv6: the A records go, AAAA arrives
    await client.register("default", "web", "web-1", expect=200, address="fd00::2")
    await settle(client)
    assert await client.addresses(fqdn("web-1", "web", "default"), "A") == set()
    assert await client.addresses(fqdn("web-1", "web", "default"), "AAAA") == {"fd00::2"}
    _, listed, _ = await client.request("GET", WEB)
    assert [i["address"] for i in listed["instances"]] == ["fd00::2"]


async def test_heartbeat_extends_the_lease(client: Client) -> None:
    first = await client.register("default", "web", "web-1", expect=201, address="10.0.0.1", ttl=30)
    await asyncio.sleep(1.1)  # expires_at has one-second resolution: let a second pass
    status, body, _ = await client.request("PUT", INST + "web-1/heartbeat")
    assert status == 200, body
    assert body["lease"]["id"] == first["lease"]["id"]
    assert body["lease"]["ttl"] == 30
    assert expires(body) > expires(first)
    assert body["address"] == "10.0.0.1"


async def test_heartbeat_answers_the_registration_it_renewed(client: Client) -> None:
    # the answer's bytes are kept per registration: a new one must show, never the old
    metadata = {"quote": 'say "hi"\\', "unicode": "caf\u00e9 \u2603"}
    first = await client.register(
        "default", "web", "web-1", expect=201, address="10.0.0.1", metadata=metadata
    )
    await settle(client)
    for _ in range(2):
        status, body, headers = await client.request("PUT", INST + "web-1/heartbeat")
        assert status == 200, body
        assert headers["Content-Type"] == "application/json; charset=utf-8"
        expires(body)
        assert {**body, "lease": {**body["lease"], "expires_at": None}} == {
            **first, "lease": {**first["lease"], "expires_at": None}
        }
    second = await client.register(
        "default", "web", "web-1", expect=200, address="10.0.0.2", metadata={"v": "2"}
    )
    await settle(client)
    status, body, _ = await client.request("PUT", INST + "web-1/heartbeat")
    assert status == 200, body
    assert (body["address"], body["metadata"]) == ("10.0.0.2", {"v": "2"})
    assert body["lease"]["id"] == second["lease"]["id"] != first["lease"]["id"]


def test_heartbeat_body_is_the_instance_body_encoded() -> None:
    from discovery import api
    from discovery.model import Instance, InstanceKey, Registration, Spec, encode_registration

    registration = Registration(
        address="10.0.0.1", metadata={"nul": "a\x00b", "expires_at": "\u0000"}, ttl=45
    )
    raw = encode_registration(registration)
    instance = Instance(InstanceKey("default", "web", "web-1"), Spec.of(registration, raw), 7, 3)
    for remaining in (45, 12, 45):
        expected = json.dumps(api._instance_body(instance, remaining)).encode()
        assert api._heartbeat_body(instance, remaining) == expected


async def test_heartbeat_of_unknown_instance_is_404(client: Client) -> None:
    assert_problem(await client.request("PUT", INST + "nobody/heartbeat"), 404)
    await client.register("default", "web", "web-1", address="10.0.0.1")
    assert_problem(await client.request("PUT", INST + "web-2/heartbeat"), 404)
    other = "/v1/services/default/api/instances/web-1/heartbeat"
    assert_problem(await client.request("PUT", other), 404)


def _ref(ns: str, svc: str, inst: str) -> dict[str, str]:
    return {"namespace": ns, "service": svc, "instance": inst}


async def test_batch_heartbeat_renews_each_and_answers_404_for_the_rest(client: Client) -> None:
    first = await client.register("default", "web", "web-1", expect=201, address="10.0.0.1", ttl=30)
    await client.register("default", "web", "web-2", expect=201, address="10.0.0.2", ttl=40)
    await client.register("default", "api", "api-1", expect=201, address="10.0.0.3", ttl=2)
    await asyncio.sleep(1.1)  # expires_at has one-second resolution: let a second pass
    refs = [
        _ref("default", "web", "web-1"),
        _ref("default", "web", "nobody"),
        _ref("default", "web", "web-2"),
        _ref("other", "web", "web-1"),
        _ref("default", "api", "api-1"),
    ]
    status, body, headers = await client.request("POST", "/v1/heartbeats", json={"instances": refs})
    assert status == 200, body
    assert headers["Content-Type"].startswith("application/json")
    results = body["results"]
    assert [r["status"] for r in results] == [200, 404, 200, 404, 200]
    assert [r.get("ttl") for r in results] == [30, None, 40, None, 2]
    renewed = datetime.fromisoformat(results[0]["expires_at"])
    assert RFC3339.match(results[0]["expires_at"]) and renewed > expires(first)
    # the batch keeps a 2 s lease alive past its TTL, as single heartbeats do
    for _ in range(6):
        await asyncio.sleep(0.5)
        _, body, _ = await client.request(
            "POST", "/v1/heartbeats", json={"instances": [_ref("default", "api", "api-1")]}
        )
        assert body["results"] == [{"status": 200, "ttl": 2, "expires_at": ANY_TIME}]
    await settle(client)
    assert await client.addresses(fqdn("api-1", "api", "default")) == {"10.0.0.3"}
    status, body, _ = await client.request("POST", "/v1/heartbeats", json={"instances": []})
    assert (status, body) == (200, {"results": []})


async def test_batch_heartbeat_after_expiry_and_re_registration(client: Client) -> None:
    await client.register("default", "web", "web-1", expect=201, address="10.0.0.1", ttl=2)
    name = fqdn("web-1", "web", "default")
    await settle(client)
    deadline = time.monotonic() + 10
    while await client.addresses(name):  # the lease expires, the watch deletes the record
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    batch = {"instances": [_ref("default", "web", "web-1")]}
    _, body, _ = await client.request("POST", "/v1/heartbeats", json=batch)
    assert body["results"] == [{"status": 404}]
    again = await client.register("default", "web", "web-1", expect=201, address="10.0.0.1")
    # a new lease, perhaps not in this replica's cache yet: the batch finds it in the store
    _, body, _ = await client.request("POST", "/v1/heartbeats", json=batch)
    assert body["results"] == [{"status": 200, "ttl": again["ttl"], "expires_at": ANY_TIME}]


class _AnyTime:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and RFC3339.match(other) is not None


ANY_TIME: Any = _AnyTime()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"", "body"),
        (b"[]", "body"),
        (b"{", "body"),
        (b"{}", "instances"),
        (b'{"instances": {}}', "instances"),
        (b'{"instances": [], "extra": 1}', "extra"),
        (b'{"instances": ["default/web/web-1"]}', "instances.0"),
        (b'{"instances": [{"namespace": "default", "service": "web"}]}', "instances.0.instance"),
        (b'{"instances": [{"namespace": "Default", "service": "web", "instance": "a"}]}',
         "instances.0.namespace"),
        (b'{"instances": [{"namespace": "d", "service": 7, "instance": "a"}]}',
         "instances.0.service"),
        (b'{"instances": [{"namespace": "d", "service": "w", "instance": "a", "ttl": 5}]}',
         "instances.0.ttl"),
    ],
)  # fmt: skip
async def test_batch_heartbeat_invalid_input_is_400(
    client: Client, body: bytes, field: str
) -> None:
    await client.register("default", "web", "web-1", address="10.0.0.1")
    response = await client.request("POST", "/v1/heartbeats", data=body)
    assert_problem(response, 400, field)


async def test_batch_heartbeat_too_many_is_400_and_counted(client: Client) -> None:
    def batch(n: int) -> dict[str, Any]:
        return {"instances": [_ref("default", "web", f"i{i}") for i in range(n)]}

    refused = 'discovery_http_refused_total{"reason": "heartbeat_batch"}'
    before = (await scrape(client)).get(refused, 0)
    status, body, _ = await client.request("POST", "/v1/heartbeats", json=batch(256))
    assert status == 200 and [r["status"] for r in body["results"]] == [404] * 256
    problem = assert_problem(
        await client.request("POST", "/v1/heartbeats", json=batch(257)), 400, "instances"
    )
    assert "at most 256" in problem["detail"]
    after = await scrape(client)
    assert after[refused] == before + 1
    errors = {"instances": [{"namespace": "A"}] * 100}  # the answer names at most 20 errors
    body = assert_problem(await client.request("POST", "/v1/heartbeats", json=errors), 400)
    assert len(body["errors"]) == 20


async def test_delete(client: Client) -> None:
    await client.register("default", "web", "web-1", expect=201, address="10.0.0.1")
    await settle(client)
    status, body, _ = await client.request("DELETE", INST + "web-1")
    assert (status, body) == (204, None)
    assert_problem(await client.request("DELETE", INST + "web-1"), 404)
    for name in (fqdn("web-1", "web", "default"), fqdn("web", "default")):
        assert (await client.query(name)).rcode() == dns.rcode.NXDOMAIN
    assert_problem(await client.request("GET", INST + "web-1"), 404)
    assert_problem(await client.request("PUT", INST + "web-1/heartbeat"), 404)
    await client.register("default", "web", "web-1", expect=201, address="10.0.0.1")


# reads


async def test_list_services(client: Client) -> None:
    status, body, headers = await client.request("GET", "/v1/services")
    assert status == 200 and body == {"services": [], "next": None}
    empty_index = int(headers["X-Discovery-Index"])
    await client.register("default", "web", "web-1", address="10.0.0.1", tags=["b", "a"])
    await client.register("default", "web", "web-2", address="10.0.0.1", tags=["a", "canary"])
    await client.register("prod", "api", "api-1", address="10.0.1.1")
    await settle(client)
    status, body, headers = await client.request("GET", "/v1/services")
    assert status == 200
    # tags: every tag any instance carries, once, sorted
    assert body == {"services": [
        {"namespace": "default", "service": "web", "instances": 2, "tags": ["a", "b", "canary"]},
        {"namespace": "prod", "service": "api", "instances": 1, "tags": []},
    ], "next": None}
    assert int(headers["X-Discovery-Index"]) > empty_index


async def test_get_service_with_tag_filters(client: Client) -> None:
    await client.register("default", "web", "web-1", address="10.0.0.1", tags=["canary", "v2"])
    await client.register("default", "web", "web-2", address="10.0.0.2", tags=["v2"])
    await client.register("default", "web", "web-3", address="10.0.0.3")
    await settle(client)

    async def names(query: str) -> list[str]:
        status, body, headers = await client.request("GET", WEB + query)
        assert status == 200, body
        assert (body["namespace"], body["service"]) == ("default", "web")
        assert int(headers["X-Discovery-Index"]) == client.server.registry.revision
        return [i["name"] for i in body["instances"]]

    assert await names("") == ["web-1", "web-2", "web-3"]
    assert await names("?tag=v2") == ["web-1", "web-2"]
    assert await names("?tag=canary") == ["web-1"]
    assert await names("?tag=v2&tag=canary") == ["web-1"]
    assert await names("?tag=canary&tag=v3") == []
    assert await names("?tag=nope") == []
    status, body, _ = await client.request("GET", "/v1/services/default/unknown")
    assert status == 200
    assert body == {"namespace": "default", "service": "unknown", "instances": [], "next": None}


async def test_get_instance(client: Client) -> None:
    registered = await client.register("default", "web", "web-1", address="10.0.0.1", ttl=60)
    await settle(client)
    status, body, headers = await client.request("GET", INST + "web-1")
    assert status == 200
    assert int(headers["X-Discovery-Index"]) > 0
    assert body["address"] == "10.0.0.1"
    assert body["lease"]["id"] == registered["lease"]["id"]
    assert abs((expires(body) - expires(registered)).total_seconds()) <= 2
    assert_problem(await client.request("GET", INST + "web-2"), 404)
    assert_problem(await client.request("GET", "/v1/services/default/api/instances/web-1"), 404)


# long poll


async def _index(client: Client, path: str = WEB) -> tuple[int, Any]:
    status, body, headers = await client.request("GET", path)
    assert status == 200
    return int(headers["X-Discovery-Index"]), body


async def _pending_poll(client: Client, path: str, index: int) -> asyncio.Task[Any]:
    """A long poll on path from index, checked to be still waiting: no change, no answer."""
    poll = asyncio.create_task(client.request("GET", f"{path}?index={index}&wait=10s"))
    done, _ = await asyncio.wait({poll}, timeout=0.3)
    assert not done, "the long poll returned without a change"
    return poll


async def test_long_poll_wakes_on_a_registration_of_the_service(client: Client) -> None:
    await client.register("default", "web", "web-1", address="10.0.0.1")
    await settle(client)
    index, _ = await _index(client)
    poll = await _pending_poll(client, WEB, index)
    started = time.monotonic()
    await client.register("default", "web", "web-2", address="10.0.0.2")
    status, body, headers = await asyncio.wait_for(poll, 5)
    assert time.monotonic() - started < 1.0
    assert status == 200
    assert [i["name"] for i in body["instances"]] == ["web-1", "web-2"]
    assert int(headers["X-Discovery-Index"]) > index


async def test_long_poll_wakes_on_expiry_and_delete(client: Client) -> None:
    await client.register("default", "web", "web-1", address="10.0.0.1")
    await settle(client)
    index, _ = await _index(client)
    poll = await _pending_poll(client, WEB, index)
    assert (await client.request("DELETE", INST + "web-1"))[0] == 204
    status, body, headers = await asyncio.wait_for(poll, 2)
    assert (status, body["instances"]) == (200, [])
    assert int(headers["X-Discovery-Index"]) > index


async def test_long_poll_ignores_other_services(client: Client) -> None:
    await client.register("default", "web", "web-1", address="10.0.0.1")
    await settle(client)
    index, before = await _index(client)
    started = time.monotonic()
    poll = asyncio.create_task(client.request("GET", f"{WEB}?index={index}&wait=1s"))
    await client.register("default", "api", "api-1", address="10.0.1.1")
    await client.register("prod", "web", "web-1", address="10.0.2.1")
    await settle(client)
    status, body, _ = await asyncio.wait_for(poll, 5)
    elapsed = time.monotonic() - started
    assert status == 200
    assert body == before
    assert 0.95 <= elapsed < 3, elapsed


async def test_long_poll_without_change_returns_after_the_wait(client: Client) -> None:
    index, before = await _index(client)
    for query in (f"?index={index}&wait=500ms", f"?index={index}&wait=0.5"):
        started = time.monotonic()
        status, body, _ = await client.request("GET", WEB + query)
        elapsed = time.monotonic() - started
        assert (status, body) == (200, before)
        assert 0.45 <= elapsed < 2.5, elapsed


async def test_long_poll_on_the_service_list(client: Client) -> None:
    index, _ = await _index(client, "/v1/services")
    poll = await _pending_poll(client, "/v1/services", index)
    await client.register("prod", "api", "api-1", address="10.0.1.1")
    status, body, headers = await asyncio.wait_for(poll, 2)
    assert status == 200
    assert body["services"] == [
        {"namespace": "prod", "service": "api", "instances": 1, "tags": []}
    ]
    assert int(headers["X-Discovery-Index"]) > index


async def test_index_zero_never_blocks(client: Client) -> None:
    started = time.monotonic()
    status, body, _ = await client.request("GET", "/v1/services/default/unknown?index=0&wait=5s")
    assert (status, body["instances"]) == (200, [])
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("index=-1", "index"), ("index=abc", "index"), ("index=1.5", "index"), ("index=", "index"),
        ("index=%C2%B2", "index"), ("index=" + "9" * 5000, "index"),
        ("wait=10x", "wait"), ("wait=-1s", "wait"), ("wait=", "wait"), ("wait=s", "wait"),
        ("wait=%D9%A1s", "wait"), ("index=1&wait=forever", "wait"),
    ],
)
async def test_invalid_long_poll_arguments(client: Client, query: str, field: str) -> None:
    for path in (WEB, "/v1/services"):
        assert_problem(await client.request("GET", f"{path}?{query}"), 400, field)


# operations endpoints


async def test_healthz_and_readyz(client: Client) -> None:
    status, body, _ = await client.request("GET", "/healthz")
    assert status == 200 and body["status"] == "ok"
    await client.register("default", "web", "web-1", address="10.0.0.1")
    await settle(client)
    status, body, headers = await client.request("GET", "/readyz")
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert body["status"] == "ready"
    assert body["store"] == "ok"
    assert body["revision"] == client.server.registry.revision > 1
    assert body["seconds_since_store_contact"] is not None


async def test_metrics(client: Client) -> None:
    status, text, headers = await client.request("GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    names = {family.name for family in text_string_to_metric_families(text)}
    for name in (
        "discovery_dns_queries", "discovery_cache_synced", "discovery_instances",
        "discovery_http_requests", "discovery_watch_revision",
    ):
        assert name in names, names
    before = await scrape(client)
    await client.register("default", "web", "web-1", address="10.0.0.1")
    await settle(client)
    for _ in range(3):
        await client.query(fqdn("web", "default"))
    await client.query(fqdn("nothing", "default"))
    after = await scrape(client)

    def total(sample: dict[str, float], prefix: str) -> float:
        return sum(v for k, v in sample.items() if k.startswith(prefix + "{"))

    queries = "discovery_dns_queries_total"
    assert total(after, queries) >= total(before, queries) + 4
    assert after["discovery_instances{}"] == 1
    assert after["discovery_cache_synced{}"] == 1
    labels = {"method": "PUT", "route": INSTANCE_ROUTE, "status": "201"}
    assert after["discovery_http_requests_total" + json.dumps(labels, sort_keys=True)] == 1


SPEC_PATHS = {
    INSTANCE_ROUTE: {"put", "get", "delete"},
    "/v1/services/{ns}/{svc}/instances/{inst}/heartbeat": {"put"},
    "/v1/heartbeats": {"post"},
    "/v1/services": {"get"},
    "/v1/services/{ns}/{svc}": {"get"},
    "/healthz": {"get"},
    "/readyz": {"get"},
    "/metrics": {"get"},
    "/openapi.json": {"get"},
    "/v1/registry": {"get"},
    "/v1/networks": {"get"},
    "/v1/networks/{net}": {"put", "get", "delete"},
    "/v1/networks/{net}/attachments": {"get"},
    "/v1/networks/{net}/attachments/{container_id}/{ifname}": {"put", "get", "delete"},
}


def router_paths(app: web.Application) -> dict[str, set[str]]:
    """What the server really routes: path template -> methods (HEAD is aiohttp's own)."""
    paths: dict[str, set[str]] = {}
    for route in app.router.routes():
        if route.method == "HEAD" or route.resource is None:
            continue
        if route.resource.canonical.startswith("/ui"):
            continue  # the dashboard's pages and files (discovery/ui): HTML, not the API
        paths.setdefault(route.resource.canonical, set()).add(route.method.lower())
    return paths


async def test_openapi_document(client: Client) -> None:
    status, doc, headers = await client.request("GET", "/openapi.json")
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert doc["openapi"].startswith("3.")
    assert doc["info"]["title"] and doc["info"]["version"]
    methods = {"get", "put", "post", "delete", "patch", "head", "options"}
    documented = {p: set(ops) & methods for p, ops in doc["paths"].items()}
    assert client.server.app is not None
    assert documented == router_paths(client.server.app), "openapi.py and the router differ"
    assert documented == SPEC_PATHS
    for path, ops in doc["paths"].items():
        for method in ops.keys() & methods:
            assert ops[method]["responses"], (path, method)
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(doc)))
    assert refs <= doc["components"]["schemas"].keys()
    assert "address" in doc["components"]["schemas"]["Registration"]["required"]
    try:
        from openapi_spec_validator import validate
    except ImportError:
        return
    validate(doc)


# validation: each bad request is a 400 naming the field


def _put(**body: Any) -> bytes:
    return json.dumps(body).encode()


BAD_BODIES = [
    pytest.param(b"{not json", "body", id="invalid-json"),
    pytest.param(b'{"address": "10.0.0.1"', "body", id="truncated-json"),
    pytest.param(b"\xff\xfe\x00", "body", id="not-utf8"),
    pytest.param(b"[" * 30000 + b"]" * 30000, "body", id="deeply-nested"),
    pytest.param(b'["10.0.0.1"]', "body", id="array"),
    pytest.param(b'"10.0.0.1"', "body", id="string"),
    pytest.param(b"null", "body", id="null"),
    pytest.param(b"", "body", id="empty"),
    pytest.param(_put(ttl=30), "address", id="missing-address"),
    pytest.param(_put(address="10.0.0.256"), "address", id="octet-256"),
    pytest.param(_put(address="example.com"), "address", id="hostname"),
    pytest.param(_put(address="0.0.0.0"), "address", id="unspecified"),
    pytest.param(_put(address="::"), "address", id="unspecified-v6"),
    pytest.param(_put(address="224.0.0.1"), "address", id="multicast"),
    pytest.param(_put(address="fe80::1%eth0"), "address", id="scoped-v6"),
    pytest.param(_put(address=167772161), "address", id="address-number"),
    pytest.param(_put(address="10.0.0.1", bogus=1), "bogus", id="unknown-field"),
    pytest.param(
        _put(address="10.0.0.1", ports=[{"name": "http", "port": 0}]), "port", id="port-0"
    ),
    pytest.param(
        _put(address="10.0.0.1", ports=[{"name": "http", "port": 70000}]), "port", id="port-70000"
    ),
    pytest.param(
        _put(address="10.0.0.1", ports=[{"name": "http", "port": 80, "protocol": "icmp"}]),
        "protocol", id="protocol-icmp",
    ),
    pytest.param(
        _put(address="10.0.0.1", ports=[{"name": "http", "port": 80, "extra": 1}]),
        "extra", id="port-unknown-field",
    ),
    pytest.param(
        _put(address="10.0.0.1", ports=[{"name": "Http_", "port": 80}]), "name", id="port-name"
    ),
    pytest.param(
        _put(address="10.0.0.1", ports=[{"name": "a", "port": 80}, {"name": "a", "port": 81}]),
        "ports", id="duplicate-port",
    ),
    pytest.param(_put(address="10.0.0.1", ttl=1), "ttl", id="ttl-below-min"),
    pytest.param(_put(address="10.0.0.1", ttl=0), "ttl", id="ttl-0"),
    pytest.param(_put(address="10.0.0.1", ttl=86401), "ttl", id="ttl-above-max"),
    pytest.param(_put(address="10.0.0.1", ttl="abc"), "ttl", id="ttl-string"),
    pytest.param(_put(address="10.0.0.1", priority=-1), "priority", id="priority"),
    pytest.param(_put(address="10.0.0.1", weight=65536), "weight", id="weight"),
    pytest.param(_put(address="10.0.0.1", tags=[""]), "tags", id="empty-tag"),
    pytest.param(_put(address="10.0.0.1", metadata={"k": 1}), "metadata", id="metadata-value"),
]


@pytest.mark.parametrize(("body", "field"), BAD_BODIES)
async def test_invalid_body(client: Client, body: bytes, field: str) -> None:
    problem = assert_problem(await client.request("PUT", INST + "web-1", data=body), 400, field)
    assert problem["title"] == "Invalid request"
    await settle(client)
    assert client.server.registry.services() == {}


@pytest.mark.parametrize(
    "label",
    ["Web", "my_svc", "a" * 64, "-web", "web-", "web.1", "%C3%A9", ""],
    ids=["upper", "underscore", "64-chars", "leading-hyphen", "trailing-hyphen", "dot", "utf8",
         "empty"],
)
async def test_invalid_names(client: Client, label: str) -> None:
    body = _put(address="10.0.0.1")
    cases = [
        (f"/v1/services/{label}/web/instances/web-1", "namespace"),
        (f"/v1/services/default/{label}/instances/web-1", "service"),
        (f"/v1/services/default/web/instances/{label}", "name"),
    ]
    for path, field in cases:
        response = await client.request("PUT", path, data=body)
        if not label:  # an empty segment matches no route
            assert_problem(response, 404)
            continue
        assert_problem(response, 400, field)
        assert_problem(await client.request("PUT", path + "/heartbeat"), 400, field)
        assert_problem(await client.request("GET", path), 400, field)
        assert_problem(await client.request("DELETE", path), 400, field)
    if label:
        assert_problem(await client.request("GET", f"/v1/services/default/{label}"), 400, "service")


async def test_63_character_labels_are_fine(client: Client) -> None:
    label = "a" * 62 + "1"
    await client.register(label, label, label, expect=201, address="10.0.0.1")
    await settle(client)
    assert await client.addresses(f"{label}.{label}.{label}.svc.{ZONE}") == {"10.0.0.1"}


async def test_body_over_64_kib_is_413(client: Client) -> None:
    big = _put(address="10.0.0.1", metadata={"k": "x" * (64 * 1024)})
    assert_problem(await client.request("PUT", INST + "web-1", data=big), 413)

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit still holds
        yield b'{"address": "10.0.0.1", "metadata": {"k": "'
        for _ in range(80):
            yield b"x" * 1024
        yield b'"}}'

    assert_problem(await client.request("PUT", INST + "web-1", data=chunks()), 413)
    status, _, _ = await client.request("PUT", INST + "web-1", data=_put(address="10.0.0.1"))
    assert status == 201


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", INST + "web-1"), ("PATCH", INST + "web-1"), ("DELETE", "/v1/services"),
     ("POST", WEB), ("GET", INST + "web-1/heartbeat"), ("PUT", "/healthz")],
)
async def test_wrong_method_is_405(client: Client, method: str, path: str) -> None:
    response = await client.request(method, path, data=_put(address="10.0.0.1"))
    assert_problem(response, 405)
    assert response[2]["Allow"]


@pytest.mark.parametrize(
    "path", ["/", "/nope", "/v1", "/v1/services/default", WEB + "/instances", INST + "a/b/c"]
)
async def test_unknown_path_is_404(client: Client, path: str) -> None:
    assert_problem(await client.request("GET", path), 404)


# property: no body and no name ever gets a 500

_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_tricky = st.sampled_from(
    ["10.0.0.1", "fd00::1", "0.0.0.0", "::", "fe80::1%eth0", "::ffff:10.0.0.1", "10.0.0.256",
     "255.255.255.255", "127.0.0.1", " 10.0.0.1", "1"]
)
_addresses = st.one_of(_tricky, _tricky, st.ip_addresses().map(str), st.text(max_size=12))
_ports = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "name": st.sampled_from(["http", "grpc", "Http", "a_b", ""]) | st.text(max_size=5),
            "port": st.integers(-5, 70000) | _scalars,
            "protocol": st.sampled_from(["tcp", "udp", "sctp", "icmp"]) | _scalars,
        },
    ),
    max_size=3,
)
_registrations = st.fixed_dictionaries(
    {"address": _addresses},
    optional={
        "ttl": st.integers(-5, 100_000) | _json,
        "ports": _ports | _json,
        "priority": st.integers(-1, 70000) | _json,
        "weight": st.integers(-1, 70000) | _json,
        "tags": st.lists(st.text(max_size=6), max_size=4) | _json,
        "metadata": st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3) | _json,
        "bogus": _json,
    },
)
_bodies = st.one_of(  # mostly near-valid registrations: they reach the store and the cache
    _registrations.map(lambda b: json.dumps(b).encode()),
    _registrations.map(lambda b: json.dumps(b).encode()),
    _registrations.map(lambda b: json.dumps(b).encode()),
    _json.map(lambda b: json.dumps(b).encode()),
    st.binary(max_size=200),
)
_fuzz = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_fuzz
@given(body=_bodies)
async def test_random_bodies_never_500(client: Client, body: bytes) -> None:
    status, data, headers = await client.request("PUT", INST + "fuzz", data=body)
    assert status in (200, 201, 400, 413), (status, data)
    if status >= 400:
        assert_problem((status, data, headers), status)
    else:
        assert data["name"] == "fuzz" and data["lease"]["ttl"] == data["ttl"]


@_fuzz
@given(label=st.text(max_size=70))
async def test_random_names_never_500(client: Client, label: str) -> None:
    path = f"/v1/services/default/web/instances/{quote(label, safe='')}"
    status, data, headers = await client.request("PUT", path, data=_put(address="10.0.0.9"))
    assert status in (200, 201, 400, 404, 405), (status, data)
    if status >= 400:
        assert_problem((status, data, headers), status)
    else:
        assert data["name"] == label


# messages in the words of a JSON writer, not pydantic's or Python's

PLAIN_WORDS = [
    pytest.param(_put(address="10.0.0.1", ttl="30"), "ttl", "must be an integer", id="ttl"),
    pytest.param(_put(address="10.0.0.1", ttl=1.5), "ttl", "must be an integer", id="ttl-1.5"),
    pytest.param(_put(ttl=30), "address", "is required", id="missing"),
    pytest.param(_put(address=5), "address", "must be a string", id="address-number"),
    pytest.param(_put(address="10.0.0.1", tags="a"), "tags", "must be a list", id="tags"),
    pytest.param(_put(address="10.0.0.1", metadata=[]), "metadata", "must be an object",
                 id="metadata"),
    pytest.param(_put(address="10.0.0.1", priority=-1), "priority", "must be at least 0",
                 id="priority"),
    pytest.param(_put(address="10.0.0.1", ports=[{"name": "http", "port": 70000}]),
                 "ports.0.port", "must be at most 65535", id="port"),
    pytest.param(_put(address="10.0.0.1", ports=[{"name": "HTTP", "port": 80}]),
                 "ports.0.name", "must be a DNS label", id="port-name"),
    pytest.param(_put(address="10.0.0.1", ports=[{"name": "http", "port": 80, "protocol": "x"}]),
                 "ports.0.protocol", "must be one of 'tcp', 'udp' or 'sctp'", id="protocol"),
    pytest.param(_put(address="10.0.0.1", tags=[""]), "tags.0", "must not be empty", id="tag"),
    pytest.param(_put(address="nope"), "address", "must be an IPv4 or IPv6 address", id="ip"),
    pytest.param(_put(address="10.0.0.1", bogus=1), "bogus", "unknown field", id="unknown"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "field", "words"), PLAIN_WORDS)
async def test_validation_messages_in_plain_words(
    client: Client, body: bytes, field: str, words: str
) -> None:
    problem = assert_problem(await client.request("PUT", INST + "web-1", data=body), 400, field)
    messages = {error["field"]: error["message"] for error in problem["errors"]}
    assert messages[field] == words or messages[field].startswith(words), messages
    for jargon in ("Input should", "Value error", "Field required", "valid tuple", "dictionary"):
        assert jargon not in json.dumps(problem), problem
