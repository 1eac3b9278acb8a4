"""A "container" (a network namespace) whose resolv.conf names only discovery resolves cluster
names and outside names with glibc's resolver (`getent hosts`): discovery on port 53 inside the
namespace forwards what is not in its zones to dnsmasq beside it."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from needs import unavailable
from upstream_support import dnsmasq_binary


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh namespace with loopback up and /etc/netns/NAME/resolv.conf naming 127.0.0.1."""
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("getent") is None:
        unavailable("needs root, iproute2 and getent (network namespaces)")
    name = f"dsc-fw-{secrets.token_hex(4)}"
    conf_dir = Path("/etc/netns") / name
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        conf_dir.mkdir(parents=True)
        (conf_dir / "resolv.conf").write_text(
            "nameserver 127.0.0.1\nsearch default.svc.cluster.local svc.cluster.local\n"
            "options ndots:5 timeout:3 attempts:2\n"
        )
        yield name
    finally:
        shutil.rmtree(conf_dir, ignore_errors=True)
        subprocess.run(["ip", "netns", "del", name], check=False)


async def _started(ns: str, *command: str, ready: str) -> asyncio.subprocess.Process:
    """Start COMMAND in the namespace; return once a stderr line contains `ready`."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, *command,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    seen = []
    assert proc.stderr is not None
    async with asyncio.timeout(30):
        while True:
            line = (await proc.stderr.readline()).decode()
            assert line, f"{command[0]} exited:\n" + "".join(seen)
            seen.append(line)
            if ready in line:
                return proc


async def _in(ns: str, *command: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, *command,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


REGISTER = """
import json, sys, urllib.request
body = json.dumps({"address": "10.1.2.3", "ttl": 60}).encode()
url = "http://127.0.0.1:8080/v1/services/default/web/instances/web-1"
request = urllib.request.Request(url, data=body, method="PUT")
print(urllib.request.urlopen(request).status)
"""


async def test_getent_in_a_namespace_resolves_cluster_and_outside_names(
    netns: str, tmp_path: Path
) -> None:
    dnsmasq = dnsmasq_binary()
    hosts = tmp_path / "hosts"
    hosts.write_text("192.0.2.10 www.example.test\n")
    upstream = await _started(
        netns, dnsmasq, "-k", "--no-resolv", "--no-hosts", "--port=5353",
        "--listen-address=127.0.0.1", "--bind-interfaces", f"--addn-hosts={hosts}", "-C",
        "/dev/null", "--local=/example.test/", "--local-ttl=60", "--user=root",
        f"--pid-file={tmp_path / 'dnsmasq.pid'}", "--log-facility=-",
        ready="read " + str(hosts),
    )  # fmt: skip
    server = None
    try:
        server = await _started(
            netns, sys.executable, "-m", "discovery", "serve",
            "--dns", "127.0.0.1:53", "--http", "127.0.0.1:8080",
            "--upstream", "127.0.0.1:5353", ready="HTTP listening",
        )  # fmt: skip
        code, out = await _in(netns, sys.executable, "-c", REGISTER)
        assert (code, out.strip()) == (0, "201"), out
        code, out = await _in(netns, "getent", "hosts", "web.default.svc.cluster.local")
        assert code == 0 and out.split() == ["10.1.2.3", "web.default.svc.cluster.local"], out
        code, out = await _in(netns, "getent", "hosts", "web")  # through the search list
        assert code == 0 and out.split()[0] == "10.1.2.3", out
        code, out = await _in(netns, "getent", "hosts", "www.example.test")
        assert code == 0 and out.split() == ["192.0.2.10", "www.example.test"], out
        code, out = await _in(netns, "getent", "hosts", "missing.example.test")
        assert code == 2, out  # not found
    finally:
        if server is not None:
            await _stop(server)
        await _stop(upstream)
