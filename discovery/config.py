"""One frozen Config, validated once when the process starts, and the process set-up it
implies: logging, the event loop, the listening sockets (bound once, by the first process)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import re
import socket
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

from .dns.transport import UDP_IO, udp_io_default

log = logging.getLogger("discovery")

LISTEN_BACKLOG = 1024
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HOST_PATTERN = re.compile(r"(\*|(\*\.)?[a-z0-9_]([a-z0-9_.-]{0,251}[a-z0-9_])?)")


def env_name(flag: str) -> str:
    """The environment variable of a command-line flag: --dns-ttl -> DISCOVERY_DNS_TTL."""
    return "DISCOVERY_" + flag.lstrip("-").upper().replace("-", "_")


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


def parse_networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """`CIDR[,CIDR...]` (a bare address is its /32 or /128)."""
    networks = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(f"{item!r} is not a CIDR prefix (e.g. 127.0.0.0/8)") from None
    return tuple(networks)


def is_node_name(text: str) -> bool:
    """A node name as store keys carry it (a host name, or anything like one)."""
    return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,252}", text) is not None


def allowed_host_pattern(text: str) -> str:
    """One --http-allowed-hosts entry, lower case: NAME, *.DOMAIN, an address, or *."""
    name = text.strip().lower().rstrip(".")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        return ipaddress.ip_address(name).compressed
    except ValueError:
        pass
    if _HOST_PATTERN.fullmatch(name) is None:
        raise ConfigError(f"{text!r} is not a host name, *.domain, an address or *")
    return name


# The longest zone that leaves room for every name the server builds from one-character
# labels: `_services._dns-sd._udp.<ns>.svc.<zone>` (DNS-SD browsing) is 31 octets more.
MAX_ZONE_LENGTH = 224


def normalize_zone(zone: str) -> str:
    name = zone.strip().strip(".").lower()
    labels = name.split(".")
    if not name or any(not label or len(label) > 63 for label in labels) or len(name) > 253:
        raise ConfigError(f"{zone!r} is not a valid zone name")
    if len(name) > MAX_ZONE_LENGTH:
        raise ConfigError(
            f"zone {name[:20]}…: {len(name)} characters leave no room for service names in"
            f" 255 octets (at most {MAX_ZONE_LENGTH})"
        )
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
    # The node lease ID every worker of this node shares (0: the store picks one). Not a
    # flag: the parent of several workers chooses it, so the lease is granted only once.
    node_lease: int = 0
    tcp_idle_timeout: float = 10.0
    tcp_max_connections: int = 1024
    tcp_message_timeout: float = 2.0
    tcp_max_connections_per_client: int = 16
    dns_rate_limit: int = 0  # queries per second per client address; 0: no limit
    dns_udp_io: str = ""  # mmsg or loop (transport.UDP_IO); "": mmsg where it is built
    max_answers: int = 0  # records per answer; 0: as many as fit the message
    log_level: str = "info"
    node: str = "node"
    node_ip: str | None = None
    node_ttl: int = 60
    cni_socket: str = ""  # the CNI agent's Unix socket; "" = off
    cni_socket_default: bool = False  # the path was not asked for: a busy one is a warning
    overlay: bool = False
    overlay_resync: float = 10.0
    # Not a flag: with --workers, the first worker programs the overlay and the others only
    # read the kernel (to say what is programmed); one writer per node.
    overlay_observe: bool = False
    # loopback or link-local prefixes a registration may nevertheless use (--allow-address)
    allow_address: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    http_long_polls_per_client: int = 256
    max_instances_per_service: int = 10_000
    max_instances_per_namespace: int = 100_000
    http_max_connections: int = 4096
    http_header_timeout: float = 10.0
    http_body_timeout: float = 30.0
    http_keepalive_timeout: float = 75.0
    auth_file: str | None = None
    auth_metrics: bool = False
    http_cert: str | None = None
    http_key: str | None = None
    http_client_ca: str | None = None
    http_allowed_hosts: tuple[str, ...] = ()

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
        if self.workers > 1 and not self.etcd:
            raise ConfigError(
                f"--workers {self.workers} needs --etcd: each worker process keeps its own copy"
                " of the registry by watching etcd (the embedded store lives in one process)"
            )
        if not 0 <= self.node_lease < 2**63:
            raise ConfigError("the node lease ID must be a positive 64-bit integer")
        if self.tcp_idle_timeout <= 0 or self.tcp_max_connections < 1:
            raise ConfigError("TCP idle timeout and connection cap must be positive")
        if not 0 < self.tcp_message_timeout <= 3600:
            raise ConfigError("--tcp-message-timeout must be between 0 and 3600 seconds")
        if self.tcp_max_connections_per_client < 1:
            raise ConfigError("--tcp-max-connections-per-client must be at least 1")
        if self.dns_rate_limit < 0:
            raise ConfigError("--dns-rate-limit must be 0 (off) or queries per second")
        if self.dns_udp_io not in ("", *UDP_IO):
            raise ConfigError(f"--dns-udp-io must be one of {', '.join(UDP_IO)}")
        if self.dns_udp_io == "mmsg" and udp_io_default() != "mmsg":
            raise ConfigError(
                "--dns-udp-io mmsg: the recvmmsg extension (discovery.dns._batch) is not built;"
                " install a C compiler and the Python headers and reinstall, or use loop"
            )
        if self.max_answers < 0:
            raise ConfigError("--max-answers must be 0 (as many as fit) or a number of records")
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
        if self.overlay:
            if self.node_ip is None:
                raise ConfigError("--overlay needs --node-ip (this node's underlay address)")
            if ipaddress.ip_address(self.node_ip).version != 4:
                raise ConfigError("--overlay needs an IPv4 --node-ip (VXLAN over IPv4 only)")
        if self.http_long_polls_per_client < 1:
            raise ConfigError("--http-long-polls-per-client must be at least 1")
        if self.max_instances_per_service < 1 or self.max_instances_per_namespace < 1:
            raise ConfigError("--max-instances-per-service and -namespace must be at least 1")
        if self.http_max_connections < 1:
            raise ConfigError("--http-max-connections must be at least 1")
        for flag, seconds in (
            ("--http-header-timeout", self.http_header_timeout),
            ("--http-body-timeout", self.http_body_timeout),
            ("--http-keepalive-timeout", self.http_keepalive_timeout),
        ):
            if not 0 < seconds <= 3600:
                raise ConfigError(f"{flag} must be between 0 and 3600 seconds")
        if not 0.5 <= self.overlay_resync <= 3600:
            raise ConfigError("--overlay-resync must be between 0.5 and 3600 seconds")
        for upstream in self.upstream:
            try:
                ipaddress.ip_address(upstream.host)
            except ValueError:
                raise ConfigError(f"upstream {upstream} must be an IP address") from None
        if not 0 < self.upstream_timeout <= 60:
            raise ConfigError("--upstream-timeout must be between 0 and 60 seconds")
        if not 0 <= self.upstream_cache_size <= 10_000_000:
            raise ConfigError("--upstream-cache-size must be between 0 and 10000000")
        if (self.http_cert is None) != (self.http_key is None):
            raise ConfigError("--http-cert and --http-key go together")
        if self.http_client_ca is not None and self.http_cert is None:
            raise ConfigError("--http-client-ca needs --http-cert and --http-key (TLS)")
        for host in self.http_allowed_hosts:
            if allowed_host_pattern(host) != host:
                raise ConfigError(f"--http-allowed-hosts {host!r}: not in its normal form")
        if self.auth_metrics and self.auth_file is None:
            raise ConfigError("--auth-metrics needs --auth-file")

    def setup_logging(self) -> None:
        logging.basicConfig(
            level=getattr(logging, self.log_level.upper(), logging.INFO),
            format=LOG_FORMAT,
            stream=sys.stderr,
        )

    def setup_event_loop(self) -> None:
        """uvloop for every loop this process runs, where it is installed."""
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
            return
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    def bind_sockets(self) -> Sockets:
        """Bind every listener (logging the addresses bound): the server, or the parent of
        several workers that all serve on these same sockets, takes them from here."""
        with _naming_the_option("--dns", self.dns):
            dns_udp, dns_tcp = _bind_dns(self.dns)
        http = cni = None
        try:
            with _naming_the_option("--http", self.http):
                http = _bind_tcp(self.http)
            if self.cni_socket:
                cni = _bind_unix(self.cni_socket, required=not self.cni_socket_default)
        except BaseException:
            for sock in (dns_udp, dns_tcp, http):
                if sock is not None:
                    sock.close()
            raise
        sockets = Sockets(dns_udp, dns_tcp, http, cni, self.cni_socket if cni else "")
        log.info("DNS listening on %s:%d (udp, tcp)", *sockets.dns_address)
        scheme = "https" if self.http_cert else "http"
        log.info("HTTP listening on %s://%s:%d", scheme, *sockets.http_address)
        if cni is not None:
            log.info("CNI socket listening on %s", self.cni_socket)
        elif self.cni_socket_default and not self.cni_socket:
            log.info("no CNI socket: not running as root (--cni-socket PATH to ask for one)")
        return sockets


_BIND_PROBLEMS = {
    errno.EADDRINUSE: "address already in use (another process listens there)",
    errno.EACCES: "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
    errno.EADDRNOTAVAIL: "no such address on this machine",
}


@contextlib.contextmanager
def _naming_the_option(flag: str, address: HostPort) -> Iterator[None]:
    """A listener that cannot be opened: say which option (and variable) to change."""
    try:
        yield
    except OSError as error:
        cause = error.__cause__ if error.errno is None else error  # uvloop wraps the errno
        if not isinstance(cause, OSError):
            cause = error
        problem = _BIND_PROBLEMS.get(cause.errno or 0, cause.strerror or str(cause))
        variable = env_name(flag)
        raise OSError(
            f"{flag} {address}: {problem}; choose another address with {flag} HOST:PORT"
            f" or {variable}"
        ) from error


@dataclass(frozen=True, slots=True)
class Sockets:
    """The listening sockets of a server: DNS over UDP and TCP on one port, HTTP, and the
    CNI agent's Unix socket (None when there is none). Workers inherit them from the process
    that bound them; only that process removes the Unix socket's file."""

    dns_udp: socket.socket
    dns_tcp: socket.socket
    http: socket.socket
    cni: socket.socket | None = None
    cni_path: str = ""
    owner: int = field(default_factory=os.getpid)
    cni_inode: tuple[int, int] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.cni_path and self.cni_inode is None:
            info = os.stat(self.cni_path)
            object.__setattr__(self, "cni_inode", (info.st_dev, info.st_ino))

    @property
    def dns_address(self) -> tuple[str, int]:
        host, port = self.dns_udp.getsockname()[:2]
        return host, port

    @property
    def http_address(self) -> tuple[str, int]:
        host, port = self.http.getsockname()[:2]
        return host, port

    def close(self) -> None:
        """Close what is still open here (a transport that took a socket closed it already);
        in the process that bound it, remove the Unix socket's file if it is still ours."""
        for sock in (self.dns_udp, self.dns_tcp, self.http, self.cni):
            if sock is not None:
                sock.close()
        if self.cni_path and self.cni_inode is not None and os.getpid() == self.owner:
            with contextlib.suppress(OSError):
                info = os.stat(self.cni_path)
                if (info.st_dev, info.st_ino) == self.cni_inode:
                    os.unlink(self.cni_path)


