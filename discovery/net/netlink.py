"""The node's data plane through netlink (pyroute2): bridge, veth pairs, addresses, routes.

Every call runs on one dedicated thread, so the event loop (and DNS) never waits on the
kernel, and the steps of one container never interleave with another's. A socket in the
container's network namespace is opened by that thread entering the namespace with
setns(2) just long enough to create it (a netlink socket stays bound to the namespace it
was created in); no process is forked, and no namespace is ever created here: a CNI_NETNS
path that does not exist is an error.

Import this module only when the CNI socket is on: pyroute2 takes 150-200 ms to import.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import hashlib
import ipaddress
import logging
import os
import re
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
NETLINK_ROUTE = 0
HOST_PREFIX = "dc"  # host ends of our veth pairs: dc + 11 hex digits of a hash
HOST_IFNAME_RE = re.compile(HOST_PREFIX + "[0-9a-f]{11}")
IFF_UP = 0x1
FORWARDING = "/proc/sys/net/ipv4/ip_forward"


class DataPlaneError(Exception):
    """The kernel refused or the container is not as it must be."""


class NetnsNotFound(DataPlaneError):
    pass


class NotANetns(DataPlaneError):
    pass


class InterfaceExists(DataPlaneError):
    pass


class CheckFailed(DataPlaneError):
    pass


def host_ifname(network: str, container_id: str, ifname: str) -> str:
    """The host end's name: stable, so DEL finds it even when the netns is gone."""
    digest = hashlib.sha256(f"{network}/{container_id}/{ifname}".encode()).hexdigest()
    return HOST_PREFIX + digest[:11]


def is_host_ifname(name: str) -> bool:
    return HOST_IFNAME_RE.fullmatch(name) is not None


@dataclass(frozen=True, slots=True)
class Plumbing:
    """What one container interface must look like."""

    netns: str
    ifname: str
    host_ifname: str
    bridge: str
    mtu: int
    address: str
    prefix_len: int
    gateway: str
    is_gateway: bool
    hairpin: bool
    routes: tuple[tuple[str, str], ...]  # (dst CIDR, gateway)


@dataclass(frozen=True, slots=True)
class Plumbed:
    bridge_mac: str
    host_mac: str
    container_mac: str


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _iproute(sock: socket.socket | None) -> IPRoute:
    """pyroute2's sync API on a plain selector loop of its own: it runs that loop on the
    netlink thread, and uvloop (the server's loop policy) cannot carry netlink sockets."""
    loop = asyncio.SelectorEventLoop()
    try:
        return IPRoute(use_socket=sock, use_event_loop=loop)
    except BaseException:
        loop.close()
        raise


def _close(ipr: IPRoute) -> None:
    loop = ipr.asyncore.event_loop
    try:
        ipr.close()
    finally:
        if not loop.is_closed():
            loop.close()


@dataclass(frozen=True, slots=True)
class Link:
    index: int
    mac: str
    up: bool


def _link(ipr: IPRoute, name: str) -> Link | None:
    """One interface by name (one RTM_GETLINK), or None."""
    try:
        found = ipr.link("get", ifname=name)
    except NetlinkError as error:
        if error.code == errno.ENODEV:
            return None
        raise
    link = found[0]
    return Link(int(link["index"]), str(link.get("address") or ""), bool(link["flags"] & IFF_UP))


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def _ignore(code: int, call: Callable[[], Any]) -> None:
    try:
        call()
    except NetlinkError as error:
        if error.code != code:
            raise


def _delete(ipr: IPRoute, index: int) -> None:
    """Delete a link; one that is gone already is fine."""
    _ignore(errno.ENODEV, lambda: ipr.link("del", index=index))


