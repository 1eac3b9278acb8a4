"""Network namespaces for tests: "containers", and a "host" namespace running a node server.

Every namespace has a random name and is deleted on exit, even when the test fails (deleting
the host namespace takes its bridge and veth ends with it). Links are only ever made inside
namespaces made here. The test process stays in the root namespace: it reaches the node
server's HTTP API through a socket created inside the host namespace (a socket belongs to the
namespace it was created in), and the CNI agent through its Unix socket (a file).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import http.client
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import etcd_support
from needs import unavailable
from test_cli import Process, clean_env, run
from waiting import eventually

NETNS_DIR = Path("/var/run/netns")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def require_netns() -> None:
    """Skip unless this process may make network namespaces (root, iproute2)."""
    if os.geteuid() != 0:
        unavailable("needs root: creates network namespaces, bridges and veth pairs")
    if shutil.which("ip") is None:
        unavailable("needs iproute2 (`ip`) to set up network namespaces")


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@contextlib.contextmanager
def netns(prefix: str = "c") -> Iterator[str]:
    """A new network namespace (lo up); yields its name, deletes it on exit."""
    name = unique(prefix)
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        ip("netns", "del", name, check=False)


def netns_path(name: str) -> str:
    return str(NETNS_DIR / name)


def links(name: str) -> list[str]:
    """Interface names in a namespace."""
    out = ip("-n", name, "-j", "link", "show").stdout
    return [link["ifname"] for link in json.loads(out)]


def socket_in(
    name: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
) -> socket.socket:
    """A socket created inside namespace `name` (by a thread that enters it and leaves)."""
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def enter_and_create() -> None:
        try:
            home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            target = os.open(netns_path(name), os.O_RDONLY)
            try:
                if _libc.setns(target, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
                try:
                    made.append(socket.socket(family, kind))
                finally:
                    if _libc.setns(home, CLONE_NEWNET) != 0:  # pragma: no cover
                        os._exit(70)  # a thread stuck in a foreign namespace: stop now
            finally:
                os.close(target)
                os.close(home)
        except BaseException as error:
            failed.append(error)

    thread = threading.Thread(target=enter_and_create)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return made[0]


def http_in(
    name: str, address: tuple[str, int], method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    """One HTTP call from inside namespace `name`: status and decoded JSON (None when empty;
    the text when the answer is not JSON)."""
    sock = socket_in(name)
    sock.settimeout(10)
    connection = http.client.HTTPConnection(*address, timeout=10)
    try:
        sock.connect(address)
        connection.sock = sock
        data = None if body is None else json.dumps(body).encode()
        connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        raw = response.read()
        if "json" not in response.getheader("Content-Type", ""):
            return response.status, raw.decode()  # /metrics
        return response.status, json.loads(raw) if raw else None
    finally:
        connection.close()
        sock.close()


def plugin_command() -> list[str]:
    """The installed `discovery-cni` next to this interpreter, as a runtime finds it."""
    script = Path(sys.executable).parent / "discovery-cni"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "discovery.net.cni"]


async def plugin(
    command: str,
    conf: dict[str, Any] | None = None,
    *,
    container_id: str = "",
    netns: str = "",
    ifname: str = "eth0",
    args: str = "",
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """Run discovery-cni as a runtime does: exit code and the JSON it printed (or None)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    environ.update(
        {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": netns,
            "CNI_IFNAME": ifname,
            "CNI_PATH": "/opt/cni/bin",
        }
    )
    if args:
        environ["CNI_ARGS"] = args
    environ = {k: v for k, v in environ.items() if v}
    environ.update(env or {})
    data = stdin if stdin is not None else json.dumps(conf or {}).encode()
    code, out, err = await run(*plugin_command(), stdin=data, env=environ)
    assert not err.strip(), err  # never a traceback
    return code, json.loads(out) if out.strip() else None


