"""The VXLAN overlay on a real kernel: network namespaces as hosts on one underlay bridge, an
infra namespace running etcd, `discovery serve --overlay` on each host, containers (namespaces
with a veth into their host's bridge) pinging each other by DNS name across hosts.

Root only (skipped otherwise); every namespace, link and process is removed at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from overlay_support import Host, Lab, block_entries, ip, make_lab, ping, until

NETWORK = {"subnet": "10.244.0.0/16", "node_prefix": 24, "backend": "vxlan", "vni": 42}
DEVICE = "dvx.42"
TTL = 5
# a restart within the node's lease: long enough for a process start on a loaded machine
RESTART_TTL = 20
pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with make_lab(tmp_path) as made:
        yield made


async def start_nodes(lab: Lab, *names: str, ttl: int = TTL) -> list[Host]:
    hosts = [lab.host(name, index) for index, name in enumerate(names, start=len(lab.hosts) + 1)]
    for host in hosts:
        host.start(ttl=ttl)
    for host in hosts:
        await host.ready()
    return hosts


def blocks(host: Host) -> dict[str, dict[str, object]]:
    status, body = host.http("GET", "/v1/networks/pods")
    assert status == 200, body
    return {block["node"]: block for block in body["blocks"]}


async def programmed(host: Host, *peers: Host) -> None:
    """Wait until host's overlay has programmed every peer's block."""

    def done() -> bool:
        seen = blocks(host)
        return all(bool(seen.get(p.name, {}).get("programmed")) for p in peers)

    await until(f"{host.name} programs {[p.name for p in peers]}", done)


async def reaches(source: Host, target: Host, timeout: float = 20) -> None:
    for a in source.containers:
        for b in target.containers:
            await until(
                f"{a.name} pings {b.name} by name", lambda a=a, b=b: ping(a, b.name), timeout
            )


def block_of(host: Host, node: str) -> str:
    return str(blocks(host)[node]["subnet"])


async def test_containers_on_two_hosts_talk_by_name_and_a_third_joins(lab: Lab) -> None:
    await lab.start_etcd()
    a, b = await start_nodes(lab, "a", "b")
    status, body = a.http("PUT", "/v1/networks/pods", NETWORK)
    assert status == 201, body
    a1, b1 = a.container("a1"), b.container("b1")
    await programmed(a, b)
    await programmed(b, a)
    for host in (a, b):  # either node's DNS answers for either container
        assert host.dig("b1.pods.net.cluster.local") == [b1.address]
        assert host.dig("a1.pods.net.cluster.local") == [a1.address]
    await reaches(a, b)
    await reaches(b, a)

    # what GET /v1/networks/{net} says: each block, node_ip, VTEP MAC, programmed here
    seen = blocks(a)
    assert seen["b"]["node_ip"] == b.address and seen["a"]["node_ip"] == a.address
    assert seen["a"]["mine"] and not seen["b"]["mine"]
    link = block_entries(a.netns, DEVICE, str(seen["b"]["subnet"]), str(seen["b"]["vtep_mac"]))
    assert str(seen["b"]["vtep_mac"]) in link["neigh"], link
    assert f"dst {b.address}" in link["fdb"], link
    assert "onlink" in link["route"], link
    assert a.metric("discovery_overlay_peers") == 1

    (c,) = await start_nodes(lab, "c")
    c.container("c1")
    for host in (a, b, c):
        await programmed(host, *(h for h in (a, b, c) if h is not host))
    for source in (a, b, c):
        for target in (a, b, c):
            if source is not target:
                await reaches(source, target)
    assert c.metric("discovery_overlay_peers") == 2


async def test_killed_node_vanishes_after_its_ttl_and_returns(lab: Lab) -> None:
    await lab.start_etcd()
    a, b = await start_nodes(lab, "a", "b")
    assert a.http("PUT", "/v1/networks/pods", NETWORK)[0] == 201
    a.container("a1")
    b1 = b.container("b1")
    await programmed(a, b)
    await reaches(a, b)
    cidr, mac = block_of(a, "b"), str(blocks(a)["b"]["vtep_mac"])
    assert set(block_entries(a.netns, DEVICE, cidr, mac)) == {"route", "neigh", "fdb"}

    b.kill(signal.SIGKILL)
    killed = time.monotonic()

    def forgotten() -> bool:
        return not block_entries(a.netns, DEVICE, cidr, mac) and not a.dig(
            "b1.pods.net.cluster.local"
        )

    await until("A forgets B's block and names", forgotten, TTL + 10)
    took = time.monotonic() - killed
    assert took <= TTL + 1, f"B's entries and names went {took:.1f} s after the kill"
    assert a.metric("discovery_overlay_peers") == 0

    # B comes back: a new lease, a block again, its container attached again
    b.containers.clear()
    b.start(ttl=TTL)
    await b.ready()
    b2 = b.container("b2")
    assert b2.address != "" and b1.address != ""
    await programmed(a, b)
    await reaches(a, b)
    await reaches(b, a)


async def test_data_plane_stays_while_etcd_is_down(lab: Lab) -> None:
    await lab.start_etcd()
    a, b = await start_nodes(lab, "a", "b")
    assert a.http("PUT", "/v1/networks/pods", NETWORK)[0] == 201
    a1, b1 = a.container("a1"), b.container("b1")
    await programmed(a, b)
    await reaches(a, b)
    cidr, mac = block_of(a, "b"), str(blocks(a)["b"]["vtep_mac"])

    lab.stop_etcd()
    down = time.monotonic()
    # longer than B's lease, with a full overlay pass every second: nothing is torn down
    while time.monotonic() - down < TTL + 2:
        assert set(block_entries(a.netns, DEVICE, cidr, mac)) == {"route", "neigh", "fdb"}
        assert ping(a1, b1.address)
    assert a.dig("b1.pods.net.cluster.local") == [b1.address]  # stale but answered

    await lab.start_etcd()  # leases are extended when etcd elects itself again
    await until("A sees etcd again", lambda: a.metric("discovery_store_up") == 1, 30)
    await programmed(a, b)
    await reaches(a, b)


async def test_node_restarted_with_the_same_name_needs_no_reprogramming(lab: Lab) -> None:
    await lab.start_etcd()
    a, b = await start_nodes(lab, "a", "b", ttl=RESTART_TTL)
    assert a.http("PUT", "/v1/networks/pods", NETWORK)[0] == 201
    a1, b1 = a.container("a1"), b.container("b1")
    await programmed(a, b)
    await reaches(a, b)
    before = blocks(a)["b"]
    changes = a.metric("discovery_overlay_changes_total")

    b.kill(signal.SIGKILL)
    assert ping(a1, b1.address)  # the data plane does not need B's process
    b.start(ttl=RESTART_TTL)
    await b.ready()
    await programmed(b, a)
    after = blocks(a)["b"]
    assert after == before  # same block, node_ip and MAC: the key was not rewritten
    assert b.metric("discovery_overlay_changes_total") == 0  # B found its device in place
    assert a.metric("discovery_overlay_changes_total") == changes  # A touched nothing
    assert ping(a1, b1.address) and ping(b1, a1.name)


async def test_node_restarted_with_another_node_ip_is_followed(lab: Lab) -> None:
    await lab.start_etcd()
    a, b = await start_nodes(lab, "a", "b", ttl=RESTART_TTL)
    assert a.http("PUT", "/v1/networks/pods", NETWORK)[0] == 201
    a1, b1 = a.container("a1"), b.container("b1")
    await programmed(a, b)
    await reaches(a, b)
    cidr, mac = block_of(a, "b"), str(blocks(a)["b"]["vtep_mac"])

    moved = "192.168.77.12"
    ip("-n", b.netns, "addr", "add", f"{moved}/24", "dev", "eth0")
    b.kill(signal.SIGKILL)
    b.start(ttl=RESTART_TTL, node_ip=moved)
    await b.ready()
    await until("B announces its new node_ip", lambda: blocks(a)["b"]["node_ip"] == moved)
    assert block_of(a, "b") == cidr  # the same block
    await until(
        "A's FDB follows B",
        lambda: f"dst {moved}" in block_entries(a.netns, DEVICE, cidr, mac).get("fdb", ""),
    )
    await until(  # B replaced its device (its local address changed)
        "B's device on its new address",
        lambda: f"local {moved}" in ip("-n", b.netns, "-d", "link", "show", DEVICE, check=False),
    )
    await reaches(a, b)
    await reaches(b, a)
    assert ping(a1, b1.address)


def test_overlay_without_net_admin_exits_with_a_clear_message(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "discovery", "serve", "--dns", "127.0.0.1:0",
            "--http", "127.0.0.1:0", "--overlay", "--node-ip", "192.168.77.1"]  # fmt: skip
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv (util-linux) to drop CAP_NET_ADMIN")
        argv = ["setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin", *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "CAP_NET_ADMIN" in done.stderr, done.stderr


def test_overlay_needs_an_ipv4_node_ip() -> None:
    for extra, message in (([], "--overlay needs --node-ip"), (["--node-ip", "fd00::1"], "IPv4")):
        argv = [sys.executable, "-m", "discovery", "serve", "--overlay", *extra]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert message in done.stderr, done.stderr
