"""The registration API: an aiohttp app factory, its routes, and problem+json errors."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from multidict import MultiDict
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from .auth import access_middleware, readable, writable
from .config import Config
from .http_server import when_gone
from .metrics import Metrics
from .model import (
    Instance,
    InstanceKey,
    Registration,
    Spec,
    address_problem,
    decode_registration,
    encode_registration,
    is_label,
    name_problems,
    txt_problems,
)
from .net.ipam import Ipam
from .net.overlay import Overlay
from .openapi import openapi_document
from .registry import Registry
from .store.base import LeaseNotFound, Store, StoreUnavailable

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
MAX_WAIT = 600.0
DEFAULT_WAIT = 300.0
RETRY_AFTER = "2"
LONG_POLL_RETRY_AFTER = "5"
PAGE = 500  # entries of a listing page when ?limit= is not given
MAX_PAGE = 5000
WRITE_VISIBLE_WAIT = 1.0  # seconds a write waits for this replica's cache to show it
PROBLEM = "application/problem+json"
CLIENT_CLOSED = 499  # the status counted for a request whose client left before the answer


@dataclass(frozen=True)
class Context:
    config: Config
    store: Store
    registry: Registry
    metrics: Metrics
    ipam: Ipam | None = None
    overlay: Overlay | None = None
    long_polls: dict[str, int] = field(default_factory=dict)  # parked long polls per client


CONTEXT = web.AppKey("context", Context)


class Problem(Exception):
    """An error answered as application/problem+json (RFC 9457)."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}

    def response(self) -> web.Response:
        body: dict[str, Any] = {"title": self.title, "status": self.status, "detail": self.detail}
        if self.errors:
            body["errors"] = self.errors
        return web.json_response(
            body, status=self.status, content_type=PROBLEM, headers=self.headers
        )


def invalid(errors: list[dict[str, str]]) -> Problem:
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return Problem(400, "Invalid request", detail, errors)


@web.middleware
async def problem_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    metrics = request.app[CONTEXT].metrics
    route = request.match_info.route.resource
    route_name = route.canonical if route is not None else "unmatched"
    started = time.perf_counter()
    try:
        response = await handler(request)
    except Problem as problem:
        response = problem.response()
    except StoreUnavailable as error:
        metrics.store_errors.inc()
        response = Problem(
            503,
            "Store unavailable",
            str(error) or "the store did not answer",
            headers={"Retry-After": RETRY_AFTER},
        ).response()
    except web.HTTPException as error:
        if error.status < 400:
            raise
        title = error.reason
        detail = (
            error.text if error.text and not error.text.startswith(str(error.status)) else title
        )
        response = Problem(error.status, title, detail, headers=_allow(error)).response()
    except ConnectionResetError:
        if request.transport is not None and not request.transport.is_closing():
            raise  # not the client's: the generic case below is for our own failures
        # The client went away mid-request (mid-body, most often): nothing to answer, no
        # error of ours. Counted as 499, nginx's "client closed request".
        log.debug("client %s closed the connection: %s %s", request.remote, request.method,
                  request.path)  # fmt: skip
        response = web.Response(status=CLIENT_CLOSED)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        response = Problem(500, "Internal error", "the server failed; see its log").response()
    metrics.http_request(request.method, route_name, response.status, time.perf_counter() - started)
    return response


def _allow(error: web.HTTPException) -> dict[str, str]:
    allow = error.headers.get("Allow")
    return {"Allow": allow} if allow else {}


def _key(request: web.Request, with_instance: bool = True) -> InstanceKey:
    info = request.match_info
    namespace, service = info["ns"], info["svc"]
    name = info["inst"] if with_instance else ""
    if is_label(namespace) and is_label(service) and (not with_instance or is_label(name)):
        return InstanceKey(namespace, service, name)
    parts = {"namespace": namespace, "service": service}
    if with_instance:
        parts["name"] = name
    errors = [
        {"field": field, "message": "must be a lower-case DNS label (RFC 1123), 1-63 characters"}
        for field, value in parts.items()
        if not is_label(value)
    ]
    if errors:
        raise invalid(errors)
    return InstanceKey(parts["namespace"], parts["service"], parts.get("name", ""))


