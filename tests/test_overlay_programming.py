"""The overlay programmer against a real kernel and a real store, in-process.

A server on the embedded store feeds its registry to an Overlay that programs a network
namespace this test creates; other nodes' blocks are store keys written here, as their nodes
would write them. The plan (which blocks are programmed, which are skipped and why) is tested
without root.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from overlay_support import block_entries, ip, require_root, until

from discovery.model import records_prefix
from discovery.net.ipam import vtep_mac
from discovery.net.overlay import Overlay, plan
from discovery.net.records import Block, NetworkKeys, NetworkSpec
from discovery.server import Server

NODE, NODE_IP = "a", "192.168.77.1"
DEVICE = "dvx.42"
pytestmark = pytest.mark.timeout(120)


@dataclass
class Node:
    server: Server
    overlay: Overlay
    netns: str
    keys: NetworkKeys

    async def network(self, name: str = "pods", **spec: object) -> None:
        body = NetworkSpec.model_validate(
            {"subnet": "10.244.0.0/16", "node_prefix": 24, "backend": "vxlan", "vni": 42, **spec}
        ).checked()
        await self.server.store.put(self.keys.network(name), body.encode())

    async def block(
        self, cidr: str, node: str, node_ip: str, mac: str | None = None, network: str = "pods"
    ) -> None:
        value = Block.encode(node, node_ip, mac or vtep_mac(node, network))
        await self.server.store.put(self.keys.block(network, cidr), value)

    async def drop(self, cidr: str, network: str = "pods") -> None:
        await self.server.store.delete(self.keys.block(network, cidr))

    def entries(self, cidr: str, mac: str = "") -> dict[str, str]:
        return block_entries(self.netns, DEVICE, cidr, mac or "-")

    async def has(self, cidr: str, mac: str, node_ip: str) -> None:
        def done() -> bool:
            found = self.entries(cidr, mac)
            return (
                mac in found.get("neigh", "")
                and f"{mac} dst {node_ip}" in found.get("fdb", "")
                and "onlink" in found.get("route", "")
            )

        await until(f"{cidr} -> {mac} at {node_ip}", done)

    async def passes(self, count: int) -> None:
        target = self.overlay.passes + count
        await until(f"{count} more passes", lambda: self.overlay.passes >= target)


async def make_node(server: Server, interval: float) -> AsyncIterator[Node]:
    require_root()
    netns = f"ovt-{secrets.token_hex(3)}"
    ip("netns", "add", netns)
    ip("-n", netns, "link", "set", "lo", "up")
    overlay = Overlay(server.registry, NODE, NODE_IP, interval=interval, netns=netns)
    try:
        server.registry.subscribe(overlay)
        await overlay.start()
        yield Node(server, overlay, netns, NetworkKeys(server.config.etcd_prefix))
    finally:
        await overlay.close()
        ip("netns", "del", netns, check=False)


@pytest.fixture
async def node(server: Server) -> AsyncIterator[Node]:
    async for made in make_node(server, interval=0.3):
        yield made


@pytest.fixture
async def quiet_node(server: Server) -> AsyncIterator[Node]:
    """No periodic pass within a test: only changes and reloads make one."""
    async for made in make_node(server, interval=3600):
        yield made


async def test_device_and_peers_follow_the_blocks(node: Node) -> None:
    await node.network()
    await node.block("10.244.1.0/24", NODE, NODE_IP)
    await node.block("10.244.2.0/24", "b", "192.168.77.2")
    await node.block("10.244.3.0/24", "c", "192.168.77.3")
    await node.has("10.244.2.0/24", vtep_mac("b", "pods"), "192.168.77.2")
    await node.has("10.244.3.0/24", vtep_mac("c", "pods"), "192.168.77.3")
    link = ip("-n", node.netns, "-d", "link", "show", DEVICE)
    assert "vxlan id 42" in link and "dstport 8472" in link and "nolearning" in link, link
    assert f"local {NODE_IP}" in link and "mtu 1450" in link, link
    assert vtep_mac(NODE, "pods") in link, link
    assert "10.244.1.0/32" in ip("-n", node.netns, "-4", "addr", "show", "dev", DEVICE)
    assert not node.entries("10.244.1.0/24").get("route"), "own block routed over the overlay"
    await until("two peers", lambda: node.overlay.peers == 2)
    assert node.overlay.is_programmed("pods", "10.244.1.0/24")  # own: on the device

    # in step: passes change nothing
    changes = node.overlay.changes
    await node.passes(3)
    assert node.overlay.changes == changes

    # a block gone: its route, neighbour and FDB entry go; the other peer stays
    await node.drop("10.244.3.0/24")
    mac_c = vtep_mac("c", "pods")
    await until("c's entries removed", lambda: not node.entries("10.244.3.0/24", mac_c))
    await node.has("10.244.2.0/24", vtep_mac("b", "pods"), "192.168.77.2")
    # the kernel's entries go during the pass, its count of peers when the pass ends
    await until("one peer", lambda: node.overlay.peers == 1)

    # the network stops being vxlan: the device goes
    await node.network(backend="bridge")
    await until(
        "device removed", lambda: not ip("-n", node.netns, "link", "show", DEVICE, check=False)
    )


async def test_hand_deleted_entries_come_back(node: Node) -> None:
    await node.network()
    await node.block("10.244.2.0/24", "b", "192.168.77.2")
    mac = vtep_mac("b", "pods")
    await node.has("10.244.2.0/24", mac, "192.168.77.2")
    ip("-n", node.netns, "route", "del", "10.244.2.0/24")
    await node.has("10.244.2.0/24", mac, "192.168.77.2")
    ip("-n", node.netns, "neigh", "del", "10.244.2.0", "dev", DEVICE)
    ip("-n", node.netns, "route", "del", "10.244.2.0/24")
    await node.has("10.244.2.0/24", mac, "192.168.77.2")
    # a stale entry someone added by hand is removed
    ip("-n", node.netns, "route", "add", "10.244.9.0/24", "via", "10.244.9.0", "dev", DEVICE,
       "onlink")  # fmt: skip
    await until("stray route removed", lambda: not node.entries("10.244.9.0/24").get("route"))


async def test_a_reload_compares_the_kernel_again(quiet_node: Node) -> None:
    node = quiet_node
    await node.network()
    await node.block("10.244.2.0/24", "b", "192.168.77.2")
    mac = vtep_mac("b", "pods")
    await node.has("10.244.2.0/24", mac, "192.168.77.2")
    ip("-n", node.netns, "route", "del", "10.244.2.0/24")
    registry = node.server.registry
    registry.load(await node.server.store.load(records_prefix(registry.prefix)))
    await node.has("10.244.2.0/24", mac, "192.168.77.2")


async def test_peer_with_a_new_node_ip_or_mac_is_followed(node: Node) -> None:
    await node.network()
    await node.block("10.244.2.0/24", "b", "192.168.77.2")
    mac = vtep_mac("b", "pods")
    await node.has("10.244.2.0/24", mac, "192.168.77.2")
    await node.block("10.244.2.0/24", "b", "192.168.77.12")
    await node.has("10.244.2.0/24", mac, "192.168.77.12")
    assert "192.168.77.2 " not in node.entries("10.244.2.0/24", mac)["fdb"] + " "
    await node.block("10.244.2.0/24", "b", "192.168.77.12", mac="02:aa:bb:cc:dd:ee")
    await node.has("10.244.2.0/24", "02:aa:bb:cc:dd:ee", "192.168.77.12")
    fdb = ip("-n", node.netns, "neigh", "show", "dev", DEVICE)
    assert mac not in fdb, fdb


async def test_bad_node_ip_is_skipped_counted_and_logged_once(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "discovery.net.overlay")
    await node.network()
    await node.block("10.244.2.0/24", "b", "192.168.77.2")
    await node.block("10.244.4.0/24", "d", "not-an-address")
    await node.block("10.244.5.0/24", "e", "")
    await node.has("10.244.2.0/24", vtep_mac("b", "pods"), "192.168.77.2")
    await node.passes(3)
    assert node.overlay.errors["node_ip"] == 2
    logged = [r for r in caplog.records if "node_ip" in r.getMessage()]
    assert len(logged) == 2, [r.getMessage() for r in logged]
    assert not node.entries("10.244.4.0/24", vtep_mac("d", "pods"))
    assert not node.entries("10.244.5.0/24", vtep_mac("e", "pods"))
    assert not node.overlay.is_programmed("pods", "10.244.4.0/24")
    # fixed by its node: programmed
    await node.block("10.244.4.0/24", "d", "192.168.77.4")
    await node.has("10.244.4.0/24", vtep_mac("d", "pods"), "192.168.77.4")


async def test_a_duplicate_vtep_mac_keeps_the_first_announcement(node: Node) -> None:
    await node.network()
    mac_b = vtep_mac("b", "pods")
    await node.block("10.244.2.0/24", "b", "192.168.77.2")
    await node.has("10.244.2.0/24", mac_b, "192.168.77.2")
    await node.block("10.244.3.0/24", "c", "192.168.77.3", mac=mac_b)  # c claims b's MAC
    await node.block("10.244.6.0/24", "f", "192.168.77.6", mac=vtep_mac(NODE, "pods"))  # ours
    await until("two duplicates counted", lambda: node.overlay.errors["duplicate_mac"] == 2)
    await node.passes(2)
    assert not node.entries("10.244.3.0/24").get("route")
    assert not node.entries("10.244.6.0/24").get("route")
    fdb = node.entries("10.244.2.0/24", mac_b)["fdb"]
    assert f"{mac_b} dst 192.168.77.2" in fdb and "192.168.77.3" not in fdb, fdb
    # the first holder goes: the other announcement is programmed
    await node.drop("10.244.2.0/24")
    await node.has("10.244.3.0/24", mac_b, "192.168.77.3")


async def test_a_network_that_cannot_be_programmed_leaves_the_others_and_dns(
    node: Node,
) -> None:
    ip("-n", node.netns, "link", "add", "dvx.43", "type", "bridge")  # someone else's link
    await node.network("other", subnet="10.245.0.0/16", vni=43)
    await node.network()
    await node.block("10.244.2.0/24", "b", "192.168.77.2")
    await node.has("10.244.2.0/24", vtep_mac("b", "pods"), "192.168.77.2")
    await until("error counted", lambda: node.overlay.errors["netlink"] > 0)
    assert "bridge" in ip("-n", node.netns, "-d", "link", "show", "dvx.43")  # left alone
    assert node.server.registry.synced and node.overlay.errors["netlink"] > 0
    # the same VNI twice: the second network is skipped
    await node.network("again", subnet="10.246.0.0/16", vni=42)
    await until("vni clash counted", lambda: node.overlay.errors["vni"] == 1)
    await node.has("10.244.2.0/24", vtep_mac("b", "pods"), "192.168.77.2")


async def test_plan_skips_what_it_cannot_program(server: Server) -> None:
    keys = NetworkKeys(server.config.etcd_prefix)
    store, registry = server.store, server.registry
    spec = NetworkSpec(subnet="10.244.0.0/16", backend="vxlan").checked()
    await store.put(keys.network("pods"), spec.encode())
    await store.put(keys.network("flat"), NetworkSpec(subnet="10.250.0.0/16").encode())
    blocks = {
        "10.244.1.0/24": ("a", "192.168.77.1", vtep_mac("a", "pods")),
        "10.244.2.0/24": ("b", "192.168.77.2", vtep_mac("b", "pods")),
        "10.244.3.0/24": ("c", "fd00::3", vtep_mac("c", "pods")),
        "10.244.4.0/24": ("d", "192.168.77.4", "ff:ff:ff:ff:ff:ff"),
        "10.244.5.0/24": ("e", "192.168.77.5", "garbage"),
        "10.244.6.0/24": ("f", "192.168.77.6", vtep_mac("b", "pods")),
    }
    for cidr, (name, node_ip, mac) in blocks.items():
        await store.put(keys.block("pods", cidr), Block.encode(name, node_ip, mac))
    await registry.wait(lambda: len(registry.blocks("pods")) == len(blocks), 5)
    plans, rejected = plan(registry, "a", "192.168.77.1")
    assert list(plans) == ["pods"]  # the bridge network needs no device
    assert list(plans["pods"].peers) == ["10.244.2.0/24"]
    assert plans["pods"].own == ("10.244.1.0/24",)
    assert plans["pods"].device.addresses == ("10.244.1.0",)
    reasons = {r.cidr: r.reason for r in rejected}
    assert reasons == {
        "10.244.3.0/24": "node_ip",
        "10.244.4.0/24": "vtep_mac",
        "10.244.5.0/24": "vtep_mac",
        "10.244.6.0/24": "duplicate_mac",
    }


async def test_an_observer_reports_what_the_writer_programmed(node: Node) -> None:
    """With --workers, the workers after the first only read the kernel."""
    observer = Overlay(
        node.server.registry, NODE, NODE_IP, interval=0.3, netns=node.netns, program=False
    )
    node.server.registry.subscribe(observer)
    await observer.start()
    try:
        await node.network()
        await node.block("10.244.2.0/24", "b", "192.168.77.2")
        mac = vtep_mac("b", "pods")
        await node.has("10.244.2.0/24", mac, "192.168.77.2")
        await until("observer sees b", lambda: observer.is_programmed("pods", "10.244.2.0/24"))
        ip("-n", node.netns, "route", "del", "10.244.2.0/24")
        await node.has("10.244.2.0/24", mac, "192.168.77.2")  # the writer repairs it
        await until("observer sees b", lambda: observer.is_programmed("pods", "10.244.2.0/24"))
        assert observer.changes == 0 and observer.passes > 1
    finally:
        await observer.close()
