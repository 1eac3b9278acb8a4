"""`python -m discovery serve` as a user runs it, and graceful shutdown in-process."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import dns.asyncquery
import dns.message
import dns.rcode
import pytest
from conftest import Client, make_config

from discovery.server import run_server

DNS_LINE = re.compile(r"DNS listening on (\S+):(\d+) \(udp, tcp\)")
HTTP_LINE = re.compile(r"HTTP listening on https?://(\S+):(\d+)")
# The options table of SPEC.md: every one must be in `serve --help`.
SPEC_FLAGS = [
    "--dns", "--http", "--zone", "--etcd", "--etcd-prefix", "--dns-ttl",
    "--negative-ttl", "--min-ttl", "--max-ttl", "--upstream",
]  # fmt: skip
LOOPBACK = ["--dns", "127.0.0.1:0", "--http", "127.0.0.1:0", "--cni-socket", ""]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISCOVERY_")}
    env.update(extra)
    return env


@dataclass
class Process:
    proc: asyncio.subprocess.Process
    dns: tuple[str, int] = ("", 0)
    http: tuple[str, int] = ("", 0)
    stderr: list[str] = field(default_factory=list)
    drain: asyncio.Task[None] | None = None

    async def read_until_listening(self) -> None:
        assert self.proc.stderr is not None
        async with asyncio.timeout(20):
            while not (self.dns[1] and self.http[1]):
                line = (await self.proc.stderr.readline()).decode()
                assert line, "exited before listening:\n" + "".join(self.stderr)
                self.stderr.append(line)
                if match := DNS_LINE.search(line):
                    self.dns = (match.group(1), int(match.group(2)))
                if match := HTTP_LINE.search(line):
                    self.http = (match.group(1), int(match.group(2)))
        self.drain = asyncio.create_task(self._drain())  # a full pipe would block the server

    async def _drain(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.stderr.append(line.decode())

    async def stop(self, signum: int) -> int:
        self.proc.send_signal(signum)
        async with asyncio.timeout(10):
            code = await self.proc.wait()
            if self.drain is not None:
                await self.drain
        return code


@asynccontextmanager
async def serve(*args: str, **env: str) -> AsyncIterator[Process]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "discovery", "serve", *LOOPBACK, *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(**env),
    )  # fmt: skip
    process = Process(proc)
    try:
        await process.read_until_listening()
        yield process
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if process.drain is not None:
            await process.drain


async def run(
    *cmd: str, stdin: bytes = b"", env: dict[str, str] | None = None, timeout: float = 60
) -> tuple[int, str, str]:
    """Run a command to completion, killed after `timeout`: exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(stdin)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def run_to_exit(*args: str, **env: str) -> tuple[int, str, str]:
    """Run `python -m discovery ARGS` to completion: exit code, stdout, stderr."""
    return await run(sys.executable, "-m", "discovery", *args, env=clean_env(**env), timeout=20)


async def register(http: tuple[str, int], ns: str, svc: str, inst: str, **body: object) -> None:
    url = f"http://{http[0]}:{http[1]}/v1/services/{ns}/{svc}/instances/{inst}"
    async with aiohttp.ClientSession() as session, session.put(url, json=body) as response:
        assert response.status == 201, await response.text()


async def resolve(
    dns_address: tuple[str, int], name: str, rdtype: str = "A"
) -> dns.message.Message:
    """Ask until the registration has reached the DNS cache (a watch event away)."""
    host, port = dns_address
    async with asyncio.timeout(5):
        while True:
            query = dns.message.make_query(name, rdtype)
            response = await dns.asyncquery.udp(query, host, port=port, timeout=2)
            if response.answer or response.rcode() not in (dns.rcode.NXDOMAIN, dns.rcode.NOERROR):
                return response
            await asyncio.sleep(0.02)  # another process: no event to await