async def read_body(request: web.Request) -> bytes:
    """The request's body, whole within --http-body-timeout (else 408, and the connection
    closes) and at most MAX_BODY bytes (else 413)."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise Problem(413, "Request body too large", f"the limit is {MAX_BODY} bytes")
    ctx = request.app[CONTEXT]
    try:
        async with asyncio.timeout(ctx.config.http_body_timeout):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise Problem(413, "Request body too large", f"the limit is {MAX_BODY} bytes") from None
    except TimeoutError:
        ctx.metrics.http_refused.labels(reason="body_timeout").inc()
        raise Problem(
            408,
            "Request body too slow",
            f"the body did not arrive within {ctx.config.http_body_timeout:g} s "
            "(--http-body-timeout)",
            headers={"Connection": "close"},
        ) from None


async def read_json(request: web.Request) -> Any:
    raw = await read_body(request)
    if not raw:
        raise invalid([{"field": "body", "message": "a JSON object is required"}])
    try:
        data = json.loads(raw)
        if b"\\u" in raw or b"\xed" in raw:
            # "\ud800" (or its bytes, which json.loads lets pass) parses to a lone surrogate,
            # which is no Unicode text and cannot be stored: refuse it here
            json.dumps(data, ensure_ascii=False).encode()
        return data
    except RecursionError:
        raise invalid([{"field": "body", "message": "invalid JSON: nested too deeply"}]) from None
    except UnicodeEncodeError:
        message = "invalid JSON: a string holds a lone surrogate (U+D800-U+DFFF), not text"
        raise invalid([{"field": "body", "message": message}]) from None
    except (ValueError, UnicodeDecodeError) as error:
        raise invalid([{"field": "body", "message": f"invalid JSON: {error}"}]) from None


def validation_errors(error: ValidationError) -> list[dict[str, str]]:
    return [
        {"field": ".".join(str(p) for p in e["loc"]) or "body", "message": _in_words(e)}
        for e in error.errors()
    ]


# pydantic's error types in the words of the API's user (a JSON writer, not a Python reader)
_MESSAGES = {
    "missing": "is required",
    "extra_forbidden": "unknown field",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "int_parsing": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "string_pattern_mismatch": "must be a DNS label: lower-case letters, digits and '-', "
    "starting and ending with a letter or digit",
}


def _in_words(e: Any) -> str:
    kind = e["type"]
    ctx = e.get("ctx") or {}
    if kind in _MESSAGES:
        return _MESSAGES[kind]
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])
    if kind == "greater_than_equal":
        return f"must be at least {ctx['ge']}"
    if kind == "less_than_equal":
        return f"must be at most {ctx['le']}"
    if kind == "greater_than":
        return f"must be more than {ctx['gt']}"
    if kind == "less_than":
        return f"must be less than {ctx['lt']}"
    if kind == "string_too_short":
        return "must not be empty" if ctx.get("min_length") == 1 else (
            f"must have at least {ctx['min_length']} characters")  # fmt: skip
    if kind == "string_too_long":
        return f"must have at most {ctx['max_length']} characters"
    if kind == "too_long":
        return f"must have at most {ctx['max_length']} entries"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}"
    message: str = e["msg"]
    return message


def _validate(data: Any, config: Config, key: InstanceKey) -> Registration:
    if not isinstance(data, dict):
        raise invalid([{"field": "body", "message": "must be a JSON object"}])
    try:
        spec = Registration.model_validate(data)
    except ValidationError as error:
        raise invalid(validation_errors(error)) from None
    if not config.min_ttl <= spec.ttl <= config.max_ttl:
        raise invalid(
            [{"field": "ttl", "message": f"must be between {config.min_ttl} and {config.max_ttl}"}]
        )
    # metadata is served as DNS-SD TXT strings: refuse what they cannot carry
    if problems := txt_problems(spec.metadata):
        raise invalid([{"field": "metadata", "message": problem} for problem in problems])
    errors = name_problems(key.namespace, key.service, key.name, spec.ports, config.zones)
    if problem := address_problem(spec.address, config.allow_address):
        errors.insert(0, {"field": "address", "message": problem})
    if errors:
        raise invalid(errors)
    return spec


_expires_memo: dict[tuple[int, int], str] = {}


def _expires(ttl: int) -> str:
    """RFC 3339 time ttl seconds from now, computed once per second and TTL (heartbeats
    come by thousands)."""
    key = (int(time.time()), ttl)
    text = _expires_memo.get(key)
    if text is None:
        if len(_expires_memo) > 64:
            _expires_memo.clear()
        moment = datetime.now(UTC) + timedelta(seconds=ttl)
        text = _expires_memo[key] = moment.isoformat(timespec="seconds").replace("+00:00", "Z")
    return text


def _instance_body(instance: Instance, remaining: int | None = None) -> dict[str, Any]:
    body = instance.to_json()
    lease = body["lease"]
    assert isinstance(lease, dict)
    lease["expires_at"] = _expires(instance.spec.ttl if remaining is None else remaining)
    return body


async def register(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    key = _key(request)
    spec = _validate(await read_json(request), ctx.config, key)
    if ctx.registry.instance(key) is None:
        _check_room(ctx, key)
    store_key = key.store_key(ctx.config.etcd_prefix)
    value = encode_registration(spec)
    lease = await ctx.store.grant(spec.ttl)
    try:
        result = await ctx.store.put(store_key, value, lease)
    except BaseException:
        try:
            await ctx.store.revoke(lease)
        except Exception:
            pass  # the lease expires on its own
        raise
    if result.prev is not None and result.prev.lease and result.prev.lease != lease:
        try:
            await ctx.store.revoke(result.prev.lease)  # it holds no key any more
        except LeaseNotFound:
            pass
    # Read your writes: this replica answers the new record before the client hears back.
    await ctx.registry.reached(result.revision, WRITE_VISIBLE_WAIT)
    instance = Instance(key, Spec.of(spec, value), lease, result.revision)
    return web.json_response(_instance_body(instance), status=200 if result.prev else 201)


def _check_room(ctx: Context, key: InstanceKey) -> None:
    """Refuse a new instance past the service's or the namespace's limit (as this replica
    sees them: replicas a moment apart may let a few more through)."""
    config, registry = ctx.config, ctx.registry
    limits = (
        ("instances_per_service", len(registry.instances(key.service_key)),
         config.max_instances_per_service, f"service {key.service}.{key.namespace}"),
        ("instances_per_namespace", registry.namespace_size(key.namespace),
         config.max_instances_per_namespace, f"namespace {key.namespace}"),
    )  # fmt: skip
    for reason, count, limit, what in limits:
        if count >= limit:
            ctx.metrics.http_refused.labels(reason=reason).inc()
            flag = "--max-" + reason.replace("_", "-")
            raise Problem(
                409,
                "Limit reached",
                f"the {what} has {count} instances, the limit ({flag}) is {limit}: "
                "deregister some first",
            )


async def _stored(ctx: Context, key: InstanceKey) -> Instance | None:
    kv = await ctx.store.get(key.store_key(ctx.config.etcd_prefix))
    if kv is None:
        return None
    spec = decode_registration(kv.value)
    return Instance(key, spec, kv.lease, kv.mod_revision) if spec is not None else None


def _not_found(key: InstanceKey) -> Problem:
    return Problem(
        404,
        "Instance not found",
        f"no live instance {key.name} of {key.service}.{key.namespace}: register it again",
    )


async def _renew(
    ctx: Context, key: InstanceKey, instance: Instance | None, tried: bool = False
) -> tuple[Instance, int] | None:
    """Renew the lease of the instance registered under key: the instance and its TTL, or
    None when it has no live lease. `tried`: instance's lease was just found gone."""
    for attempt in range(1 if tried else 0, 2):
        if instance is None or attempt:
            # Not in this replica's cache yet, or re-registered with a new lease since.
            fresh = await _stored(ctx, key)
            if fresh is None or (instance is not None and fresh.lease == instance.lease):
                return None
            instance = fresh
        try:
            return instance, await ctx.store.keepalive(instance.lease)
        except LeaseNotFound:
            continue
    return None


