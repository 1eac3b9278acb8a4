"""Wires store, watcher, cache, DNS and HTTP together; starts and stops them in order."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import resource
import signal
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import web

from .api import Context, create_app
from .auth import ACCESS, Access, ServerTLS
from .config import Config, Sockets
from .dns.answers import Answers, DnsSettings
from .dns.forward import Forwarder
from .dns.resolver import Resolver
from .dns.transport import TcpConnections, TcpLimits, UdpListener, open_listeners
from .http_server import GuardedSite, HttpConnections
from .metrics import Metrics
from .model import records_prefix
from .net import routes as network_routes
from .net.ipam import Ipam
from .net.overlay import Overlay
from .registry import Changes, Registry
from .store.base import Store, StoreUnavailable
from .store.embedded import EmbeddedStore
from .ui import routes as dashboard_routes
from .watcher import Watcher

if TYPE_CHECKING:
    from .net.agent import CniAgent

log = logging.getLogger(__name__)


def make_store(config: Config) -> Store:
    if not config.etcd:
        return EmbeddedStore()
    from .store.etcd import EtcdStore

    return EtcdStore(
        [(endpoint.host, endpoint.port) for endpoint in config.etcd],
        ca=config.etcd_ca,
        cert=config.etcd_cert,
        key=config.etcd_key,
        user=config.etcd_user,
        password=config.etcd_password,
        dial_timeout=config.etcd_dial_timeout,
        request_timeout=config.etcd_request_timeout,
    )


def _glue_address(host: str) -> str | None:
    """The listener address when it names one host: the A/AAAA of ns.dns.<zone>."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return None if address.is_unspecified else address.compressed


def raise_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit: every HTTP and DNS TCP
    connection is a descriptor, and 1,024 (a common soft default) is below the caps."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20  # Linux's default nr_open
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as error:
            log.warning("cannot raise the open file limit from %d: %s", soft, error)
    log.info("open file limit %d", soft)
    return soft


class _FreezeAfterLoad:
    """After each full load: the registry and its answers are long-lived and acyclic, so
    keep them out of the collector's full passes, which would otherwise walk every record
    now and then (a process-wide effect: only Server.serve subscribes it)."""

    def reset(self, registry: Registry) -> None:
        gc.freeze()

    def update(self, registry: Registry, changes: Changes) -> None:
        pass