def tcp_refused(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def udp_free(address: tuple[str, int]) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind(address)
        except OSError:
            return False
    return True


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_serve_register_resolve_then_stop(signum: int) -> None:
    async with serve() as process:
        assert process.dns[0] == process.http[0] == "127.0.0.1"
        assert process.dns[1] != 0 and process.http[1] != 0
        await register(process.http, "default", "web", "web-1", address="10.1.2.3")
        response = await resolve(process.dns, "web.default.svc.cluster.local")
        assert response.rcode() == dns.rcode.NOERROR
        assert [rr.to_text() for rrset in response.answer for rr in rrset] == ["10.1.2.3"]
        assert await process.stop(signum) == 0, "".join(process.stderr)
    assert "Traceback" not in "".join(process.stderr)
    assert tcp_refused(process.dns)
    assert tcp_refused(process.http)
    assert udp_free(process.dns)


async def test_env_dns_ttl() -> None:
    async with serve(DISCOVERY_DNS_TTL="7") as process:
        await register(process.http, "default", "web", "web-1", address="10.1.2.3", ttl=30)
        response = await resolve(process.dns, "web.default.svc.cluster.local")
        assert [rrset.ttl for rrset in response.answer] == [7]
        assert await process.stop(signal.SIGTERM) == 0


async def test_flag_overrides_env() -> None:
    async with serve("--dns-ttl", "9", DISCOVERY_DNS_TTL="7") as process:
        await register(process.http, "default", "web", "web-1", address="10.1.2.3", ttl=30)
        response = await resolve(process.dns, "web.default.svc.cluster.local")
        assert [rrset.ttl for rrset in response.answer] == [9]
        assert await process.stop(signal.SIGTERM) == 0


async def test_env_zones() -> None:
    async with serve(DISCOVERY_ZONE="a.test,b.test") as process:
        await register(process.http, "default", "web", "web-1", address="10.1.2.3")
        for zone in ("a.test", "b.test"):
            response = await resolve(process.dns, f"web.default.svc.{zone}")
            assert [rr.to_text() for rrset in response.answer for rr in rrset] == ["10.1.2.3"]
        outside = await resolve(process.dns, "web.default.svc.cluster.local")
        assert outside.rcode() == dns.rcode.REFUSED
        assert await process.stop(signal.SIGTERM) == 0


async def test_repeated_zone_flag() -> None:
    async with serve("--zone", "a.test", "--zone", "b.test") as process:
        await register(process.http, "default", "web", "web-1", address="10.1.2.3")
        for zone in ("a.test", "b.test"):
            response = await resolve(process.dns, f"web.default.svc.{zone}")
            assert [rr.to_text() for rrset in response.answer for rr in rrset] == ["10.1.2.3"]
        assert await process.stop(signal.SIGTERM) == 0


@pytest.mark.parametrize(
    ("args", "env", "mentions"),
    [
        (["--dns-ttl", "nope"], {}, "--dns-ttl"),
        (["--min-ttl", "10", "--max-ttl", "5"], {}, "min-ttl"),
        ([], {"DISCOVERY_DNS_TTL": "nope"}, "--dns-ttl"),
        (["--dns", "127.0.0.1:99999"], {}, "--dns"),
        (["--zone", "bad..zone"], {}, "zone"),
        (["--no-such-flag"], {}, "--no-such-flag"),
        (["--log-level", "loud"], {}, "--log-level"),
        (["--workers", "0"], {}, "--workers"),
        (["--upstream", "/nonexistent/resolv.conf"], {}, "cannot read /nonexistent/resolv.conf"),
        ([], {"DISCOVERY_UPSTREAM": "/dev/null"}, "--upstream: /dev/null names no nameserver"),
        (["--upstream", "dns.example"], {}, "must be an IP address"),
    ],
    ids=[
        "bad-int",
        "min-above-max",
        "bad-env",
        "bad-port",
        "bad-zone",
        "unknown-flag",
        "bad-log-level",
        "no-workers",
        "unreadable-resolv-conf",
        "resolv-conf-without-nameserver",
        "upstream-not-an-address",
    ],
)
async def test_bad_option_exits_2(args: list[str], env: dict[str, str], mentions: str) -> None:
    code, _, stderr = await run_to_exit("serve", *LOOPBACK, *args, **env)
    assert code == 2, stderr
    assert mentions in stderr
    assert "Traceback" not in stderr
    assert "usage:" in stderr


@pytest.mark.parametrize("listener", ["--dns", "--http"])
async def test_address_in_use_exits_1(listener: str) -> None:
    with socket.socket() as taken, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        if listener == "--dns":  # take the UDP side too: the DNS listener binds both
            udp.bind(("127.0.0.1", port))
        code, _, stderr = await run_to_exit("serve", *LOOPBACK, listener, f"127.0.0.1:{port}")
    assert code == 1, stderr
    assert "cannot start" in stderr
    assert "address already in use" in stderr
    variable = "DISCOVERY_" + listener[2:].upper()
    assert f"{listener} 127.0.0.1:{port}" in stderr and variable in stderr, stderr
    assert "Traceback" not in stderr and "Errno" not in stderr


async def test_version() -> None:
    code, stdout, stderr = await run_to_exit("--version")
    assert code == 0, stderr
    assert re.fullmatch(r"discovery \d+\.\d+\.\d+\S*\n", stdout), stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--dns-ttl", "five"], "--dns-ttl: 'five' must be an integer"),
        (["--upstream-timeout", "soon"], "--upstream-timeout: 'soon' must be a number"),
        (["--node-ttl", "1e400"], "--node-ttl: '1e400' must be an integer"),
        (["--tcp-idle-timeout", "nan"], "--tcp-idle-timeout: 'nan' must be a finite number"),
    ],
)
async def test_bad_numbers_are_explained_in_words(args: list[str], words: str) -> None:
    code, _, stderr = await run_to_exit("serve", *LOOPBACK, *args)
    assert code == 2 and words in stderr, stderr
    assert "invalid literal" not in stderr and "could not convert" not in stderr