# The JSON of an instance around its lease's expires_at, by key: a heartbeat's answer is
# these bytes with the time put in (the instance's dict and its encoding, built once per
# registration, were a tenth of a heartbeat's CPU). An entry is used only for the very
# Instance object it was made of (the registry makes a new one on every change).
_heartbeat_bodies: dict[InstanceKey, tuple[Instance, bytes, bytes]] = {}
MAX_HEARTBEAT_BODIES = 16_384
_EXPIRES_MARK = "\x00"  # encoded as "\u0000"; expires_at is the last value of the body
_JSON_HEADERS = {"Content-Type": "application/json; charset=utf-8"}


def _heartbeat_body(instance: Instance, remaining: int) -> bytes:
    """What json.dumps(_instance_body(instance, remaining)).encode() gives."""
    entry = _heartbeat_bodies.get(instance.key)
    if entry is None or entry[0] is not instance:
        body = instance.to_json()
        lease = body["lease"]
        assert isinstance(lease, dict)
        lease["expires_at"] = _EXPIRES_MARK
        head, _, tail = json.dumps(body).encode().rpartition(b'"\\u0000"')
        if len(_heartbeat_bodies) >= MAX_HEARTBEAT_BODIES:
            _heartbeat_bodies.clear()
        entry = _heartbeat_bodies[instance.key] = (instance, head, tail)
    return b'%s"%s"%s' % (entry[1], _expires(remaining).encode(), entry[2])


