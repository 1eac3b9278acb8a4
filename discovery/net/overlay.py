"""The VXLAN overlay: node blocks from the watch turned into a data plane on this node.

A second consumer of the registry's changes (dns/answers.py is the first), in the manner of
flannel's vxlan backend. Per network with `backend: vxlan`, one VXLAN device (`dvx.<vni>`:
VNI, UDP port, learning off, local --node-ip, the network's MTU, a MAC derived from node and
network, the network address of this node's block as a /32). For every other node's block:

    fdb    <remote VTEP MAC> dst <remote node_ip>          permanent
    neigh  <remote block network address> → <remote MAC>   permanent
    route  <remote block> via <its network address> dev dvx.<vni> onlink

added in that order (the route last, so the kernel never ARPs for its gateway) and removed in
the reverse one. The plan (what the registry says) is computed on the event loop; the netlink
work runs in one dedicated thread that owns its pyroute2 socket. Each pass compares the kernel
with the plan and changes only what differs, so a hand-deleted route comes back on the next
periodic pass and a restarted node finds its entries in place and touches nothing.

Nothing is torn down while the store is unreachable: the registry keeps its last state until
the store says otherwise (a delete event, or a full load without the block).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..registry import Changes, Registry
from .ipam import vtep_mac

log = logging.getLogger(__name__)

DEVICE_PREFIX = "dvx."
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
NUD_PERMANENT = 0x80
NUD_NOARP = 0x40
RTNH_F_ONLINK = 4
MAIN_TABLE = 254
CAP_NET_ADMIN = 12


class OverlayError(OSError):
    """The overlay cannot run on this node (no netlink, no permission): the server exits."""


def has_net_admin() -> bool:
    """Whether this process holds CAP_NET_ADMIN in its effective set."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError):
        pass
    return False


def device_name(vni: int) -> str:
    return f"{DEVICE_PREFIX}{vni}"


@dataclass(frozen=True, slots=True)
class Device:
    """The VXLAN device one network needs on this node."""

    network: str
    name: str
    vni: int
    port: int
    mtu: int
    local: str
    mac: str
    addresses: tuple[str, ...]  # network addresses of this node's blocks (each a /32)


@dataclass(frozen=True, slots=True)
class Peer:
    """Another node's block, as this node programs it."""

    cidr: str
    gateway: str  # the block's network address: the remote VTEP's address on the overlay
    mac: str
    node_ip: str
    node: str


@dataclass(frozen=True, slots=True)
class NetworkPlan:
    device: Device
    peers: Mapping[str, Peer]  # cidr -> peer
    own: tuple[str, ...]  # this node's blocks (their network addresses are on the device)


@dataclass(frozen=True, slots=True)
class Rejection:
    """A block (or network) the overlay skips, and why."""

    network: str
    cidr: str
    reason: str  # a metrics label: node_ip, vtep_mac, duplicate_mac, vni
    detail: str


