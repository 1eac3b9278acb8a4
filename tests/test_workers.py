"""`--workers N`: the parent binds the sockets, N processes serve them, each with its own
watch on etcd; a dead worker is replaced; the workers stop with their parent."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import dns.asyncquery
import dns.exception
import dns.message
import dns.rcode
import etcd_support
import pytest
from test_cli import Process, register, run_to_exit, serve, tcp_refused, udp_free
from test_networks import attach, put_network
from test_replicas import replica, session, synced
from waiting import eventually

EtcdServer = etcd_support.EtcdServer
etcd_server = etcd_support.etcd_server
open_etcd_store = etcd_support.open_etcd_store
_fixtures = (session,)  # imported for pytest

NAME = "web.default.svc.cluster.local"
pytestmark = pytest.mark.etcd


def workers_of(parent: int) -> set[int]:
    """The worker processes of a server (not multiprocessing's resource tracker)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                is_worker = b"spawn_main" in cmdline.read()
        except OSError:
            continue
        if int(fields[1]) == parent and is_worker:
            found.add(int(entry))
    return found


async def exited(pids: set[int], timeout: float = 20.0) -> None:
    """Wait until every process has exited: their pidfds become readable (no polling)."""
    loop = asyncio.get_running_loop()
    waits: list[asyncio.Future[None]] = []
    fds: list[int] = []
    try:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # gone already
                fd = os.pidfd_open(pid)
                fds.append(fd)
                done: asyncio.Future[None] = loop.create_future()
                loop.add_reader(fd, lambda d=done: d.done() or d.set_result(None))
                waits.append(done)
        async with asyncio.timeout(timeout):
            await asyncio.gather(*waits)
    finally:
        for fd in fds:
            loop.remove_reader(fd)
            os.close(fd)


async def answers(address: tuple[str, int], count: int) -> list[str]:
    """`count` queries in a row: each answer's address, rcode or "timeout"."""
    seen = []
    for _ in range(count):
        query = dns.message.make_query(NAME, "A")
        try:
            response = await dns.asyncquery.udp(query, address[0], port=address[1], timeout=2)
        except dns.exception.Timeout:
            seen.append("timeout")  # e.g. read by a worker being killed
            continue
        if response.rcode() != dns.rcode.NOERROR:
            seen.append(dns.rcode.to_text(response.rcode()))
        seen += [rr.to_text() for rrset in response.answer for rr in rrset]
    return seen


@contextlib.asynccontextmanager
async def workers(etcd: EtcdServer, count: int, *args: str) -> AsyncIterator[Process]:
    """`discovery serve --workers COUNT` on etcd, once all its workers are running."""
    async with serve("--workers", str(count), "--etcd", etcd.client_url, *args) as process:

        async def all_running() -> bool:
            started = "".join(process.stderr).count(" started (pid ")
            return started == count and len(workers_of(process.proc.pid)) == count

        await eventually(all_running, f"{count} workers running", within=30)
        yield process


async def test_more_than_one_worker_needs_etcd() -> None:
    code, _, stderr = await run_to_exit(
        "serve", "--dns", "127.0.0.1:0", "--http", "127.0.0.1:0", "--workers", "2"
    )
    assert code == 2, stderr
    assert "--workers 2 needs --etcd" in stderr
    assert "Traceback" not in stderr


async def test_workers_serve_the_parents_sockets_and_a_dead_one_is_replaced(
    etcd_server: EtcdServer,
) -> None:
    async with workers(etcd_server, 2) as process:
        first = workers_of(process.proc.pid)
        await register(process.http, "default", "web", "a", address="10.9.8.7")

        async def all_answer() -> bool:
            return set(await answers(process.dns, 16)) == {"10.9.8.7"}

        await eventually(all_answer, "every worker answers", within=20)

        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        # The survivor reads the shared sockets meanwhile: answers keep coming.
        during = await answers(process.dns, 20)
        assert during.count("timeout") <= 1, during  # at most the one the victim had read
        assert set(during) <= {"10.9.8.7", "timeout", "SERVFAIL"}, during

        async def replaced() -> bool:
            current = workers_of(process.proc.pid)
            return len(current) == 2 and victim not in current

        await eventually(replaced, "the dead worker replaced", within=30)
        # the new worker has loaded the registry from etcd
        await eventually(all_answer, "every worker answers", within=20)
        assert "exited with -9: restarting" in "".join(process.stderr)

        assert await process.stop(signal.SIGTERM) == 0
        await exited(workers_of(process.proc.pid) | first)
    assert "Traceback" not in "".join(process.stderr)


async def test_sigterm_stops_every_worker_and_closes_the_sockets(
    etcd_server: EtcdServer,
) -> None:
    async with workers(etcd_server, 3) as process:
        pids = workers_of(process.proc.pid)
        await register(process.http, "default", "web", "a", address="10.9.8.7")

        async def answered() -> bool:  # by whichever worker, once its watch has the change
            return await answers(process.dns, 1) == ["10.9.8.7"]

        await eventually(answered, "an answer", within=20)
        stopping = asyncio.create_task(exited(pids))
        assert await process.stop(signal.SIGTERM) == 0
        await stopping
    assert tcp_refused(process.dns) and tcp_refused(process.http) and udp_free(process.dns)
    assert "".join(process.stderr).count("shutting down") == 3
    assert "Traceback" not in "".join(process.stderr)


async def test_workers_stop_when_their_parent_is_killed(etcd_server: EtcdServer) -> None:
    async with workers(etcd_server, 2) as process:
        pids = workers_of(process.proc.pid)
        process.proc.kill()  # SIGKILL: the parent cannot tell anyone
        await exited(pids)
        await process.proc.wait()
    assert "".join(process.stderr).count("the parent process is gone: stopping") == 2
    assert tcp_refused(process.dns) and tcp_refused(process.http) and udp_free(process.dns)


async def cni_answers(path: Path) -> int:
    """The status of a CNI request that cannot be decoded (400 from any live agent)."""
    connector = aiohttp.UnixConnector(path=str(path))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post("http://cni/v1/cni/ADD", data=b"not json") as response,
    ):
        body = await response.json()
        assert body["code"] == 6, body
        return response.status


