"""Command line: flags (each also a DISCOVERY_* environment variable) -> Config -> Server.

Exit codes: 0 after a clean shutdown, 2 for a bad option, 1 when the server cannot start.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import logging
import os
import signal
import socket
from collections.abc import Callable, Sequence
from typing import Any

from . import auth
from .config import (
    Config,
    ConfigError,
    HostPort,
    allowed_host_pattern,
    env_name,
    normalize_zone,
    parse_networks,
    parse_upstreams,
)
from .dns.transport import UDP_IO
from .server import Server, raise_file_limit
from .workers import Supervisor

log = logging.getLogger("discovery")
DEFAULT_CNI_SOCKET = "/run/discovery/cni.sock"  # = discovery.net.cni.DEFAULT_SOCKET


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _log_level(text: str) -> str:
    level = text.strip().lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ValueError(f"{text!r} is not one of debug, info, warning, error")
    return level


def _udp_io(text: str) -> str:
    value = text.strip().lower()
    if value not in UDP_IO:
        raise ValueError(f"{text!r} is not one of {', '.join(UDP_IO)}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} must be an integer") from None


def _number(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} must be a number (seconds, e.g. 2.5)") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{text!r} must be a finite number")
    return value


def _hosts(text: str) -> tuple[str, ...]:
    return tuple(allowed_host_pattern(host) for host in _split(text))


def version() -> str:
    try:
        return importlib.metadata.version("discovery")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "unknown"


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
        raise ValueError(f"{text!r} is not a boolean (1/0, true/false, yes/no, on/off)")
    return value in ("1", "true", "yes", "on")


# flag, type/parser, default, help
_OPTIONS: list[tuple[str, Callable[[str], Any], Any, str]] = [
    (
        "--dns",
        HostPort.parse,
        "127.0.0.1:8053",
        "DNS listener HOST:PORT, UDP and TCP (port 0: any)",
    ),
    ("--http", HostPort.parse, "127.0.0.1:8080", "HTTP API listener HOST:PORT (port 0: any)"),
    ("--etcd", str, None, "etcd endpoints URL[,URL...] (default: the embedded store)"),
    ("--etcd-prefix", str, "/discovery/", "key prefix in etcd"),
    ("--etcd-ca", str, None, "CA bundle for TLS to etcd"),
    ("--etcd-cert", str, None, "client certificate for mutual TLS to etcd"),
    ("--etcd-key", str, None, "client key for mutual TLS to etcd"),
    ("--etcd-user", str, None, "etcd user name"),
    ("--etcd-password", str, None, "etcd password"),
    ("--etcd-dial-timeout", _number, 5.0, "seconds to wait for an etcd connection"),
    ("--etcd-request-timeout", _number, 5.0, "seconds to wait for one etcd request"),
    ("--dns-ttl", _integer, 5, "TTL of service records (never above the lease)"),
    ("--negative-ttl", _integer, 5, "TTL of NXDOMAIN/NODATA answers (SOA minimum)"),
    ("--min-ttl", _integer, 2, "shortest lease TTL a registration may ask for"),
    ("--max-ttl", _integer, 86400, "longest lease TTL a registration may ask for"),
    (
        "--upstream",
        parse_upstreams,
        None,
        "resolvers HOST[:PORT],... or a resolv.conf path for names outside the zones",
    ),
    ("--upstream-timeout", _number, 2.0, "seconds to wait for one upstream's answer"),
    ("--upstream-cache-size", _integer, 10000, "answers from upstreams kept in memory (0: none)"),
    ("--workers", _integer, 1, "server processes sharing the listeners (more than 1 needs --etcd)"),
    ("--tcp-idle-timeout", _number, 10.0, "seconds before an idle DNS TCP connection is closed"),
    ("--tcp-max-connections", _integer, 1024, "cap on open DNS TCP connections"),
    (
        "--tcp-message-timeout",
        _number,
        2.0,
        "seconds a DNS TCP client has to send a whole message once it began",
    ),
    (
        "--tcp-max-connections-per-client",
        _integer,
        16,
        "cap on open DNS TCP connections from one client address",
    ),
    ("--dns-rate-limit", _integer, 0, "DNS queries per second per client address (0: no limit)"),
    (
        "--dns-udp-io",
        _udp_io,
        "",
        "how UDP datagrams are read and answered, many per wake-up: mmsg (recvmmsg/sendmmsg)"
        " or loop (recvfrom/sendto in Python) [default: mmsg where it is built]",
    ),
    ("--max-answers", _integer, 0, "records per DNS answer, a rotated subset (0: all that fit)"),
    ("--log-level", _log_level, "info", "debug, info, warning or error"),
    ("--node", str, None, "this node's name for container networking (default: the host name)"),
    ("--node-ip", str, None, "this node's underlay address (needed for the vxlan backend)"),
    ("--node-ttl", _integer, 60, "seconds a node's blocks and attachments outlive the node"),
    (
        "--cni-socket",
        str,
        None,
        f"Unix socket for discovery-cni ('' for none) [as root: {DEFAULT_CNI_SOCKET}; else none]",
    ),
    ("--overlay", _flag, False, "program the VXLAN overlay of vxlan networks (CAP_NET_ADMIN)"),
    ("--overlay-resync", _number, 10.0, "seconds between full overlay passes (repairs drift)"),
    (
        "--http-long-polls-per-client",
        _integer,
        256,
        "long polls one client address may hold open at once (429 past it)",
    ),
    ("--max-instances-per-service", _integer, 10000, "live instances one service may have"),
    ("--max-instances-per-namespace", _integer, 100000, "live instances one namespace may have"),
    ("--http-max-connections", _integer, 4096, "cap on open HTTP connections (503 past it)"),
    (
        "--http-header-timeout",
        _number,
        10.0,
        "seconds a request's headers may take from its first byte (then the connection closes)",
    ),
    ("--http-body-timeout", _number, 30.0, "seconds a request's body may take (then 408)"),
    ("--http-keepalive-timeout", _number, 75.0, "seconds an idle HTTP connection is kept"),
    ("--auth-file", str, None, "JSON file of API tokens (SHA-256 digests); re-read on SIGHUP"),
    ("--auth-metrics", _flag, False, "with --auth-file: /metrics needs a token too"),
    ("--http-cert", str, None, "TLS certificate (PEM, chain) of the HTTP API; re-read on SIGHUP"),
    ("--http-key", str, None, "TLS private key (PEM) of the HTTP API"),
    ("--http-client-ca", str, None, "CA bundle: the API requires client certificates (mTLS)"),
    (
        "--http-allowed-hosts",
        _hosts,
        (),
        "host names the API answers to besides addresses and localhost (NAME,*.DOMAIN,*)",
    ),
]
_FLAGS = {"--overlay", "--auth-metrics"}  # switches: no value on the command line


def _endpoint(url: str) -> HostPort:
    for scheme in ("http://", "https://"):
        if url.startswith(scheme):
            url = url[len(scheme) :]
    return HostPort.parse(url.rstrip("/"), default_port=2379)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="discovery", description=__doc__)
    parser.add_argument("--version", action="version", version=f"discovery {version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the DNS responder and the HTTP API",
        description="Every flag can also be set as DISCOVERY_<FLAG> (e.g. DISCOVERY_DNS_TTL).",
    )
    for flag, _, default, text in _OPTIONS:
        more: dict[str, Any] = {"action": "store_const", "const": "1"} if flag in _FLAGS else {}
        serve.add_argument(
            flag, default=None, help=f"{text} [{env_name(flag)}; default {default}]", **more
        )
    serve.add_argument(
        "--zone",
        action="append",
        default=None,
        help="served zone; may repeat [DISCOVERY_ZONE, comma-separated; default cluster.local]",
    )
    serve.add_argument(
        "--allow-address",
        action="append",
        default=None,
        metavar="CIDR",
        help="admit registrations of loopback or link-local addresses in CIDR (refused "
        "otherwise); may repeat [DISCOVERY_ALLOW_ADDRESS, comma-separated; default none]",
    )
    from . import check, sidecar

    sidecar.add_parser(commands)
    check.add_parser(commands)
    return parser


def config_from(args: argparse.Namespace, environ: dict[str, str]) -> Config:
    values: dict[str, Any] = {}
    for flag, parse, default, _ in _OPTIONS:
        attr = flag.lstrip("-").replace("-", "_")
        raw = getattr(args, attr)
        if raw is None:
            raw = environ.get(env_name(flag))
        if raw is None:
            values[attr] = default
            continue
        try:
            values[attr] = parse(raw)
        except (ValueError, ConfigError) as error:
            raise ConfigError(f"{flag}: {error}") from None
    zones = args.zone or _split(environ.get("DISCOVERY_ZONE", "")) or ["cluster.local"]
    etcd = tuple(_endpoint(url) for url in _split(values.pop("etcd") or ""))
    allowed = ",".join(args.allow_address or ()) or environ.get("DISCOVERY_ALLOW_ADDRESS", "")
    try:
        values["allow_address"] = parse_networks(allowed)
    except ConfigError as error:
        raise ConfigError(f"--allow-address: {error}") from None
    upstream = values.pop("upstream") or ()
    if isinstance(values["dns"], str):
        values["dns"] = HostPort.parse(values["dns"])
    if isinstance(values["http"], str):
        values["http"] = HostPort.parse(values["http"])
    if values["node"] is None:
        values["node"] = socket.gethostname().split(".")[0].lower()
    if values["cni_socket"] is None:  # links are made as root: no socket for anyone else
        values["cni_socket"] = DEFAULT_CNI_SOCKET if os.geteuid() == 0 else ""
        values["cni_socket_default"] = True
    return Config(
        zones=tuple(normalize_zone(z) for z in zones), etcd=etcd, upstream=upstream, **values
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "register":
        from . import sidecar

        return sidecar.main(args, parser)
    if args.command == "check":
        from . import check

        return check.main(args, parser)
    try:
        config = config_from(args, dict(os.environ))
        auth.check_files(config)
    except ConfigError as error:
        parser.error(str(error))
    config.setup_logging()
    if config.overlay:
        from .net.overlay import has_net_admin

        if not has_net_admin():
            log.error(
                "cannot start: --overlay programs VXLAN devices, routes and neighbours and needs "
                "CAP_NET_ADMIN (run as root, or grant it: setcap cap_net_admin+ep, "
                "AmbientCapabilities=CAP_NET_ADMIN)"
            )
            return 1
    raise_file_limit()  # before the workers start: they inherit it
    try:
        sockets = config.bind_sockets()
    except OSError as error:
        log.error("cannot start: %s", error)
        return 1
    auth.warn_if_open(config, sockets.http_address)
    # SIGHUP re-reads the auth file once the server runs; until then it must not kill it
    # (the server reads the file again after installing its handler).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if config.workers > 1:
        return Supervisor(config, sockets).run()
    config.setup_event_loop()
    try:
        asyncio.run(Server(config).serve(sockets))
    except (OSError, ConfigError) as error:
        log.error("cannot start: %s", error)
        return 1
    return 0