@dataclass
class Node:
    """A node server in its own "host" namespace, with its CNI socket and its containers."""

    host: str
    socket_path: str
    process: Process
    containers: list[str] = field(default_factory=list)

    @property
    def http(self) -> tuple[str, int]:
        return self.process.http

    @property
    def dns_port(self) -> int:
        return self.process.dns[1]

    async def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return await asyncio.to_thread(http_in, self.host, self.http, method, path, body)

    async def network(self, name: str = "pods", **spec: Any) -> dict[str, Any]:
        body = {"subnet": "10.244.0.0/16", "node_prefix": 24, **spec}
        answer: tuple[int, Any] = (0, None)

        async def answered() -> bool:
            nonlocal answer
            answer = await self.api("PUT", f"/v1/networks/{name}", body)
            return answer[0] != 503  # 503 while the node is still loading

        await eventually(answered, f"network {name} created", within=20)
        status, data = answer
        assert status in (200, 201), data
        return data  # type: ignore[no-any-return]

    def conf(self, name: str = "pods", **extra: Any) -> dict[str, Any]:
        return {
            "cniVersion": "1.1.0",
            "name": name,
            "type": "discovery-cni",
            "bridge": "cni0",
            "isGateway": True,
            "mtu": 1400,
            "server": f"http://{self.http[0]}:{self.http[1]}",
            "socket": self.socket_path,
            **extra,
        }

    @contextlib.contextmanager
    def container(self) -> Iterator[str]:
        with netns("c") as name:
            yield name

    def host_links(self) -> list[str]:
        return links(self.host)


@contextlib.asynccontextmanager
async def node_server(tmp_path: Path, *args: str, host: str | None = None) -> AsyncIterator[Node]:
    """`discovery serve` inside a host namespace (made here unless `host` is given)."""
    require_netns()
    socket_path = str(tmp_path / f"{unique('cni')}.sock")
    with contextlib.ExitStack() as stack:
        if host is None:
            host = stack.enter_context(netns("host"))
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", host,
            sys.executable, "-m", "discovery", "serve",
            "--dns", "0.0.0.0:0", "--http", "127.0.0.1:0",
            "--cni-socket", socket_path, "--log-level", "debug", *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=clean_env(),
        )  # fmt: skip
        process = Process(proc)
        try:
            await process.read_until_listening()
            yield Node(host, socket_path, process)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            if process.drain is not None:
                await process.drain


class NetnsEtcd(etcd_support.EtcdServer):
    """etcd inside a test namespace (its loopback), so a node server there reaches it."""

    def __init__(self, directory: Path, namespace: str, address: str = "127.0.0.1") -> None:
        super().__init__(directory, binary=etcd_support.require_etcd())
        self.namespace = namespace
        self.address = address  # where clients reach it: loopback, or an underlay address

    @property
    def endpoint(self) -> tuple[str, int]:
        return (self.address, self.client_port)

    @property
    def client_url(self) -> str:
        return f"http://{self.address}:{self.client_port}"

    def _command(self) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *super()._command()]

    def _healthy(self) -> bool:
        try:
            status, _ = http_in(self.namespace, self.endpoint, "GET", "/health")
        except OSError:
            return False
        return status == 200

    def count(self, prefix: str) -> int:
        """How many keys start with `prefix` (etcd's JSON gateway, from inside)."""
        end = bytearray(prefix.encode())  # the range [prefix, prefix with its last byte + 1)
        end[-1] += 1
        body = {
            "key": base64.b64encode(prefix.encode()).decode(),
            "range_end": base64.b64encode(bytes(end)).decode(),
            "count_only": True,
        }
        status, data = http_in(self.namespace, self.endpoint, "POST", "/v3/kv/range", body)
        assert status == 200, data
        return int(data.get("count", 0))


UNDERLAY = "10.99.0"  # a /24 that exists only inside the namespaces made below


@contextlib.contextmanager
def underlay(hosts: int) -> Iterator[tuple[str, list[str]]]:
    """An "infra" namespace with a bridge at UNDERLAY.1 and `hosts` host namespaces wired to
    it by veth pairs (UNDERLAY.11, .12, …): nodes that reach one etcd in the infra namespace."""
    with contextlib.ExitStack() as stack:
        infra = stack.enter_context(netns("infra"))
        ip("-n", infra, "link", "add", "br0", "type", "bridge")
        ip("-n", infra, "addr", "add", f"{UNDERLAY}.1/24", "dev", "br0")
        ip("-n", infra, "link", "set", "br0", "up")
        names = []
        for number in range(hosts):
            host = stack.enter_context(netns("host"))
            ip("-n", infra, "link", "add", f"u{number}", "type", "veth", "peer", "name", "eth0",
               "netns", host)  # fmt: skip
            ip("-n", infra, "link", "set", f"u{number}", "master", "br0", "up")
            ip("-n", host, "addr", "add", f"{UNDERLAY}.{11 + number}/24", "dev", "eth0")
            ip("-n", host, "link", "set", "eth0", "up")
            names.append(host)
        yield infra, names
