"""Access control for the HTTP API: the Host check (DNS rebinding), bearer tokens per
namespace (`--auth-file`, re-read on SIGHUP) and the TLS context of the listener.

The auth file holds only SHA-256 digests of the tokens:

    {"tokens": [{"name": "payments-ci", "sha256": "<64 hex>",
                 "namespaces": ["payments"], "rights": ["read", "write"]}]}

`"namespaces": ["*"]` covers every namespace; the right `admin` covers networks and every
namespace. A presented token is hashed and looked up by its digest: the lookup's timing can
only tell an attacker about the digest of a token they chose (SHA-256 is not invertible),
never about a stored token, and the one candidate found is confirmed with
hmac.compare_digest.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import hdrs, web

from .config import Config, ConfigError, env_name
from .metrics import Metrics

log = logging.getLogger(__name__)

RIGHTS = ("read", "write", "admin")
PROBLEM = "application/problem+json"
REALM = 'Bearer realm="discovery"'
# Paths anyone may read: probes, the API's own description, the dashboard's static files
# (the data they show comes from the API, with a token).
PUBLIC = frozenset({"/healthz", "/readyz", "/openapi.json", "/ui"})
PUBLIC_PREFIXES = ("/ui/",)
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


@dataclass(frozen=True, slots=True)
class Token:
    """One entry of the auth file (the token itself is never known, only its digest)."""

    name: str
    digest: bytes
    namespaces: frozenset[str]
    rights: frozenset[str]

    def may(self, right: str | None, namespace: str | None = None) -> bool:
        """`right` on `namespace` (None: any namespace; right None: any valid token)."""
        if right is None or "admin" in self.rights:
            return True
        if right not in self.rights or right == "admin":
            return False
        return namespace is None or "*" in self.namespaces or namespace in self.namespaces

    def may_read(self, namespace: str) -> bool:
        return self.may("read", namespace)


class Tokens:
    """The tokens of one auth file, by digest."""

    def __init__(self, tokens: Iterable[Token]) -> None:
        self.by_digest = {token.digest: token for token in tokens}

    def __len__(self) -> int:
        return len(self.by_digest)

    def find(self, presented: str) -> Token | None:
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        token = self.by_digest.get(digest)
        if token is None or not hmac.compare_digest(token.digest, digest):
            return None
        return token

    @classmethod
    def parse(cls, raw: bytes, path: str) -> Tokens:
        """The tokens of an auth file's text; ConfigError naming the entry that is wrong."""
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as error:
            raise ConfigError(f"auth file {path}: not JSON: {error}") from None
        if not isinstance(data, dict) or set(data) != {"tokens"}:
            raise ConfigError(f'auth file {path}: expected {{"tokens": [...]}}')
        entries = data["tokens"]
        if not isinstance(entries, list):
            raise ConfigError(f'auth file {path}: "tokens" must be a list')
        tokens: list[Token] = []
        seen: dict[bytes, str] = {}
        for number, entry in enumerate(entries):
            token = _token(entry, f"auth file {path}: token {number}")
            if token.digest in seen:
                raise ConfigError(
                    f"auth file {path}: tokens {seen[token.digest]!r} and {token.name!r}"
                    " have the same sha256"
                )
            seen[token.digest] = token.name
            tokens.append(token)
        return cls(tokens)


def _token(entry: Any, where: str) -> Token:
    fields = {"name", "sha256", "namespaces", "rights"}
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be an object with {', '.join(sorted(fields))}")
    if unknown := set(entry) - fields:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    if missing := fields - set(entry):
        raise ConfigError(f"{where}: missing {', '.join(sorted(missing))}")
    name, digest = entry["name"], entry["sha256"]
    namespaces, rights = entry["namespaces"], entry["rights"]
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: name must be a non-empty string")
    where = f"{where} ({name!r})"
    if not isinstance(digest, str) or re.fullmatch(r"[0-9a-fA-F]{64}", digest) is None:
        raise ConfigError(f'{where}: sha256 must be 64 hex digits (printf %s "$TOKEN" | sha256sum)')
    if (
        not isinstance(namespaces, list)
        or not namespaces
        or not all(isinstance(n, str) and (n == "*" or _LABEL.fullmatch(n)) for n in namespaces)
    ):
        raise ConfigError(f'{where}: namespaces must be a non-empty list of names or "*"')
    if (
        not isinstance(rights, list)
        or not rights
        or not all(isinstance(r, str) and r in RIGHTS for r in rights)
    ):
        raise ConfigError(f"{where}: rights must be a non-empty list of {', '.join(RIGHTS)}")
    return Token(name, bytes.fromhex(digest), frozenset(namespaces), frozenset(rights))


