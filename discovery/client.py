"""The Python client: register with heartbeats, list and watch a service, pick an SRV target.

    async with DiscoveryClient(["http://10.0.0.5:8080", "http://10.0.0.6:8080"]) as client:
        async with client.registration("default", "web", "web-1", address="10.1.2.3",
                                       ports=[("http", 8080)], ttl=15) as reg:
            ...  # reg.healthy says whether the last heartbeat reached a server
        async for instances in client.watch("default", "web"):
            ...

Every call goes to the server that answered last and fails over to the next URL when that one
cannot be reached (connection refused or reset, a timeout, 502/503/504). `SyncClient` wraps the
same calls for scripts, on an event loop of its own in a background thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json as jsonlib
import logging
import random
import ssl
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp

from .model import txt_problems

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0  # seconds for one request to one server
WATCH_WAIT = 60.0  # seconds one long poll may block on the server
BACKOFF_FIRST = 0.05  # seconds before the first retry while no server answers
BACKOFF_CAP = 2.0  # never wait longer than this between retries (or a heartbeat interval)
HEARTBEAT_BATCH = 256  # the most heartbeats in one POST /v1/heartbeats (the server's limit)
BATCH_WINDOW = 0.05  # seconds a due heartbeat waits for others to share its call
BATCH_RETRY = 300.0  # seconds before a server that lacked the batch route is asked again
HEARTBEAT_CONNECTIONS = 4  # per server, for heartbeats only (a batch call takes milliseconds)
_RETRY_STATUS = (502, 503, 504)


class DiscoveryError(Exception):
    """Base class of every error the client raises."""


class Unavailable(DiscoveryError):
    """No server answered (every URL refused, timed out or answered 502/503/504)."""


class Refused(DiscoveryError):
    """A server answered with a client error (4xx): the request itself is wrong."""

    def __init__(self, status: int, title: str, detail: str, errors: list[Any] | None = None):
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = errors or []


@dataclass(frozen=True, slots=True)
class Port:
    name: str
    port: int
    protocol: str = "tcp"


@dataclass(frozen=True, slots=True)
class Instance:
    """A live instance as the server lists it."""

    namespace: str
    service: str
    name: str
    address: str
    ports: tuple[Port, ...] = ()
    priority: int = 0
    weight: int = 100
    tags: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)
    ttl: int = 30

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Instance:
        return cls(
            namespace=body["namespace"],
            service=body["service"],
            name=body["name"],
            address=body["address"],
            ports=tuple(
                Port(p["name"], p["port"], p.get("protocol", "tcp")) for p in body.get("ports", ())
            ),
            priority=body.get("priority", 0),
            weight=body.get("weight", 100),
            tags=tuple(body.get("tags", ())),
            metadata=dict(body.get("metadata", {})),
            ttl=body.get("ttl", 30),
        )


PortLike = Port | tuple[str, int] | tuple[str, int, str]


def _port(value: PortLike) -> dict[str, Any]:
    if isinstance(value, Port):
        return {"name": value.name, "port": value.port, "protocol": value.protocol}
    if len(value) == 2:
        return {"name": value[0], "port": value[1], "protocol": "tcp"}
    return {"name": value[0], "port": value[1], "protocol": value[2]}


def backoff(attempt: int, cap: float = BACKOFF_CAP) -> float:
    """Seconds to wait before retry number `attempt` (0, 1, …): capped exponential growth with
    jitter, so that many clients cut off together do not come back in step."""
    ceiling = min(cap, BACKOFF_FIRST * 2 ** min(attempt, 30))
    return random.uniform(ceiling / 2, ceiling)


def tls_context(
    cafile: str | None = None, certfile: str | None = None, keyfile: str | None = None
) -> ssl.SSLContext | None:
    """TLS for https:// servers: a CA bundle to trust (default: the system's) and a client
    certificate for a server that requires one (mutual TLS); None when nothing is given."""
    if cafile is None and certfile is None:
        return None
    context = ssl.create_default_context(cafile=cafile)
    if certfile is not None:
        context.load_cert_chain(certfile, keyfile)
    return context


class DiscoveryClient:
    """An asyncio client of one or more discovery servers (replicas of one registry)."""

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        connections: int = 64,
        heartbeat_batch: int = HEARTBEAT_BATCH,
        session: aiohttp.ClientSession | None = None,
        ssl: ssl.SSLContext | None = None,
    ) -> None:
        """`connections`: the most connections open to one server at once (a call waits for
        one, and the wait counts against its timeout; deregistrations go `connections` at a
        time, each timed from when it is sent). `heartbeat_batch`: the most heartbeats
        of this client's registrations sent in one call (1: one call each). `ssl`: for https://
        servers with a private CA or mutual TLS (see tls_context)."""
        if not 1 <= heartbeat_batch <= HEARTBEAT_BATCH:
            raise ValueError(f"heartbeat_batch must be between 1 and {HEARTBEAT_BATCH}")
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("at least one server URL is needed")
        self.urls = [url.rstrip("/") for url in self.urls]
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r}: a server URL starts with http:// or https://")
        self.timeout = timeout
        self.connections = connections
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._ssl = ssl
        self._session = session
        self._heartbeat_session: aiohttp.ClientSession | None = None
        self._own_session = session is None
        self._current = 0  # the URL that answered last
        self.closed = False
        self.heartbeats = _Heartbeats(self, heartbeat_batch)
        # registrations stopped together (a process exiting) deregister `connections` at a
        # time: a DELETE's timeout then counts from when it can be sent, not while it waits
        # for a connection behind thousands of others
        self.deregistering = asyncio.Semaphore(connections)

    async def __aenter__(self) -> DiscoveryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connections; registrations still open stop heartbeating (their leases
        expire: stop them first to deregister)."""
        self.closed = True
        self.heartbeats.close()
        if self._own_session and self._session is not None:
            await self._session.close()
        if self._heartbeat_session is not None:
            await self._heartbeat_session.close()
        self._session = self._heartbeat_session = None

    @property
    def url(self) -> str:
        """The server URL calls go to first."""
        return self.urls[self._current]

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            # one connection pool for every registration of this process
            connector = aiohttp.TCPConnector(
                limit=max(256, self.connections),
                limit_per_host=self.connections,
                ssl=self._ssl if self._ssl is not None else True,
            )
            self._session = aiohttp.ClientSession(connector=connector, headers=self._headers)
        return self._session

    def _heartbeat_http(self) -> aiohttp.ClientSession:
        """Connections of their own for heartbeats: thousands of registrations being opened,
        or long polls, queue for the main pool, and a heartbeat behind them could come too
        late for its lease."""
        if not self._own_session:
            return self._http()
        if self._heartbeat_session is None:
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=HEARTBEAT_CONNECTIONS)
            self._heartbeat_session = aiohttp.ClientSession(
                connector=connector, headers=self._headers
            )
        return self._heartbeat_session

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        timeout: float | None = None,
        heartbeat: bool = False,
    ) -> tuple[int, Any, Mapping[str, str]]:
        """One call, failing over between the URLs: (status, JSON body or None, headers).
        `heartbeat`: on the connections kept for heartbeats.

        Raises Unavailable when no server answered and Refused for a 4xx other than 404 (the
        callers decide what a 404 means)."""
        if self.closed:
            raise DiscoveryError("the client is closed")
        session = self._heartbeat_http() if heartbeat else self._http()
        limit = aiohttp.ClientTimeout(total=timeout or self.timeout)
        errors = []
        start = self._current
        for step in range(len(self.urls)):
            index = (start + step) % len(self.urls)
            url = self.urls[index] + path
            try:
                async with session.request(
                    method, url, json=json, params=params, timeout=limit, headers=self._headers
                ) as response:
                    raw = await response.read()
                    status = response.status
                    headers = response.headers
            except (aiohttp.ClientError, TimeoutError, OSError) as error:
                if self.closed:
                    raise DiscoveryError("the client is closed") from None
                errors.append(f"{self.urls[index]}: {_describe(error)}")
                continue
            except RuntimeError:
                if self.closed:  # closed under a call in flight
                    raise DiscoveryError("the client is closed") from None
                raise
            body: Any = None
            if raw:
                try:
                    body = jsonlib.loads(raw)
                except ValueError:
                    body = None
            if status in _RETRY_STATUS:
                detail = body.get("detail") if isinstance(body, dict) else None
                errors.append(f"{self.urls[index]}: {status} {detail or ''}".rstrip())
                continue
            self._current = index
            if 400 <= status < 500 and status != 404:
                problem = body if isinstance(body, dict) else {}
                raise Refused(
                    status,
                    str(problem.get("title", "Refused")),
                    str(problem.get("detail", raw[:200].decode(errors="replace"))),
                    problem.get("errors"),
                )
            if status >= 500:
                raise Unavailable(f"{self.urls[index]}: {status}")
            return status, body, headers
        # every server failed: start with the next one next time
        self._current = (start + 1) % len(self.urls)
        raise Unavailable("no server answered: " + "; ".join(errors))

    # registration

    async def register(
        self,
        namespace: str,
        service: str,
        instance: str,
        *,
        address: str,
        ports: Sequence[PortLike] = (),
        ttl: int = 30,
        priority: int = 0,
        weight: int = 100,
        tags: Sequence[str] = (),
        metadata: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Register (or update) an instance once: the stored instance with its lease."""
        body = _registration_body(address, ports, ttl, priority, weight, tags, metadata or {})
        status, data, _ = await self.request(
            "PUT", _instance_path(namespace, service, instance), json=body
        )
        if status not in (200, 201):
            raise DiscoveryError(f"register answered {status}")
        result: dict[str, Any] = data
        return result

    async def heartbeat(self, namespace: str, service: str, instance: str) -> bool:
        """Renew the instance's lease; False when the server no longer knows it (404)."""
        path = _instance_path(namespace, service, instance) + "/heartbeat"
        status, _, _ = await self.request("PUT", path)
        return status == 200

    async def deregister(self, namespace: str, service: str, instance: str) -> bool:
        """Remove the instance now; False when it was not registered."""
        status, _, _ = await self.request("DELETE", _instance_path(namespace, service, instance))
        return status == 204

    def registration(
        self,
        namespace: str,
        service: str,
        instance: str,
        *,
        address: str,
        ports: Sequence[PortLike] = (),
        ttl: int = 30,
        priority: int = 0,
        weight: int = 100,
        tags: Sequence[str] = (),
        metadata: Mapping[str, str] | None = None,
    ) -> Registration:
        """An async context manager that keeps the instance registered while it is open."""
        body = _registration_body(address, ports, ttl, priority, weight, tags, metadata or {})
        return Registration(self, namespace, service, instance, body)

    # reading

    async def instances(self, namespace: str, service: str) -> list[Instance]:
        """The live instances of a service, in name order."""
        instances, _ = await self._service(namespace, service, None, 0.0)
        return instances

    async def _service(
        self, namespace: str, service: str, index: int | None, wait: float
    ) -> tuple[list[Instance], int]:
        params = {}
        if index is not None:
            params = {"index": str(index), "wait": f"{wait:g}s"}
        instances: list[Instance] = []
        revision = None
        while True:  # page by page (`next`); the first one may be a long poll
            status, body, headers = await self.request(
                "GET",
                f"/v1/services/{_q(namespace)}/{_q(service)}",
                params=params,
                timeout=wait + self.timeout,
            )
            if status != 200 or not isinstance(body, dict):
                raise DiscoveryError(f"listing {service}.{namespace} answered {status}")
            instances.extend(Instance.from_json(item) for item in body.get("instances", ()))
            if revision is None:  # a change between pages: the next poll returns at once
                revision = int(headers.get("X-Discovery-Index", "0"))
            after = body.get("next")
            if not isinstance(after, str):
                return instances, revision
            params = {"after": after, "limit": "5000"}

    async def watch(
        self, namespace: str, service: str, *, wait: float = WATCH_WAIT
    ) -> AsyncIterator[list[Instance]]:
        """Each new set of live instances, starting with the current one (long polls).

        Survives server restarts and replica switches: after any failure the next poll asks
        without an index, so a replica whose revision is behind (or restarted from zero)
        answers at once; a set equal to the last one yielded is not yielded again."""
        index: int | None = None
        last: list[Instance] | None = None
        attempt = 0
        while True:
            try:
                instances, revision = await self._service(namespace, service, index, wait)
            except Unavailable as error:
                log.debug("watch %s.%s: %s", service, namespace, error)
                index = None
                await asyncio.sleep(backoff(attempt))
                attempt += 1
                continue
            attempt = 0
            if index is not None and revision < index:
                index = None  # a server that starts again from revision 0: ask afresh
            else:
                index = revision
            if instances != last:
                last = instances
                yield instances


class Registration:
    """Keeps one instance registered: heartbeats at a third of the TTL, registers again after a
    404 (the lease was lost: server restart, store outage, expiry), backs off with jitter while
    no server answers, and deregisters on exit (also when the task is cancelled).

    `healthy` is True while the last register or heartbeat reached a server and succeeded.
    """

    def __init__(
        self,
        client: DiscoveryClient,
        namespace: str,
        service: str,
        instance: str,
        body: dict[str, Any],
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.service = service
        self.instance = instance
        self.body = body
        self.ttl: int = body["ttl"]
        self.interval = self.ttl / 3
        self.healthy = False
        self.registrations = 0  # successful register calls (the first and every re-register)
        self.heartbeats = 0  # successful heartbeats
        self.missed = 0  # gaps between successful heartbeats over two intervals
        self.max_gap = 0.0  # the longest such gap, in seconds
        self.lease: str | None = None
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._path = _instance_path(namespace, service, instance)
        self._healthy_event = asyncio.Event()
        self._closed = False
        self._sent = False  # a register call went out (it may have landed)

    async def __aenter__(self) -> Registration:
        await self.start()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self, *, wait: bool = True) -> None:
        """Register once (raising Refused when the server refuses the registration itself),
        then keep it alive in a background task. When no server answers, the task keeps
        trying with backoff; `wait=False` does not even try before returning."""
        if wait:
            try:
                await self._register()
            except Unavailable as error:
                self._unhealthy(error)
            except asyncio.CancelledError:
                await self.stop()  # the register call may have landed: take it back
                raise
        self._task = asyncio.create_task(self._keep(), name=f"registration {self._path}")

    async def stop(self, *, deregister: bool = True) -> None:
        """Stop heartbeating and (unless told otherwise) deregister at once."""
        if self._closed:
            return
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if deregister and (self.registrations or self._sent):
            try:
                async with self.client.deregistering:
                    await self.client.request("DELETE", self._path, timeout=min(5.0, self.interval))
            except DiscoveryError as error:
                log.warning(
                    "could not deregister %s (its lease will expire): %s", self._path, error
                )
        self.healthy = False

    async def wait_healthy(self, timeout: float | None = None) -> None:
        """Until a register or heartbeat has succeeded (raises TimeoutError)."""
        async with asyncio.timeout(timeout):
            await self._healthy_event.wait()

    async def _register(self) -> None:
        self._sent = True
        status, data, _ = await self.client.request("PUT", self._path, json=self.body)
        if status not in (200, 201):
            raise Unavailable(f"register answered {status}")
        self.lease = data.get("lease", {}).get("id") if isinstance(data, dict) else None
        self.registrations += 1
        self._ok()

    def _ok(self) -> None:
        if not self.healthy:
            log.info("%s registered (lease %s)", self._path, self.lease)
        self.healthy = True
        self.last_error = None
        self._healthy_event.set()

    def _unhealthy(self, error: BaseException) -> None:
        if self.healthy or self.last_error is None:
            log.warning("%s: %s; retrying", self._path, error)
        self.healthy = False
        self.last_error = str(error)
        self._healthy_event.clear()

    async def _keep(self) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        last_ok = loop.time() if self.healthy else None
        while True:
            if self.healthy:
                delay = self.interval
                if last_ok is not None:
                    delay = max(0.0, last_ok + self.interval - loop.time())
            else:
                delay = backoff(attempt, min(BACKOFF_CAP, self.interval))
                attempt += 1
            await asyncio.sleep(delay)
            try:
                if self.registrations == 0:
                    await self._register()
                else:
                    renewed = await self.client.heartbeats.beat(
                        self.namespace, self.service, self.instance
                    )
                    if not renewed:  # 404: the lease is gone: register again at once
                        log.info("%s: lease lost; registering again", self._path)
                        await self._register()
                    else:
                        if last_ok is not None:
                            gap = loop.time() - last_ok
                            self.max_gap = max(self.max_gap, gap)
                            if gap > 2 * self.interval:
                                self.missed += 1
                        self.heartbeats += 1
                        self._ok()
            except Unavailable as error:
                self._unhealthy(error)
                continue
            except Refused as error:
                # the server refuses what it took before (e.g. new limits): keep trying
                self._unhealthy(error)
                continue
            except DiscoveryError as error:
                if self.client.closed:
                    self._unhealthy(error)
                    return
                raise
            attempt = 0
            last_ok = loop.time()


class _Heartbeats:
    """Coalesces the due heartbeats of a client's registrations into `POST /v1/heartbeats`
    calls: the first due one waits BATCH_WINDOW for others (or until the batch is full),
    then one call renews them all and answers each. A server without the route (404 or 405
    on it) gets one `PUT …/heartbeat` per registration instead, until BATCH_RETRY has
    passed; a 413 (a body too large for a proxy on the way) halves the batch size."""

    def __init__(self, client: DiscoveryClient, size: int) -> None:
        self.client = client
        self.size = size
        self.calls = 0  # POST /v1/heartbeats calls sent
        self._single_until = float("inf") if size == 1 else 0.0  # loop time
        self._pending: list[tuple[dict[str, str], asyncio.Future[bool]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()

    async def beat(self, namespace: str, service: str, instance: str) -> bool:
        """Renew one registration's lease: True when renewed, False when the server no longer
        knows it (404). Raises Unavailable or Refused as a single call would."""
        loop = asyncio.get_running_loop()
        if loop.time() < self._single_until:
            path = _instance_path(namespace, service, instance) + "/heartbeat"
            status, _, _ = await self.client.request("PUT", path, heartbeat=True)
            return status != 404
        future: asyncio.Future[bool] = loop.create_future()
        self._pending.append(
            ({"namespace": namespace, "service": service, "instance": instance}, future)
        )
        if len(self._pending) >= self.size:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(BATCH_WINDOW, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.create_task(self._send(batch), name="heartbeats")
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[dict[str, str], asyncio.Future[bool]]]) -> None:
        try:
            await self._renew(batch)
        except DiscoveryError as error:  # every one of them failed alike
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)

    async def _renew(self, batch: list[tuple[dict[str, str], asyncio.Future[bool]]]) -> None:
        if self.closed:
            raise DiscoveryError("the client is closed")
        body = {"instances": [ref for ref, _ in batch]}
        self.calls += 1
        try:
            status, answer, _ = await self._post(body)
        except Refused as error:
            if error.status == 405:
                return await self._singly(batch)
            if error.status == 413 and len(batch) > 1:  # e.g. a proxy's body size limit
                self.size = max(1, len(batch) // 2)
                half = len(batch) // 2
                await asyncio.gather(self._renew(batch[:half]), self._renew(batch[half:]))
                return
            raise
        if status == 404:
            return await self._singly(batch)
        results = answer.get("results") if isinstance(answer, dict) else None
        if status != 200 or not isinstance(results, list) or len(results) != len(batch):
            raise Unavailable(f"POST /v1/heartbeats answered {status} without a result each")
        for (_, future), result in zip(batch, results, strict=True):
            code = result.get("status") if isinstance(result, dict) else None
            if future.done():
                continue
            if code in (200, 404):
                future.set_result(code == 200)
            else:
                future.set_exception(Unavailable(f"heartbeat answered {code}"))

    async def _post(self, body: dict[str, Any]) -> tuple[int, Any, Mapping[str, str]]:
        return await self.client.request("POST", "/v1/heartbeats", json=body, heartbeat=True)

    async def _singly(self, batch: list[tuple[dict[str, str], asyncio.Future[bool]]]) -> None:
        """A server without the batch route: one call per heartbeat, for a while."""
        log.info("the server has no POST /v1/heartbeats: one call per heartbeat")
        self._single_until = asyncio.get_running_loop().time() + BATCH_RETRY

        async def one(ref: dict[str, str], future: asyncio.Future[bool]) -> None:
            path = _instance_path(ref["namespace"], ref["service"], ref["instance"])
            try:
                status, _, _ = await self.client.request("PUT", path + "/heartbeat", heartbeat=True)
            except DiscoveryError as error:
                if not future.done():
                    future.set_exception(error)
                return
            if not future.done():
                future.set_result(status != 404)

        await asyncio.gather(*(one(ref, future) for ref, future in batch))

    @property
    def closed(self) -> bool:
        return self.client.closed

    def close(self) -> None:
        """Fail the heartbeats still waiting for their call (the calls in flight fail on
        their own as the connections close)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        for _, future in batch:
            if not future.done():
                future.set_exception(DiscoveryError("the client is closed"))


def _registration_body(
    address: str,
    ports: Sequence[PortLike],
    ttl: int,
    priority: int,
    weight: int,
    tags: Sequence[str],
    metadata: Mapping[str, str],
) -> dict[str, Any]:
    problems = txt_problems(metadata)
    if problems:
        raise ValueError("metadata cannot be served as DNS-SD TXT: " + "; ".join(problems))
    if ttl < 1:
        raise ValueError("ttl must be at least 1 second")
    return {
        "address": address,
        "ports": [_port(p) for p in ports],
        "ttl": ttl,
        "priority": priority,
        "weight": weight,
        "tags": list(tags),
        "metadata": dict(metadata),
    }


def _q(label: str) -> str:
    return quote(label, safe="")


def _instance_path(namespace: str, service: str, instance: str) -> str:
    return f"/v1/services/{_q(namespace)}/{_q(service)}/instances/{_q(instance)}"


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    return str(error) or type(error).__name__


# SRV selection (RFC 2782)


@dataclass(frozen=True, slots=True)
class Target:
    """Where to connect: the SRV target's host name and port (and its address when the answer
    carried it as glue)."""

    host: str
    port: int
    priority: int = 0
    weight: int = 0
    address: str | None = None


def pick(targets: Sequence[Target], rng: random.Random | None = None) -> Target:
    """One target by RFC 2782: the lowest priority wins; among those, a weighted random
    choice (weight 0 is chosen only rarely, when every other weight is 0 as well it is an
    even choice)."""
    if not targets:
        raise ValueError("no SRV targets to pick from")
    chooser = rng or random
    best = min(t.priority for t in targets)
    group = [t for t in targets if t.priority == best]
    # RFC 2782: zero weights first, then a running sum; pick the first whose sum reaches a
    # uniform random number in [0, total].
    group.sort(key=lambda t: t.weight != 0)
    total = sum(t.weight for t in group)
    if total == 0:
        return chooser.choice(group)
    point = chooser.randint(0, total)
    running = 0
    for target in group:
        running += target.weight
        if running >= point:
            return target
    return group[-1]  # pragma: no cover - running reaches total


async def srv_targets(
    name: str, *, nameserver: str | None = None, port: int = 53, lifetime: float = 5.0
) -> list[Target]:
    """Every SRV record of name, through dnspython's async resolver (the system resolver
    unless nameserver is given)."""
    import dns.asyncresolver
    import dns.rdatatype
    import dns.resolver

    resolver = dns.asyncresolver.Resolver(configure=nameserver is None)
    if nameserver is not None:
        resolver.nameservers = [nameserver]
        resolver.port = port
    try:
        answer = await resolver.resolve(name, "SRV", lifetime=lifetime, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    glue: dict[str, str] = {}
    for rrset in answer.response.additional:
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            for record in rrset:
                glue.setdefault(rrset.name.to_text(omit_final_dot=True).lower(), record.address)
    targets = []
    for record in answer:
        host = record.target.to_text(omit_final_dot=True)
        targets.append(
            Target(host, record.port, record.priority, record.weight, glue.get(host.lower()))
        )
    return targets


async def resolve(
    name: str, *, nameserver: str | None = None, port: int = 53, rng: random.Random | None = None
) -> Target:
    """One host and port for an SRV name (`_http._tcp.web.default.svc.cluster.local`), picked
    by priority and weight. Raises LookupError when the name has no SRV records."""
    targets = await srv_targets(name, nameserver=nameserver, port=port)
    if not targets:
        raise LookupError(f"{name}: no SRV records")
    return pick(targets, rng)


# the synchronous wrapper


class SyncClient:
    """The same calls for scripts without asyncio: an event loop in a daemon thread."""

    def __init__(self, urls: str | Sequence[str], **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="discovery-client"
        )
        self._thread.start()
        self._client: DiscoveryClient = self._run(self._make(urls, kwargs))

    @staticmethod
    async def _make(urls: str | Sequence[str], kwargs: dict[str, Any]) -> DiscoveryClient:
        return DiscoveryClient(urls, **kwargs)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def instances(self, namespace: str, service: str) -> list[Instance]:
        return self._run(self._client.instances(namespace, service))

    def register(
        self, namespace: str, service: str, instance: str, **kwargs: Any
    ) -> dict[str, Any]:
        return self._run(self._client.register(namespace, service, instance, **kwargs))

    def deregister(self, namespace: str, service: str, instance: str) -> bool:
        return self._run(self._client.deregister(namespace, service, instance))

    def resolve(self, name: str, **kwargs: Any) -> Target:
        return self._run(resolve(name, **kwargs))

    @contextlib.contextmanager
    def registration(
        self, namespace: str, service: str, instance: str, **kwargs: Any
    ) -> Iterator[Registration]:
        """Registered while the block runs; heartbeats run in the client's thread."""

        async def make() -> Registration:
            return self._client.registration(namespace, service, instance, **kwargs)

        registration = self._run(make())
        self._run(registration.start())
        try:
            yield registration
        finally:
            self._run(registration.stop())
