"""`discovery check` (a subprocess) against two replicas on a real etcd, one of them cut off
from etcd during writes and then caught up; GET /v1/registry on its own."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import aiohttp
import etcd_support
import pytest
from conftest import Client, make_config
from test_replicas import CuttableProxy

from discovery.config import Config, HostPort
from discovery.server import Server, run_server
from discovery.testing import free_ports

etcd_server = etcd_support.etcd_server  # the fixture
NS, SVC = "default", "web"


def url(server: Server) -> str:
    return "http://{}:{}".format(*server.http_address)


async def check(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "discovery", "check", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def replica_config(endpoint: tuple[str, int]) -> Config:
    return make_config(etcd=(HostPort(*endpoint),), min_ttl=1, etcd_request_timeout=3.0)


@pytest.fixture
async def proxy(etcd_server: etcd_support.EtcdServer) -> AsyncIterator[CuttableProxy]:
    proxy = CuttableProxy(etcd_server.endpoint)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


@pytest.mark.etcd
async def test_divergence_is_reported_then_equal_once_caught_up(
    etcd_server: etcd_support.EtcdServer, proxy: CuttableProxy
) -> None:
    etcd_url = etcd_server.client_url
    async with (
        run_server(replica_config(etcd_server.endpoint)) as a,
        run_server(replica_config(proxy.endpoint)) as b,
        aiohttp.ClientSession() as session,
    ):
        for replica in (a, b):
            assert await replica.registry.wait(lambda r=replica: r.registry.synced, 15)
        client = Client(a, session)
        for name, address in (("keep", "10.5.0.1"), ("change", "10.5.0.2"), ("gone", "10.5.0.3")):
            await client.register(NS, SVC, name, address=address, ttl=60)
        assert await b.registry.wait(lambda: len(b.registry.instances((NS, SVC))) == 3, 10)
        code, out = await check("--etcd", etcd_url, "--replica", url(a), "--replica", url(b))
        assert code == 0, out
        assert out.count(": equal (revision") == 2, out

        proxy.cut()  # B stops hearing etcd: it keeps answering what it had
        await client.register(NS, SVC, "change", address="10.5.0.9", ttl=60)
        await client.register(NS, SVC, "new", address="10.5.0.4", ttl=60)
        status, _, _ = await client.request("DELETE", f"/v1/services/{NS}/{SVC}/instances/gone")
        assert status == 204
        code, out = await check(
            "--etcd", etcd_url, "--replica", url(a), "--replica", url(b), "--wait", "1"
        )
        assert code == 1, out
        lines = out.splitlines()
        assert f"{url(a)}: equal" in out
        b_line = next(line for line in lines if line.startswith(f"{url(b)}: DIFFERENT"))
        assert "1 missing, 1 extra, 1 different" in b_line, out
        assert f"  missing   {NS}/{SVC}/new" in lines
        assert f"  extra     {NS}/{SVC}/gone" in lines
        assert any(
            line.startswith(f"  different {NS}/{SVC}/change: address '10.5.0.2' (etcd '10.5.0.9')")
            for line in lines
        ), out
        assert "Traceback" not in out

        proxy.restore()  # B resumes its watch and catches up
        assert await b.registry.wait(lambda: "new" in b.registry.instances((NS, SVC)), 30)
        code, out = await check("--etcd", etcd_url, "--replica", url(a), "--replica", url(b))
        assert code == 0, out


@pytest.mark.etcd
async def test_a_replica_that_is_down_is_reported(etcd_server: etcd_support.EtcdServer) -> None:
    down = f"http://127.0.0.1:{free_ports(1)[0]}"
    async with run_server(replica_config(etcd_server.endpoint)) as a:
        assert await a.registry.wait(lambda: a.registry.synced, 15)
        code, out = await check(
            "--etcd", etcd_server.client_url, "--replica", url(a), "--replica", down
        )
    assert code == 1, out
    assert f"{down}: DIFFERENT: unreachable" in out and f"{url(a)}: equal" in out
    assert "Traceback" not in out


async def test_etcd_down_and_bad_options() -> None:
    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    code, out = await check("--etcd", dead, "--replica", "http://127.0.0.1:1")
    assert code == 1 and out.startswith("etcd: ") and "Traceback" not in out, out
    code, out = await check("--etcd", dead)
    assert code == 2 and "--replica" in out, out
    code, out = await check("--replica", "http://127.0.0.1:1")
    assert code == 2 and "--etcd" in out, out
    code, out = await check("--etcd", dead, "--replica", "127.0.0.1:1")
    assert code == 2 and "http://" in out, out


async def test_registry_endpoint_lists_instances_with_the_revision() -> None:
    async with run_server(make_config()) as server, aiohttp.ClientSession() as session:
        assert await server.registry.wait(lambda: server.registry.synced, 5)
        client = Client(server, session)
        await client.register(NS, SVC, "b", address="10.6.0.2", metadata={"k": "v"})
        await client.register("alpha", SVC, "a", address="10.6.0.1")
        status, body, headers = await client.request("GET", "/v1/registry")
        assert status == 200
        assert body["revision"] == int(headers["X-Discovery-Index"]) == server.registry.revision
        assert [(i["namespace"], i["name"]) for i in body["instances"]] == [
            ("alpha", "a"), (NS, "b"),
        ]  # fmt: skip
        assert body["instances"][1]["metadata"] == {"k": "v"} and body["instances"][1]["lease"]
        # a long poll returns once the revision passes the index
        revision = body["revision"]
        waiting = asyncio.create_task(
            client.request("GET", f"/v1/registry?index={revision}&wait=20s")
        )
        await asyncio.sleep(0)
        assert not waiting.done()
        await client.register(NS, SVC, "c", address="10.6.0.3")
        status, body, _ = await asyncio.wait_for(waiting, 10)
        assert body["revision"] > revision and len(body["instances"]) == 3
