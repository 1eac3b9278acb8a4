"""One frozen Config, validated once when the process starts."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """An option has a value the server cannot run with."""


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, default_port: int | None = None) -> HostPort:
        """Parse HOST:PORT, [V6]:PORT, or (with a default port) a bare host."""
        text = text.strip()
        host, sep, port_text = text.rpartition(":")
        if text.startswith("[") and "]" in text:
            inside, _, rest = text[1:].partition("]")
            host, port_text = inside, rest[1:] if rest.startswith(":") else ""
            sep = ":" if port_text else ""
        elif not sep or ":" in host:  # bare host, or a bare IPv6 address
            host, port_text = text, ""
        if not port_text:
            if default_port is None:
                raise ConfigError(f"{text!r}: expected HOST:PORT")
            port_text = str(default_port)
        try:
            port = int(port_text)
        except ValueError:
            raise ConfigError(f"{text!r}: port is not a number") from None
        if not 0 <= port <= 65535:
            raise ConfigError(f"{text!r}: port out of range")
        if not host:
            raise ConfigError(f"{text!r}: missing host")
        return cls(host, port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_upstreams(text: str) -> tuple[HostPort, ...]:
    """`HOST[:PORT],...` (port 53 by default) or the path of a resolv.conf, whose
    `nameserver` lines are read (as CoreDNS's `forward . /etc/resolv.conf`)."""
    upstreams: list[HostPort] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item.startswith(("/", "./")):
            upstreams.extend(_nameservers(item))
        else:
            upstreams.append(HostPort.parse(item, default_port=53))
    return tuple(upstreams)


def _nameservers(path: str) -> list[HostPort]:
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            lines = file.read().splitlines()
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror or error}") from None
    found = []
    for line in lines:
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                ipaddress.ip_address(words[1])
            except ValueError:
                raise ConfigError(f"{path}: {words[1]!r} is not an IP address") from None
            found.append(HostPort(words[1], 53))
    if not found:
        raise ConfigError(f"{path} names no nameserver")
    return found


def is_node_name(text: str) -> bool:
    """A node name as store keys carry it (a host name, or anything like one)."""
    return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,252}", text) is not None


def normalize_zone(zone: str) -> str:
    name = zone.strip().strip(".").lower()
    labels = name.split(".")
    if not name or any(not label or len(label) > 63 for label in labels) or len(name) > 253:
        raise ConfigError(f"{zone!r} is not a valid zone name")
    return name


@dataclass(frozen=True, slots=True)
class Config:
    dns: HostPort = field(default_factory=lambda: HostPort("127.0.0.1", 8053))
    http: HostPort = field(default_factory=lambda: HostPort("127.0.0.1", 8080))
    zones: tuple[str, ...] = ("cluster.local",)
    etcd: tuple[HostPort, ...] = ()
    etcd_prefix: str = "/discovery/"
    etcd_ca: str | None = None
    etcd_cert: str | None = None
    etcd_key: str | None = None
    etcd_user: str | None = None
    etcd_password: str | None = None
    etcd_dial_timeout: float = 5.0
    etcd_request_timeout: float = 5.0
    dns_ttl: int = 5
    negative_ttl: int = 5
    min_ttl: int = 2
    max_ttl: int = 86400
    upstream: tuple[HostPort, ...] = ()
    upstream_timeout: float = 2.0
    upstream_cache_size: int = 10000
    workers: int = 1
    tcp_idle_timeout: float = 10.0
    tcp_max_connections: int = 1024
    log_level: str = "info"
    node: str = "node"
    node_ip: str | None = None
    node_ttl: int = 60
    cni_socket: str = ""  # the CNI agent's Unix socket; "" = off
    cni_socket_default: bool = False  # the path was not asked for: a busy one is a warning

    def __post_init__(self) -> None:
        if not self.zones:
            raise ConfigError("at least one zone is needed")
        if len(set(self.zones)) != len(self.zones):
            raise ConfigError("a zone is listed twice")
        for zone in self.zones:
            if normalize_zone(zone) != zone:
                raise ConfigError(f"zone {zone!r} must be lower case without a trailing dot")
        if not 0 <= self.dns_ttl <= 2**31 - 1 or not 0 <= self.negative_ttl <= 2**31 - 1:
            raise ConfigError("DNS TTLs must be between 0 and 2^31-1")
        if not 1 <= self.min_ttl <= self.max_ttl:
            raise ConfigError("need 1 <= --min-ttl <= --max-ttl")
        if not self.etcd_prefix.startswith("/") or not self.etcd_prefix.endswith("/"):
            raise ConfigError("--etcd-prefix must start and end with '/'")
        if (self.etcd_cert is None) != (self.etcd_key is None):
            raise ConfigError("--etcd-cert and --etcd-key go together")
        if (self.etcd_user is None) != (self.etcd_password is None):
            raise ConfigError("--etcd-user and --etcd-password go together")
        if self.workers < 1:
            raise ConfigError("--workers must be at least 1")
        if self.tcp_idle_timeout <= 0 or self.tcp_max_connections < 1:
            raise ConfigError("TCP idle timeout and connection cap must be positive")
        if not is_node_name(self.node):
            raise ConfigError(
                f"--node {self.node!r}: use letters, digits, '-', '_' and '.' (1-253 characters)"
            )
        if self.node_ip is not None:
            try:
                ipaddress.ip_address(self.node_ip)
            except ValueError:
                raise ConfigError(f"--node-ip {self.node_ip!r} is not an IP address") from None
        if not 5 <= self.node_ttl <= 3600:
            raise ConfigError("--node-ttl must be between 5 and 3600 seconds")
        if self.cni_socket and not self.cni_socket.startswith("/"):
            raise ConfigError("--cni-socket must be an absolute path (or '' for none)")
        for upstream in self.upstream:
            try:
                ipaddress.ip_address(upstream.host)
            except ValueError:
                raise ConfigError(f"upstream {upstream} must be an IP address") from None
        if not 0 < self.upstream_timeout <= 60:
            raise ConfigError("--upstream-timeout must be between 0 and 60 seconds")
        if not 0 <= self.upstream_cache_size <= 10_000_000:
            raise ConfigError("--upstream-cache-size must be between 0 and 10000000")