def plan(
    registry: Registry, node: str, node_ip: str, held: Mapping[str, NetworkPlan] | None = None
) -> tuple[dict[str, NetworkPlan], list[Rejection]]:
    """What the data plane should be, from the registry alone (no netlink). Networks in
    `held` (the last plan) keep their VNI against a newcomer that asks for the same one."""
    plans: dict[str, NetworkPlan] = {}
    rejected: list[Rejection] = []
    vnis: dict[int, str] = {}
    for name in sorted(registry.networks(), key=lambda n: (n not in (held or {}), n)):
        spec = registry.networks()[name].spec
        if spec.backend != "vxlan":
            continue
        if spec.vni in vnis:
            detail = f"VNI {spec.vni} is network {vnis[spec.vni]}'s already"
            rejected.append(Rejection(name, "", "vni", detail))
            continue
        vnis[spec.vni] = name
        blocks = registry.blocks(name)
        mine = vtep_mac(node, name)
        own = tuple(sorted(cidr for cidr, block in blocks.items() if block.node == node))
        addresses = tuple(str(ipaddress.ip_network(cidr).network_address) for cidr in own)
        device = Device(
            name,
            device_name(spec.vni),
            spec.vni,
            spec.port,
            spec.mtu or 1450,
            node_ip,
            mine,
            addresses,
        )
        holders: dict[str, str] = {mine: node}  # VTEP MAC -> the node that announced it first
        peers: dict[str, Peer] = {}
        # the earliest announcement of a MAC keeps it: order by the block's revision
        for cidr, block in sorted(blocks.items(), key=lambda item: (item[1].revision, item[0])):
            if block.node == node:
                continue
            try:
                address = ipaddress.ip_address(block.node_ip)
            except ValueError:
                detail = f"node {block.node} announces node_ip {block.node_ip!r}: not an address"
                rejected.append(Rejection(name, cidr, "node_ip", detail))
                continue
            if address.version != 4:
                detail = f"node {block.node} announces node_ip {block.node_ip}: not IPv4"
                rejected.append(Rejection(name, cidr, "node_ip", detail))
                continue
            mac = block.vtep_mac.lower()
            first = int(mac[:2], 16) if MAC_RE.fullmatch(mac) else 1
            if first & 1 or mac == "00:00:00:00:00:00":
                detail = f"node {block.node} announces vtep_mac {block.vtep_mac!r}: not unicast"
                rejected.append(Rejection(name, cidr, "vtep_mac", detail))
                continue
            holder = holders.setdefault(mac, block.node)
            if holder != block.node:
                who = "this node" if holder == node else f"node {holder}"
                detail = f"node {block.node} announces VTEP MAC {mac}, which is {who}'s"
                rejected.append(Rejection(name, cidr, "duplicate_mac", detail))
                continue
            gateway = str(ipaddress.ip_network(cidr).network_address)
            peers[cidr] = Peer(cidr, gateway, mac, address.compressed, block.node)
        plans[name] = NetworkPlan(device, peers, own)
    return plans, rejected


@dataclass(slots=True)
class Outcome:
    """What one pass over the kernel did."""

    programmed: dict[str, set[str]] = field(default_factory=dict)  # network -> cidrs
    devices: dict[str, int] = field(default_factory=dict)  # network -> ifindex
    errors: list[tuple[str, str, str]] = field(default_factory=list)  # network, cidr, message
    changes: int = 0  # netlink writes made


