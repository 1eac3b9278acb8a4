"""The VXLAN overlay, measured on one machine: network namespaces as hosts on an underlay bridge.

    sudo .venv/bin/python bench/overlay.py [--joins 40] [--rounds 3] [--seconds 5]
                                           [--out docs/overlay-benchmarks.md]

Builds an underlay bridge, an infra namespace running etcd and hosts A and B, each running
`discovery serve --overlay` (containers plumbed by `discovery-cni`), then measures:

1. join: a new host joins (its own namespace on the underlay, a new node), attaches a
   container, so its node leases a block; time from that lease (the node's log line, in
   wall-clock milliseconds) to the first ping reply from A's container (`ping -D -i 0.005`,
   started as soon as the CNI ADD returns). Each joined host is removed after its sample.
2. pairs: ping RTT (`ping -c 200 -i 0.01`) and TCP throughput (`iperf3 -t SECONDS`) from a
   container on A to one on B (across the overlay) and to another on A (the same bridge),
   alternated over the rounds, in one run.

Root only; everything it makes is removed at the end (namespaces, processes, files).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from machine import cpu_model, discovery_command

UNDERLAY = "192.168.88"
ETCD_URL = f"http://{UNDERLAY}.100:2379"
TTL = 5
NETWORK = {"subnet": "10.240.0.0/16", "node_prefix": 24, "backend": "vxlan", "vni": 7}


def run(*argv: str, check: bool = True, **kwargs: object) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, **kwargs)  # type: ignore[call-overload]
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stdout}{done.stderr}")
    return str(done.stdout)


def ip(*args: str, check: bool = True) -> str:
    return run("ip", *args, check=check)


def wait_until(what: str, check: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def etcd_argv(netns: str, data: Path, peer: str) -> list[str]:
    return [
        "ip", "netns", "exec", netns, "etcd", "--name", "infra", "--data-dir", str(data),
        "--listen-client-urls", ETCD_URL, "--advertise-client-urls", ETCD_URL,
        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"infra={peer}",
    ]  # fmt: skip


@dataclass
class Host:
    name: str
    netns: str
    address: str
    directory: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.directory / f"node-{self.name}.log"

    @property
    def socket(self) -> str:
        return str(self.directory / f"cni-{self.name}.sock")

    def exec(self, *argv: str, check: bool = True) -> str:
        return run("ip", "netns", "exec", self.netns, *argv, check=check)

    def start(self) -> None:
        argv = [
            *discovery_command(), "serve", "--etcd", ETCD_URL, "--node", self.name,
            "--node-ip", self.address, "--node-ttl", str(TTL), "--overlay",
            "--dns", "0.0.0.0:53", "--http", "127.0.0.1:8080", "--cni-socket", self.socket,
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"node {self.name} exited: {self.log.read_text()[-2000:]}")
            out = self.exec("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                            "http://127.0.0.1:8080/readyz", check=False)  # fmt: skip
            return out == "200"

        wait_until(f"node {self.name} ready", ready)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=20)

    def api(self, method: str, path: str, body: object) -> str:
        return self.exec("curl", "-sf", "-X", method, f"http://127.0.0.1:8080{path}",
                         "-d", json.dumps(body))  # fmt: skip

    def lease_time(self) -> float:
        """Wall-clock time of the node's 'leased block' log line."""
        for line in self.log.read_text().splitlines():
            if " leased block " in line:
                stamp = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                return stamp.timestamp()
        raise RuntimeError(f"node {self.name} logged no block lease")


