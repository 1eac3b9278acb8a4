"""The dashboard with 1,000 services and 10,000 instances: first paint, and registration -> row.

One command, run from anywhere with the Python that has `discovery` and playwright installed
(`pip install -e '.[test]'`) and Debian's chromium (`make test-deps`):

    python bench/dashboard.py                   # writes docs/dashboard-benchmarks.md
    python bench/dashboard.py --rounds 5 --out -          # quick look, printed
    python bench/dashboard.py --screenshots docs          # docs/dashboard-*.png, small demo data

It starts `discovery serve` (embedded store, free loopback ports) as a subprocess, registers
--services services with --instances instances in all (spread over 20 namespaces, an hour's
lease, two tags each) over HTTP, and drives headless chromium through Playwright.

First paint: a fresh browser context per round loads the page; the figures are the browser's
own (Navigation Timing and Paint Timing): the HTML's last byte (responseEnd), first
contentful paint, and DOMContentLoaded, all from the start of navigation.

Registration -> row: the page is open and following; the browser itself sends the PUT
(fetch) so that one clock measures both ends. A MutationObserver notes when the row enters
the DOM and the next animation frame after it (the row painted); the figure is the time
from just before fetch() to that frame. Rounds are 0.5 s apart so each starts with the
page's long poll waiting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
from etcd_harness import log, machine, now, percentile, table
from machine import discovery_command
from playwright.sync_api import Browser, Page, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
HTTP_LINE = re.compile(r"HTTP listening on (http://\S+)")
NAMESPACES = 20


@contextlib.contextmanager
def server(*extra: str) -> Iterator[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISCOVERY_")}
    proc = subprocess.Popen(
        [*discovery_command(), "serve", "--http", "127.0.0.1:0", "--dns", "127.0.0.1:0",
         "--cni-socket", "", *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, env=env,
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        base = ""
        for line in proc.stderr:
            if match := HTTP_LINE.search(line):
                base = match.group(1)
                break
        if not base:
            raise RuntimeError("discovery serve exited before listening")
        stderr = proc.stderr
        threading.Thread(target=lambda: [None for _ in stderr], daemon=True).start()
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()


async def register_all(base: str, bodies: list[tuple[str, dict[str, Any]]]) -> float:
    started = time.perf_counter()
    queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
    for item in bodies:
        queue.put_nowait(item)

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            path, body = queue.get_nowait()
            async with session.put(base + path, json=body) as response:
                if response.status not in (200, 201):
                    raise RuntimeError(f"{path}: {response.status} {await response.text()}")

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(32)))
    return time.perf_counter() - started


def population(services: int, instances: int) -> list[tuple[str, dict[str, Any]]]:
    per_service = max(1, instances // services)
    bodies = []
    for s in range(services):
        ns, svc = f"team-{s % NAMESPACES:02d}", f"svc-{s:04d}"
        for i in range(per_service):
            n = s * per_service + i
            body = {
                "address": f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}",
                "ports": [{"name": "http", "port": 8080}],
                "ttl": 3600,
                "tags": ["v1", f"zone-{i % 3}"],
                "metadata": {"version": "1.4.2"},
            }
            bodies.append((f"/v1/services/{ns}/{svc}/instances/{svc}-{i}", body))
    return bodies


# (page.wait_for_function with a string would need 'unsafe-eval', which the pages' CSP refuses)
FIRST_PAINT = """async () => {
  await new Promise((resolve) => new PerformanceObserver(resolve)
    .observe({type: "paint", buffered: true}));
  const nav = performance.getEntriesByType("navigation")[0];
  const fcp = performance.getEntriesByName("first-contentful-paint")[0];
  return {html: nav.responseEnd, fcp: fcp ? fcp.startTime : null,
          dcl: nav.domContentLoadedEventEnd, bytes: nav.transferSize};
}"""

REGISTER_AND_WAIT = """async ([path, selector, body]) => {
  return await new Promise((resolve, reject) => {
    let seen = null;
    const started = performance.now();
    const look = () => {
      if (seen === null && document.querySelector(selector)) {
        seen = performance.now();
        observer.disconnect();
        requestAnimationFrame(() =>
          resolve({row: seen - started, frame: performance.now() - started}));
      }
    };
    const observer = new MutationObserver(look);
    observer.observe(document.body, {childList: true, subtree: true});
    setTimeout(() => reject(new Error("no row within 10 s")), 10000);
    fetch(path, {method: "PUT", body: JSON.stringify(body)}).then((r) => {
      if (r.status !== 201) reject(new Error("PUT answered " + r.status));
    });
  });
}"""


def first_paint(browser: Browser, url: str, rounds: int) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {"html": [], "fcp": [], "dcl": [], "bytes": []}
    for _ in range(rounds):
        context = browser.new_context()
        page = context.new_page()
        page.goto(url, wait_until="load")
        figures = page.evaluate(FIRST_PAINT)
        for key in found:
            found[key].append(float(figures[key]))
        context.close()
    return found


def registration_to_row(
    page: Page, url: str, ns: str, svc: str, rounds: int, tag: str
) -> dict[str, list[float]]:
    page.goto(url)
    page.locator("#live").filter(has_text="Live").wait_for()
    page.wait_for_timeout(500)
    found: dict[str, list[float]] = {"row": [], "frame": []}
    for n in range(rounds):
        name = f"new-{tag}-{n}"
        if svc:  # a new instance of the service the page shows
            path, selector = f"/v1/services/{ns}/{svc}/instances/{name}", f'tr[data-key="{name}"]'
        else:  # a new service on the list
            path = f"/v1/services/{ns}/{name}/instances/i-1"
            selector = f'tr[data-key="{ns}/{name}"]'
        body = {"address": "10.200.0.1", "ttl": 3600, "tags": ["new"]}
        figures = page.evaluate(REGISTER_AND_WAIT, [path, selector, body])
        found["row"].append(float(figures["row"]))
        found["frame"].append(float(figures["frame"]))
        page.wait_for_timeout(500)
    return found


def summary(values: list[float]) -> list[str]:
    return [f"{percentile(values, 50):.0f}", f"{percentile(values, 90):.0f}", f"{max(values):.0f}"]


def measure(args: argparse.Namespace) -> str:
    with server() as base:
        bodies = population(args.services, args.instances)
        log(f"registering {len(bodies)} instances of {args.services} services")
        took = asyncio.run(register_all(base, bodies))
        log(f"registered in {took:.1f} s")
        playwright = sync_playwright().start()
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            service_url = f"{base}/ui/services/team-00/svc-0000"
            list_paint = first_paint(browser, base + "/ui/", args.rounds)
            service_paint = first_paint(browser, service_url, args.rounds)
            context = browser.new_context()
            page = context.new_page()
            to_list = registration_to_row(page, base + "/ui/", "team-00", "", args.rounds, "l")
            to_service = registration_to_row(
                page, service_url, "team-00", "svc-0000", args.rounds, "s"
            )
            context.close()
            version = browser.version
        finally:
            browser.close()
            playwright.stop()
    each = len(bodies) // args.services
    rows = [
        ["services list (1 page, all services)", "HTML received", *summary(list_paint["html"])],
        ["", "first contentful paint", *summary(list_paint["fcp"])],
        ["", "DOMContentLoaded", *summary(list_paint["dcl"])],
        [f"one service ({each} instances)", "HTML received", *summary(service_paint["html"])],
        ["", "first contentful paint", *summary(service_paint["fcp"])],
        ["", "DOMContentLoaded", *summary(service_paint["dcl"])],
        ["services list: a new service", "row in the DOM", *summary(to_list["row"])],
        ["", "row painted (next frame)", *summary(to_list["frame"])],
        ["one service: a new instance", "row in the DOM", *summary(to_service["row"])],
        ["", "row painted (next frame)", *summary(to_service["frame"])],
    ]
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    command = "python bench/dashboard.py" + (
        f" --rounds {args.rounds}" if args.rounds != 20 else ""
    )
    list_kib = percentile(list_paint["bytes"], 50) / 1024
    return f"""# Dashboard: first paint and registration -> row

