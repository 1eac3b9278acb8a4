"""The node server's side of `discovery-cni`: CNI commands over a Unix socket.

The plugin executable (cni.py) forwards each command here as `POST /v1/cni/<COMMAND>` with
`{"env": {CNI_*}, "config": {...}}`. This agent checks the request again with the plugin's
own functions, allocates through the Ipam directly (no HTTP hop), and does the netlink work
on the netlink thread (netlink.py). The socket is the only way in: it creates links as root,
so it is never served on the TCP API, and its file mode is 0600.

One container interface is handled by one request at a time (a lock per
network/container/interface). Any failure after the address was taken releases it and
leaves no veth; a release the store cannot take now (it went away mid-ADD) is retried in the
background until the store is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from ..metrics import Metrics
from ..store.base import StoreError
from . import cni
from .ipam import Ipam, IpamError
from .netlink import (
    CheckFailed,
    DataPlaneError,
    InterfaceExists,
    Netlink,
    NetnsNotFound,
    NotANetns,
    Plumbing,
    host_ifname,
)
from .records import AttachmentRequest

log = logging.getLogger(__name__)

DEADLINE = 45.0  # seconds one command may take (the plugin waits cni.TIMEOUT)
Key = tuple[str, str, str]  # network, container ID, interface name

_IPAM_CODES = {
    400: cni.INVALID_CONFIG,
    404: cni.NETWORK_UNKNOWN,
    409: cni.NAME_IN_USE,
    507: cni.ADDRESSES_EXHAUSTED,
}


def _http_status(code: int) -> int:
    if code in (cni.TRY_AGAIN_LATER, cni.NOT_AVAILABLE):
        return 503
    return 400 if code < 100 else 500


def _data_plane_error(error: DataPlaneError | OSError) -> cni.CniError:
    if isinstance(error, NetnsNotFound):
        return cni.CniError(cni.CONTAINER_UNKNOWN, str(error))
    if isinstance(error, NotANetns):
        return cni.CniError(cni.INVALID_ENVIRONMENT, f"CNI_NETNS: {error}")
    if isinstance(error, InterfaceExists):
        return cni.CniError(cni.INTERFACE_EXISTS, str(error))
    if isinstance(error, CheckFailed):
        return cni.CniError(cni.CHECK_FAILED, str(error))
    return cni.CniError(cni.NETLINK_FAILED, "the kernel refused a netlink request", str(error))


class CniAgent:
    """Serves the CNI commands of this node on a Unix socket."""

    def __init__(self, ipam: Ipam, zone: str, metrics: Metrics | None = None) -> None:
        self.ipam = ipam
        self.metrics = metrics
        self.registry = ipam.registry
        self.zone = zone
        self.netlink = Netlink()
        self._runner: web.AppRunner | None = None
        self._locks: dict[Key, asyncio.Lock] = {}
        self._users: dict[Key, int] = {}  # commands holding or awaiting each lock
        self._releases: dict[Key, asyncio.Task[None]] = {}

    # lifecycle

    async def start(self, sock: socket.socket) -> None:
        """Serve on the listening Unix socket (Config.bind_sockets made it, mode 0600)."""
        app = web.Application(client_max_size=1 << 20)
        app.router.add_post("/v1/cni/{command}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for key, task in list(self._releases.items()):
            task.cancel()
            log.warning(
                "attachment %s/%s/%s not released (store away): the node lease keeps it", *key
            )
        for task in list(self._releases.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._releases.clear()
        await asyncio.get_running_loop().run_in_executor(None, self.netlink.close)

    # HTTP

    async def _handle(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        response, code = await self._answer(request)
        if self.metrics is not None:
            command = request.match_info["command"]
            command = command if command in cni.COMMANDS else "other"
            self.metrics.cni_commands.labels(command, str(code)).inc()
            self.metrics.cni_latency.labels(command).observe(time.perf_counter() - started)
        return response

    async def _answer(self, request: web.Request) -> tuple[web.Response, int]:
        """The answer and its CNI code (0: success)."""
        version = cni.LATEST
        try:
            try:
                body = await request.json()
                env, conf = body["env"], body["config"]
                if not isinstance(env, dict) or not isinstance(conf, dict):
                    raise TypeError("env and config must be objects")
            except (ValueError, KeyError, TypeError) as error:
                raise cni.CniError(cni.UNDECODABLE, "not a CNI request", str(error)) from None
            version = cni.config_version(conf)
            req = cni.parse_request({str(k): str(v) for k, v in env.items()}, conf)
            if req["command"] != request.match_info["command"]:
                raise cni.CniError(cni.INVALID_ENVIRONMENT, "CNI_COMMAND differs from the path")
            async with asyncio.timeout(DEADLINE):
                result = await self._dispatch(req)
        except cni.CniError as error:
            status = _http_status(error.code)
            return web.json_response(error.to_json(version), status=status), error.code
        except TimeoutError:
            late = cni.CniError(
                cni.TRY_AGAIN_LATER, f"the command did not finish within {DEADLINE:.0f} s"
            )
            return web.json_response(late.to_json(version), status=503), late.code
        if result is None:
            return web.Response(status=204), 0
        return web.json_response(result), 0

    async def _dispatch(self, req: dict[str, Any]) -> dict[str, Any] | None:
        command = req["command"]
        log.debug("%s %s/%s in %s", command, req["containerId"], req["ifname"], req["network"])
        if command == "ADD":
            return await self.add(req)
        if command == "DEL":
            await self.delete(req)
        elif command == "CHECK":
            await self.check(req)
        elif command == "STATUS":
            self.status(req)
        elif command == "GC":
            await self.gc(req)
        return None

    # commands

    @contextlib.asynccontextmanager
    async def _serial(self, key: Key) -> AsyncIterator[None]:
        """One command at a time per container interface; a pending release gives way."""
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with lock:
                pending = self._releases.pop(key, None)
                if pending is not None:
                    pending.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await pending
                yield
        finally:
            self._users[key] -= 1
            if not self._users[key]:  # nobody holds or awaits it: forget the lock
                del self._users[key]
                del self._locks[key]

    def _ready(self) -> None:
        if not self.registry.synced:
            raise cni.CniError(
                cni.TRY_AGAIN_LATER, "the node server has not loaded the registry yet"
            )

    async def add(self, req: dict[str, Any]) -> dict[str, Any]:
        key: Key = (req["network"], req["containerId"], req["ifname"])
        try:
            wanted = AttachmentRequest.model_validate(
                {"name": req["name"], "service": req["service"]}
            )
        except ValidationError as error:
            fields = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()
            )
            raise cni.CniError(
                cni.INVALID_CONFIG, "the container's name or service is invalid", fields
            ) from None
        async with self._serial(key):
            self._ready()
            try:
                await self.netlink.call(self.netlink.probe, req["netns"], req["ifname"])
            except DataPlaneError as error:
                raise _data_plane_error(error) from None
            try:
                attached = await self.ipam.attach(*key, wanted)
            except IpamError as error:  # refused before anything was written
                code = _IPAM_CODES.get(error.status, cni.UNEXPECTED)
                raise cni.CniError(code, error.detail) from None
            except BaseException as error:
                # the transaction may have been applied without us hearing back
                self._release_later(key)
                if isinstance(error, StoreError):
                    raise cni.CniError(
                        cni.TRY_AGAIN_LATER, "the store is unavailable", str(error)
                    ) from None
                raise
            body = attached.body
            plumbing = self._plumbing(req, body)
            try:
                plumbed = await self.netlink.call(self.netlink.attach, plumbing)
            except BaseException as error:
                await self._release(key)
                if isinstance(error, DataPlaneError | OSError):
                    raise _data_plane_error(error) from None
                raise
        log.info("ADD %s/%s in %s: %s", req["containerId"], req["ifname"], key[0], body["address"])
        return self._result(req, body, plumbing, plumbed.bridge_mac, plumbed.host_mac,
                            plumbed.container_mac)  # fmt: skip

    def _plumbing(self, req: dict[str, Any], body: dict[str, Any]) -> Plumbing:
        # a route to the block itself is the interface's own (on-link) route already
        routes = [(r["dst"], r["gw"]) for r in body["routes"] if r["dst"] != body["subnet"]]
        if req["isDefaultGateway"]:
            routes = [("0.0.0.0/0", body["gateway"])]
        return Plumbing(
            netns=req["netns"],
            ifname=req["ifname"],
            host_ifname=host_ifname(req["network"], req["containerId"], req["ifname"]),
            bridge=req["bridge"],
            mtu=req["mtu"] or body["mtu"],
            address=body["address"],
            prefix_len=body["prefix_len"],
            gateway=body["gateway"],
            is_gateway=req["isGateway"],
            hairpin=req["hairpinMode"],
            routes=tuple(routes),
        )

    def _result(
        self,
        req: dict[str, Any],
        body: dict[str, Any],
        plumbing: Plumbing,
        bridge_mac: str,
        host_mac: str,
        container_mac: str,
    ) -> dict[str, Any]:
        """The ADD result (CNI spec "Success"): interfaces, ips, routes, dns."""
        sandbox: dict[str, Any] = {
            "name": plumbing.ifname,
            "mac": container_mac,
            "sandbox": plumbing.netns,
        }
        if req["cniVersion"] == "1.1.0":
            sandbox["mtu"] = plumbing.mtu
        dns = dict(req["dns"])
        if "search" not in dns:
            search = [f"{req['network']}.net.{self.zone}", self.zone]
            if req["podNamespace"]:
                search.insert(0, f"{req['podNamespace']}.svc.{self.zone}")
            dns["search"] = search
        return {
            "cniVersion": req["cniVersion"],
            "interfaces": [
                {"name": plumbing.bridge, "mac": bridge_mac},
                {"name": plumbing.host_ifname, "mac": host_mac},
                sandbox,
            ],
            "ips": [
                {
                    "address": f"{plumbing.address}/{plumbing.prefix_len}",
                    "gateway": plumbing.gateway,
                    "interface": 2,
                }
            ],
            "routes": [{"dst": dst, "gw": gw} for dst, gw in plumbing.routes],
            "dns": dns,
        }

    async def _release(self, key: Key) -> None:
        """Free an attachment now, or later when the store cannot take it now."""
        try:
            await self.ipam.detach(*key)
        except StoreError as error:
            log.warning("cannot release %s/%s/%s yet (%s): retrying", *key, error)
            self._release_later(key)

    def _release_later(self, key: Key) -> None:
        if key not in self._releases:
            task = asyncio.create_task(self._releasing(key), name=f"release {key[1]}/{key[2]}")
            self._releases[key] = task

    async def _releasing(self, key: Key) -> None:
        delay = 0.2
        try:
            while True:
                try:
                    await self.ipam.detach(*key)
                    log.info("released %s/%s/%s after a failed ADD", *key)
                    return
                except StoreError:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
        finally:
            if self._releases.get(key) is asyncio.current_task():
                del self._releases[key]

    async def delete(self, req: dict[str, Any]) -> None:
        """DEL: the veth pair and the attachment; nothing there is no error."""
        key: Key = (req["network"], req["containerId"], req["ifname"])
        async with self._serial(key):
            try:
                await self.netlink.call(self.netlink.detach, host_ifname(*key))
            except (DataPlaneError, OSError) as error:
                raise _data_plane_error(error) from None
            try:
                await self.ipam.detach(*key)
            except StoreError as error:
                raise cni.CniError(
                    cni.TRY_AGAIN_LATER, "the store is unavailable", str(error)
                ) from None
        log.info("DEL %s/%s in %s", req["containerId"], req["ifname"], key[0])

    async def check(self, req: dict[str, Any]) -> None:
        """CHECK: the interface, address and routes are as the attachment says."""
        key: Key = (req["network"], req["containerId"], req["ifname"])
        self._ready()
        attachment = self.registry.attachment(*key)
        body = self.ipam.body(attachment) if attachment is not None else None
        if body is None:
            raise cni.CniError(
                cni.CHECK_FAILED, f"no attachment {key[1]}/{key[2]} in network {key[0]}"
            )
        plumbing = self._plumbing(req, body)
        previous = req["prevResult"]
        if isinstance(previous, dict):
            addresses = {
                ip.get("address") for ip in previous.get("ips", []) if isinstance(ip, dict)
            }
            if f"{plumbing.address}/{plumbing.prefix_len}" not in addresses:
                raise cni.CniError(
                    cni.CHECK_FAILED,
                    f"prevResult does not hold the attachment's address {plumbing.address}",
                )
        async with self._serial(key):
            try:
                await self.netlink.call(self.netlink.check, plumbing)
            except (DataPlaneError, OSError) as error:
                raise _data_plane_error(error) from None

    def status(self, req: dict[str, Any]) -> None:
        """STATUS: can this node take an ADD in this network now?"""
        if not self.registry.synced:
            raise cni.CniError(cni.NOT_AVAILABLE, "the node server has not loaded the registry")
        if not self.registry.store_healthy:
            raise cni.CniError(cni.NOT_AVAILABLE, "the node server cannot reach its store")
        if self.registry.network(req["network"]) is None:
            raise cni.CniError(
                cni.NOT_AVAILABLE, f"network {req['network']} does not exist on the server"
            )

    async def gc(self, req: dict[str, Any]) -> None:
        """GC: drop this node's attachments (and host veths) the runtime no longer knows."""
        self._ready()
        network = req["network"]
        valid = set(req["validAttachments"])
        node = self.ipam.node
        stale = [
            (network, a.container_id, a.ifname)
            for a in self.registry.attachments(network).values()
            if a.node == node and (a.container_id, a.ifname) not in valid
        ]
        for key in stale:
            async with self._serial(key):
                await self.netlink.call(self.netlink.detach, host_ifname(*key))
                try:
                    await self.ipam.detach(*key)
                except StoreError as error:
                    raise cni.CniError(
                        cni.TRY_AGAIN_LATER, "the store is unavailable", str(error)
                    ) from None
            log.info("GC removed %s/%s in %s", key[1], key[2], network)
        # host ends to keep: every other attachment of this node, and commands in flight
        keep = {host_ifname(network, cid, ifname) for cid, ifname in valid}
        for name in self.registry.networks():
            if name != network:
                keep.update(
                    host_ifname(name, a.container_id, a.ifname)
                    for a in self.registry.attachments(name).values()
                    if a.node == node
                )
        keep.update(host_ifname(*key) for key in self._locks)
        removed = await self.netlink.call(self.netlink.sweep, req["bridge"], keep)
        if removed:
            log.info("GC removed stray host interfaces %s", ", ".join(removed))