@dataclass
class Lab:
    directory: Path
    suffix: str = field(default_factory=lambda: secrets.token_hex(3))
    namespaces: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    hosts: list[Host] = field(default_factory=list)
    ports: int = 0

    def netns(self, role: str) -> str:
        name = f"ob{role}-{self.suffix}"
        ip("netns", "add", name)
        self.namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")
        return name

    def attach(self, role: str, address: str) -> str:
        netns = self.netns(role)
        self.ports += 1
        port = f"p{self.ports}"
        ip("-n", self.namespaces[0], "link", "add", port, "type", "veth",
           "peer", "name", "eth0", "netns", netns)  # fmt: skip
        ip("-n", self.namespaces[0], "link", "set", port, "master", "br0", "up")
        ip("-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")
        return netns

    def build(self) -> None:
        underlay = self.netns("ul")
        ip("-n", underlay, "link", "add", "br0", "type", "bridge")
        ip("-n", underlay, "link", "set", "br0", "up")
        infra = self.attach("infra", f"{UNDERLAY}.100")
        peer = "http://127.0.0.1:2380"
        with open(self.directory / "etcd.log", "ab") as log:
            self.procs.append(
                subprocess.Popen(
                    etcd_argv(infra, self.directory / "etcd", peer),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            )
        health = ["ip", "netns", "exec", infra, "curl", "-s", "-m", "2", f"{ETCD_URL}/health"]
        wait_until("etcd healthy", lambda: '"true"' in run(*health, check=False))

    def host(self, name: str, index: int) -> Host:
        address = f"{UNDERLAY}.{index}"
        host = Host(name, self.attach(f"h{name}", address), address, self.directory)
        self.hosts.append(host)
        host.start()
        return host

    def container(self, host: Host, name: str) -> tuple[str, str]:
        """discovery-cni ADD through host's node: (netns, address)."""
        netns = self.netns(f"c{name}")
        conf = {
            "cniVersion": "1.0.0", "name": "pods", "type": "discovery-cni", "bridge": "cni0",
            "isGateway": True, "socket": host.socket,
            "args": {"cni": {"discovery": {"name": name}}},
        }  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
        env.update(CNI_COMMAND="ADD", CNI_CONTAINERID=f"{name}-{self.suffix}",
                   CNI_NETNS=f"/var/run/netns/{netns}", CNI_IFNAME="eth0",
                   CNI_PATH="/opt/cni/bin")  # fmt: skip
        plugin = Path(sys.executable).parent / "discovery-cni"
        argv = [str(plugin)] if plugin.exists() else [sys.executable, "-m", "discovery.net.cni"]
        out = run(*argv, input=json.dumps(conf), env=env)
        return netns, json.loads(out)["ips"][0]["address"].split("/")[0]

    def close(self) -> None:
        for host in self.hosts:
            with contextlib.suppress(Exception):
                host.stop()
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=20)
        for name in reversed(self.namespaces):
            ip("netns", "del", name, check=False)