`{command}` ({now()}; {machine()}; Chromium {version}, headless, through Playwright;
load average {load} at the end: the machine was shared with other work).

{args.services:,} services, {len(bodies):,} instances ({len(bodies) // args.services} per
service, {NAMESPACES} namespaces, tags and metadata on each) registered over HTTP in
{took:.1f} s on the embedded store; {args.rounds} rounds of each measurement, milliseconds.
The services list page is {list_kib:.0f} KiB of HTML (every service, server-rendered).

{table(["page", "measured from the start of navigation / from fetch()", "p50", "p90", "max"], rows)}

How: first paint is the browser's own Navigation and Paint Timing in a fresh context per
round. Registration -> row: the page is open and following the API's long poll; the
browser sends the PUT itself, a MutationObserver notes the row, and the next animation frame
after it counts as painted; one clock (performance.now()) measures both ends. On the list
page a new service's registration returns the long poll with the whole list (every
service), which the page reconciles row by row; on a service page the long poll is for that
service only.
"""


DEMO = [
    ("default", "web", "web-1", {"address": "10.1.2.3", "ttl": 600, "tags": ["canary", "v2"],
     "ports": [{"name": "http", "port": 8080}],
     "metadata": {"version": "1.4.2", "owner": "web-team"}}),
    ("default", "web", "web-2", {"address": "10.1.2.4", "ttl": 300, "tags": ["v2"],
     "ports": [{"name": "http", "port": 8080}], "metadata": {"version": "1.4.2"}}),
    ("default", "web", "web-3", {"address": "10.1.2.5", "ttl": 300, "tags": ["v1"],
     "ports": [{"name": "http", "port": 8080}, {"name": "metrics", "port": 9100}]}),
    ("default", "api", "api-1", {"address": "10.1.3.1", "ttl": 60,
     "ports": [{"name": "grpc", "port": 9090}]}),
    ("payments", "ledger", "ledger-1", {"address": "10.2.0.7", "ttl": 60, "tags": ["pci"],
     "ports": [{"name": "https", "port": 8443}]}),
    ("payments", "ledger", "ledger-2", {"address": "10.2.0.8", "ttl": 60, "tags": ["pci"]}),
    ("payments", "fraud", "fraud-1", {"address": "10.2.1.3", "ttl": 60,
     "metadata": {"note": "<script>alert(1)</script> shown as text"}}),
]  # fmt: skip


def screenshots(directory: Path) -> None:
    with server() as base, contextlib.ExitStack() as stack:
        asyncio.run(register_all(base, [(f"/v1/services/{ns}/{svc}/instances/{inst}", body)
                                         for ns, svc, inst, body in DEMO]))  # fmt: skip
        for path, body in (
            ("/v1/networks/pods", {"subnet": "10.244.0.0/16", "node_prefix": 24}),
            ("/v1/networks/pods/attachments/4f3c2b1a0d9e/eth0", {"name": "web-a"}),
            ("/v1/networks/pods/attachments/9a8b7c6d5e4f/eth0", {"name": "worker-b"}),
        ):
            asyncio.run(register_all(base, [(path, body)]))
        playwright = stack.enter_context(sync_playwright())
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for name, path, width, height in (
                ("services", "/ui/", 1100, 640),
                ("service", "/ui/services/default/web", 1100, 640),
                ("networks", "/ui/networks", 1100, 560),
                ("health", "/ui/health", 1100, 560),
                ("phone", "/ui/services/default/web", 390, 844),
            ):
                context = browser.new_context(viewport={"width": width, "height": height})
                page = context.new_page()
                page.goto(base + path)
                page.locator("#live").filter(has_text="Live").wait_for()
                page.wait_for_timeout(2500)  # the health page's second reading: rates
                target = directory / f"dashboard-{name}.png"
                page.screenshot(path=str(target))
                log(f"wrote {target}")
                context.close()
        finally:
            browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--instances", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "docs" / "dashboard-benchmarks.md"))
    parser.add_argument("--screenshots", metavar="DIR", help="write screenshots there instead")
    args = parser.parse_args()
    if shutil.which(CHROMIUM) is None:
        sys.exit(f"{CHROMIUM} is missing: apt-get install chromium (make test-deps)")
    if args.screenshots:
        screenshots(Path(args.screenshots))
        return 0
    report = measure(args)
    if args.out == "-":
        print(report)
    else:
        Path(args.out).write_text(report)
        log(f"wrote {args.out}")
    print(json.dumps({"written": args.out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