class Server:
    """Runtime state of one process: created from a Config, started, stopped. With
    `--workers N` each of the N processes runs one, on the sockets its parent bound."""

    def __init__(self, config: Config, store: Store | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.access = Access(config, self.metrics)
        self.tls = ServerTLS(config)
        self.store = store if store is not None else make_store(config)
        settings = DnsSettings(
            config.zones,
            config.dns_ttl,
            config.negative_ttl,
            _glue_address(config.dns.host),
            config.max_answers,
        )
        self.registry = Registry(config.etcd_prefix)
        self.answers = Answers(settings)
        self.registry.subscribe(self.answers)
        self.forwarder = (
            Forwarder(
                [(u.host, u.port) for u in config.upstream],
                config.upstream_timeout,
                config.upstream_cache_size,
            )
            if config.upstream
            else None
        )
        self.resolver = Resolver(self.answers, forwarder=self.forwarder)
        self.watcher = Watcher(self.store, self.registry, records_prefix(config.etcd_prefix))
        self.ipam = Ipam(
            self.store,
            self.registry,
            config.node,
            config.node_ip,
            config.node_ttl,
            lease_id=config.node_lease,
        )
        self.overlay: Overlay | None = None
        if config.overlay and config.node_ip is not None:
            self.overlay = Overlay(
                self.registry,
                config.node,
                config.node_ip,
                config.overlay_resync,
                program=not config.overlay_observe,
            )
            self.registry.subscribe(self.overlay)
        self.dns_address: tuple[str, int] = (config.dns.host, config.dns.port)
        self.http_address: tuple[str, int] = (config.http.host, config.http.port)
        self._tasks: list[asyncio.Task[None]] = []
        self._sockets: Sockets | None = None
        self._udp: UdpListener | None = None
        self._tcp: asyncio.Server | None = None
        self._connections: TcpConnections | None = None
        self._runner: web.AppRunner | None = None
        self.cni: CniAgent | None = None
        self._stop = asyncio.Event()
        self.long_polls: dict[str, int] = {}  # parked long polls per client address

    @property
    def app(self) -> web.Application | None:
        """The HTTP application once started (its router is the one list of routes)."""
        return self._runner.app if self._runner is not None else None

    async def startup(self, sockets: Sockets | None = None) -> None:
        """Serve on `sockets`, or on sockets bound here from the config."""
        config = self.config
        self._tasks = [
            asyncio.create_task(self.watcher.run(), name="watch"),
            asyncio.create_task(self.watcher.probe(), name="probe"),
        ]
        try:
            self._sockets = sockets if sockets is not None else config.bind_sockets()
            self.dns_address = self._sockets.dns_address
            self.http_address = self._sockets.http_address
            if self.forwarder is not None:
                self.forwarder.exclude_self(*self.dns_address)
            self._udp, self._tcp, self._connections = await open_listeners(
                self._sockets.dns_udp,
                self._sockets.dns_tcp,
                self.resolver.answer,
                TcpLimits(
                    config.tcp_idle_timeout,
                    config.tcp_message_timeout,
                    config.tcp_max_connections,
                    config.tcp_max_connections_per_client,
                ),
                self.resolver.stats.refused,
                config.dns_rate_limit,
                config.dns_udp_io,
            )
            if self.overlay is not None:
                await self.overlay.start()
            self.metrics.watch(
                self.registry,
                self.answers,
                self.watcher,
                self.resolver.stats,
                self._connections,
                self.overlay,
            )
            context = Context(
                config,
                self.store,
                self.registry,
                self.metrics,
                self.ipam,
                self.overlay,
                long_polls=self.long_polls,
            )
            if self.forwarder is not None:
                self.metrics.watch_forwarding(self.forwarder)
            app = create_app(context, network_routes.add_routes, dashboard_routes(self.dns_address))
            app[ACCESS] = self.access
            self._runner = web.AppRunner(
                app,
                access_log=None,
                shutdown_timeout=5,
                keepalive_timeout=config.http_keepalive_timeout,
                lingering_time=2.0,  # after a 408 or 413, not the whole body timeout again
            )
            self._tasks.append(asyncio.create_task(self._adopt_node_lease(), name="node-lease"))
            await self._runner.setup()
            connections = HttpConnections(
                config.http_max_connections, config.http_header_timeout, self.metrics
            )
            self.metrics.watch_http(connections, context.long_polls, self.registry)
            site = GuardedSite(
                self._runner,
                self._sockets.http,
                connections,
                backlog=1024,
                ssl_context=self.tls.listener,
            )
            await site.start()
            await self._start_cni()
        except BaseException:
            await self.shutdown()
            raise
        store = f"etcd {','.join(map(str, config.etcd))}" if config.etcd else "embedded store"
        log.info("zones %s; %s", ", ".join(config.zones), store)
        if config.upstream:
            log.info("other names forwarded to %s", ", ".join(map(str, config.upstream)))

    async def shutdown(self) -> None:
        """Stop taking work, finish what is in flight, then release the store."""
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        if self._connections is not None:
            self._connections.close_all()
        if self._tcp is not None:
            await self._tcp.wait_closed()
        self.registry.close()  # long polls answer now with what they have
        if self._runner is not None:
            await self._runner.cleanup()
        if self.cni is not None:
            await self.cni.close()
            self.cni = None
        if self._sockets is not None:
            self._sockets.close()  # those no transport took (a start-up that failed halfway)
        await self.ipam.close()
        if self.forwarder is not None:
            await self.forwarder.close()
        if self.overlay is not None:
            await self.overlay.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.store.close()
        self._udp = self._tcp = self._connections = self._runner = self._sockets = None
        self._tasks = []

    async def _start_cni(self) -> None:
        assert self._sockets is not None
        if self._sockets.cni is None:
            return
        from .net.agent import CniAgent  # pyroute2: only when this node plumbs containers

        agent = CniAgent(self.ipam, self.config.zones[0], self.metrics)
        try:
            await agent.start(self._sockets.cni)
        except BaseException:
            await agent.close()
            raise
        self.cni = agent

    async def _adopt_node_lease(self) -> None:
        """After the first load: a restarted node keeps its blocks (their lease) alive."""
        await self.registry.wait(lambda: self.registry.synced, 365 * 86400)
        while self.registry.synced:
            try:
                await self.ipam.lease.adopt()
                await self.ipam.republish()
                return
            except StoreUnavailable as error:
                log.warning("cannot renew this node's lease yet (%s): retrying", error)
                await asyncio.sleep(1.0)

    def request_stop(self) -> None:
        self._stop.set()

    def reload(self) -> None:
        """SIGHUP: re-read the auth file and the TLS certificate, key and client CA."""
        self.access.reload()
        self.tls.reload()

    async def serve(self, sockets: Sockets | None = None) -> None:
        """Run as this process's server until SIGTERM or SIGINT (or request_stop).

        Process-wide effects belong here, not in startup(), which tests run many times
        in one process: the signal handlers, and gc.freeze() after each full load.
        """
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        # a SIGHUP before the handler was there was ignored: the file may have changed since
        self.access.reload(quiet_if_unchanged=True)
        self.registry.subscribe(_FreezeAfterLoad())
        await self.startup(sockets)
        try:
            await self._stop.wait()
        finally:
            log.info("shutting down")
            await self.shutdown()
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)


@contextlib.asynccontextmanager
async def run_server(config: Config) -> AsyncIterator[Server]:
    server = Server(config)
    await server.startup()
    try:
        yield server
    finally:
        await server.shutdown()