class Dataplane:
    """The netlink side; every method runs in the overlay's one thread."""

    def __init__(self, netns: str | None = None, program: bool = True) -> None:
        self.netns = netns
        self.program = program  # False: only read the kernel (another process writes it)
        self._ipr: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def open(self) -> None:
        from pyroute2 import IPRoute

        # pyroute2 runs its own loop in this thread: a plain asyncio one (the process's loop
        # policy may be uvloop's, which has no netlink sockets)
        self._loop = asyncio.SelectorEventLoop()
        # groups=0: no subscription to kernel broadcasts nobody would read
        options: dict[str, Any] = {"groups": 0, "use_event_loop": self._loop}
        if self.netns is not None:
            options.update(netns=self.netns, flags=0)
        try:
            self._ipr = IPRoute(**options)
        except BaseException:
            self._loop.close()
            self._loop = None
            raise
        if self.netns is None and self.program:
            _enable_forwarding()

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self._loop is not None:
            # let the closed transport's callbacks run before the loop goes
            self._loop.run_until_complete(asyncio.sleep(0))
            self._loop.close()
            self._loop = None

    def reopen(self) -> None:
        self.close()
        self.open()

    def apply(self, plans: Mapping[str, NetworkPlan]) -> Outcome:
        from pyroute2.netlink.exceptions import NetlinkError

        if not self.program:
            return self._observe(plans)
        outcome = Outcome()
        ipr = self._ipr
        wanted = {p.device.name for p in plans.values()}
        for link in ipr.get_links():
            name = link.get("IFLA_IFNAME") or ""
            if name.startswith(DEVICE_PREFIX) and name not in wanted and _kind(link) == "vxlan":
                try:
                    ipr.link("del", index=link["index"])
                    outcome.changes += 1
                    log.info("overlay: removed %s (no vxlan network needs it)", name)
                except (NetlinkError, OSError) as error:
                    outcome.errors.append(("", "", f"removing {name}: {error}"))
        for network, network_plan in plans.items():
            try:
                index = self._device(network_plan.device, outcome)
            except (NetlinkError, OSError) as error:  # OverlayError is an OSError
                name = network_plan.device.name
                outcome.errors.append((network, "", f"device {name}: {error}"))
                continue
            outcome.devices[network] = index
            self._peers(index, network_plan, outcome)
        return outcome

    def _device(self, device: Device, outcome: Outcome) -> int:
        ipr = self._ipr
        found = ipr.link_lookup(ifname=device.name)
        index = found[0] if found else 0
        if index:
            link = ipr.get_links(index)[0]
            if _kind(link) != "vxlan":
                raise OverlayError(f"a link named {device.name} exists and is not a VXLAN device")
            data = link.get(("IFLA_LINKINFO", "IFLA_INFO_DATA"))
            same = (
                data is not None
                and data.get("IFLA_VXLAN_ID") == device.vni
                and data.get("IFLA_VXLAN_PORT") == device.port
                and data.get("IFLA_VXLAN_LOCAL") == device.local
                and not data.get("IFLA_VXLAN_LEARNING")
            )
            if not same:
                log.info("overlay: replacing %s (its VXLAN settings differ)", device.name)
                ipr.link("del", index=index)
                outcome.changes += 1
                index = 0
            else:
                changes: dict[str, Any] = {}
                if (link.get("IFLA_ADDRESS") or "").lower() != device.mac:
                    changes["address"] = device.mac
                if link.get("IFLA_MTU") != device.mtu:
                    changes["mtu"] = device.mtu
                if not link["flags"] & 1:  # IFF_UP
                    changes["state"] = "up"
                if changes:
                    ipr.link("set", index=index, **changes)
                    outcome.changes += 1
        if not index:
            ipr.link(
                "add",
                ifname=device.name,
                kind="vxlan",
                vxlan_id=device.vni,
                vxlan_port=device.port,
                vxlan_local=device.local,
                vxlan_learning=0,
                address=device.mac,
                mtu=device.mtu,
            )
            index = ipr.link_lookup(ifname=device.name)[0]
            ipr.link("set", index=index, state="up")
            outcome.changes += 2
            log.info(
                "overlay: %s up for network %s (vni %d, port %d, local %s, mac %s)",
                device.name,
                device.network,
                device.vni,
                device.port,
                device.local,
                device.mac,
            )
        have = {
            (a.get("IFA_LOCAL") or a.get("IFA_ADDRESS"), a["prefixlen"])
            for a in ipr.get_addr(index=index, family=socket.AF_INET)
        }
        want = {(address, 32) for address in device.addresses}
        for address, prefixlen in sorted(have - want):
            ipr.addr("del", index=index, address=address, prefixlen=prefixlen)
            outcome.changes += 1
        for address, prefixlen in sorted(want - have):
            ipr.addr("add", index=index, address=address, prefixlen=prefixlen)
            outcome.changes += 1
        return int(index)

    def _observe(self, plans: Mapping[str, NetworkPlan]) -> Outcome:
        """Which peers the kernel holds as planned; writes nothing."""
        outcome = Outcome()
        for network, network_plan in plans.items():
            found = self._ipr.link_lookup(ifname=network_plan.device.name)
            if not found:
                continue
            index = int(found[0])
            outcome.devices[network] = index
            routes, neighbours, fdb = self._entries(index)
            outcome.programmed[network] = {
                cidr
                for cidr, peer in network_plan.peers.items()
                if routes.get(cidr) == peer.gateway
                and neighbours.get(peer.gateway) == peer.mac
                and fdb.get(peer.mac) == peer.node_ip
            }
        return outcome

    def _entries(self, index: int) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
        """The device's routes (cidr -> gateway), permanent neighbours (address -> MAC) and
        remote FDB entries (MAC -> node_ip)."""
        ipr = self._ipr
        routes: dict[str, str] = {}
        for route in ipr.route("dump", family=socket.AF_INET, oif=index, table=MAIN_TABLE):
            gateway = route.get("RTA_GATEWAY")
            if gateway and route.get("RTA_OIF") == index:
                routes[f"{route.get('RTA_DST')}/{route['dst_len']}"] = gateway
        neighbours: dict[str, str] = {}
        for entry in ipr.neigh("dump", family=socket.AF_INET, ifindex=index):
            if entry["ifindex"] == index and entry["state"] & NUD_PERMANENT:
                neighbours[entry.get("NDA_DST")] = (entry.get("NDA_LLADDR") or "").lower()
        fdb: dict[str, str] = {}
        for entry in ipr.fdb("dump", ifindex=index):
            if entry["ifindex"] == index and entry.get("NDA_DST"):
                fdb[(entry.get("NDA_LLADDR") or "").lower()] = entry.get("NDA_DST")
        return routes, neighbours, fdb

    def _peers(self, index: int, network_plan: NetworkPlan, outcome: Outcome) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        ipr = self._ipr
        network = network_plan.device.network
        peers = network_plan.peers
        routes, neighbours, fdb = self._entries(index)
        gateways = {peer.gateway: peer.mac for peer in peers.values()}
        macs = {peer.mac: peer.node_ip for peer in peers.values()}

        def attempt(cidr: str, what: str, call: Any, *args: Any, **kwargs: Any) -> bool:
            try:
                call(*args, **kwargs)
            except (NetlinkError, OSError) as error:
                outcome.errors.append((network, cidr, f"{what}: {error}"))
                return False
            outcome.changes += 1
            return True

        # gone or changed: the route first, then what it relied on
        for cidr, gateway in sorted(routes.items()):
            peer = peers.get(cidr)
            if peer is None or peer.gateway != gateway:
                attempt(cidr, "route del", ipr.route, "del", dst=cidr, gateway=gateway, oif=index)
        for dst in sorted(neighbours):
            if dst not in gateways:
                attempt("", f"neigh del {dst}", ipr.neigh, "del", ifindex=index, dst=dst)
        for mac, dst in sorted(fdb.items()):
            if macs.get(mac) != dst:
                attempt("", f"fdb del {mac}", ipr.fdb, "del", ifindex=index, lladdr=mac, dst=dst)
                fdb.pop(mac)

        programmed: set[str] = set()
        for cidr, peer in sorted(peers.items()):
            if fdb.get(peer.mac) != peer.node_ip:
                if not attempt(
                    cidr, "fdb add", ipr.fdb, "add", ifindex=index, lladdr=peer.mac,
                    dst=peer.node_ip,
                ):  # fmt: skip
                    continue
                fdb[peer.mac] = peer.node_ip
            if neighbours.get(peer.gateway) != peer.mac:
                if not attempt(
                    cidr, "neigh replace", ipr.neigh, "replace", ifindex=index,
                    dst=peer.gateway, lladdr=peer.mac, state=NUD_PERMANENT,
                ):  # fmt: skip
                    continue
                neighbours[peer.gateway] = peer.mac
            if routes.get(cidr) != peer.gateway:
                if not attempt(
                    cidr, "route replace", ipr.route, "replace", dst=cidr,
                    gateway=peer.gateway, oif=index, flags=RTNH_F_ONLINK,
                ):  # fmt: skip
                    continue
            programmed.add(cidr)
        outcome.programmed[network] = programmed