async def test_help_lists_every_option() -> None:
    code, stdout, stderr = await run_to_exit("serve", "--help")
    assert code == 0, stderr
    for flag in SPEC_FLAGS:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", stdout), flag
        env_name = "DISCOVERY_" + flag[2:].upper().replace("-", "_")
        assert env_name in stdout, env_name


async def test_no_command_exits_2() -> None:
    code, _, stderr = await run_to_exit()
    assert code == 2
    assert "usage:" in stderr


async def test_shutdown_with_a_long_poll_in_flight_is_prompt() -> None:
    polling = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        async with run_server(make_config()) as server:
            client = Client(server, session)
            await client.register("default", "web", "web-1", address="10.1.2.3", ttl=30)
            assert await client.wait_cache(
                lambda: ("default", "web") in server.registry.services()
            )
            real_wait = server.registry.wait_service

            async def wait(
                service: tuple[str, str], predicate: Callable[[], bool], seconds: float
            ) -> bool:
                polling.set()  # the long poll has reached its handler
                return await real_wait(service, predicate, seconds)

            server.registry.wait_service = wait  # type: ignore[method-assign]
            path = f"/v1/services/default/web?index={server.registry.revision}&wait=30s"
            long_poll = asyncio.create_task(client.request("GET", path))
            async with asyncio.timeout(5):
                await polling.wait()
            assert not long_poll.done()
            started = time.monotonic()
        elapsed = time.monotonic() - started  # run_server has shut the server down
        outcome = await settle(long_poll)
    assert elapsed < 2, f"shutdown took {elapsed:.1f}s with a long poll in flight"
    # Either the poll is answered with what is known now, or its connection is closed.
    if not isinstance(outcome, BaseException):
        assert isinstance(outcome, tuple)
        status, body, _ = outcome
        assert status == 200, body
        assert [i["name"] for i in body["instances"]] == ["web-1"]


async def settle(task: Awaitable[tuple[int, object, dict[str, str]]]) -> object:
    try:
        async with asyncio.timeout(5):
            return await task
    except aiohttp.ClientError as error:
        return error
