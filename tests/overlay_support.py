"""Network namespaces for overlay tests: hosts on one underlay bridge, containers on bridges.

Everything is made inside namespaces the test creates (never a link in the root namespace)
under a random suffix, and removed on close() even when the test failed halfway.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from needs import unavailable
from waiting import eventually

UNDERLAY = "192.168.77"  # /24 on the underlay bridge; it only exists inside the test's namespaces
ETCD_IP = f"{UNDERLAY}.100"
NETNS_ETC = Path("/etc/netns")


def require_root() -> None:
    if os.geteuid() != 0:
        unavailable("needs root: creates network namespaces, bridges and VXLAN devices")
    for tool in ("ip", "bridge"):
        if shutil.which(tool) is None:
            unavailable(f"needs `{tool}` (iproute2) to build and inspect the test network")


def ip(*args: str, check: bool = True) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def in_netns(netns: str, *argv: str, timeout: float = 30, check: bool = True) -> str:
    done = subprocess.run(
        ["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, timeout=timeout
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"{netns}: {' '.join(argv)} failed: {done.stdout}{done.stderr}")
    return done.stdout


async def until(what: str, check: Callable[[], bool], timeout: float = 20.0) -> float:
    """eventually() for checks that ask the kernel or another process synchronously."""

    async def ask() -> bool:
        return check()

    return await eventually(ask, what, timeout)


def block_entries(netns: str, device: str, cidr: str, mac: str) -> dict[str, str]:
    """What the kernel holds for one remote block and its VTEP MAC: route, neighbour, FDB."""
    found: dict[str, str] = {}
    gateway = cidr.split("/")[0]
    routes = ip("-n", netns, "route", "show", "exact", cidr, check=False).strip()
    if routes:
        found["route"] = routes
    for line in ip("-n", netns, "neigh", "show", "dev", device, check=False).splitlines():
        if line.split()[:1] == [gateway]:
            found["neigh"] = line.strip()
    done = subprocess.run(
        ["bridge", "-n", netns, "fdb", "show", "dev", device],
        capture_output=True,
        text=True,
        timeout=30,
    )
    fdb = [line.strip() for line in done.stdout.splitlines() if line.startswith(mac + " dst")]
    if fdb:
        found["fdb"] = "\n".join(fdb)
    return found


@dataclass
class Container:
    name: str
    netns: str
    address: str
    host: Host


@dataclass
class Host:
    lab: Lab
    name: str
    netns: str
    address: str
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    containers: list[Container] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:8080{path}"

    def http(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        argv = ["curl", "-s", "-m", "10", "-X", method, "-w", "\n%{http_code}", self.url(path)]
        if body is not None:
            argv += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
        out = in_netns(self.netns, *argv, check=False)
        text, _, code = out.rpartition("\n")
        try:
            data = json.loads(text) if text.strip() else None
        except ValueError:
            data = text
        return int(code or 0), data

    def start(self, *extra: str, node_ip: str | None = None, ttl: int = 5) -> None:
        """`discovery serve --overlay` in this host's namespace (DNS on :53 for containers)."""
        assert self.proc is None or self.proc.poll() is not None
        self.log = self.lab.tmp / f"node-{self.name}.log"
        argv = [
            sys.executable, "-m", "discovery", "serve",
            "--etcd", f"http://{ETCD_IP}:2379",
            "--node", self.name,
            "--node-ip", node_ip or self.address,
            "--node-ttl", str(ttl),
            "--overlay",
            "--overlay-resync", "1",
            "--dns", "0.0.0.0:53",
            "--http", "127.0.0.1:8080",
            "--cni-socket", self.cni_socket,
            *extra,
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    async def ready(self, timeout: float = 30) -> None:
        def answers() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"node {self.name} exited {self.proc.returncode}:\n{self.log_tail()}")
            return self.http("GET", "/readyz")[0] == 200

        await until(f"node {self.name} ready", answers, timeout)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=20)

    def log_tail(self, lines: int = 40) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def metric(self, name: str) -> float:
        status, text = self.http("GET", "/metrics")
        assert status == 200, text
        total = 0.0
        for line in str(text).splitlines():
            if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def dig(self, name: str) -> list[str]:
        out = in_netns(
            self.netns, "dig", "@127.0.0.1", "+short", "+time=2", "+tries=2", name, check=False
        )
        return sorted(line for line in out.split() if line)

    @property
    def cni_socket(self) -> str:
        return str(self.lab.tmp / f"cni-{self.name}.sock")

    def container(self, name: str, network: str = "pods") -> Container:
        """A namespace plumbed by `discovery-cni ADD` through this host's node, with a
        resolv.conf naming the node's DNS at the bridge gateway (search <net>.net.<zone>)."""
        netns = self.lab.netns(f"c{name}")
        conf = {
            "cniVersion": "1.0.0",
            "name": network,
            "type": "discovery-cni",
            "bridge": "cni0",
            "isGateway": True,
            "socket": self.cni_socket,
            "args": {"cni": {"discovery": {"name": name}}},
        }
        env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
        env.update(
            CNI_COMMAND="ADD",
            CNI_CONTAINERID=f"{name}-{self.lab.suffix}",
            CNI_NETNS=f"/var/run/netns/{netns}",
            CNI_IFNAME="eth0",
            CNI_PATH="/opt/cni/bin",
        )
        done = subprocess.run(
            cni_plugin(), input=json.dumps(conf), env=env, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, f"discovery-cni ADD: {done.stdout}{done.stderr}"
        result = json.loads(done.stdout)
        address, gateway = result["ips"][0]["address"].split("/")[0], result["ips"][0]["gateway"]
        etc = NETNS_ETC / netns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(
            f"nameserver {gateway}\nsearch {network}.net.cluster.local\noptions ndots:1\n"
        )
        container = Container(name, netns, address, self)
        self.containers.append(container)
        return container


def cni_plugin() -> list[str]:
    """The installed `discovery-cni` next to this interpreter, as a runtime finds it."""
    script = Path(sys.executable).parent / "discovery-cni"
    return [str(script)] if script.exists() else [sys.executable, "-m", "discovery.net.cni"]


class Lab:
    """Hosts (network namespaces) on one underlay bridge, an infra namespace running etcd."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.suffix = secrets.token_hex(3)
        self.namespaces: list[str] = []
        self.hosts: dict[str, Host] = {}
        self.etcd: subprocess.Popen[bytes] | None = None
        self.underlay = self.infra = ""

    def build(self) -> None:
        self.underlay = self.netns("ul")
        ip("-n", self.underlay, "link", "add", "br0", "type", "bridge")
        ip("-n", self.underlay, "link", "set", "br0", "up")
        self.infra = self.attach("infra", ETCD_IP)

    def netns(self, role: str) -> str:
        name = f"ov{role}-{self.suffix}"
        ip("netns", "add", name)
        self.namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")
        return name

    def attach(self, role: str, address: str) -> str:
        """A namespace with eth0 on the underlay bridge."""
        netns = self.netns(role)
        port = f"p-{role}"[:15]
        ip("-n", self.underlay, "link", "add", port, "type", "veth",
           "peer", "name", "eth0", "netns", netns)  # fmt: skip
        ip("-n", self.underlay, "link", "set", port, "master", "br0", "up")
        ip("-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")
        return netns

    def host(self, name: str, index: int) -> Host:
        address = f"{UNDERLAY}.{index}"
        host = Host(self, name, self.attach(f"h{name}", address), address)
        self.hosts[name] = host
        return host

    async def start_etcd(self) -> None:
        self.launch_etcd()
        client = f"http://{ETCD_IP}:2379"

        def healthy() -> bool:
            assert self.etcd is not None
            if self.etcd.poll() is not None:
                pytest.fail(f"etcd exited {self.etcd.returncode}")
            out = in_netns(self.infra, "curl", "-s", "-m", "2", f"{client}/health", check=False)
            return '"true"' in out

        await until("etcd healthy", healthy, 30)

    def launch_etcd(self) -> None:
        data = self.tmp / "etcd"
        client = f"http://{ETCD_IP}:2379"
        peer = "http://127.0.0.1:2380"
        argv = [
            "etcd", "--name", "infra", "--data-dir", str(data),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"infra={peer}",
        ]  # fmt: skip
        with open(self.tmp / "etcd.log", "ab") as log:
            self.etcd = subprocess.Popen(
                ["ip", "netns", "exec", self.infra, *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def stop_etcd(self) -> None:
        if self.etcd is not None and self.etcd.poll() is None:
            self.etcd.kill()
            self.etcd.wait(timeout=20)

    def close(self) -> None:
        for host in self.hosts.values():
            with contextlib.suppress(Exception):
                host.kill()
        with contextlib.suppress(Exception):
            self.stop_etcd()
        for name in reversed(self.namespaces):
            ip("netns", "del", name, check=False)
            shutil.rmtree(NETNS_ETC / name, ignore_errors=True)


@contextlib.contextmanager
def make_lab(tmp: Path) -> Iterator[Lab]:
    require_root()
    lab = Lab(tmp)
    try:
        lab.build()
        yield lab
    finally:
        lab.close()


def ping(container: Container, target: str, count: int = 1, wait: float = 2) -> bool:
    done = subprocess.run(
        ["ip", "netns", "exec", container.netns, "ping", "-c", str(count), "-W", str(wait), target],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return done.returncode == 0


__all__ = ["Container", "Host", "Lab", "make_lab", "ping", "signal"]
