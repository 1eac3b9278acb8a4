"""discovery-cni as a container runtime runs it, against a node server in a host namespace.

Containers are network namespaces. The plugin runs in the root namespace (as a runtime would
run it on the host) and reaches the node server through its Unix socket; the bridge and the
host ends of the veth pairs live in the host namespace the test made. Tests that need no
kernel (bad input, the plugin's imports) run anywhere; the others need root.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from netns_support import (
    UNDERLAY,
    NetnsEtcd,
    Node,
    ip,
    links,
    netns,
    netns_path,
    node_server,
    plugin,
    require_netns,
    run,
    underlay,
    unique,
)
from waiting import eventually

CIDR4 = r"^\d{1,3}(\.\d{1,3}){3}/\d{1,2}$"
IP4 = r"^\d{1,3}(\.\d{1,3}){3}$"
MAC = r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$"
# the ADD result of CNI spec 1.0.0/1.1.0 ("Success"): no "version" in ips since 1.0.0
RESULT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["cniVersion", "interfaces", "ips"],
    "additionalProperties": False,
    "properties": {
        "cniVersion": {"enum": ["1.0.0", "1.1.0"]},
        "interfaces": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "minLength": 1, "maxLength": 15},
                    "mac": {"type": "string", "pattern": MAC},
                    "mtu": {"type": "integer", "minimum": 68},
                    "sandbox": {"type": "string", "minLength": 1},
                    "socketPath": {"type": "string"},
                    "pciID": {"type": "string"},
                },
            },
        },
        "ips": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["address"],
                "additionalProperties": False,
                "properties": {
                    "address": {"type": "string", "pattern": CIDR4},
                    "gateway": {"type": "string", "pattern": IP4},
                    "interface": {"type": "integer", "minimum": 0},
                },
            },
        },
        "routes": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["dst"],
                "additionalProperties": False,
                "properties": {
                    "dst": {"type": "string", "pattern": CIDR4},
                    "gw": {"type": "string", "pattern": IP4},
                    "mtu": {"type": "integer"},
                    "advmss": {"type": "integer"},
                    "priority": {"type": "integer"},
                    "table": {"type": "integer"},
                    "scope": {"type": "integer"},
                },
            },
        },
        "dns": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "nameservers": {"type": "array", "items": {"type": "string"}},
                "domain": {"type": "string"},
                "search": {"type": "array", "items": {"type": "string"}},
                "options": {"type": "array", "items": {"type": "string"}},
            },
        },
    },
}
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["cniVersion", "code", "msg"],
    "additionalProperties": False,
    "properties": {
        "cniVersion": {"type": "string"},
        "code": {"type": "integer"},
        "msg": {"type": "string", "minLength": 1},
        "details": {"type": "string"},
    },
}


def valid_result(result: Any, version: str = "1.1.0") -> dict[str, Any]:
    jsonschema.validate(result, RESULT_SCHEMA)
    assert result["cniVersion"] == version
    for entry in result["ips"]:
        interface = result["interfaces"][entry["interface"]]
        assert "sandbox" in interface  # the address is on the container's interface
        network = ipaddress.ip_interface(entry["address"]).network
        assert ipaddress.ip_address(entry["gateway"]) in network
    return result  # type: ignore[no-any-return]


def cni_error(output: Any, code: int) -> dict[str, Any]:
    jsonschema.validate(output, ERROR_SCHEMA)
    assert output["code"] == code, output
    return output  # type: ignore[no-any-return]


README = Path(__file__).resolve().parent.parent / "README.md"
BASE_CONF = {"cniVersion": "1.1.0", "name": "pods", "type": "discovery-cni", "bridge": "cni0"}


def away_socket(tmp_path: Path) -> str:
    return str(tmp_path / "nobody-listens.sock")


# the plugin alone: no kernel, no server


async def test_version_is_answered_by_the_plugin_itself() -> None:
    code, out = await plugin("VERSION", {"cniVersion": "1.0.0"})
    assert code == 0
    assert out == {"cniVersion": "1.0.0", "supportedVersions": ["1.0.0", "1.1.0"]}
    code, out = await plugin("VERSION", stdin=b"")
    assert code == 0 and out["cniVersion"] == "1.1.0"
    code, out = await plugin("VERSION", {"cniVersion": "0.3.1"})  # how a runtime asks
    assert code == 0 and out["supportedVersions"] == ["1.0.0", "1.1.0"]


async def test_bad_input_gets_the_spec_error_codes(tmp_path: Path) -> None:
    conf = {**BASE_CONF, "socket": away_socket(tmp_path)}
    ids = {"container_id": "abc123", "netns": "/var/run/netns/x"}
    for stdin in (b"{not json", b"\xff\xfe", b"[1, 2]", b""):
        code, out = await plugin("ADD", stdin=stdin, **ids)
        assert code == 1
        cni_error(out, 6)
    code, out = await plugin("ADD", conf)  # no CNI_CONTAINERID, CNI_NETNS
    msg = cni_error(out, 4)["msg"]
    assert "CNI_CONTAINERID" in msg and "CNI_NETNS" in msg and code == 1
    code, out = await plugin("ADD", conf, env={"CNI_PATH": ""}, **ids)
    assert "CNI_PATH" in cni_error(out, 4)["msg"]
    assert (
        "CNI_IFNAME" in cni_error((await plugin("ADD", conf, ifname="x" * 16, **ids))[1], 4)["msg"]
    )
    cni_error((await plugin("ADD", conf, container_id="has space", netns="/x"))[1], 4)
    cni_error((await plugin("ADD", conf, container_id="a", netns="relative/path"))[1], 4)
    cni_error((await plugin("FROB", conf, **ids))[1], 4)
    cni_error((await plugin("ADD", conf, args="K8S_POD_NAME", **ids))[1], 4)
    cni_error((await plugin("ADD", conf, args="K8S_POD_NAME=Not_A_Label", **ids))[1], 4)
    for version in ("0.4.0", "2.0.0", "1.0"):
        code, out = await plugin("ADD", {**conf, "cniVersion": version}, **ids)
        assert code == 1 and version in cni_error(out, 1)["msg"]
    code, out = await plugin("STATUS", {**conf, "cniVersion": "1.0.0"})
    cni_error(out, 1)  # STATUS and GC came with 1.1.0
    bad_confs = [
        {k: v for k, v in conf.items() if k != "cniVersion"},
        {k: v for k, v in conf.items() if k != "name"},
        {**conf, "name": "Bad_Name"},
        {**conf, "mtu": "1450"},
        {**conf, "mtu": True},
        {**conf, "mtu": 100},
        {**conf, "bridge": "a-bridge-name-too-long"},
        {**conf, "isGateway": "yes"},
        {**conf, "socket": "relative.sock"},
        {**conf, "args": {"cni": {"discovery": {"name": "UPPER"}}}},
        {**conf, "args": {"cni": {"discovery": {"colour": "red"}}}},
        {**conf, "args": {"cni": {"discovery": "web"}}},
    ]
    for bad in bad_confs:
        code, out = await plugin("ADD", bad, **ids)
        assert code == 1
        cni_error(out, 7)
    code, out = await plugin("ADD", {**conf, "ipam": {"type": "host-local"}}, **ids)
    assert "ipam" in cni_error(out, 2)["msg"]
    code, out = await plugin("GC", {**conf, "cni.dev/valid-attachments": [{"id": 1}]})
    cni_error(out, 7)


async def test_an_unreachable_server_is_try_again_later(tmp_path: Path) -> None:
    conf = {**BASE_CONF, "socket": away_socket(tmp_path)}
    ids = {"container_id": "abc123", "netns": "/var/run/netns/x"}
    for command in ("ADD", "DEL", "CHECK"):
        code, out = await plugin(command, conf, **ids)
        assert code == 1
        assert away_socket(tmp_path) in cni_error(out, 11)["msg"]
    code, out = await plugin("STATUS", conf)
    cni_error(out, 50)
    # a path that is not a socket, and a socket nobody accepts on
    not_socket = tmp_path / "file"
    not_socket.write_text("")
    cni_error((await plugin("ADD", {**conf, "socket": str(not_socket)}, **ids))[1], 11)


async def test_the_plugin_imports_only_the_standard_library() -> None:
    probe = (
        "import sys, discovery.net.cni as shim; "
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('pyroute2', 'aiohttp', 'pydantic', 'asyncio', 'http', 'ssl', 'grpc', 'discovery'))))"
    )
    code, out, err = await run(sys.executable, "-c", probe)
    assert code == 0, err
    assert out.split() == ["discovery", "discovery.net", "discovery.net.cni"]
    # and the real command, as a runtime starts it
    env = {**os.environ, "CNI_COMMAND": "VERSION"}
    code, _, err = await run(sys.executable, "-X", "importtime", "-m", "discovery.net.cni", env=env)
    assert code == 0
    imported = {line.rsplit("|", 1)[-1].strip() for line in err.splitlines() if "|" in line}
    heavy = {
        m for m in imported if m.split(".")[0] in ("pyroute2", "aiohttp", "pydantic", "asyncio")
    }
    assert not heavy, heavy


# through a node server in a host namespace (root)


@pytest.fixture
async def node(tmp_path: Path) -> Any:
    async with node_server(tmp_path) as running:
        yield running


async def add(
    node: Node,
    container: str,
    cid: str | None = None,
    conf: dict[str, Any] | None = None,
    **kw: Any,
) -> tuple[int, Any]:
    return await plugin(
        "ADD",
        conf or node.conf(),
        container_id=cid or f"{container}-id",
        netns=netns_path(container),
        **kw,
    )


async def delete(node: Node, container: str, cid: str | None = None, **kw: Any) -> tuple[int, Any]:
    return await plugin(
        "DEL", kw.pop("conf", None) or node.conf(), container_id=cid or f"{container}-id",
        netns=kw.pop("netns", netns_path(container)), **kw,
    )  # fmt: skip


async def attachments(node: Node, network: str = "pods") -> list[dict[str, Any]]:
    status, data = await node.api("GET", f"/v1/networks/{network}/attachments")
    assert status == 200, data
    return data["attachments"]  # type: ignore[no-any-return]


def veths(node: Node) -> list[str]:
    return [name for name in node.host_links() if name.startswith("dc")]


def inside(container: str, *cmd: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", container, *cmd], capture_output=True, text=True, timeout=timeout
    )


def dig(container: str, server: str, port: int, name: str, rdtype: str = "A") -> list[str]:
    out = inside(
        container,
        "dig",
        "+short",
        "+tries=3",
        "+time=2",
        f"@{server}",
        "-p",
        str(port),
        name,
        rdtype,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


async def test_the_server_socket_is_private(node: Node) -> None:
    mode = os.stat(node.socket_path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


async def test_two_containers_ping_and_resolve_each_other(node: Node) -> None:
    await node.network()
    with node.container() as c1, node.container() as c2:
        code, first = await add(
            node, c1, args="IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1"
        )
        assert code == 0, first
        valid_result(first)
        conf = node.conf(cniVersion="1.0.0", args={"cni": {"discovery": {"name": "web-2"}}})
        code, second = await add(node, c2, conf=conf)
        assert code == 0, second
        valid_result(second, "1.0.0")
        assert "mtu" not in second["interfaces"][2]  # 1.1.0 only
        one = ipaddress.ip_interface(first["ips"][0]["address"])
        two = ipaddress.ip_interface(second["ips"][0]["address"])
        gateway = first["ips"][0]["gateway"]
        assert one != two and one.network == two.network and one.network.prefixlen == 24
        assert first["interfaces"][2] == {
            "name": "eth0",
            "mac": first["interfaces"][2]["mac"],
            "sandbox": netns_path(c1),
            "mtu": 1400,
        }
        assert first["routes"] == [{"dst": "10.244.0.0/16", "gw": gateway}]
        assert first["dns"]["search"][0] == "shop.svc.cluster.local"
        # the kernel agrees with the result
        shown = json.loads(ip("-n", c1, "-j", "addr", "show", "eth0").stdout)[0]
        assert shown["mtu"] == 1400 and shown["address"] == first["interfaces"][2]["mac"]
        assert any(a["local"] == str(one.ip) for a in shown["addr_info"])
        bridge = json.loads(ip("-n", node.host, "-j", "-d", "link", "show", "cni0").stdout)[0]
        assert bridge["mtu"] == 1400 and "UP" in bridge["flags"]
        host_end = json.loads(
            ip("-n", node.host, "-j", "-d", "link", "show", first["interfaces"][1]["name"]).stdout
        )[0]
        assert host_end["master"] == "cni0" and host_end["linkinfo"]["info_slave_data"]["hairpin"]
        forwarding = inside(node.host, "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip()
        assert forwarding == "1"
        # by address, both ways
        for here, there in ((c1, two.ip), (c2, one.ip)):
            ping = inside(here, "ping", "-c", "1", "-W", "5", str(there))
            assert ping.returncode == 0, ping.stdout + ping.stderr
        # by name, through discovery's DNS on the host namespace (reached via the gateway)
        assert dig(c1, gateway, node.dns_port, "web-2.pods.net.cluster.local") == [str(two.ip)]
        assert dig(c2, gateway, node.dns_port, "web-1.pods.net.cluster.local") == [str(one.ip)]
        name = dig(c1, gateway, node.dns_port, "web-2.pods.net.cluster.local")[0]
        ping = inside(c1, "ping", "-c", "1", "-W", "5", name)
        assert ping.returncode == 0, ping.stdout
        # CHECK passes with the prevResult; then DEL undoes everything
        code, out = await plugin(
            "CHECK",
            {**node.conf(), "prevResult": first},
            container_id=f"{c1}-id",
            netns=netns_path(c1),
        )
        assert code == 0 and out is None, out
        assert (await delete(node, c1)) == (0, None)
        assert (await delete(node, c2, conf=conf)) == (0, None)
        assert links(c1) == ["lo"] and links(c2) == ["lo"]
        assert veths(node) == []
        assert await attachments(node) == []
        status, data = await node.api("GET", "/v1/networks/pods")
        assert status == 200 and data["attachments"] == 0


async def test_a_container_with_a_service_answers_srv(node: Node) -> None:
    await node.network()
    service = {"service": "cart", "ports": [{"name": "http", "port": 8080}]}
    conf = node.conf(args={"cni": {"discovery": {"service": service}}})
    with node.container() as c1:
        code, result = await add(
            node, c1, conf=conf, args="K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0"
        )
        assert code == 0, result
        address, gateway = result["ips"][0]["address"].split("/")[0], result["ips"][0]["gateway"]
        srv = dig(c1, gateway, node.dns_port, "_http._tcp.cart.shop.svc.cluster.local", "SRV")
        assert srv == ["0", "100", "8080", "cart-0.cart.shop.svc.cluster.local."]
        assert dig(c1, gateway, node.dns_port, "cart.shop.svc.cluster.local") == [address]
        assert (await delete(node, c1, conf=conf)) == (0, None)
        status, data = await node.api("GET", "/v1/services/shop/cart")
        assert status == 404 or data["instances"] == []


async def test_add_twice_leaves_the_first_attachment_working(node: Node) -> None:
    await node.network()
    with node.container() as c1, node.container() as c2:
        code, first = await add(node, c1)
        assert code == 0, first
        assert (await add(node, c2))[0] == 0
        code, out = await add(node, c1)
        assert code == 1
        assert "eth0" in cni_error(out, 101)["msg"]
        # the first is intact: its attachment, its veth, its address, its traffic
        listed = {a["container_id"]: a["address"] for a in await attachments(node)}
        assert listed[f"{c1}-id"] == first["ips"][0]["address"].split("/")[0]
        assert first["interfaces"][1]["name"] in veths(node)
        ping = inside(c2, "ping", "-c", "1", "-W", "5", listed[f"{c1}-id"])
        assert ping.returncode == 0, ping.stdout
        code, _ = await plugin("CHECK", node.conf(), container_id=f"{c1}-id", netns=netns_path(c1))
        assert code == 0
        # DEL twice: both succeed
        assert (await delete(node, c1)) == (0, None)
        assert (await delete(node, c1)) == (0, None)
        assert [a["container_id"] for a in await attachments(node)] == [f"{c2}-id"]
        status, text = await node.api("GET", "/metrics")
        assert status == 200
        for sample in (
            'discovery_cni_commands_total{code="0",command="ADD"} 2.0',
            'discovery_cni_commands_total{code="101",command="ADD"} 1.0',
            'discovery_cni_commands_total{code="0",command="DEL"} 2.0',
            'discovery_cni_command_seconds_count{command="ADD"} 3.0',
        ):
            assert sample in text.splitlines(), sample


async def test_del_after_the_netns_is_gone(node: Node) -> None:
    await node.network()
    with node.container() as c1:
        code, result = await add(node, c1)
        assert code == 0, result
        path = netns_path(c1)
    assert not await asyncio.to_thread(os.path.exists, path)  # the runtime deleted it first

    async def no_veth() -> bool:  # the kernel takes the pair with the namespace, a moment later
        return not veths(node)

    await eventually(no_veth, "the host end gone with the namespace", within=20)
    assert len(await attachments(node)) == 1
    assert (await delete(node, c1, netns=path)) == (0, None)
    assert await attachments(node) == []
    assert (await delete(node, c1, netns="")) == (0, None)  # DEL without CNI_NETNS


async def test_a_netns_that_does_not_exist_is_never_created(node: Node) -> None:
    await node.network()
    missing = netns_path(unique("never"))
    code, out = await plugin("ADD", node.conf(), container_id="ghost", netns=missing)
    assert code == 1 and missing in cni_error(out, 3)["msg"]
    assert not await asyncio.to_thread(os.path.exists, missing)
    assert await attachments(node) == [] and veths(node) == []
    # not a namespace at all
    code, out = await plugin("ADD", node.conf(), container_id="ghost", netns="/etc/hostname")
    cni_error(out, 4)
    assert await attachments(node) == [] and veths(node) == []


async def test_an_interface_name_taken_in_the_container(node: Node) -> None:
    await node.network()
    with node.container() as c1:
        ip("-n", c1, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
        code, out = await add(node, c1)
        assert code == 1
        cni_error(out, 101)
        assert await attachments(node) == [] and veths(node) == []
        assert sorted(links(c1)) == ["eth0", "lo", "peer0"]
        code, result = await add(node, c1, ifname="net1")  # another name is fine
        assert code == 0, result
        assert result["interfaces"][2]["name"] == "net1"


async def test_an_exhausted_pool_leaves_nothing_behind(node: Node) -> None:
    await node.network(subnet="10.250.0.0/29", node_prefix=29)  # .2 … .6
    for taken in ("other-1", "other-2"):  # two of the five are taken: a pool of three
        status, data = await node.api("PUT", f"/v1/networks/pods/attachments/{taken}/eth0")
        assert status == 201, data
    with node.container() as a, node.container() as b, node.container() as c, node.container() as d:
        for container in (a, b, c):
            code, result = await add(node, container)
            assert code == 0, result
        before = veths(node)
        code, out = await add(node, d)
        assert code == 1 and "pods" in cni_error(out, 100)["msg"]
        assert links(d) == ["lo"] and veths(node) == before and len(before) == 3
        listed = await attachments(node)
        assert len(listed) == 5 and f"{d}-id" not in {x["container_id"] for x in listed}
        # a freed address is usable again
        assert (await delete(node, a))[0] == 0
        code, result = await add(node, d)
        assert code == 0, result


async def test_check_notices_what_is_missing(node: Node) -> None:
    await node.network()
    with node.container() as c1:
        code, result = await add(node, c1)
        assert code == 0, result
        ids = {"container_id": f"{c1}-id", "netns": netns_path(c1)}
        assert (await plugin("CHECK", node.conf(), **ids))[0] == 0
        wrong = {**result, "ips": [{**result["ips"][0], "address": "10.9.9.9/24"}]}
        code, out = await plugin("CHECK", {**node.conf(), "prevResult": wrong}, **ids)
        cni_error(out, 104)
        ip("-n", c1, "route", "del", "10.244.0.0/16")
        code, out = await plugin("CHECK", node.conf(), **ids)
        assert "route" in cni_error(out, 104)["msg"]
        ip("-n", c1, "addr", "flush", "dev", "eth0")
        code, out = await plugin("CHECK", node.conf(), **ids)
        assert result["ips"][0]["address"].split("/")[0] in cni_error(out, 104)["msg"]
        code, out = await plugin("CHECK", node.conf(), container_id="unknown", netns=netns_path(c1))
        cni_error(out, 104)


async def test_status_and_gc(node: Node) -> None:
    code, out = await plugin("STATUS", node.conf())
    assert "pods" in cni_error(out, 50)["msg"]  # no such network yet
    await node.network()
    assert (await plugin("STATUS", node.conf())) == (0, None)
    with node.container() as c1, node.container() as c2, node.container() as c3:
        results = {}
        for container in (c1, c2, c3):
            code, results[container] = await add(node, container)
            assert code == 0
        valid = [{"containerID": f"{c1}-id", "ifname": "eth0"}]
        conf = {**node.conf(), "cni.dev/valid-attachments": valid}
        assert (await plugin("GC", conf)) == (0, None)
        assert [a["container_id"] for a in await attachments(node)] == [f"{c1}-id"]
        assert veths(node) == [results[c1]["interfaces"][1]["name"]]
        assert links(c2) == ["lo"] and links(c3) == ["lo"]
        # a stray host end on the bridge (no attachment) goes too
        ip("-n", node.host, "link", "add", "dc0123456789a", "type", "veth", "peer", "name", "p0")
        ip("-n", node.host, "link", "set", "dc0123456789a", "master", "cni0")
        assert (await plugin("GC", conf)) == (0, None)
        assert veths(node) == [results[c1]["interfaces"][1]["name"]]


async def test_the_server_refuses_a_busy_socket_path(tmp_path: Path, node: Node) -> None:
    code, _, err = await run(
        "ip", "netns", "exec", node.host, sys.executable, "-m", "discovery", "serve",
        "--dns", "127.0.0.1:0", "--http", "127.0.0.1:0", "--cni-socket", node.socket_path,
        timeout=30,
    )  # fmt: skip
    assert code == 1 and "in use" in err
    assert (await plugin("STATUS", node.conf()))[1]["code"] == 50  # the first still answers


async def test_an_unreachable_server_leaves_the_container_untouched(tmp_path: Path) -> None:
    require_netns()
    dead = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as left:  # a server that died
        left.bind(str(dead))
        with netns("c") as container:
            for path in (str(dead), away_socket(tmp_path)):
                conf = {**BASE_CONF, "socket": path}
                code, out = await plugin(
                    "ADD", conf, container_id="c1", netns=netns_path(container)
                )
                assert code == 1
                cni_error(out, 11)
                assert links(container) == ["lo"]


async def test_the_store_going_away_mid_add_leaks_nothing(tmp_path: Path) -> None:
    """etcd stops answering while an ADD waits on it, then dies: the plugin says 11, and
    neither a veth nor a key is left once etcd is back."""
    require_netns()
    with netns("host") as host:
        etcd = NetnsEtcd(tmp_path / "etcd", host)
        etcd.start()
        try:
            endpoint = f"http://127.0.0.1:{etcd.client_port}"
            async with node_server(
                tmp_path, "--etcd", endpoint, "--etcd-request-timeout", "2",
                "--etcd-dial-timeout", "2", "--node", "n1", host=host,
            ) as node:  # fmt: skip
                await node.network()
                with node.container() as first, node.container() as victim:
                    code, result = await add(node, first)  # the node's lease and block exist
                    assert code == 0, result
                    etcd.pause()
                    adding = asyncio.create_task(add(node, victim))
                    line = f"DEBUG discovery.net.agent: ADD {victim}-id/eth0 in pods"

                    async def in_flight() -> bool:
                        return any(line in entry for entry in node.process.stderr)

                    await eventually(in_flight, "the ADD reaching the server", within=30)
                    etcd.stop()  # SIGKILL while stopped: the request dies with it
                    code, out = await adding
                    assert code == 1
                    cni_error(out, 11)
                    assert links(victim) == ["lo"]
                    assert veths(node) == [result["interfaces"][1]["name"]]
                    await asyncio.to_thread(etcd.start)
                    prefix = "/discovery/v1/"

                    async def released() -> bool:
                        left = await asyncio.to_thread(
                            etcd.count, f"{prefix}attachments/pods/{victim}-id/"
                        )
                        addresses = await asyncio.to_thread(etcd.count, f"{prefix}addresses/pods/")
                        return left == 0 and addresses == 1

                    await eventually(released, "no key of the failed ADD", within=30)
                    # the runtime tries again: it works, and the first container still does
                    code, again = await add(node, victim)
                    assert code == 0, again
                    address = result["ips"][0]["address"].split("/")[0]
                    ping = inside(victim, "ping", "-c", "1", "-W", "5", address)
                    assert ping.returncode == 0, ping.stdout
        finally:
            etcd.stop()


async def test_two_nodes_adding_30_containers_each_at_once(tmp_path: Path) -> None:
    """Two node servers on one etcd (in an infra namespace, reached over veths), 2 x 30
    concurrent ADDs through the plugin: 60 distinct addresses, one block per node."""
    require_netns()
    with underlay(2) as (infra, hosts):
        etcd = NetnsEtcd(tmp_path / "etcd", infra, address=f"{UNDERLAY}.1")
        etcd.start()
        try:
            async with contextlib.AsyncExitStack() as stack:
                nodes = [
                    await stack.enter_async_context(
                        node_server(
                            tmp_path, "--etcd", etcd.client_url, "--node", f"n{i}", host=host
                        )
                    )
                    for i, host in enumerate(hosts, 1)
                ]
                await nodes[0].network()
                containers = {
                    node.host: [stack.enter_context(node.container()) for _ in range(30)]
                    for node in nodes
                }
                jobs = [
                    add(node, container) for node in nodes for container in containers[node.host]
                ]
                results = await asyncio.gather(*jobs)
                assert all(code == 0 for code, _ in results), [r for r in results if r[0]]
                addresses = [valid_result(r)["ips"][0]["address"] for _, r in results]
                assert len(set(addresses)) == 60
                blocks = {
                    node.host: {ipaddress.ip_interface(a).network for a in addresses[i * 30 :][:30]}
                    for i, node in enumerate(nodes)
                }
                assert all(len(b) == 1 for b in blocks.values())
                assert blocks[hosts[0]] != blocks[hosts[1]]
                listed = await attachments(nodes[1])
                assert sorted(a["node"] for a in listed) == ["n1"] * 30 + ["n2"] * 30
                jobs = [
                    delete(node, container) for node in nodes for container in containers[node.host]
                ]
                assert all(code == 0 for code, _ in await asyncio.gather(*jobs))
                assert await attachments(nodes[0]) == []
        finally:
            etcd.stop()


async def test_concurrent_adds_for_one_container_take_turns(node: Node) -> None:
    await node.network()
    with node.container() as c1:
        results = await asyncio.gather(*(add(node, c1) for _ in range(4)))
        codes = sorted(code for code, _ in results)
        assert codes == [0, 1, 1, 1], results
        assert all(cni_error(out, 101) for code, out in results if code)
        assert len(await attachments(node)) == 1 and len(veths(node)) == 1
        assert sorted(links(c1)) == ["eth0", "lo"]
        results = await asyncio.gather(*(delete(node, c1) for _ in range(3)))
        assert results == [(0, None)] * 3
        assert await attachments(node) == [] and veths(node) == []


def readme_walkthrough() -> str:
    text = README.read_text()
    section = text[text.index("## Containers on a node: `discovery-cni`") :]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "no sh block in the discovery-cni section"
    return match.group(1)


async def test_the_readme_wires_two_containers_as_written(tmp_path: Path) -> None:
    """The README's discovery-cni section, run by bash in a node namespace of its own; only
    the CNI socket and the container namespaces' names are made unique."""
    require_netns()
    sock = str(tmp_path / "cni.sock")
    c1, c2 = unique("c1"), unique("c2")
    script = readme_walkthrough()
    readme_sock = "/run/discovery/node1.sock"
    replacements = [
        (f"--cni-socket {readme_sock} &", f"--cni-socket {sock} &"),
        (f'"socket": "{readme_sock}"}}', f'"socket": "{sock}"}}'),
    ]
    for old, new in replacements:
        assert script.count(old) == 1, old
        script = script.replace(old, new)
    for old, new in (("c1", c1), ("c2", c2)):  # the names, not `ping -c1`
        script = re.sub(rf"(?<![\w-]){old}\b", new, script)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
    out = await asyncio.to_thread(out_path.open, "wb")
    err = await asyncio.to_thread(err_path.open, "wb")
    with netns("node") as node, out, err:
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", node, "bash", "-euo", "pipefail", "-c",
            "ip link set lo up\n" + script,
            stdout=out, stderr=err, cwd=tmp_path, env=env, start_new_session=True,
        )  # fmt: skip
        try:
            async with asyncio.timeout(90):
                await proc.wait()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the server, if the script stopped early
            await proc.wait()
            for name in (c1, c2):
                ip("netns", "del", name, check=False)
    output = out_path.read_text()
    assert proc.returncode == 0, output + err_path.read_text()
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    assert lines[0].endswith(" 201"), lines
    results = [json.loads(line) for line in lines if line.startswith('{"cniVersion"')]
    assert [valid_result(r)["ips"][0]["address"] for r in results] == [
        "10.244.0.2/24",
        "10.244.0.3/24",
    ]
    assert "1 packets transmitted, 1 received" in output
    assert "10.244.0.2" in lines and "ok" in lines and lines[-1] == "204", lines