def first_reply(netns: str, address: str, timeout: float = 10) -> float:
    """Wall-clock time of the first echo reply from address (ping -D timestamps)."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, "ping", "-D", "-n", "-i", "0.005", "-W", "1", address],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None
        for line in proc.stdout:
            if "bytes from" in line:
                return float(line[1 : line.index("]")])
            if time.monotonic() > deadline:
                break
        raise RuntimeError(f"no reply from {address} within {timeout} s")
    finally:
        proc.kill()
        proc.wait()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def rtt(netns: str, address: str) -> tuple[float, float]:
    out = run("ip", "netns", "exec", netns, "ping", "-n", "-q", "-c", "200", "-i", "0.01", address)
    line = next(x for x in out.splitlines() if x.startswith("rtt"))
    _low, avg, _high, mdev = (float(x) for x in line.split("=")[1].split()[0].split("/"))
    return avg, mdev


def throughput(client: str, server: str, address: str, seconds: int) -> float:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", server, "iperf3", "-s", "-1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            done = subprocess.run(
                ["ip", "netns", "exec", client, "iperf3", "-c", address, "-t", str(seconds), "-J"],
                capture_output=True,
                text=True,
                timeout=seconds + 60,
            )
            report = json.loads(done.stdout) if done.stdout.strip() else {}
            received = report.get("end", {}).get("sum_received")
            if done.returncode == 0 and received:
                return float(received["bits_per_second"]) / 1e9
            if "error" in report and "connect" not in str(report["error"]):
                raise RuntimeError(f"iperf3 to {address}: {report['error']}")
            time.sleep(0.05)  # the server was not listening yet
        raise RuntimeError(f"iperf3 to {address} failed: {done.stdout[-500:]}")
    finally:
        proc.kill()
        proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--joins", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root: network namespaces, bridges and VXLAN devices")
    for tool in ("ip", "etcd", "ping", "iperf3", "curl"):
        if shutil.which(tool) is None:
            sys.exit(f"needs {tool}")
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="overlay-bench-") as tmp, _lab(Path(tmp)) as lab:
        a = lab.host("a", 1)
        b = lab.host("b", 2)
        a.api("PUT", "/v1/networks/pods", NETWORK)
        a1, _ = lab.container(a, "a1")
        a2, a2_ip = lab.container(a, "a2")
        b1, b1_ip = lab.container(b, "b1")
        wait_until("a1 reaches b1", lambda: first_reply(a1, b1_ip) > 0)

        joins: list[float] = []
        after_add: list[float] = []  # from the CNI ADD's return to the first reply
        for i in range(args.joins):
            host = lab.host(f"j{i}", 10 + i)
            netns, address = lab.container(host, f"j{i}")
            added = time.time()
            replied = first_reply(a1, address)
            leased = host.lease_time()
            joins.append((replied - leased) * 1000)
            after_add.append((replied - added) * 1000)
            host.stop()
            lab.hosts.remove(host)
            ip("netns", "del", host.netns, check=False)
            ip("netns", "del", netns, check=False)
            print(f"join {i + 1}/{args.joins}: {joins[-1]:.0f} ms", file=sys.stderr)

        pairs: dict[str, dict[str, list[float]]] = {
            "overlay": {"rtt": [], "mdev": [], "gbps": []},
            "bridge": {"rtt": [], "mdev": [], "gbps": []},
        }
        for round_ in range(args.rounds):
            for kind, (server, address) in (("overlay", (b1, b1_ip)), ("bridge", (a2, a2_ip))):
                avg, mdev = rtt(a1, address)
                gbps = throughput(a1, server, address, args.seconds)
                pairs[kind]["rtt"].append(avg)
                pairs[kind]["mdev"].append(mdev)
                pairs[kind]["gbps"].append(gbps)
                print(f"round {round_ + 1} {kind}: rtt {avg:.3f} ms, {gbps:.2f} Gbit/s",
                      file=sys.stderr)  # fmt: skip
    load_after = os.getloadavg()
    report = _report(args, started, load_before, load_after, joins, after_add, pairs)
    print(report)
    if args.out is not None:
        args.out.write_text(report)
    return 0


@contextlib.contextmanager
def _lab(directory: Path) -> Iterator[Lab]:
    lab = Lab(directory)
    try:
        lab.build()
        yield lab
    finally:
        lab.close()


def _report(
    args: argparse.Namespace,
    started: dt.datetime,
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
    joins: list[float],
    after_add: list[float],
    pairs: dict[str, dict[str, list[float]]],
) -> str:
    commit = run("git", "rev-parse", "--short", "HEAD", check=False).strip() or "unknown"
    iperf = run("iperf3", "--version", check=False).splitlines()[:1]
    med = statistics.median
    o, b = pairs["overlay"], pairs["bridge"]
    lines = [
        "# The VXLAN overlay: join latency, RTT and throughput",
        "",
        f"Command: `sudo .venv/bin/python bench/overlay.py --joins {args.joins} "
        f"--rounds {args.rounds} --seconds {args.seconds}` — {started:%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: nproc {os.cpu_count()}, cpu {cpu_model()}, kernel {platform.release()}, "
        f"python {platform.python_version()}, {' '.join(iperf)}, commit {commit}",
        "",
        "Load average (1, 5, 15 min) before: "
        + " ".join(f"{x:.2f}" for x in load_before)
        + "; after: "
        + " ".join(f"{x:.2f}" for x in load_after)
        + " (other work shared the machine)",
        "",
        "Hosts are network namespaces on one underlay bridge (veths), etcd in an infra namespace,",
        f"`discovery serve --overlay --node-ttl {TTL}` per host, containers plumbed by",
        "`discovery-cni`; the network is `" + json.dumps(NETWORK) + "` (MTU 1450).",
        "",
        "## A new node's block lease → first ping reply from an existing node's container",
        "",
        f"{len(joins)} joins: each a new host namespace and node, one container (the node leases",
        "its block on that first attachment); from the node's `leased block` log line to the",
        "first echo reply seen by `ping -D -i 0.005` in A's container (started when the CNI ADD",
        "returns, so the figure includes the rest of the ADD: address, veth, routes).",
        "",
        "| p50 | p90 | p99 | max | target |",
        "|---|---|---|---|---|",
        f"| {percentile(joins, 50):.0f} ms | {percentile(joins, 90):.0f} ms "
        f"| {percentile(joins, 99):.0f} ms | {max(joins):.0f} ms | p99 < 1000 ms |",
        "",
        f"Of which after the ADD returned: p50 {percentile(after_add, 50):.0f} ms, "
        f"p99 {percentile(after_add, 99):.0f} ms (the ping's own interval is 5 ms). With "
        f"{len(joins)} samples p99 is the second largest or the largest.",
        "",
        "## Container to container: across the overlay vs on one bridge",
        "",
        "A container on host A to one on host B (overlay) and to another on A (same bridge),",
        f"alternated over {args.rounds} rounds; RTT: `ping -c 200 -i 0.01` (average per round);",
        f"throughput: `iperf3 -t {args.seconds}` (one TCP stream, received rate).",
        "",
        "| pair | RTT median (ms) | RTT rounds | TCP median (Gbit/s) | TCP rounds |",
        "|---|---|---|---|---|",
        f"| overlay (A → B) | {med(o['rtt']):.3f} | "
        + ", ".join(f"{x:.3f}" for x in o["rtt"])
        + f" | {med(o['gbps']):.2f} | "
        + ", ".join(f"{x:.2f}" for x in o["gbps"])
        + " |",
        f"| bridge (A → A) | {med(b['rtt']):.3f} | "
        + ", ".join(f"{x:.3f}" for x in b["rtt"])
        + f" | {med(b['gbps']):.2f} | "
        + ", ".join(f"{x:.2f}" for x in b["gbps"])
        + " |",
        "",
        f"Overlay / bridge: RTT **{med(o['rtt']) / med(b['rtt']):.2f}x**, "
        f"throughput **{med(o['gbps']) / med(b['gbps']):.2f}x**.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
