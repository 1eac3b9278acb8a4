"""The HTTP side of issue 13, measured: a write into a big service, listings of many services,
thousands of parked long polls, and what each does to DNS meanwhile.

    python bench/http_limits.py                          # this tree; writes docs/http-benchmarks.md
    python bench/http_limits.py --old /path/to/checkout  # the same run against other code too

etcd is started (free loopback ports, a temporary directory) and preloaded straight through
the store with `--big` instances of one service, 10 of another and one instance each of
`--services` services. Each code under test then runs as `python -m discovery serve --etcd …`
(free loopback ports, `--log-level info`) and loads it; `--old DIR` puts DIR first on the
server's PYTHONPATH. Nothing but 127.0.0.1 is bound or queried; every process started here is
stopped at the end. Steps, in one server per code:

1. `--writes` new instances are registered one at a time into the big service, and as many
   into the 10-instance one: PUT latency (request to 201, which includes this replica's cache
   showing it).
2. `GET /v1/services` (the default page:
   the whole list on code without pages) `--lists` times, one at a time, while a second task
   sends DNS queries (A of a one-instance service nobody writes to or polls) one at a time:
   listing latency, and the slowest DNS answer during the listings (what a listing holds the
   event loop for).
3. 300 registrations (20 in flight) into a service nobody polls, and 500 DNS queries, first
   alone, then with `--polls` long polls parked on other services (one connection each, the
   per-client cap raised where there is one); the server's RSS before, with and after the
   polls (after their connections close).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiohttp
import dns.asyncquery
import dns.message
from etcd_harness import machine, now, percentile, table
from machine import discovery_command

from discovery.model import InstanceKey, Registration, encode_registration
from discovery.store.etcd import EtcdStore
from discovery.testing import EtcdServer

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "/discovery/"
HTTP_LINE = re.compile(rb"HTTP listening on http://(\S+):(\d+)")
DNS_LINE = re.compile(rb"DNS listening on (\S+):(\d+) \(udp, tcp\)")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Server:
    def __init__(
        self, proc: asyncio.subprocess.Process, http: tuple[str, int], dns_: tuple[str, int]
    ) -> None:
        self.proc = proc
        self.http = http
        self.dns = dns_
        self.base = "http://{}:{}".format(*http)
        self.quiet = 0  # the number of the service the DNS queries ask for

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")


@contextlib.asynccontextmanager
async def server(source: str | None, extra: Sequence[str]) -> AsyncIterator[Server]:
    env = dict(os.environ)
    if source:
        env["PYTHONPATH"] = source
    cmd = [*discovery_command(), "serve", "--dns", "127.0.0.1:0", "--http", "127.0.0.1:0",
           "--cni-socket", "", "--log-level", "info", "--min-ttl", "1", *extra]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *cmd, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None
    http = dns_ = None
    drain = None
    try:
        while http is None or dns_ is None:
            line = await proc.stderr.readline()
            if not line:
                raise SystemExit("discovery exited before listening")
            if match := HTTP_LINE.search(line):
                http = (match.group(1).decode(), int(match.group(2)))
            if match := DNS_LINE.search(line):
                dns_ = (match.group(1).decode(), int(match.group(2)))
        drain = asyncio.create_task(proc.stderr.read())  # a full pipe would stop the server
        yield Server(proc, http, dns_)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if drain is not None:
            await drain


async def put(session: aiohttp.ClientSession, srv: Server, svc: str, inst: str, i: int) -> float:
    started = time.perf_counter()
    body = {"address": f"10.{64 + i // 65536}.{i // 256 % 256}.{i % 256 or 1}", "ttl": 600}
    url = f"{srv.base}/v1/services/default/{svc}/instances/{inst}"
    async with session.put(url, json=body) as r:
        if r.status not in (200, 201):
            raise SystemExit(f"PUT answered {r.status}: {await r.text()}")
    return time.perf_counter() - started


async def fill(session: aiohttp.ClientSession, srv: Server, names: list[tuple[str, str]]) -> float:
    """Register names (service, instance), 20 in flight: registrations per second."""
    queue = iter(enumerate(names))

    async def worker() -> None:
        for i, (svc, inst) in queue:
            await put(session, srv, svc, inst, i)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(20)))
    return len(names) / (time.perf_counter() - started)


async def dns_latencies(srv: Server, count: int, stop: asyncio.Event | None = None) -> list[float]:
    # a one-instance service nobody writes to or polls: the answer is the same size throughout
    query = dns.message.make_query(f"svc{srv.quiet}.default.svc.cluster.local", "A")
    host, port = srv.dns
    latencies: list[float] = []
    while (stop is None and len(latencies) < count) or (stop is not None and not stop.is_set()):
        started = time.perf_counter()
        await dns.asyncquery.udp(query, host, port=port, timeout=5)
        latencies.append(time.perf_counter() - started)
    return latencies


async def preload(etcd: EtcdServer, args: argparse.Namespace) -> None:
    """Straight into etcd (each server then loads it at start): `--big` instances of one
    service, 10 of another, one each of `--services` services."""
    log(f"preloading etcd: {args.big} + 10 instances, {args.services} services")
    store = EtcdStore([etcd.endpoint], request_timeout=30.0, dial_timeout=5.0)
    names = [("big", f"b{i}") for i in range(args.big)] + [("small", f"s{i}") for i in range(10)]
    names += [(f"svc{i}", "i1") for i in range(args.services)]
    queue = iter(enumerate(names))

    async def worker() -> None:
        for i, (svc, inst) in queue:
            address = f"10.{i // 65536}.{i // 256 % 256}.{i % 256 or 1}"
            value = encode_registration(Registration(address=address, ttl=600))
            await store.put(InstanceKey("default", svc, inst).store_key(PREFIX), value)

    try:
        await asyncio.gather(*(worker() for _ in range(50)))
    finally:
        await store.close()


def ms(value: float) -> str:
    return f"{value * 1000:.1f}"


async def measure(
    label: str, source: str | None, args: argparse.Namespace, etcd: EtcdServer
) -> dict[str, str]:
    figures: dict[str, str] = {"code": label}
    supports_limits = source is None  # this tree has the flags; older code may not
    extra = ["--etcd", etcd.client_url]
    if supports_limits:
        extra += ["--http-long-polls-per-client", str(args.polls + 10)]
        extra += ["--http-max-connections", str(args.polls + 1000)]
    async with server(source, extra) as srv, aiohttp.ClientSession() as session:
        while True:  # until the full load of what was preloaded
            async with session.get(f"{srv.base}/readyz") as response:
                if response.status == 200:
                    break
            await asyncio.sleep(0.5)
        tag = "o" if source else "t"  # each run its own new names
        srv.quiet = args.services - 1
        writes = range(args.writes)
        big = [await put(session, srv, "big", f"{tag}n{i}", 100_000 + i) for i in writes]
        small = [await put(session, srv, "small", f"{tag}n{i}", 200_000 + i) for i in writes]
        figures["PUT into big: p50 / p99 / max ms"] = (
            f"{ms(percentile(big, 50))} / {ms(percentile(big, 99))} / {ms(max(big))}"
        )
        figures["PUT into 10: p50 / p99 / max ms"] = (
            f"{ms(percentile(small, 50))} / {ms(percentile(small, 99))} / {ms(max(small))}"
        )

        stop = asyncio.Event()
        during = asyncio.create_task(dns_latencies(srv, 0, stop))
        lists = []
        for _ in range(args.lists):
            started = time.perf_counter()
            async with session.get(f"{srv.base}/v1/services") as response:
                body = await response.json()
            lists.append(time.perf_counter() - started)
        stop.set()
        stalls = await during
        figures["GET /v1/services: entries"] = str(len(body["services"]))
        figures["GET /v1/services: p50 / max ms"] = (
            f"{ms(percentile(lists, 50))} / {ms(max(lists))}"
        )
        figures["DNS during listings: p50 / max ms"] = (
            f"{ms(percentile(stalls, 50))} / {ms(max(stalls))}"
        )

        log(f"{label}: baseline, then {args.polls} parked long polls")
        async with session.get(f"{srv.base}/v1/services/default/small") as response:
            index = response.headers["X-Discovery-Index"]
        rss_before = srv.rss_mb()
        rate = await fill(session, srv, [("busy", f"{tag}a{i}") for i in range(300)])
        alone = await dns_latencies(srv, 500)
        polls = []
        for i in range(args.polls):
            reader, writer = await asyncio.open_connection(*srv.http)
            path = f"/v1/services/default/svc{i % 1000}?index={index}&wait=300s"
            writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
            polls.append((reader, writer))
        await asyncio.sleep(2)  # let the server read every request
        rss_with = srv.rss_mb()
        rate_polls = await fill(session, srv, [("busy", f"{tag}p{i}") for i in range(300)])
        with_polls = await dns_latencies(srv, 500)
        for _, writer in polls:
            writer.close()
        await asyncio.sleep(3)  # the server sees every close
        rss_after = srv.rss_mb()
        figures["registrations/s alone / with polls"] = f"{rate:.0f} / {rate_polls:.0f}"
        figures["DNS p99 alone / with polls ms"] = (
            f"{ms(percentile(alone, 99))} / {ms(percentile(with_polls, 99))}"
        )
        figures["RSS before / with / after polls MB"] = (
            f"{rss_before:.0f} / {rss_with:.0f} / {rss_after:.0f}"
        )
        figures["DNS median alone ms"] = ms(statistics.median(alone))
    return figures


async def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", help="a checkout of other code to measure too")
    parser.add_argument("--old-label", default="old")
    parser.add_argument("--big", type=int, default=6000)
    parser.add_argument("--writes", type=int, default=200)
    parser.add_argument("--services", type=int, default=30000)
    parser.add_argument("--lists", type=int, default=20)
    parser.add_argument("--polls", type=int, default=5000)
    parser.add_argument("--out", default=str(ROOT / "docs" / "http-benchmarks.md"))
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="http-limits-") as work:
        etcd = EtcdServer(Path(work) / "etcd")
        etcd.start()
        try:
            await preload(etcd, args)
            runs = [await measure("this tree", None, args, etcd)]
            if args.old:
                runs.append(await measure(args.old_label, args.old, args, etcd))
        finally:
            etcd.stop()
    load = f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    keys = list(runs[0])
    rows = [[key, *(run.get(key, "") for run in runs)] for key in keys[1:]]
    command = "python bench/http_limits.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = "\n".join([
        "# HTTP limits: big services, big listings, parked long polls",
        "",
        f"`{command.strip()}` on {now()}; {machine()}; {load} (a shared machine: other work"
        " ran beside it, so compare the columns, not the absolute figures).",
        "",
        table(["", *(run["code"] for run in runs)], rows),
        "",
        __doc__.split("\n", 4)[4].strip(),
        "",
    ])  # fmt: skip
    await asyncio.to_thread(Path(args.out).write_text, text)
    print(text)


if __name__ == "__main__":
    asyncio.run(main())