async def heartbeat(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    key = _key(request)
    renewed = await _renew(ctx, key, ctx.registry.registered(key))
    if renewed is None:
        raise _not_found(key)
    # what web.json_response(body) sends, without its per-call overhead
    return web.Response(body=_heartbeat_body(*renewed), headers=_JSON_HEADERS)


MAX_HEARTBEAT_BATCH = 256  # instances per POST /v1/heartbeats (more: 400)
_BATCH_FIELDS = ("namespace", "service", "instance")
_MAX_ERRORS = 20  # validation errors named in one answer


def _batch_keys(data: Any, metrics: Metrics) -> list[InstanceKey]:
    if not isinstance(data, dict):
        raise invalid([{"field": "body", "message": "must be a JSON object"}])
    errors = [{"field": name, "message": "unknown field"} for name in data if name != "instances"]
    items = data.get("instances")
    if items is None:
        errors.append({"field": "instances", "message": "is required"})
    elif not isinstance(items, list):
        errors.append({"field": "instances", "message": "must be a list"})
    if errors or not isinstance(items, list):
        raise invalid(errors)
    if len(items) > MAX_HEARTBEAT_BATCH:
        metrics.http_refused.labels("heartbeat_batch").inc()
        message = f"must have at most {MAX_HEARTBEAT_BATCH} entries (send the rest in another call)"
        raise invalid([{"field": "instances", "message": message}])
    keys = []
    for index, item in enumerate(items):
        where = f"instances.{index}"
        if not isinstance(item, dict):
            errors.append({"field": where, "message": "must be an object"})
            continue
        errors += [
            {"field": f"{where}.{name}", "message": "unknown field"}
            for name in item
            if name not in _BATCH_FIELDS
        ]
        for name in _BATCH_FIELDS:
            value = item.get(name)
            if value is None:
                errors.append({"field": f"{where}.{name}", "message": "is required"})
            elif not isinstance(value, str) or not is_label(value):
                errors.append(
                    {
                        "field": f"{where}.{name}",
                        "message": "must be a lower-case DNS label (RFC 1123), 1-63 characters",
                    }
                )
        if not errors:
            keys.append(InstanceKey(item["namespace"], item["service"], item["instance"]))
    if errors:
        raise invalid(errors[:_MAX_ERRORS])
    return keys


async def heartbeats(request: web.Request) -> web.Response:
    """Renew many leases in one call: `{"instances": [{"namespace", "service", "instance"},
    …]}` → `{"results": [{"status": 200, "ttl", "expires_at"} | {"status": 404}, …]}` in
    request order; 404: register that one again. All leases go to the store at once (one
    round trip on etcd's keepalive stream). An unreachable store fails the whole call (503).
    With tokens, every instance's namespace needs `write`, as its own heartbeat does."""
    ctx = request.app[CONTEXT]
    keys = _batch_keys(await read_json(request), ctx.metrics)
    may_write = writable(request)
    denied = sorted({key.namespace for key in keys if not may_write(key.namespace)})
    if denied:
        ctx.metrics.http_refused.labels(reason="forbidden").inc()
        raise Problem(
            403,
            "Forbidden",
            "this token does not have the right 'write' on namespace "
            + ", ".join(repr(namespace) for namespace in denied),
            headers={"WWW-Authenticate": 'Bearer realm="discovery", error="insufficient_scope"'},
        )
    instances = [ctx.registry.registered(key) for key in keys]
    known = [index for index, instance in enumerate(instances) if instance is not None]
    ttls = await ctx.store.keepalive_many(
        [instance.lease for instance in instances if instance is not None]
    )
    renewed: list[int | None] = [None] * len(keys)
    for index, ttl in zip(known, ttls, strict=True):
        if ttl > 0:
            renewed[index] = ttl
    # the rest as one heartbeat each: not in this replica's cache yet, or re-registered
    late = [index for index, ttl in enumerate(renewed) if ttl is None]
    if late:
        answers = await asyncio.gather(
            *(_renew(ctx, keys[i], instances[i], tried=instances[i] is not None) for i in late)
        )
        for index, answer in zip(late, answers, strict=True):
            if answer is not None:
                renewed[index] = answer[1]
    results = [
        {"status": 200, "ttl": ttl, "expires_at": _expires(ttl)}
        if ttl is not None
        else {"status": 404}
        for ttl in renewed
    ]
    body = json.dumps({"results": results}).encode()
    return web.Response(body=body, content_type=_JSON, charset="utf-8")


_JSON = "application/json"


async def deregister(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    key = _key(request)
    store_key = key.store_key(ctx.config.etcd_prefix)
    prev = await ctx.store.delete(store_key)
    if prev is None:
        raise _not_found(key)
    if prev.lease:
        try:
            await ctx.store.revoke(prev.lease)
        except LeaseNotFound:
            pass
    # Read your writes: this replica stops answering before the client hears back.
    registry = ctx.registry
    await registry.wait_service(
        key.service_key, lambda: not registry.has_instance_key(store_key), WRITE_VISIBLE_WAIT
    )
    return web.Response(status=204)


def _wait_args(request: web.Request) -> tuple[int | None, float]:
    index_text = request.query.get("index")
    wait_text = request.query.get("wait")
    errors = []
    index = None
    wait = DEFAULT_WAIT
    if index_text is not None:
        if re.fullmatch(r"[0-9]{1,19}", index_text) is None or int(index_text) >= 2**63:
            errors.append({"field": "index", "message": "must be an integer from 0 to 2^63-1"})
        else:
            index = int(index_text)
    if wait_text is not None:
        match = re.fullmatch(r"([0-9]{1,9}(?:\.[0-9]{1,9})?)(ms|s|m|h)?", wait_text)
        if match is None:
            errors.append({"field": "wait", "message": "must be a duration like 500ms, 30s or 5m"})
        else:
            unit = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}[match.group(2)]
            wait = min(MAX_WAIT, float(match.group(1)) * unit)
    if errors:
        raise invalid(errors)
    return index, wait


@contextlib.contextmanager
def _long_poll(request: web.Request) -> Iterator[None]:
    """Count a parked long poll against its client's address; refuse one past the cap (each
    holds a socket and memory until its change or its wait comes)."""
    ctx = request.app[CONTEXT]
    polls = ctx.long_polls
    client = request.remote or ""
    parked = polls.get(client, 0)
    limit = ctx.config.http_long_polls_per_client
    if parked >= limit:
        ctx.metrics.http_refused.labels(reason="long_polls").inc()
        raise Problem(
            429,
            "Too many long polls",
            f"{client} has {parked} long polls open, the limit per client address "
            f"(--http-long-polls-per-client) is {limit}",
            headers={"Retry-After": LONG_POLL_RETRY_AFTER},
        )
    polls[client] = parked + 1
    task = asyncio.current_task()
    assert task is not None
    forget = when_gone(request.protocol, task.cancel)
    try:
        yield
    except asyncio.CancelledError:
        if request.transport is not None or task.cancelling() > 1:
            raise  # not (only) the client leaving: the server stops, say
        task.uncancel()
        raise ConnectionResetError("the client left its long poll") from None
    finally:
        forget()
        if polls[client] <= 1:
            del polls[client]
        else:
            polls[client] -= 1


def _indexed(body: Any, registry: Registry) -> web.Response:
    return web.json_response(body, headers={"X-Discovery-Index": str(registry.revision)})


def _page_args(request: web.Request, parts: int) -> tuple[int, tuple[str, ...] | None]:
    """`?limit=` (default PAGE, at most MAX_PAGE) and `?after=` (the `next` of the page
    before: `parts` names joined by '/')."""
    errors = []
    limit = PAGE
    limit_text = request.query.get("limit")
    if limit_text is not None:
        if re.fullmatch(r"[0-9]{1,6}", limit_text) is None or not 1 <= int(limit_text) <= MAX_PAGE:
            errors.append({"field": "limit", "message": f"must be an integer 1-{MAX_PAGE}"})
        else:
            limit = int(limit_text)
    after: tuple[str, ...] | None = None
    after_text = request.query.get("after")
    if after_text is not None:
        names = tuple(after_text.split("/"))
        if len(names) != parts or len(after_text) > 255:
            errors.append({"field": "after", "message": "must be the `next` of a page before"})
        else:
            after = names
    if errors:
        raise invalid(errors)
    return limit, after


def _paged(
    request: web.Request, body: dict[str, Any], registry: Registry, limit: int, last: str | None
) -> web.Response:
    """The page, with `next` and a Link header (RFC 8288) when there is more."""
    headers = {"X-Discovery-Index": str(registry.revision)}
    body["next"] = last
    if last is not None:
        query = MultiDict(
            (k, v) for k, v in request.query.items() if k not in ("index", "wait", "after")
        )
        query["after"] = last
        query["limit"] = str(limit)
        headers["Link"] = f'<{request.rel_url.with_query(query)}>; rel="next"'
    return web.json_response(body, headers=headers)


async def list_services(request: web.Request) -> web.Response:
    registry = request.app[CONTEXT].registry
    index, wait = _wait_args(request)
    limit, after = _page_args(request, 2)
    if index is not None and registry.revision <= index:
        with _long_poll(request):
            await registry.reached(index + 1, wait)
    keys = registry.sorted_services()
    start = bisect.bisect_right(keys, after) if after is not None else 0
    page = keys[start : start + limit]
    may_read = readable(request)
    services = [
        {
            "namespace": ns,
            "service": svc,
            "instances": len(instances),
            "tags": sorted({tag for i in instances.values() for tag in i.spec.tags}),
        }
        for ns, svc in page
        for instances in (registry.instances((ns, svc)),)
        if may_read(ns)
    ]
    last = "/".join(page[-1]) if start + limit < len(keys) else None
    return _paged(request, {"services": services}, registry, limit, last)


async def get_service(request: web.Request) -> web.Response:
    registry = request.app[CONTEXT].registry
    key = _key(request, with_instance=False)
    index, wait = _wait_args(request)
    limit, after = _page_args(request, 1)
    service = key.service_key
    # index=0 never blocks: the registry revision is always past it (Consul too)
    if index and registry.service_revision(service) <= index:
        with _long_poll(request):
            await registry.wait_service(
                service, lambda: registry.service_revision(service) > index, wait
            )
    tags = request.query.getall("tag", [])
    names = registry.sorted_names(service)
    instances = registry.instances(service)
    page: list[dict[str, object]] = []
    last = None
    start = bisect.bisect_right(names, after[0]) if after is not None else 0
    for name in itertools.islice(names, start, None):
        instance = instances[name]
        if all(t in instance.spec.tags for t in tags):
            if len(page) == limit:
                last = str(page[-1]["name"])
                break
            page.append(instance.to_json())
    body = {"namespace": key.namespace, "service": key.service, "instances": page}
    return _paged(request, body, registry, limit, last)


async def get_registry(request: web.Request) -> web.Response:
    """Every instance registered over the API and the revision it reflects (what
    `discovery check` compares with the store), a page at a time."""
    registry = request.app[CONTEXT].registry
    index, wait = _wait_args(request)
    limit, after = _page_args(request, 3)
    if index is not None and registry.revision <= index:
        with _long_poll(request):
            await registry.reached(index + 1, wait)
    keys = registry.sorted_services()
    first = bisect.bisect_left(keys, after[:2]) if after is not None else 0
    may_read = readable(request)
    page: list[dict[str, object]] = []
    last = None
    for service in itertools.islice(keys, first, None):
        if not may_read(service[0]):
            continue
        names = registry.sorted_names(service)
        start = 0
        if after is not None and service == after[:2]:
            start = bisect.bisect_right(names, after[2])
        instances = registry.instances(service)
        for name in itertools.islice(names, start, None):
            instance = instances[name]
            if registry.registered(instance.key) is not instance:
                continue  # made by an attachment
            if len(page) == limit:
                break
            page.append(instance.to_json() | {"mod_revision": instance.revision})
            last = f"{service[0]}/{service[1]}/{name}"
        else:
            continue
        break
    else:
        last = None
    body = {"revision": registry.revision, "instances": page}
    return _paged(request, body, registry, limit, last)


async def get_instance(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    key = _key(request)
    instance = ctx.registry.instance(key)
    if instance is None:
        raise _not_found(key)
    try:
        remaining = await ctx.store.time_to_live(instance.lease)
    except LeaseNotFound:
        raise _not_found(key) from None
    except StoreUnavailable:
        # Reads answer from memory through an outage; only the expiry is unknown then.
        ctx.metrics.store_errors.inc()
        return _indexed(instance.to_json(), ctx.registry)
    return _indexed(_instance_body(instance, remaining), ctx.registry)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    registry = request.app[CONTEXT].registry
    since = time.monotonic() - registry.last_contact if registry.last_contact else None
    body = {
        "status": "ready" if registry.synced else "loading",
        "store": "ok" if registry.store_healthy else "degraded",
        "revision": registry.revision,
        "seconds_since_store_contact": None if since is None else round(since, 3),
        "node": request.app[CONTEXT].config.node,
    }
    return web.json_response(body, status=200 if registry.synced else 503)


async def metrics(request: web.Request) -> web.Response:
    data = generate_latest(request.app[CONTEXT].metrics.registry)
    response = web.Response(body=data)
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    response.charset = "utf-8"
    return response


async def openapi(request: web.Request) -> web.Response:
    config = request.app[CONTEXT].config
    return web.json_response(openapi_document(config.auth_file is not None, config.auth_metrics))


def create_app(
    context: Context, *more_routes: Callable[[web.Application], None]
) -> web.Application:
    app = web.Application(
        middlewares=[problem_middleware, access_middleware], client_max_size=MAX_BODY
    )
    app[CONTEXT] = context
    for add_routes in more_routes:
        add_routes(app)
    base = "/v1/services/{ns}/{svc}"
    app.router.add_put(base + "/instances/{inst}", register)
    app.router.add_put(base + "/instances/{inst}/heartbeat", heartbeat)
    app.router.add_delete(base + "/instances/{inst}", deregister)
    app.router.add_get(base + "/instances/{inst}", get_instance)
    app.router.add_get(base, get_service)
    app.router.add_post("/v1/heartbeats", heartbeats)
    app.router.add_get("/v1/services", list_services)
    app.router.add_get("/v1/registry", get_registry)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    return app