def _address(
    where: HostPort, kind: socket.SocketKind
) -> tuple[socket.AddressFamily, tuple[str, int]]:
    """The first address the listener's host resolves to, as asyncio's endpoints take it."""
    family, _, _, _, address = socket.getaddrinfo(
        where.host, where.port, type=kind, flags=socket.AI_PASSIVE
    )[0]
    return family, (str(address[0]), where.port)


def _bind_tcp(where: HostPort, port: int | None = None) -> socket.socket:
    family, address = _address(where, socket.SOCK_STREAM)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address[0], where.port if port is None else port))
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_dns(where: HostPort) -> tuple[socket.socket, socket.socket]:
    """UDP and TCP on one port; port 0 picks one that is free for both."""
    family, address = _address(where, socket.SOCK_DGRAM)
    attempts = 20 if where.port == 0 else 1
    for attempt in range(attempts):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        try:
            udp.bind(address)
            return udp, _bind_tcp(where, udp.getsockname()[1])
        except OSError as error:
            udp.close()
            if error.errno != errno.EADDRINUSE or attempt == attempts - 1:
                raise
        except BaseException:
            udp.close()
            raise
    raise OSError(errno.EADDRINUSE, "no free port for DNS")  # pragma: no cover


def _bind_unix(path: str, required: bool) -> socket.socket | None:
    """A listening Unix socket at `path`, mode 0600; a stale file is replaced. A path that
    a live server answers on is an error when `required`, else a warning and no socket."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    for _ in range(2):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is never reachable by anyone else, not even briefly
        try:
            sock.bind(path)
        except OSError as error:
            sock.close()
            if error.errno != errno.EADDRINUSE:
                raise
            if _answering(path):
                message = f"CNI socket {path} is in use by another server"
                if required:
                    raise OSError(errno.EADDRINUSE, message) from None
                log.warning("%s: serving no CNI socket", message)
                return None
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)  # left by a server that died
                else:
                    raise OSError(errno.EEXIST, f"{path} exists and is not a socket") from None
            continue
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(128)
        return sock
    raise OSError(errno.EADDRINUSE, f"cannot bind the CNI socket {path}")


def _answering(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()
