"""The dashboard at /ui/: server-rendered pages (escaped with html.escape) that app.js then
keeps live through the public API's long poll. Static files ship in discovery/ui/static."""

from __future__ import annotations

import asyncio
import hashlib
import html
import ipaddress
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web

from ..api import CONTEXT, Context, _expires
from ..model import Instance, is_label
from ..store.base import LeaseNotFound, StoreUnavailable

# Every page and asset: scripts and styles only from this origin, no inline code, no frames.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
ASSET_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
EXPIRY_LOOKUPS = 200  # instances of one service whose lease expiry the first paint asks for


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def _load_assets() -> tuple[str, dict[str, Asset]]:
    """The static files and one version for all of them (their URLs carry it, so a
    browser may keep them forever: a new release has new URLs)."""
    assets: dict[str, Asset] = {}
    version = hashlib.sha256()
    for entry in sorted(resources.files(__package__).joinpath("static").iterdir(), key=str):
        suffix = "." + entry.name.rpartition(".")[2]
        if suffix not in ASSET_TYPES:
            continue
        body = entry.read_bytes()
        version.update(entry.name.encode() + b"\0" + body)
        etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        assets[entry.name] = Asset(body, ASSET_TYPES[suffix], etag)
    return version.hexdigest()[:12], assets


VERSION, ASSETS = _load_assets()


def e(text: object) -> str:
    return html.escape(str(text), quote=True)


def b(text: object) -> str:
    """A value from the registry: escaped, and isolated so right-to-left text cannot
    reorder what surrounds it."""
    return f"<bdi>{e(text)}</bdi>"


def _page(
    request: web.Request, page: str, title: str, content: str, data: Mapping[str, object]
) -> web.Response:
    nav = "".join(
        f'<a href="{href}"{" aria-current=page" if name == page else ""}>{label}</a>'
        for name, href, label in (
            ("services", "/ui/", "Services"),
            ("networks", "/ui/networks", "Networks"),
            ("health", "/ui/health", "Health"),
        )
    )
    attributes = "".join(f' data-{name}="{e(value)}"' for name, value in data.items())
    asset = f"/ui/assets/{VERSION}"
    text = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)} · discovery</title>
<link rel="icon" href="{asset}/icon.svg" type="image/svg+xml">
<link rel="stylesheet" href="{asset}/style.css">
<script src="{asset}/app.js" defer></script>
</head>
<body data-page="{page}"{attributes}>
<a class="skip" href="#main">Skip to content</a>
<header>
<div class="bar">
<span class="brand">discovery</span>
<nav aria-label="Pages">{nav}</nav>
</div>
<form id="token-form" class="token" hidden>
<label for="token">API token</label>
<input id="token" name="token" type="password" autocomplete="off" spellcheck="false">
<button type="submit">Use token</button>
<button type="button" id="token-forget">Forget</button>
</form>
<p id="live" class="live" role="status" aria-live="polite">{STATIC_NOTE}</p>
<p id="message" class="live" role="status" aria-live="polite"></p>
</header>
<main id="main" tabindex="-1">
{content}
</main>
</body>
</html>
"""
    response = web.Response(text=text, content_type="text/html", charset="utf-8")
    response.headers.update(SECURITY_HEADERS)
    response.headers["Cache-Control"] = "no-store"
    return response


def _shows_data(ctx: Context) -> bool:
    """The first paint renders the registry only where the API itself answers without a
    token: a browser sends no bearer token when it loads a page, and app.js asks with one."""
    return not getattr(ctx.config, "auth_file", None)


STATIC_NOTE = "Static view: live updates need JavaScript."
TOKEN_NEEDED = (
    '<p class="notice" id="token-needed">This server needs an API token: '
    "enter it above (it stays in this tab only).</p>"
)


def _tags(tags: Iterable[str]) -> str:
    items = "".join(f"<li>{b(tag)}</li>" for tag in tags)
    return f'<ul class="tags">{items}</ul>' if items else ""


def _service_tags(instances: Mapping[str, Instance]) -> list[str]:
    return sorted({tag for instance in instances.values() for tag in instance.spec.tags})


async def services_page(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    registry = ctx.registry
    query = request.query.get("q", "")[:200]
    form = f"""<h1>Services</h1>
