"""`discovery register`: keep one instance registered for a process that does not speak HTTP.

    discovery register --server http://10.0.0.5:8080 --service web --port http:8080 \\
        --check http://127.0.0.1:8080/healthz -- python -m http.server 8080

Registers (through discovery.client: heartbeats, re-register on 404, backoff), and while a
`--check` is given, only while it passes: a failing check deregisters, a passing one registers
again. With a command after `--`, runs it, forwards signals to it, and when it ends deregisters
and exits with its exit code. SIGTERM or SIGINT deregister first, then reach the command, which
is killed when it has not ended after `--grace` seconds. Every option is also a DISCOVERY_*
environment variable (lists comma-separated).

Exit codes: the command's (128 + N when a signal N ended it); without a command 0 after
SIGTERM/SIGINT; 2 for a bad option; 1 when the server refuses the registration itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from .client import DiscoveryClient, Port, Refused, Registration, Unavailable, tls_context
from .config import env_name
from .model import is_label, txt_problems

log = logging.getLogger("discovery.register")

FORWARDED = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH, signal.SIGQUIT)
STOPPING = (signal.SIGTERM, signal.SIGINT)


class OptionError(ValueError):
    """A bad option (exit code 2)."""


@dataclass(frozen=True)
class Check:
    """A health check: an HTTP(S) GET that must answer below 400, or a TCP connect."""

    url: str
    interval: float
    timeout: float

    @classmethod
    def parse(cls, url: str, interval: float, timeout: float) -> Check:
        parts = urlsplit(url)
        if parts.scheme in ("http", "https"):
            if not parts.hostname:
                raise OptionError(f"--check {url!r}: no host")
        elif parts.scheme == "tcp":
            if not parts.hostname or parts.port is None:
                raise OptionError(f"--check {url!r}: tcp://HOST:PORT")
        else:
            raise OptionError(f"--check {url!r}: must start with http://, https:// or tcp://")
        if interval <= 0 or timeout <= 0:
            raise OptionError("--check-interval and --check-timeout must be positive")
        return cls(url, interval, timeout)

    async def passes(self, session: aiohttp.ClientSession) -> tuple[bool, str]:
        """(passed, why): a check that hangs fails after the timeout."""
        parts = urlsplit(self.url)
        try:
            async with asyncio.timeout(self.timeout):
                if parts.scheme == "tcp":
                    assert parts.hostname is not None and parts.port is not None
                    _, writer = await asyncio.open_connection(parts.hostname, parts.port)
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
                    return True, "connected"
                async with session.get(self.url, allow_redirects=False) as response:
                    await response.read()
                    return response.status < 400, f"HTTP {response.status}"
        except TimeoutError:
            return False, f"no answer within {self.timeout:g} s"
        except (OSError, aiohttp.ClientError) as error:
            return False, str(error) or type(error).__name__


@dataclass(frozen=True)
class Options:
    servers: tuple[str, ...]
    namespace: str
    service: str
    instance: str
    address: str
    ports: tuple[Port, ...]
    ttl: int
    priority: int
    weight: int
    tags: tuple[str, ...]
    metadata: Mapping[str, str]
    check: Check | None
    grace: float
    token: str | None
    command: tuple[str, ...] = field(default=())
    tls: ssl.SSLContext | None = None


# flag, default, help (lists: comma-separated in the environment)
_FLAGS: list[tuple[str, Any, str]] = [
    ("--server", None, "server URL(s), comma-separated or repeated: calls fail over in turn"),
    ("--namespace", "default", "namespace of the service"),
    ("--service", None, "service name (required)"),
    ("--instance", None, "instance name (default: this host's name)"),
    ("--address", "auto", "address to register, or 'auto': the one routing to the server"),
    ("--port", None, "named port NAME:PORT[/PROTO]; may repeat"),
    ("--ttl", "15", "lease TTL in seconds (heartbeats every third)"),
    ("--priority", "0", "SRV priority"),
    ("--weight", "100", "SRV weight"),
    ("--tag", None, "tag; may repeat"),
    ("--metadata", None, "KEY=VALUE (DNS-SD TXT); may repeat"),
    ("--check", None, "health check: http://…, https://… (below 400 passes) or tcp://HOST:PORT"),
    ("--check-interval", None, "seconds between checks (default: a third of the TTL)"),
    ("--check-timeout", "2", "seconds a check may take before it counts as failing"),
    ("--grace", "10", "seconds the command has after SIGTERM before SIGKILL"),
    ("--token", None, "bearer token for the API"),
    ("--cacert", None, "CA bundle to trust for https:// servers (default: the system's)"),
    ("--cert", None, "client certificate (PEM) for servers that require one (mutual TLS)"),
    ("--key", None, "private key of --cert (PEM; default: in the --cert file)"),
    ("--log-level", "info", "debug, info, warning or error"),
]
_REPEATED = {"--server", "--port", "--tag", "--metadata"}


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        "register",
        help="keep an instance registered (a sidecar), optionally around a command",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for flag, default, text in _FLAGS:
        action = "append" if flag in _REPEATED else "store"
        shown = f"; default {default}" if default is not None else ""
        parser.add_argument(flag, action=action, default=None,
                            help=f"{text} [{env_name(flag)}{shown}]")  # fmt: skip
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND ARGS…")
    return parser


def _value(args: argparse.Namespace, environ: Mapping[str, str], flag: str) -> Any:
    attr = flag.lstrip("-").replace("-", "_")
    value = getattr(args, attr)
    if value is None:
        raw = environ.get(env_name(flag))
        if raw is not None:
            value = [v.strip() for v in raw.split(",") if v.strip()] if flag in _REPEATED else raw
    if value is None:
        default = next(d for f, d, _ in _FLAGS if f == flag)
        value = [] if flag in _REPEATED else default
    return value


def _number(flag: str, text: str, kind: Callable[[str], Any]) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise OptionError(f"{flag}: {text!r} is not a number") from None


def parse_port(text: str) -> Port:
    name, sep, rest = text.partition(":")
    number, _, protocol = rest.partition("/")
    if not sep or not is_label(name) or not number.isdigit() or not 1 <= int(number) <= 65535:
        raise OptionError(f"--port {text!r}: NAME:PORT[/PROTO], NAME a DNS label, PORT 1-65535")
    protocol = protocol or "tcp"
    if protocol not in ("tcp", "udp", "sctp"):
        raise OptionError(f"--port {text!r}: protocol must be tcp, udp or sctp")
    return Port(name, int(number), protocol)


def options_from(args: argparse.Namespace, environ: Mapping[str, str]) -> Options:
    def get(flag: str) -> Any:
        return _value(args, environ, flag)

    servers = tuple(s.strip().rstrip("/") for v in get("--server") for s in v.split(",") if s)
    if not servers:
        raise OptionError(f"--server (or {env_name('--server')}) is required")
    for url in servers:
        if not url.startswith(("http://", "https://")) or not urlsplit(url).hostname:
            raise OptionError(f"--server {url!r}: must be http://HOST[:PORT] or https://…")
    service = get("--service")
    if not service:
        raise OptionError(f"--service (or {env_name('--service')}) is required")
    instance = get("--instance") or socket.gethostname().split(".")[0].lower()
    for flag, value in (("--namespace", get("--namespace")), ("--service", service),
                        ("--instance", instance)):  # fmt: skip
        if not is_label(value):
            raise OptionError(f"{flag} {value!r}: must be a lower-case DNS label (RFC 1123)")
    ttl = _number("--ttl", get("--ttl"), int)
    if ttl < 1:
        raise OptionError("--ttl must be at least 1")
    metadata: dict[str, str] = {}
    for item in get("--metadata"):
        key, sep, value = item.partition("=")
        if not sep:
            raise OptionError(f"--metadata {item!r}: KEY=VALUE")
        metadata[key] = value
    if problems := txt_problems(metadata):
        raise OptionError("--metadata: " + "; ".join(problems))
    check = None
    if get("--check"):
        interval = get("--check-interval")
        check = Check.parse(
            get("--check"),
            _number("--check-interval", interval, float) if interval else ttl / 3,
            _number("--check-timeout", get("--check-timeout"), float),
        )
    address = get("--address")
    if address == "auto":
        address = auto_address(servers[0])
    else:
        try:
            address = ipaddress.ip_address(address).compressed
        except ValueError:
            raise OptionError(f"--address {address!r}: an IP address or 'auto'") from None
    command = tuple(args.argv or ())
    if command and command[0] == "--":
        command = command[1:]
    grace = _number("--grace", get("--grace"), float)
    return Options(
        servers=servers,
        namespace=get("--namespace"),
        service=service,
        instance=instance,
        address=address,
        ports=tuple(parse_port(p) for v in get("--port") for p in v.split(",") if p),
        ttl=ttl,
        priority=_number("--priority", get("--priority"), int),
        weight=_number("--weight", get("--weight"), int),
        tags=tuple(get("--tag")),
        metadata=metadata,
        check=check,
        grace=grace,
        token=get("--token"),
        command=command,
        tls=client_tls(get("--cacert"), get("--cert"), get("--key")),
    )


def client_tls(
    cafile: str | None, certfile: str | None, keyfile: str | None
) -> ssl.SSLContext | None:
    """--cacert, --cert and --key as a TLS context (None: aiohttp's defaults)."""
    if keyfile is not None and certfile is None:
        raise OptionError("--key needs --cert")
    try:
        return tls_context(cafile, certfile, keyfile)
    except (OSError, ssl.SSLError) as error:
        raise OptionError(f"--cacert/--cert/--key: {error}") from None


def auto_address(server: str) -> str:
    """The local address of the interface that routes to the server (a connected UDP
    socket sends nothing; the kernel picks the source address)."""
    parts = urlsplit(server)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as error:
        raise OptionError(f"--address auto: cannot resolve {host!r}: {error}") from None
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(sockaddr)
        except OSError as error:
            raise OptionError(f"--address auto: no route to {host}: {error}") from None
        return str(ipaddress.ip_address(probe.getsockname()[0].split("%")[0]))


class Sidecar:
    """One registration, gated by a check, around an optional command."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.client = DiscoveryClient(list(options.servers), token=options.token, ssl=options.tls)
        self.registration: Registration | None = None
        self.child: asyncio.subprocess.Process | None = None
        self.refused: Refused | None = None
        self._stop = asyncio.Event()
        self._stop_signal: int | None = None

    def _new_registration(self) -> Registration:
        o = self.options
        return self.client.registration(
            o.namespace, o.service, o.instance, address=o.address, ports=o.ports, ttl=o.ttl,
            priority=o.priority, weight=o.weight, tags=o.tags, metadata=o.metadata,
        )  # fmt: skip

    async def _register(self) -> None:
        if self.registration is not None:
            return
        # kept before it starts: a stop during the first register call still deregisters
        registration = self.registration = self._new_registration()
        try:
            await registration.start()
        except Refused as error:
            self.registration = None
            self.refused = error
            log.error("the server refuses the registration: %s", error)
            self._stop.set()
            return
        self.registration = registration

    async def _deregister(self) -> None:
        registration, self.registration = self.registration, None
        if registration is not None:
            await registration.stop()
            if registration.registrations:
                log.info("deregistered %s", self._name())

    def _name(self) -> str:
        o = self.options
        return f"{o.instance}.{o.service}.{o.namespace}"

    async def _gate(self) -> None:
        """Registered while the check passes (always, without a check)."""
        check = self.options.check
        if check is None:
            await self._register()
            return
        passing: bool | None = None
        timeout = aiohttp.ClientTimeout(total=check.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                ok, why = await check.passes(session)
                if ok != passing:
                    log.info("check %s %s (%s)", check.url, "passes" if ok else "fails", why)
                    passing = ok
                if ok:
                    await self._register()
                else:
                    await self._deregister()
                await asyncio.sleep(check.interval)

    def _on_signal(self, number: int) -> None:
        if number in STOPPING:
            if self._stop_signal is None:
                self._stop_signal = number
            self._stop.set()
        elif self.child is not None and self.child.returncode is None:
            self.child.send_signal(number)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for number in (*STOPPING, *FORWARDED):
            loop.add_signal_handler(number, self._on_signal, number)
        try:
            return await self._run()
        finally:
            for number in (*STOPPING, *FORWARDED):
                loop.remove_signal_handler(number)
            await self.client.close()

    async def _run(self) -> int:
        o = self.options
        log.info("registering %s at %s via %s", self._name(), o.address, ", ".join(o.servers))
        if o.command:
            try:
                self.child = await asyncio.create_subprocess_exec(*o.command)
            except OSError as error:
                log.error("cannot run %s: %s", o.command[0], error)
                return 127 if isinstance(error, FileNotFoundError) else 126
        gate = asyncio.create_task(self._gate(), name="gate")
        stop = asyncio.create_task(self._stop.wait(), name="stop")
        waits: set[asyncio.Future[Any]] = {gate, stop}
        exited = asyncio.create_task(self.child.wait()) if self.child else None
        if exited is not None:
            waits.add(exited)
        try:
            while True:
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if gate in done:
                    waits.discard(gate)
                    gate.result()  # a check loop never ends; _register returns
                    continue
                break
        finally:
            gate.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await gate
            stop.cancel()
        # deregister first: nothing is sent to a command that is on its way out
        await self._deregister()
        if self.child is None:
            return 1 if self.refused else 0
        assert exited is not None
        if not exited.done():
            self.child.send_signal(self._stop_signal or signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(exited), o.grace)
            except TimeoutError:
                log.warning("%s did not end %g s after the signal: killing it", o.command[0],
                            o.grace)  # fmt: skip
                self.child.kill()
            await exited
        code = self.child.returncode
        assert code is not None
        if self.refused and not self._stop_signal:
            return 1
        return 128 - code if code < 0 else code


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    environ = dict(os.environ)
    level = _value(args, environ, "--log-level")
    logging.basicConfig(
        level=getattr(logging, str(level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        options = options_from(args, environ)
    except OptionError as error:
        parser.error(str(error))
    try:
        return asyncio.run(Sidecar(options).run())
    except Unavailable as error:  # pragma: no cover - the client retries instead
        log.error("%s", error)
        return 1
