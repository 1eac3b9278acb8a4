"""`--workers N`: several processes answer on one DNS port, each with its own cache."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import aiohttp
import dns.asyncquery
import dns.exception
import dns.message
import dns.rcode
from test_cli import serve

NAME = "web.default.svc.cluster.local"


def udp_sockets_on(port: int) -> int:
    """How many UDP sockets are bound to the port (SO_REUSEPORT lets several)."""
    count = 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                local = row.split()[1]
                if int(local.rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


def workers_of(pid: int) -> set[int]:
    """The DNS worker processes of a server (not multiprocessing's resource tracker)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
            is_tracker = b"resource_tracker" in cmdline.read()
        if int(fields[1]) == pid and not is_tracker:
            found.add(int(entry))
    return found


async def eventually(check: object, timeout: float = 10.0) -> None:
    """Poll a condition another process brings about: there is no event to await."""
    assert callable(check)
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110 - the change happens in another process
            await asyncio.sleep(0.05)


async def answer_from_new_sockets(host: str, port: int, count: int) -> set[str]:
    """Ask from `count` fresh sockets: their source ports spread over the workers."""
    answers: set[str] = set()
    for _ in range(count):
        try:
            response = await dns.asyncquery.udp(
                dns.message.make_query(NAME, "A"), host, port=port, timeout=2
            )
        except dns.exception.Timeout:
            answers.add("timeout")  # e.g. sent to the socket of a worker being killed
            continue
        if response.rcode() != dns.rcode.NOERROR:
            answers.add(dns.rcode.to_text(response.rcode()))
        answers |= {rr.to_text() for rrset in response.answer for rr in rrset}
    return answers


async def test_workers_share_the_port_and_each_answers_from_its_own_cache() -> None:
    async with serve("--workers", "2") as process, aiohttp.ClientSession() as session:
        host, port = process.dns
        await eventually(lambda: asyncio.sleep(0, udp_sockets_on(port) == 2))
        workers = workers_of(process.proc.pid)
        assert workers, "no worker process"

        url = f"http://{process.http[0]}:{process.http[1]}/v1/services/default/web/instances/a"
        async with session.put(url, json={"address": "10.9.8.7"}) as response:
            assert response.status == 201

        async def everyone_knows() -> bool:
            return await answer_from_new_sockets(host, port, 16) == {"10.9.8.7"}

        await eventually(everyone_knows)

        # A worker that dies is replaced, and the new one loads the registry first.
        for pid in workers:
            os.kill(pid, signal.SIGKILL)

        async def replaced() -> bool:
            current = workers_of(process.proc.pid)
            return bool(current) and not current & workers and udp_sockets_on(port) == 2

        await eventually(replaced)
        await eventually(everyone_knows)

        assert await process.stop(signal.SIGTERM) == 0
        assert udp_sockets_on(port) == 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            assert probe.connect_ex((host, port)) != 0