<form class="filter" role="search" method="get" action="/ui/">
<label for="filter">Filter by namespace, service or tag</label>
<input id="filter" name="q" type="search" value="{e(query)}" autocomplete="off">
<button type="submit">Filter</button>
</form>"""
    if not _shows_data(ctx):
        content = (
            form + TOKEN_NEEDED + '<p id="summary" class="summary"></p><div id="services"></div>'
        )
        return _page(request, "services", "Services", content, {"index": 0})
    needle = query.strip().lower()
    by_namespace: dict[str, list[tuple[bool, str]]] = {}
    shown = total = 0
    for (ns, svc), instances in sorted(registry.services().items()):
        tags = _service_tags(instances)
        total += 1
        hidden = bool(needle) and not any(needle in text for text in (ns, svc, *tags))
        shown += not hidden
        link = f"/ui/services/{e(ns)}/{e(svc)}"
        search = "\n".join([ns, svc, *tags]).lower()
        by_namespace.setdefault(ns, []).append(
            (
                hidden,
                f'<tr data-key="{e(ns)}/{e(svc)}" data-search="{e(search)}"'
                f"{' hidden' if hidden else ''}>"
                f'<th scope="row" data-label="Service"><a href="{link}">{b(svc)}</a></th>'
                f'<td data-label="Instances">{len(instances)}</td>'
                f'<td data-label="Tags">{_tags(tags)}</td></tr>',
            )
        )
    sections = []
    for ns, rows in by_namespace.items():
        hide = " hidden" if all(row_hidden for row_hidden, _ in rows) else ""
        sections.append(
            f'<section class="namespace" data-namespace="{e(ns)}"{hide}>'
            f"<h2>Namespace {b(ns)}</h2>"
            '<table><thead><tr><th scope="col">Service</th><th scope="col">Instances</th>'
            f'<th scope="col">Tags</th></tr></thead><tbody>{"".join(r for _, r in rows)}</tbody>'
            "</table>"
            "</section>"
        )
    summary = f"{total} services, {registry.instance_count()} instances"
    if needle:
        summary += f"; {shown} match"
    empty = "" if total else '<p id="nothing" class="empty">Nothing registered yet.</p>'
    content = (
        f'{form}<p id="summary" class="summary">{e(summary)}</p>'
        f'<div id="services">{"".join(sections)}</div>{empty}'
    )
    return _page(request, "services", "Services", content, {"index": registry.revision})


def _dns_host(request: web.Request, dns: tuple[str, int]) -> str:
    host = dns[0]
    try:
        unspecified = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        unspecified = False
    if unspecified:  # the DNS listener takes every address: the one this page came from
        host = (request.url.host or "127.0.0.1").strip("[]")
    return host


def dig_lines(
    dig: str, ns: str, svc: str, zone: str, ports: Iterable[tuple[str, str]]
) -> list[tuple[str, str]]:
    """(what it asks, the command) for the names that answer for a service."""
    name = f"{svc}.{ns}.svc.{zone}"
    lines = [("every instance's address", f"{dig} +short {name}")]
    for port, protocol in sorted(set(ports)):
        lines.append(
            (f"port {port}/{protocol} (SRV)", f"{dig} +short _{port}._{protocol}.{name} SRV")
        )
    return lines


async def _expiries(ctx: Context, instances: list[Instance]) -> dict[str, str]:
    """When each lease runs out, as the API says it (the store knows, not the cache)."""

    async def one(instance: Instance) -> tuple[str, str] | None:
        try:
            return instance.key.name, _expires(await ctx.store.time_to_live(instance.lease))
        except (LeaseNotFound, StoreUnavailable):
            return None

    found = await asyncio.gather(*(one(i) for i in instances[:EXPIRY_LOOKUPS]))
    return dict(item for item in found if item is not None)


def _ports(instance: Instance) -> str:
    items = "".join(f"<li>{b(p.name)} {p.port}/{e(p.protocol)}</li>" for p in instance.spec.ports)
    return f'<ul class="ports">{items}</ul>' if items else ""


def _metadata(metadata: Mapping[str, Any]) -> str:
    items = "".join(f"<div><dt>{b(k)}</dt><dd>{b(v)}</dd></div>" for k, v in metadata.items())
    return f'<dl class="metadata">{items}</dl>' if items else ""


def _instance_row(instance: Instance, zone: str, expires: str | None) -> str:
    data = instance.to_json()
    key = instance.key
    fqdn = f"{key.name}.{key.service}.{key.namespace}.svc.{zone}"
    metadata = data.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    when = (
        f'<time datetime="{e(expires)}" data-expires="{e(expires)}">{e(expires)}</time>'
        if expires
        else "unknown"
    )
    return (
        f'<tr data-key="{e(key.name)}">'
        f'<th scope="row" data-label="Instance">{b(key.name)}</th>'
        f'<td data-label="Address"><code>{b(instance.spec.address)}</code></td>'
        f'<td data-label="Ports">{_ports(instance)}</td>'
        f'<td data-label="Tags">{_tags(instance.spec.tags)}</td>'
        f'<td data-label="Metadata">{_metadata(metadata)}</td>'
        f'<td data-label="Lease">{instance.spec.ttl} s, expires {when}</td>'
        f'<td data-label="DNS name"><code>{b(fqdn)}</code></td>'
        f'<td data-label="Actions" class="actions"></td>'
        "</tr>"
    )


INSTANCE_HEADINGS = (
    "Instance", "Address", "Ports", "Tags", "Metadata", "Lease", "DNS name", "Actions"
)  # fmt: skip


def _service_page(dns: tuple[str, int]) -> Callable[[web.Request], Any]:
    async def service_page(request: web.Request) -> web.Response:
        ctx = request.app[CONTEXT]
        ns, svc = request.match_info["ns"], request.match_info["svc"]
        if not (is_label(ns) and is_label(svc)):
            return _error_page(request, 404, "No such service", "Service names are DNS labels.")
        zone = ctx.config.zones[0]
        host = _dns_host(request, dns)
        dig = f"dig @{host} -p {dns[1]}"
        title = f"{svc}.{ns}"
        data: dict[str, object] = {
            "namespace": ns, "service": svc, "zone": zone, "dig": dig, "index": 0
        }  # fmt: skip
        heading = (
            f'<p class="crumbs"><a href="/ui/">Services</a> / namespace {b(ns)}</p>'
            f"<h1>Service {b(svc)}</h1>"
        )
        headings = "".join(f'<th scope="col">{h}</th>' for h in INSTANCE_HEADINGS)
        if not _shows_data(ctx):
            content = (
                heading + TOKEN_NEEDED + '<section aria-labelledby="dns-h"><h2 id="dns-h">'
                'DNS names</h2><ul id="dig" class="dig"></ul></section>'
                '<section aria-labelledby="inst-h"><h2 id="inst-h">Instances</h2>'
                f'<p id="summary" class="summary"></p><table id="instances"><thead><tr>{headings}'
                "</tr></thead><tbody></tbody></table></section>"
            )
            return _page(request, "service", title, content, data)
        registry = ctx.registry
        data["index"] = registry.revision
        instances = sorted(registry.instances((ns, svc)).values(), key=lambda i: i.key.name)
        expiries = await _expiries(ctx, instances)
        ports = [(p.name, p.protocol) for i in instances for p in i.spec.ports]
        digs = "".join(
            f'<li><span class="what">{e(what)}</span> <code>{b(command)}</code></li>'
            for what, command in dig_lines(dig, ns, svc, zone, ports)
        )
        rows = "".join(_instance_row(i, zone, expiries.get(i.key.name)) for i in instances)
        count = f"{len(instances)} live instance{'' if len(instances) == 1 else 's'}"
        content = (
            heading + '<section aria-labelledby="dns-h"><h2 id="dns-h">DNS names</h2>'
            f'<ul id="dig" class="dig">{digs}</ul></section>'
            '<section aria-labelledby="inst-h"><h2 id="inst-h">Instances</h2>'
            f'<p id="summary" class="summary">{e(count)}</p>'
            f'<table id="instances"><thead><tr>{headings}</tr></thead>'
            f"<tbody>{rows}</tbody></table></section>"
        )
        return _page(request, "service", title, content, data)

    return service_page


def _network_tables(ctx: Context) -> str:
    from ..net.routes import _network_body

    ipam = ctx.ipam
    if ipam is None or not ctx.registry.synced:
        return '<p class="notice">Networks are not loaded yet.</p>'
    sections = []
    for name in sorted(ctx.registry.networks()):
        body = _network_body(ipam, name, ctx.overlay)
        blocks = "".join(
            f'<tr><th scope="row" data-label="Node">{b(block["node"])}</th>'
            f'<td data-label="Block"><code>{e(block["subnet"])}</code></td>'
            f'<td data-label="Node address">{b(block["node_ip"])}</td>'
            f'<td data-label="Attachments">{block["attachments"]}</td>'
            f'<td data-label="Free addresses">{block["free"]}</td></tr>'
            for block in body["blocks"]
        )
        attachments = sorted(
            ctx.registry.attachments(name).values(), key=lambda a: (a.container_id, a.ifname)
        )
        rows = "".join(
            f'<tr><th scope="row" data-label="Name">{b(a.name)}</th>'
            f'<td data-label="Address"><code>{e(a.address)}</code></td>'
            f'<td data-label="Node">{b(a.node)}</td>'
            f'<td data-label="Container"><code>{b(a.container_id[:12])}</code> {b(a.ifname)}</td>'
            f'<td data-label="Service">{_attachment_service(a.service)}</td></tr>'
            for a in attachments
        )
        sections.append(_network_section(body, blocks, rows))
    return "".join(sections) or '<p class="empty">No networks.</p>'


def _attachment_service(service: Any) -> str:
    if service is None:
        return ""
    link = f"/ui/services/{e(service.namespace)}/{e(service.service)}"
    return f'<a href="{link}">{b(service.service)}.{b(service.namespace)}</a>'


def _network_section(body: Mapping[str, Any], blocks: str, rows: str) -> str:
    name = body["name"]
    return (
        f'<section class="network" data-network="{e(name)}">'
        f"<h2>Network {b(name)}</h2>"
        f'<p class="summary"><code>{e(body["subnet"])}</code>, /{e(body["node_prefix"])} '
        f"per node, {e(body['backend'])}, {body['attachments']} attachments</p>"
        "<h3>Blocks per node</h3>"
        '<table><thead><tr><th scope="col">Node</th><th scope="col">Block</th>'
        '<th scope="col">Node address</th><th scope="col">Attachments</th>'
        f'<th scope="col">Free addresses</th></tr></thead><tbody>{blocks}</tbody></table>'
        "<h3>Attachments</h3>"
        '<table><thead><tr><th scope="col">Name</th><th scope="col">Address</th>'
        '<th scope="col">Node</th><th scope="col">Container</th><th scope="col">Service</th>'
        f"</tr></thead><tbody>{rows}</tbody></table></section>"
    )


async def networks_page(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    if not _shows_data(ctx):
        content = "<h1>Networks</h1>" + TOKEN_NEEDED + '<div id="networks"></div>'
        return _page(request, "networks", "Networks", content, {"index": 0})
    content = f'<h1>Networks</h1><div id="networks">{_network_tables(ctx)}</div>'
    return _page(request, "networks", "Networks", content, {"index": ctx.registry.revision})


def _samples(ctx: Context, family: str) -> dict[str, float]:
    """One metric's samples by their first label value ("" when unlabelled)."""
    values: dict[str, float] = {}
    for metric in ctx.metrics.registry.collect():
        if metric.name == family:
            for sample in metric.samples:
                if sample.name in (family, family + "_total"):
                    label = next(iter(sample.labels.values()), "")
                    values[label] = sample.value
    return values


