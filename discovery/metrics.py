"""Every Prometheus collector in one place.

DNS counters are plain integers on the hot path (see dns.resolver.Stats); they are read
here at scrape time, so a query never touches a Prometheus lock.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .dns.records import RCODE_NAMES
from .dns.transport import REFUSAL_REASONS

if TYPE_CHECKING:
    from .dns.answers import Answers
    from .dns.forward import Forwarder
    from .dns.resolver import Stats
    from .dns.transport import TcpConnections
    from .net.overlay import Overlay
    from .registry import Registry
    from .watcher import Watcher


class OpenConnections(Protocol):
    """What the HTTP gauges read of the listener (http_server.HttpConnections)."""

    open: int


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "discovery_http_requests",
            "HTTP API requests by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "discovery_http_request_seconds",
            "HTTP API request latency",
            ["method", "route"],
            registry=self.registry,
        )
        self.cni_commands = Counter(
            "discovery_cni_commands",
            "CNI commands served on the CNI socket by command and CNI result code (0: success)",
            ["command", "code"],
            registry=self.registry,
        )
        self.cni_latency = Histogram(
            "discovery_cni_command_seconds",
            "Time the CNI agent took per command (the plugin's own start-up not included)",
            ["command"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 45.0),
            registry=self.registry,
        )
        self.http_refused = Counter(
            "discovery_http_refused",
            "HTTP requests refused before they reached the registry, by reason "
            "(a limit's name, or unauthenticated, forbidden, host)",
            ["reason"],
            registry=self.registry,
        )
        self.store_errors = Counter(
            "discovery_store_errors",
            "Store calls from the HTTP API that failed because the store was unreachable",
            registry=self.registry,
        )
        # labelled children by (method, route, status): labels() validates and takes a
        # lock on every call, a dict lookup does not (every API request counts itself)
        self._http_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def http_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one HTTP API request and observe its latency."""
        key = (method, route, status)
        children = self._http_children.get(key)
        if children is None:
            children = (
                self.http_requests.labels(method, route, str(status)),
                self.http_latency.labels(method, route),
            )
            if len(self._http_children) < 4096:  # methods are the client's choice
                self._http_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def watch(
        self,
        registry: Registry,
        answers: Answers,
        watcher: Watcher,
        stats: Stats,
        tcp: TcpConnections | None = None,
        overlay: Overlay | None = None,
    ) -> None:
        self.registry.register(_StateCollector(registry, answers, watcher, stats, tcp))
        if overlay is not None:
            self.registry.register(_OverlayCollector(overlay))

    def watch_http(
        self, connections: OpenConnections, long_polls: dict[str, int], registry: Registry
    ) -> None:
        self.registry.register(_HttpCollector(connections, long_polls, registry))

    def watch_forwarding(self, forwarder: Forwarder) -> None:
        self.registry.register(_ForwardCollector(forwarder))


class _StateCollector(Collector):
    def __init__(
        self,
        registry: Registry,
        answers: Answers,
        watcher: Watcher,
        stats: Stats,
        tcp: TcpConnections | None,
    ) -> None:
        self.source = registry
        self.answers = answers
        self.watcher = watcher
        self.stats = stats
        self.tcp = tcp

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        registry = self.source
        yield _gauge(
            "discovery_cache_synced", "1 once the first full load finished", registry.synced
        )
        yield _gauge("discovery_store_up", "1 while the store answers", registry.store_healthy)
        since = time.monotonic() - registry.last_contact if registry.last_contact else float("nan")
        yield _gauge(
            "discovery_store_last_contact_seconds", "Seconds since the store last answered", since
        )
        yield _gauge(
            "discovery_watch_revision", "Store revision the registry reflects", registry.revision
        )
        services = registry.services()
        yield _gauge("discovery_services", "Services with live instances", len(services))
        yield _gauge("discovery_instances", "Live instances", registry.instance_count())
        names = len(self.answers.state.names)
        yield _gauge("discovery_dns_names", "DNS names answered from memory", names)
        reloads = CounterMetricFamily(
            "discovery_watch_reloads", "Full reloads after a compacted watch"
        )
        reloads.add_metric([], self.watcher.reloads)
        yield reloads
        resumes = CounterMetricFamily(
            "discovery_watch_resumes", "Watch restarts after the store became unreachable"
        )
        resumes.add_metric([], self.watcher.resumes)
        yield resumes
        failures = CounterMetricFamily(
            "discovery_watch_failures", "Unexpected watch errors, each followed by a full reload"
        )
        failures.add_metric([], self.watcher.failures)
        yield failures
        stats = self.stats
        queries = CounterMetricFamily(
            "discovery_dns_queries", "DNS queries answered, by path", labels=["path"]
        )
        queries.add_metric(["fast"], stats.fast)
        queries.add_metric(["full"], stats.full)
        queries.add_metric(["dropped"], stats.dropped)
        queries.add_metric(["forwarded"], stats.forwarded)
        yield queries
        rcodes = CounterMetricFamily(
            "discovery_dns_full_path_responses",
            "Responses built by the full resolver, by rcode",
            labels=["rcode"],
        )
        for rcode, count in sorted(stats.rcodes.items()):
            rcodes.add_metric([RCODE_NAMES.get(rcode, str(rcode))], count)
        yield rcodes
        truncated = CounterMetricFamily("discovery_dns_truncated", "UDP answers sent with TC=1")
        truncated.add_metric([], stats.truncated)
        yield truncated
        refused = CounterMetricFamily(
            "discovery_dns_refused",
            "DNS clients refused by a limit, by reason: TCP connections over the cap in all "
            "(tcp_connections) or per client (tcp_client_connections), a TCP message not whole "
            "by its deadline (tcp_message_timeout), queries over --dns-rate-limit (rate_limit)",
            labels=["reason"],
        )
        for reason in REFUSAL_REASONS:
            refused.add_metric([reason], stats.refused[reason])
        yield refused
        skipped = CounterMetricFamily(
            "discovery_dns_records_skipped",
            "Records left out of DNS answers because a name they need would be illegal "
            "(a label over 63 or a name over 255 octets)",
        )
        skipped.add_metric([], self.answers.stats.skipped)
        yield skipped
        if self.tcp is not None:
            yield _gauge(
                "discovery_dns_tcp_connections", "Open DNS TCP connections", len(self.tcp.open)
            )
            refused = CounterMetricFamily(
                "discovery_dns_tcp_refused", "TCP connections closed at the connection cap"
            )
            refused.add_metric([], self.tcp.refused)
            yield refused