def read_tokens(path: str) -> tuple[Tokens, bytes]:
    try:
        with open(path, "rb") as file:
            raw = file.read(4 * 1024 * 1024 + 1)
    except OSError as error:
        raise ConfigError(f"cannot read auth file {path}: {error.strerror or error}") from None
    if len(raw) > 4 * 1024 * 1024:
        raise ConfigError(f"auth file {path} is larger than 4 MiB")
    return Tokens.parse(raw, path), raw


def server_tls(config: Config) -> ssl.SSLContext | None:
    """The API listener's TLS context (None: plain HTTP); ConfigError for unusable files."""
    if config.http_cert is None or config.http_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.http_cert, config.http_key)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(
            f"--http-cert {config.http_cert} / --http-key {config.http_key}: {error}"
        ) from None
    if config.http_client_ca is not None:
        try:
            context.load_verify_locations(cafile=config.http_client_ca)
        except (OSError, ssl.SSLError) as error:
            raise ConfigError(f"--http-client-ca {config.http_client_ca}: {error}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class ServerTLS:
    """The listener's TLS context, whose certificate, key and client CA SIGHUP re-reads.

    A listening socket keeps the context it was made with, so that one only picks the
    certificate: its SNI callback (which OpenSSL calls for every handshake, with or without
    SNI) hands each new connection the context loaded last. Connections already open keep
    theirs. A file that cannot be read keeps the context loaded before.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        listener = server_tls(config)
        self.current = listener
        self.listener = listener
        if listener is not None:
            listener.sni_callback = self._pick

    def _pick(self, connection: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        if self.current is not None and self.current is not self.listener:
            connection.context = self.current

    def reload(self) -> bool:
        if self.listener is None:
            return False
        try:
            context = server_tls(self.config)
        except ConfigError as error:
            log.error("%s; keeping the certificate loaded before", error)
            return False
        self.current = context
        log.info("TLS certificate %s loaded", self.config.http_cert)
        return True


def check_files(config: Config) -> None:
    """Read the auth file and the TLS files once, so a bad one is a bad option (exit 2)."""
    if config.auth_file is not None:
        read_tokens(config.auth_file)
    server_tls(config)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def warn_if_open(config: Config, address: tuple[str, int]) -> None:
    """Without an auth file anyone who reaches a non-loopback listener may write."""
    if config.auth_file is None and not is_loopback(address[0]):
        log.warning(
            "the HTTP API listens on %s without --auth-file: anyone who reaches it can "
            "register, overwrite and delete any instance (see README, Security)",
            address[0],
        )


def _host_of(header: str) -> str:
    """The host part of a Host header, lower case, without port or trailing dot."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rpartition(":")[0].rstrip(".") if ":" in header else header.rstrip(".")


class Access:
    """What the HTTP API checks before a handler runs, and its refusals' counts."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.tokens: Tokens | None = None
        self._raw = b""
        if config.auth_file is not None:
            self.tokens, self._raw = read_tokens(config.auth_file)
        self.any_host = "*" in config.http_allowed_hosts
        names = {h for h in config.http_allowed_hosts if not h.startswith("*")}
        names.add(socket.gethostname().lower())
        if not _is_address(config.http.host):  # a listener named by a host name
            names.add(config.http.host.lower().rstrip("."))
        self.names = frozenset(names)
        self.suffixes = tuple(h[1:] for h in config.http_allowed_hosts if h.startswith("*."))
        self._hosts: dict[str, bool] = {}  # Host header -> allowed

    def reload(self, quiet_if_unchanged: bool = False) -> bool:
        """Re-read the auth file (SIGHUP); a bad one keeps the tokens loaded before."""
        path = self.config.auth_file
        if path is None:
            if not quiet_if_unchanged:
                log.info("SIGHUP: no --auth-file to reload")
            return False
        try:
            tokens, raw = read_tokens(path)
        except ConfigError as error:
            log.error("%s; keeping the %d tokens loaded before", error, len(self.tokens or ()))
            return False
        if raw == self._raw and quiet_if_unchanged:
            return True
        self.tokens, self._raw = tokens, raw
        log.info("auth file %s loaded: %d tokens", path, len(tokens))
        return True

    def host_allowed(self, header: str | None) -> bool:
        """Host names a browser could have been lured to (DNS rebinding) are refused; an
        address cannot be rebound, and a client without Host is no browser."""
        if not header or self.any_host:
            return True
        # a client sends one Host on every request: decided once (parsing an address costs
        # more than the rest of this middleware), a bounded memo of what was seen
        allowed = self._hosts.get(header)
        if allowed is None:
            allowed = self._host_allowed(header)
            if len(self._hosts) >= 1024:
                self._hosts.clear()
            self._hosts[header] = allowed
        return allowed

    def _host_allowed(self, header: str) -> bool:
        host = _host_of(header)
        if _is_address(host) or host == "localhost" or host.endswith(".localhost"):
            return True
        return host in self.names or host.endswith(self.suffixes)

    def refuse(
        self, reason: str, status: int, title: str, detail: str, **headers: str
    ) -> web.Response:
        self.metrics.http_refused.labels(reason=reason).inc()
        body = {"title": title, "status": status, "detail": detail}
        return web.json_response(body, status=status, content_type=PROBLEM, headers=headers)


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


ACCESS = web.AppKey("access", Access)


def _requirement(request: web.Request) -> tuple[str | None, str | None]:
    """(right, namespace) a request needs; (None, None): any valid token."""
    path = request.path
    if path == "/v1/networks" or path.startswith("/v1/networks/"):
        return "admin", None
    namespace = request.match_info.get("ns")
    if namespace is not None:
        right = "read" if request.method in ("GET", "HEAD") else "write"
        return right, namespace
    return None, None


def _public(request: web.Request, access: Access) -> bool:
    path = request.path
    if path in PUBLIC or path.startswith(PUBLIC_PREFIXES):
        return True
    return path == "/metrics" and not access.config.auth_metrics


@web.middleware
async def access_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    access = request.app.get(ACCESS)
    if access is None:
        return await handler(request)
    if not access.host_allowed(request.headers.get(hdrs.HOST)):
        return access.refuse(
            "host",
            421,
            "Misdirected request",
            f"this server does not answer to the host name in Host; if it is this server's, "
            f"add it with --http-allowed-hosts ({env_name('--http-allowed-hosts')})",
        )
    tokens = access.tokens
    if tokens is None or _public(request, access):
        return await handler(request)
    token = _bearer(request, tokens)
    if token is None:
        presented = hdrs.AUTHORIZATION in request.headers
        return access.refuse(
            "unauthenticated",
            401,
            "Unauthorized",
            "this token is not valid" if presented else "send Authorization: Bearer <token>",
            **{hdrs.WWW_AUTHENTICATE: REALM + (', error="invalid_token"' if presented else "")},
        )
    right, namespace = _requirement(request)
    if not token.may(right, namespace):
        where = f" on namespace {namespace!r}" if namespace is not None else ""
        return access.refuse(
            "forbidden",
            403,
            "Forbidden",
            f"token {token.name!r} does not have the right {right!r}{where}",
            **{hdrs.WWW_AUTHENTICATE: REALM + ', error="insufficient_scope"'},
        )
    return await handler(request)


def _bearer(request: web.Request, tokens: Tokens) -> Token | None:
    scheme, _, credentials = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    return tokens.find(credentials.strip()) if scheme.lower() == "bearer" else None


def readable(request: web.Request) -> Callable[[str], bool]:
    """Whether the request may read a namespace (listings show only those). The middleware
    let the request through, so its token is valid (looked up again: hashing is cheap)."""
    access = request.app.get(ACCESS)
    if access is None or access.tokens is None:
        return _anything
    token = _bearer(request, access.tokens)
    return token.may_read if token is not None else _nothing


def writable(request: web.Request) -> Callable[[str], bool]:
    """Whether the request may write a namespace: for calls that name their namespaces in the
    body (POST /v1/heartbeats), which the middleware cannot check."""
    access = request.app.get(ACCESS)
    if access is None or access.tokens is None:
        return _anything
    token = _bearer(request, access.tokens)
    return (lambda namespace: token.may("write", namespace)) if token is not None else _nothing


def _anything(namespace: str) -> bool:
    return True


def _nothing(namespace: str) -> bool:
    return False