HEALTH_ROWS = (
    ("status", "Status"),
    ("store", "Store"),
    ("revision", "Watch revision"),
    ("contact", "Last contact with the store"),
    ("node", "Node"),
    ("services", "Services"),
    ("instances", "Instances"),
    ("reloads", "Watch reloads (compaction)"),
    ("resumes", "Watch resumes (store unreachable)"),
)


async def health_page(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    registry = ctx.registry
    since = time.monotonic() - registry.last_contact if registry.last_contact else None
    values = {
        "status": "ready" if registry.synced else "loading",
        "store": "up" if registry.store_healthy else "degraded",
        "revision": registry.revision,
        "contact": "never" if since is None else f"{since:.1f} s ago",
        "node": ctx.config.node,
        "services": len(registry.services()),
        "instances": registry.instance_count(),
        "reloads": int(_samples(ctx, "discovery_watch_reloads").get("", 0)),
        "resumes": int(_samples(ctx, "discovery_watch_resumes").get("", 0)),
    }
    rows = "".join(
        f'<div data-field="{key}"><dt>{label}</dt><dd>{b(values[key])}</dd></div>'
        for key, label in HEALTH_ROWS
    )
    queries = _samples(ctx, "discovery_dns_queries")
    query_rows = "".join(
        f'<tr data-path="{e(path)}"><th scope="row" data-label="Path">{e(path)}</th>'
        f'<td data-label="Queries/s" class="rate">…</td>'
        f'<td data-label="Total">{int(count)}</td></tr>'
        for path, count in sorted(queries.items())
    )
    content = (
        "<h1>This replica's health</h1>"
        f'<dl id="health" class="facts">{rows}</dl>'
        '<section aria-labelledby="q-h"><h2 id="q-h">DNS queries by path</h2>'
        '<table id="queries"><thead><tr><th scope="col">Path</th><th scope="col">Queries/s</th>'
        f'<th scope="col">Total</th></tr></thead><tbody>{query_rows}</tbody></table>'
        '<p class="note">fast: answered from pre-built answers; full: built by the resolver; '
        "forwarded: sent upstream; dropped: malformed or refused.</p></section>"
    )
    return _page(request, "health", "Health", content, {})


def _error_page(request: web.Request, status: int, title: str, detail: str) -> web.Response:
    response = _page(request, "error", title, f"<h1>{e(title)}</h1><p>{e(detail)}</p>", {})
    response.set_status(status)
    return response


async def asset(request: web.Request) -> web.StreamResponse:
    found = ASSETS.get(request.match_info["name"])
    if found is None or request.match_info["version"] != VERSION:
        return _error_page(request, 404, "Not found", "No such file.")
    headers = {
        **SECURITY_HEADERS,
        "ETag": found.etag,
        "Cache-Control": "public, max-age=31536000, immutable",
    }
    if found.etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    return web.Response(body=found.body, content_type=found.content_type, headers=headers)


async def to_index(request: web.Request) -> web.StreamResponse:
    raise web.HTTPPermanentRedirect("/ui/")


def routes(dns: tuple[str, int]) -> Callable[[web.Application], None]:
    """The dashboard's routes for create_app; `dns` is the bound DNS listener, for the
    dig commands the service page offers."""

    def add_routes(app: web.Application) -> None:
        app.router.add_get("/ui", to_index)
        app.router.add_get("/ui/", services_page)
        app.router.add_get("/ui/services/{ns}/{svc}", _service_page(dns))
        app.router.add_get("/ui/networks", networks_page)
        app.router.add_get("/ui/health", health_page)
        app.router.add_get("/ui/assets/{version}/{name}", asset)

    return add_routes