class Netlink:
    """pyroute2 calls for the CNI agent, each on the one netlink thread."""

    def __init__(self) -> None:
        self._home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink")
        self._host: IPRoute | None = None
        self._gateways: set[tuple[int, str, int]] = set()  # (bridge index, address, prefix)
        self._broken = False

    async def call(self, function: Callable[..., T], *args: Any) -> T:
        """Run `function` on the netlink thread; the kernel's refusals as DataPlaneError."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, function, *args)
        except NetlinkError as error:
            raise DataPlaneError(f"netlink: {os.strerror(error.code)} ({error})") from None

    def close(self) -> None:
        self._executor.submit(self._close_host).result()
        self._executor.shutdown(wait=True)
        os.close(self._home)

    def _close_host(self) -> None:
        if self._host is not None:
            _close(self._host)
            self._host = None

    # on the netlink thread only

    def _host_ipr(self) -> IPRoute:
        if self._host is None:
            self._host = _iproute(None)
        return self._host

    @contextlib.contextmanager
    def _container(self, netns: str) -> Iterator[IPRoute]:
        """A netlink socket inside the namespace at `netns`."""
        if self._broken:
            raise DataPlaneError("the netlink thread lost its own namespace; restart the server")
        try:
            fd = os.open(netns, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NetnsNotFound(f"network namespace {netns} does not exist") from None
        except OSError as error:
            raise NotANetns(f"cannot open {netns}: {error.strerror}") from None
        try:
            try:
                _setns(fd)
            except OSError as error:
                raise NotANetns(f"{netns} is not a network namespace ({error.strerror})") from None
            try:
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE)
            finally:
                try:
                    _setns(self._home)
                except OSError:  # pragma: no cover - the kernel let us in but not out
                    self._broken = True
                    log.critical("the netlink thread cannot return to its own namespace")
                    raise
        finally:
            os.close(fd)
        try:
            ipr = _iproute(sock)
        except BaseException:
            sock.close()
            raise
        try:
            yield ipr
        finally:
            _close(ipr)
            sock.close()

    def probe(self, netns: str, ifname: str) -> None:
        """Before an address is taken: the namespace exists and `ifname` is free in it."""
        with self._container(netns) as ipr:
            if _index(ipr, ifname) is not None:
                raise InterfaceExists(f"the container already has an interface {ifname}")

    def _bridge(self, ipr: IPRoute, plumbing: Plumbing) -> Link:
        """The bridge, created if absent, up, with the gateway address (once per bridge)."""
        link = _link(ipr, plumbing.bridge)
        if link is None:
            _ignore(
                errno.EEXIST,
                lambda: ipr.link("add", ifname=plumbing.bridge, kind="bridge", mtu=plumbing.mtu),
            )
            link = _link(ipr, plumbing.bridge)
            if link is None:
                raise DataPlaneError(f"bridge {plumbing.bridge} vanished after it was created")
            log.info("created bridge %s (mtu %d)", plumbing.bridge, plumbing.mtu)
        if not link.up:
            ipr.link("set", index=link.index, state="up")
        gateway = (link.index, plumbing.gateway, plumbing.prefix_len)
        if plumbing.is_gateway and gateway not in self._gateways:
            _ignore(
                errno.EEXIST,
                lambda: ipr.addr(
                    "add", index=link.index, address=plumbing.gateway, prefixlen=plumbing.prefix_len
                ),
            )
            self._gateways.add(gateway)
        return link

    def _forwarding(self) -> None:
        with open(FORWARDING, "r+") as flag:
            if flag.read().strip() != "1":
                flag.seek(0)
                flag.write("1\n")

    def attach(self, plumbing: Plumbing) -> Plumbed:
        """Bridge, veth pair, address, routes; on failure nothing of the pair is left."""
        host = self._host_ipr()
        bridge = self._bridge(host, plumbing)
        self._forwarding()
        with self._container(plumbing.netns) as inside:
            self._veth(host, plumbing)
            try:
                return self._wire(host, inside, bridge, plumbing)
            except BaseException:
                with contextlib.suppress(NetlinkError):
                    host.link("del", ifname=plumbing.host_ifname)
                raise

    def _veth(self, host: IPRoute, plumbing: Plumbing) -> None:
        """The pair, its container end made inside the namespace under its final name."""
        for _ in range(2):
            nsfd = os.open(plumbing.netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                host.link(
                    "add",
                    ifname=plumbing.host_ifname,
                    kind="veth",
                    mtu=plumbing.mtu,
                    peer={"ifname": plumbing.ifname, "net_ns_fd": nsfd},
                )
                return
            except NetlinkError as error:
                if error.code != errno.EEXIST:
                    raise
                stale = _link(host, plumbing.host_ifname)
                if stale is None:
                    raise InterfaceExists(
                        f"the container already has an interface {plumbing.ifname}"
                    ) from None
                # left by a crash (its container end is not in this netns): replace it
                log.warning("removing a stale %s", plumbing.host_ifname)
                _delete(host, stale.index)
            finally:
                os.close(nsfd)
        raise DataPlaneError(f"{plumbing.host_ifname} keeps coming back")

    def _wire(self, host: IPRoute, inside: IPRoute, bridge: Link, plumbing: Plumbing) -> Plumbed:
        outer = _link(host, plumbing.host_ifname)
        inner = _link(inside, plumbing.ifname)
        if outer is None or inner is None:
            raise DataPlaneError(f"the veth pair {plumbing.host_ifname} vanished")
        host.link("set", index=outer.index, master=bridge.index, state="up")
        if plumbing.hairpin:
            host.brport("set", index=outer.index, mode=1)  # IFLA_BRPORT_MODE: hairpin
        inside.link("set", index=inner.index, mtu=plumbing.mtu, state="up")
        inside.addr(
            "add", index=inner.index, address=plumbing.address, prefixlen=plumbing.prefix_len
        )
        for dst, gateway in plumbing.routes:
            try:
                inside.route("add", dst=dst, gateway=gateway, oif=inner.index)
            except NetlinkError as error:
                # another network may own the default route already (CNI spec: skip it)
                if not (error.code == errno.EEXIST and dst == "0.0.0.0/0"):
                    raise
        return Plumbed(bridge.mac, outer.mac, inner.mac)

    def detach(self, host_ifname: str) -> bool:
        """Remove the pair by its host end (the kernel removes the container end with it)."""
        host = self._host_ipr()
        index = _index(host, host_ifname)
        if index is None:
            return False
        _delete(host, index)
        return True

    def check(self, plumbing: Plumbing) -> None:
        """CHECK: raise CheckFailed naming the first thing that is not as it must be."""
        host = self._host_ipr()
        outer = _index(host, plumbing.host_ifname)
        bridge = _index(host, plumbing.bridge)
        if bridge is None:
            raise CheckFailed(f"bridge {plumbing.bridge} is missing")
        if outer is None:
            raise CheckFailed(f"host interface {plumbing.host_ifname} is missing")
        if host.get_links(outer)[0].get("master") != bridge:
            raise CheckFailed(f"{plumbing.host_ifname} is not on bridge {plumbing.bridge}")
        with self._container(plumbing.netns) as inside:
            inner = _index(inside, plumbing.ifname)
            if inner is None:
                raise CheckFailed(f"interface {plumbing.ifname} is missing in the container")
            link = inside.get_links(inner)[0]
            if link.get("mtu") != plumbing.mtu:
                raise CheckFailed(
                    f"{plumbing.ifname} has mtu {link.get('mtu')}, not {plumbing.mtu}"
                )
            addresses = {
                (a.get("address"), a["prefixlen"])
                for a in inside.get_addr(index=inner, family=socket.AF_INET)
            }
            if (plumbing.address, plumbing.prefix_len) not in addresses:
                raise CheckFailed(
                    f"{plumbing.ifname} lacks {plumbing.address}/{plumbing.prefix_len}"
                )
            routes = set()
            for route in inside.get_routes(family=socket.AF_INET, oif=inner):
                dst = route.get("dst") or "0.0.0.0"
                routes.add((f"{dst}/{route['dst_len']}", route.get("gateway")))
            for dst, gateway in plumbing.routes:
                wanted = (ipaddress.ip_network(dst).with_prefixlen, gateway)
                if wanted not in routes:
                    raise CheckFailed(f"route {dst} via {gateway} is missing in the container")

    def sweep(self, bridge: str, keep: set[str]) -> list[str]:
        """GC: remove our host ends on `bridge` that belong to no valid attachment."""
        host = self._host_ipr()
        index = _index(host, bridge)
        if index is None:
            return []
        removed = []
        for link in host.get_links():
            name = link.get("ifname") or ""
            if link.get("master") == index and is_host_ifname(name) and name not in keep:
                _delete(host, int(link["index"]))
                removed.append(name)
        return removed
