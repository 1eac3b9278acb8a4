"""The dashboard at /ui/ in a real browser: Debian's headless Chromium driven by Playwright,
against `discovery serve` in a subprocess. One browser and one server for the module; every
test uses namespaces of its own."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import pytest
from needs import unavailable

from discovery.config import Config

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
HTTP_LINE = re.compile(r"HTTP listening on (http://\S+)")
DNS_LINE = re.compile(r"DNS listening on (\S+):(\d+) ")
WAIT_MS = 10_000  # for what the page must show; a failure names what was missing

try:
    from playwright.sync_api import (
        Browser,
        ConsoleMessage,
        Page,
        Route,
        expect,
        sync_playwright,
    )
except ImportError:  # pragma: no cover - the test extra installs it
    sync_playwright = None  # type: ignore[assignment]


@dataclass
class Served:
    base: str
    dns: tuple[str, int]
    proc: subprocess.Popen[str]
    log: list[str] = field(default_factory=list)

    def call(
        self, method: str, path: str, body: Any = None, token: str = ""
    ) -> tuple[int, bytes, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(self.base + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read(), response.headers
        except urllib.error.HTTPError as error:
            with error:
                return error.code, error.read(), error.headers

    def register(self, ns: str, svc: str, inst: str, token: str = "", **body: Any) -> None:
        body.setdefault("address", "10.1.2.3")
        path = f"/v1/services/{ns}/{svc}/instances/{inst}"
        status, raw, _ = self.call("PUT", path, body, token)
        assert status in (200, 201), raw


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with serving("--min-ttl", "2") as running:
        yield running


@contextlib.contextmanager
def serving(*args: str) -> Iterator[Served]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISCOVERY_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "discovery", "serve", "--http", "127.0.0.1:0",
         "--dns", "127.0.0.1:0", "--cni-socket", "", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, env=env,
    )  # fmt: skip
    assert proc.stderr is not None
    log: list[str] = []
    base, dns_address = "", ("", 0)
    try:
        for line in proc.stderr:
            log.append(line)
            if match := HTTP_LINE.search(line):
                base = match.group(1)
            if match := DNS_LINE.search(line):
                dns_address = (match.group(1), int(match.group(2)))
            if base and dns_address[1]:
                break
        assert base, "the server exited before listening:\n" + "".join(log)
        stderr = proc.stderr
        drain = threading.Thread(target=lambda: log.extend(stderr), daemon=True)
        drain.start()  # a full pipe would block the server
        yield Served(base, dns_address, proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if sync_playwright is None:
        unavailable("playwright is not installed (pip install -e '.[test]')")
    if shutil.which(CHROMIUM) is None:
        unavailable("chromium is not installed (make test-deps)")
    with sync_playwright() as playwright:
        # launch() gives the browser a fresh profile directory of its own, removed on close
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class Watched:
    page: Page
    problems: list[str]


@pytest.fixture
def page(browser: Browser) -> Iterator[Watched]:
    """A fresh tab that records console errors and uncaught exceptions: none is allowed."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    tab = context.new_page()
    problems: list[str] = []

    def console(message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            problems.append(f"console {message.type}: {message.text}")

    tab.on("console", console)
    tab.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    try:
        yield Watched(tab, problems)
        assert not problems, problems
    finally:
        context.close()


def test_pages_headers_and_assets(served: Served) -> None:
    for path in ("/ui/", "/ui/services/default/web", "/ui/networks", "/ui/health"):
        status, raw, headers = served.call("GET", path)
        assert status == 200, path
        assert headers["Content-Type"] == "text/html; charset=utf-8"
        assert headers["Cache-Control"] == "no-store"
        assert headers["X-Content-Type-Options"] == "nosniff"
        csp = headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp
        assert "unsafe-inline" not in csp
        text = raw.decode()
        tags = re.findall(r"<[^>]+>", text)  # data is escaped: only the page's own markup
        assert not [t for t in tags if re.search(r"\son[a-z]+=|\sstyle=", t)]  # no inline code
        assert not [t for t in tags if t.startswith("<script") and " src=" not in t]
        assets = re.findall(r'(?:src|href)="(/ui/assets/[^"]+)"', text)
        assert len(assets) == 3, assets
    kinds = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    for asset in assets:
        status, raw, headers = served.call("GET", asset)
        assert status == 200 and raw
        assert headers["Content-Type"].split(";")[0] == kinds[Path(asset).suffix]
        assert "immutable" in headers["Cache-Control"]
        assert headers["X-Content-Type-Options"] == "nosniff"
        request = urllib.request.Request(
            served.base + asset, headers={"If-None-Match": headers["ETag"]}
        )
        with pytest.raises(urllib.error.HTTPError) as not_modified:
            urllib.request.urlopen(request, timeout=10)
        with not_modified.value:
            assert not_modified.value.code == 304
    stale = re.sub(r"/ui/assets/[^/]+/", "/ui/assets/000000000000/", assets[0])
    assert served.call("GET", stale)[0] == 404
    assert served.call("GET", "/ui/assets/x/../../v1/services")[0] == 404
    status, raw, headers = served.call("GET", "/ui/services/Not_A_Label/web")
    assert status == 404 and b"DNS labels" in raw


HOSTILE_TAGS = [
    "<script>window.pwned=1</script>",
    '"><img src=x onerror="window.pwned=1">',
    "x" * 250,
]
HOSTILE_METADATA = {
    "quote": 'it\'s "quoted" & <b>bold</b>',
    "rtl": "\u05e9\u05dc\u05d5\u05dd \u202eevil",
    "html": "<img src=x onerror=window.pwned=1>",
}


def test_first_paint_without_javascript(served: Served, browser: Browser) -> None:
    served.register("static", "web", "web-1", tags=["canary", *HOSTILE_TAGS],
                    metadata=HOSTILE_METADATA, ports=[{"name": "http", "port": 8080}])  # fmt: skip
    context = browser.new_context(java_script_enabled=False)
    try:
        tab = context.new_page()
        tab.goto(served.base + "/ui/?q=stat")
        row = tab.locator('tr[data-key="static/web"]')
        expect(row).to_be_visible()
        expect(row).to_contain_text("canary")
        expect(tab.locator("#live")).to_have_text(re.compile("need JavaScript"))
        # the filter works without JavaScript too: a GET form the server answers
        tab.goto(served.base + "/ui/?q=no-such-thing-anywhere")
        expect(row).to_be_hidden()
        tab.goto(served.base + "/ui/services/static/web")
        instance = tab.locator('tr[data-key="web-1"]')
        expect(instance).to_contain_text("10.1.2.3")
        for tag in HOSTILE_TAGS:
            expect(instance.get_by_text(tag, exact=True)).to_be_visible()
        expect(instance).to_contain_text(HOSTILE_METADATA["quote"])
        expect(tab.locator("#dig")).to_contain_text("_http._tcp.web.static.svc.cluster.local SRV")
        assert tab.locator("img").count() == 0 and tab.locator("main b").count() == 0
    finally:
        context.close()


def test_registration_appears_and_expiry_disappears(served: Served, page: Watched) -> None:
    tab = page.page
    tab.goto(served.base + "/ui/services/live/web")
    expect(tab.locator("#live")).to_have_text(re.compile("Live"))
    row = tab.locator('tr[data-key="web-1"]')
    expect(row).to_have_count(0)
    served.register("live", "web", "web-1", address="10.9.0.1", ttl=2, tags=["fresh"])
    expect(row).to_contain_text("10.9.0.1", timeout=WAIT_MS)
    expect(row.locator("time")).to_have_text(re.compile(r"in \d s|now"), timeout=WAIT_MS)
    expect(tab.locator("#summary")).to_have_text("1 live instance")
    # no heartbeat: the lease runs out and the row goes
    expect(row).to_have_count(0, timeout=WAIT_MS)
    expect(tab.locator("#summary")).to_have_text("0 live instances")

    tab.goto(served.base + "/ui/")
    service_row = tab.locator('tr[data-key="live/api"]')
    expect(service_row).to_have_count(0)
    served.register("live", "api", "api-1", ttl=2, tags=["v2"])
    expect(service_row).to_contain_text("v2", timeout=WAIT_MS)
    expect(service_row).to_have_count(0, timeout=WAIT_MS)


def test_filter_and_open_a_service(served: Served, page: Watched) -> None:
    served.register("shop", "cart", "cart-1", tags=["blue"])
    served.register("shop", "checkout", "checkout-1", ports=[{"name": "grpc", "port": 9090}])
    served.register("bank", "ledger", "ledger-1")
    tab = page.page
    tab.goto(served.base + "/ui/")
    filter_box = tab.get_by_label("Filter by namespace, service or tag")
    filter_box.fill("checkout")
    expect(tab.locator('tr[data-key="shop/checkout"]')).to_be_visible()
    expect(tab.locator('tr[data-key="shop/cart"]')).to_be_hidden()
    expect(tab.locator('section[data-namespace="bank"]')).to_be_hidden()
    assert tab.url.endswith("/ui/?q=checkout")
    filter_box.fill("blue")  # a tag
    expect(tab.locator('tr[data-key="shop/cart"]')).to_be_visible()
    expect(tab.locator('tr[data-key="shop/checkout"]')).to_be_hidden()
    filter_box.fill("")
    expect(tab.locator('section[data-namespace="bank"]')).to_be_visible()
    # keyboard only: tab to the link and follow it
    link = tab.get_by_role("link", name="checkout")
    link.focus()
    tab.keyboard.press("Enter")
    expect(tab).to_have_url(served.base + "/ui/services/shop/checkout")
    expect(tab.get_by_role("heading", level=1)).to_have_text("Service checkout")
    expect(tab.locator("#dig")).to_contain_text("_grpc._tcp.checkout.shop.svc.cluster.local SRV")
    expect(tab.locator('tr[data-key="checkout-1"]')).to_contain_text("grpc 9090/tcp")


def test_hostile_values_arriving_live_stay_text(served: Served, page: Watched) -> None:
    tab = page.page
    tab.goto(served.base + "/ui/services/hostile/web")
    expect(tab.locator("#live")).to_have_text(re.compile("Live"))
    served.register("hostile", "web", "web-1", tags=HOSTILE_TAGS, metadata=HOSTILE_METADATA)
    row = tab.locator('tr[data-key="web-1"]')
    for tag in HOSTILE_TAGS:
        expect(row.get_by_text(tag, exact=True)).to_be_visible(timeout=WAIT_MS)
    expect(row).to_contain_text(HOSTILE_METADATA["rtl"])
    tab.goto(served.base + "/ui/")
    expect(tab.locator('tr[data-key="hostile/web"]')).to_contain_text(HOSTILE_TAGS[0])
    served.register("hostile", "web", "web-2", tags=["<svg onload=window.pwned=1>"])
    expect(tab.locator('tr[data-key="hostile/web"]')).to_contain_text("<svg onload")
    assert tab.evaluate("window.pwned") is None
    assert tab.locator("main img, main svg, main script").count() == 0


def test_deregister_asks_first(served: Served, page: Watched) -> None:
    served.register("ops", "web", "web-1")
    served.register("ops", "web", "web-2")
    tab = page.page
    tab.goto(served.base + "/ui/services/ops/web")
    button = tab.get_by_role("button", name="Deregister web-1")
    tab.once("dialog", lambda dialog: dialog.dismiss())
    button.click()
    expect(tab.locator("#live")).to_have_text(re.compile("Live"))
    assert served.call("GET", "/v1/services/ops/web/instances/web-1")[0] == 200
    tab.once("dialog", lambda dialog: dialog.accept())
    button.click()
    expect(tab.locator('tr[data-key="web-1"]')).to_have_count(0, timeout=WAIT_MS)
    expect(tab.locator("#message")).to_have_text("web-1 deregistered.")
    assert served.call("GET", "/v1/services/ops/web/instances/web-1")[0] == 404
    expect(tab.locator('tr[data-key="web-2"]')).to_be_visible()


def test_networks_and_health(served: Served, page: Watched) -> None:
    status, raw, _ = served.call(
        "PUT", "/v1/networks/pods", {"subnet": "10.244.0.0/16", "node_prefix": 24}
    )
    assert status in (200, 201), raw
    tab = page.page
    tab.goto(served.base + "/ui/networks")
    network = tab.locator('section[data-network="pods"]')
    expect(network).to_contain_text("10.244.0.0/16")
    status, raw, _ = served.call(
        "PUT", "/v1/networks/pods/attachments/4f3c2b1a0d9e/eth0", {"name": "web-a"}
    )
    assert status in (200, 201), raw
    address = json.loads(raw)["address"]
    # live: the attachment and its node's block appear without a reload
    expect(network).to_contain_text(address, timeout=WAIT_MS)
    expect(network).to_contain_text("10.244.0.0/24")
    expect(network.locator("tbody tr").first).to_contain_text("252")  # free in the block

    tab.goto(served.base + "/ui/health")
    expect(tab.locator('[data-field="status"] dd')).to_have_text("ready")
    expect(tab.locator('[data-field="store"] dd')).to_have_text("up")
    query = dns.message.make_query("web.ops.svc.cluster.local", "A")
    for _ in range(20):
        dns.query.udp(query, served.dns[0], port=served.dns[1], timeout=3)
    rates = tab.locator("#queries tbody td.rate")
    expect(rates.first).to_have_text(re.compile(r"^\d+\.\d$"), timeout=WAIT_MS)
    total = tab.locator("#queries tbody tr").filter(has_text=re.compile("fast|full"))
    expect(total.first).to_be_visible()


@pytest.mark.parametrize("width", [390, 800, 1024])
def test_no_sideways_scrolling(served: Served, browser: Browser, width: int) -> None:
    long = {"tags": ["y" * 200, "canary"], "metadata": {"owner": "z" * 200}}
    served.register("narrow", "web", "web-1", ports=[{"name": "http", "port": 80}], **long)
    phone = width < 600
    context = browser.new_context(viewport={"width": width, "height": 844}, is_mobile=phone)
    try:
        tab = context.new_page()
        for path in ("/ui/", "/ui/services/narrow/web", "/ui/health", "/ui/networks"):
            tab.goto(served.base + path)
            expect(tab.locator("#live")).to_have_text(re.compile("Live"))
            # nothing wider than the screen: long values wrap, a phone shows rows as cards
            scroll_width = tab.evaluate("document.documentElement.scrollWidth")
            assert scroll_width <= width, (path, scroll_width)
    finally:
        context.close()


def test_lists_are_read_a_page_at_a_time(served: Served, page: Watched) -> None:
    for n in range(5):
        served.register("paged", f"svc-{n}", "i-1")
    tab = page.page

    # every listing the page asks for comes two entries a page: the list must still be whole
    def two_a_page(route: Route) -> None:
        url = urllib.parse.urlsplit(route.request.url)
        query = dict(urllib.parse.parse_qsl(url.query)) | {"limit": "2"}
        route.continue_(url=url._replace(query=urllib.parse.urlencode(query)).geturl())

    tab.route(re.compile(r".*/v1/services(\?.*)?$"), two_a_page)
    tab.goto(served.base + "/ui/")
    section = tab.locator('section[data-namespace="paged"]')
    expect(section.locator("tbody tr")).to_have_count(5)
    expect(tab.locator("#live")).to_have_text(re.compile("Live"))
    served.register("paged", "svc-new", "i-1")  # the long poll answers with the first page
    expect(section.locator('tr[data-key="paged/svc-new"]')).to_be_visible(timeout=WAIT_MS)
    expect(section.locator("tbody tr")).to_have_count(6)
    expect(tab.locator("#summary")).to_have_text(re.compile(r"^\d+ services"))


def test_a_token_typed_into_the_page(served: Served, browser: Browser, tmp_path: Path) -> None:
    if "auth_file" not in {f.name for f in dataclasses.fields(Config)}:
        pytest.skip("this server has no --auth-file yet")

    def digest(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"tokens": [
        {"name": "reader", "sha256": digest("reader-token"), "namespaces": ["*"],
         "rights": ["read"]},
        {"name": "writer", "sha256": digest("writer-token"), "namespaces": ["locked"],
         "rights": ["read", "write"]},
    ]}))  # fmt: skip
    with serving("--auth-file", str(auth)) as locked:
        locked.register("locked", "web", "web-1", token="writer-token")
        context = browser.new_context()
        try:
            tab = context.new_page()
            problems: list[str] = []
            tab.on("pageerror", lambda error: problems.append(str(error)))
            tab.goto(locked.base + "/ui/services/locked/web")
            # without a token the first paint shows nothing of the registry, and says why
            expect(tab.locator("#token-needed")).to_be_visible()
            expect(tab.locator("#live")).to_have_text(re.compile("needs an API token"))
            row = tab.locator('tr[data-key="web-1"]')
            expect(row).to_have_count(0)
            token = tab.get_by_label("API token")
            token.fill("reader-token")
            token.press("Enter")
            expect(row).to_contain_text("10.1.2.3")
            expect(tab.locator("#token-needed")).to_be_hidden()
            # a read-only token: the server refuses the deregistration, the buttons go
            tab.once("dialog", lambda dialog: dialog.accept())
            tab.get_by_role("button", name="Deregister web-1").click()
            expect(tab.locator("#message")).to_have_text(re.compile("may not deregister"))
            expect(tab.get_by_role("button", name="Deregister web-1")).to_have_count(0)
            path = "/v1/services/locked/web/instances/web-1"
            assert locked.call("GET", path, token="reader-token")[0] == 200
            # a token with the write right brings them back, and deregisters
            token.fill("writer-token")
            token.press("Enter")
            tab.once("dialog", lambda dialog: dialog.accept())
            tab.get_by_role("button", name="Deregister web-1").click()
            expect(row).to_have_count(0, timeout=WAIT_MS)
            # the token stays in this tab: the list page reads with it
            tab.goto(locked.base + "/ui/")
            locked.register("locked", "api", "api-1", token="writer-token")
            expect(tab.locator('tr[data-key="locked/api"]')).to_be_visible(timeout=WAIT_MS)
            assert not problems, problems
        finally:
            context.close()