def _kind(link: Any) -> str | None:
    kind = link.get(("IFLA_LINKINFO", "IFLA_INFO_KIND"))
    return kind if isinstance(kind, str) else None


def _enable_forwarding() -> None:
    """Containers on the bridge reach the VXLAN device and back: the node routes for them."""
    with open("/proc/sys/net/ipv4/ip_forward", "r+") as forward:
        if forward.read().strip() != "1":
            forward.seek(0)
            forward.write("1")


class Overlay:
    """Keeps the kernel equal to the plan: on every change, after a reload, and periodically."""

    def __init__(
        self,
        registry: Registry,
        node: str,
        node_ip: str,
        interval: float = 10.0,
        netns: str | None = None,
        program: bool = True,
    ) -> None:
        self.registry = registry
        self.node = node
        self.node_ip = node_ip
        self.interval = interval
        self.program = program
        self.dataplane = Dataplane(netns, program)
        self.errors: Counter[str] = Counter()  # reason -> count
        self.changes = 0  # netlink writes made so far
        self.passes = 0
        self.programmed: dict[str, set[str]] = {}  # network -> cidrs programmed last pass
        self.devices: dict[str, int] = {}
        self._applied: dict[str, NetworkPlan] | None = None  # None: compare with the kernel
        self._applied_plans: dict[str, NetworkPlan] = {}  # what the last pass worked from
        self._rejected: set[Rejection] = set()
        self._failing: set[tuple[str, str, str]] = set()
        self._dirty = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None

    # the registry feed: cheap, never awaits; the pass itself runs in the task

    def reset(self, registry: Registry) -> None:
        self._applied = None  # a full load: compare everything with the kernel again
        self._dirty.set()

    def update(self, registry: Registry, changes: Changes) -> None:
        if changes.blocks or changes.networks:
            self._dirty.set()

    # lifecycle

    async def start(self) -> None:
        """Open the netlink socket in its thread; raises OverlayError when that fails."""
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="overlay-netlink")
        try:
            await self._in_thread(self.dataplane.open)
        except (OSError, ImportError) as error:
            await self.close()
            raise OverlayError(f"--overlay: cannot program the network ({error})") from None
        self._task = asyncio.create_task(self._run(), name="overlay")

    async def close(self) -> None:
        """Stop programming; the data plane stays as it is (containers keep talking)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._executor is not None:
            with contextlib.suppress(Exception):
                await self._in_thread(self.dataplane.close)
            self._executor.shutdown(wait=False)
            self._executor = None

    async def _in_thread(self, call: Any, *args: Any) -> Any:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, call, *args)

    def is_programmed(self, network: str, cidr: str) -> bool:
        """Another node's block: its entries are in. This node's own: the device carries it."""
        if cidr in self.programmed.get(network, ()):
            return True
        applied = self._applied_plans.get(network)
        return network in self.devices and applied is not None and cidr in applied.own

    @property
    def peers(self) -> int:
        return sum(len(cidrs) for cidrs in self.programmed.values())

    async def _run(self) -> None:
        registry = self.registry
        await registry.wait(lambda: registry.synced, 365 * 86400)
        self._dirty.set()
        while True:
            periodic = False
            # an observer looks again soon while the writer may still be at work
            behind = not self.program and any(
                len(self.programmed.get(n, ())) < len(p.peers)
                for n, p in self._applied_plans.items()
            )
            try:
                await asyncio.wait_for(self._dirty.wait(), 0.5 if behind else self.interval)
            except TimeoutError:
                periodic = True
            self._dirty.clear()
            plans, rejected = plan(registry, self.node, self.node_ip, self._applied_plans)
            self._report(rejected)
            if plans == self._applied and not periodic:
                continue
            try:
                outcome: Outcome = await self._in_thread(self.dataplane.apply, plans)
            except Exception:
                # a bug or a netlink socket gone bad: count it, start over on a new socket,
                # and keep DNS and the watch running
                log.exception("overlay: a programming pass failed")
                self.errors["netlink"] += 1
                self._applied = None
                await asyncio.sleep(1.0)
                with contextlib.suppress(Exception):
                    await self._in_thread(self.dataplane.reopen)
                self._dirty.set()
                continue
            self._record(outcome)
            self._applied_plans = plans
            self._applied = None if outcome.errors or not self.program else plans

    def _report(self, rejected: list[Rejection]) -> None:
        """Count and log each skipped block once (again only if it goes and comes back)."""
        now = set(rejected)
        for rejection in sorted(now - self._rejected, key=lambda r: (r.network, r.cidr)):
            self.errors[rejection.reason] += 1
            where = f" block {rejection.cidr}" if rejection.cidr else ""
            log.warning(
                "overlay: skipping network %s%s: %s", rejection.network, where, rejection.detail
            )
        self._rejected = now

    def _record(self, outcome: Outcome) -> None:
        self.passes += 1
        self.changes += outcome.changes
        self.programmed = outcome.programmed
        self.devices = outcome.devices
        failing = set(outcome.errors)
        for network, cidr, message in outcome.errors:
            self.errors["netlink"] += 1
            if (network, cidr, message) not in self._failing:
                where = f" block {cidr}" if cidr else ""
                log.warning("overlay: network %s%s: %s", network or "-", where, message)
        self._failing = failing