async def test_the_parent_binds_the_cni_socket_and_removes_it(
    etcd_server: EtcdServer, tmp_path: Path
) -> None:
    path = tmp_path / "run" / "cni.sock"
    async with workers(etcd_server, 2, "--cni-socket", str(path)) as process:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert await cni_answers(path) == 400
        # a worker that stops cleanly leaves the socket to its parent and the other worker
        victim = min(workers_of(process.proc.pid))
        os.kill(victim, signal.SIGTERM)
        await exited({victim})
        assert path.exists()
        assert [await cni_answers(path) for _ in range(4)] == [400] * 4
        assert await process.stop(signal.SIGTERM) == 0
    assert not path.exists()
    assert "".join(process.stderr).count("CNI socket listening on") == 1


def etcd_leases(etcd: EtcdServer) -> list[int]:
    """Every lease etcd holds (its JSON gateway)."""
    request = urllib.request.Request(f"{etcd.client_url}/v3/lease/leases", data=b"{}")
    with urllib.request.urlopen(request, timeout=5) as response:
        body = json.load(response)
    return [int(lease["ID"]) for lease in body.get("leases", [])]


async def node_lease_holders(etcd: EtcdServer) -> set[int]:
    """The leases the node's keys (blocks, attachments, addresses) are bound to."""
    async with open_etcd_store(etcd) as store:
        snapshot = await store.load(b"/discovery/v1/")
    return {kv.lease for kv in snapshot.items if kv.lease}


async def test_the_workers_of_one_node_take_one_node_lease(etcd_server: EtcdServer) -> None:
    async with workers(etcd_server, 2, "--node", "n1") as process:
        base = f"http://{process.http[0]}:{process.http[1]}"

        async def put(path: str, body: object) -> tuple[int, object]:
            # a connection of its own each: the workers take turns accepting them
            async with aiohttp.ClientSession() as own, own.put(base + path, json=body) as reply:
                return reply.status, await reply.json(content_type=None)

        async def network_ready() -> bool:
            status, _ = await put("/v1/networks/pods", {"subnet": "10.244.0.0/16"})
            return status in (200, 201)  # 503 while a worker is still loading

        await eventually(network_ready, "the network created", within=20)
        results = await asyncio.gather(
            *(put(f"/v1/networks/pods/attachments/c{i}/eth0", None) for i in range(24))
        )
        assert all(status == 201 for status, _ in results), results
        assert len({body["address"] for _, body in results}) == 24  # type: ignore[index]
        assert len(etcd_leases(etcd_server)) == 1
        assert await node_lease_holders(etcd_server) == set(etcd_leases(etcd_server))
        assert await process.stop(signal.SIGTERM) == 0


async def test_two_servers_sharing_a_node_lease_id_grant_it_once(
    etcd_server: EtcdServer, session: aiohttp.ClientSession
) -> None:
    """What two workers of one node do, in one process: both need the lease at once."""
    shared = 0x77_0000_0001
    async with (
        replica(etcd_server.endpoint, session, node="n1", node_lease=shared) as a,
        replica(etcd_server.endpoint, session, node="n1", node_lease=shared) as b,
    ):
        await synced(a, b)
        await put_network(a, node_prefix=24)
        assert await b.wait_cache(lambda: b.server.registry.network("pods") is not None)
        results = await asyncio.gather(
            *(attach(server, f"c{n}-{i}") for n, server in enumerate((a, b)) for i in range(8))
        )
        assert all(status == 201 for status, _ in results), results
        assert a.server.ipam.lease.id == b.server.ipam.lease.id == shared
        assert etcd_leases(etcd_server) == [shared]
        assert await node_lease_holders(etcd_server) == {shared}