class _ForwardCollector(Collector):
    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        forwarder = self.forwarder
        stats = forwarder.stats
        for name, doc, value in (
            ("queries", "Queries for names outside the zones", stats.queries),
            ("cache_hits", "Of those, answered from the forward cache", stats.cache_hits),
            ("servfail", "Of those, answered SERVFAIL: no upstream answered", stats.servfail),
            ("overloaded", "Of those, refused: too many upstream queries in flight",
             stats.overloaded),
        ):  # fmt: skip
            counter = CounterMetricFamily(f"discovery_forward_{name}", doc)
            counter.add_metric([], value)
            yield counter
        yield _gauge(
            "discovery_forward_cache_entries", "Upstream answers cached", len(forwarder.cache)
        )
        up = GaugeMetricFamily(
            "discovery_forward_upstream_up", "1 while the upstream answers", labels=["upstream"]
        )
        sent = CounterMetricFamily(
            "discovery_forward_upstream_queries", "Queries sent upstream", labels=["upstream"]
        )
        for upstream in forwarder.upstreams:
            up.add_metric([upstream.label], float(upstream.up))
            sent.add_metric([upstream.label], stats.upstream_queries[upstream.label])
        yield up
        yield sent
        failures = CounterMetricFamily(
            "discovery_forward_upstream_failures",
            "Upstream exchanges that gave no answer (timeout, refused, unreachable, malformed,"
            " rcode), and replies dropped as not ours (id, question, address)",
            labels=["upstream", "reason"],
        )
        for (label, reason), count in sorted(stats.upstream_failures.items()):
            failures.add_metric([label, reason], count)
        yield failures


class _OverlayCollector(Collector):
    def __init__(self, overlay: Overlay) -> None:
        self.overlay = overlay

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        overlay = self.overlay
        yield _gauge(
            "discovery_overlay_peers",
            "Other nodes' blocks whose route, neighbour and FDB entry are programmed",
            overlay.peers,
        )
        errors = CounterMetricFamily(
            "discovery_overlay_errors",
            "Overlay failures: blocks skipped (node_ip, vtep_mac, duplicate_mac, vni) and "
            "failed netlink calls (netlink)",
            labels=["reason"],
        )
        for reason in ("node_ip", "vtep_mac", "duplicate_mac", "vni", "netlink"):
            errors.add_metric([reason], overlay.errors[reason])
        yield errors
        changes = CounterMetricFamily(
            "discovery_overlay_changes", "Netlink writes the overlay made (0 while in step)"
        )
        changes.add_metric([], overlay.changes)
        yield changes


class _HttpCollector(Collector):
    def __init__(
        self, connections: OpenConnections, long_polls: dict[str, int], registry: Registry
    ) -> None:
        self.connections = connections
        self.long_polls = long_polls
        self.source = registry

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield _gauge(
            "discovery_http_connections", "Open HTTP connections", self.connections.open
        )
        yield _gauge(
            "discovery_http_long_polls",
            "Long polls parked, waiting for a change",
            sum(self.long_polls.values()),
        )
        yield _gauge(
            "discovery_http_long_poll_clients",
            "Client addresses with a parked long poll",
            len(self.long_polls),
        )


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))
