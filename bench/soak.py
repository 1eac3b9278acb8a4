"""Soak: two replicas over etcd under churn while dnsperf runs; etcd restarted and compacted.

    python bench/soak.py                  # about 10 minutes (make soak), writes docs/soak.md
    python bench/soak.py --duration 60 --no-docs   # a short run, only printed

One etcd and two `discovery serve --etcd` replicas on free 127.0.0.1 ports. For --duration
seconds, at once:

* --stable instances (in --stable-services services) are held by discovery.client
  registrations with heartbeats (TTL 6 s) against both replicas (the client fails over);
* a churn of about --churn registrations per second in other services: a third deleted again
  after a moment, a third left to expire (TTL 2 s, no heartbeat), a third re-registered with new
  addresses and then deleted;
* dnsperf asks each replica, at a bounded rate (--qps per replica), for the stable services'
  A and SRV names and the stable instances' names: every answer must be NOERROR (a stable name
  that vanished, even once, shows up as NXDOMAIN) and no query may be lost;
* etcd is killed (SIGKILL) and started again twice (at 1/3 and 2/3 of the run), and compacted
  at its current revision every --compact-every seconds.

Every 5 s it samples each replica's resident memory (VmRSS) and open file descriptors. At the end
the churn stops, the stable registrations are deregistered, and after the leases run out:

* no lost query and no answer other than NOERROR (dnsperf's counters);
* RSS at the end within 10% of where it settled (the median of the samples between 20% and 35%
  of the run);
* no file descriptor leaked: the replica holds no more descriptors than when it settled (at the
  end: the lowest of a few samples over 10 s, so that a connection a client has just closed
  does not count, and not counting a connection to etcd opened since, up to the two a replica
  holds: its gRPC channel and its keepalive stream, opened at the first heartbeat it serves);
* `discovery check` finds both replicas equal to etcd (during the run, after each restart, and
  at the end);
* every process and file it made is gone.

Exit 0 when every check holds, 1 otherwise. Nothing but 127.0.0.1 is bound or queried; every
process started here is stopped at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from dnsperf_compare import HOST, Proc, Procs, parse_dnsperf
from machine import discovery_command

from discovery.client import DiscoveryClient, Registration
from discovery.store.etcd import EtcdStore
from discovery.testing import EtcdServer

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "soak.md"
NS = "soak"
ZONE = "cluster.local"
SAMPLE_EVERY = 5.0
END_SAMPLES = 5  # descriptor samples at the end, once the clients are gone
END_WINDOW = 10.0  # seconds they span
ETCD_CONNECTIONS = 2  # a replica's gRPC channel and its keepalive stream
STABLE_TTL = 6
EXPIRE_TTL = 2
CHURN_TTL = 30
# churn names (and addresses) come from a pool: the answer builder's caches of names and
# addresses are bounded (65,536 entries each) and fill as new names come; with a pool they
# fill in the first minutes, so RSS afterwards shows what each operation leaves behind
NAME_POOL = 4000

_DNS_LINE = re.compile(r"DNS listening on ([0-9.]+):(\d+)")
_HTTP_LINE = re.compile(r"HTTP listening on https?://([0-9.]+):(\d+)")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class Replica:
    name: str
    proc: Proc
    dns_port: int
    http_port: int
    rss_kb: list[tuple[float, int]] = field(default_factory=list)
    fds: list[tuple[float, int]] = field(default_factory=list)
    open_at_end: str = ""  # what the descriptors were at the end (kinds, and TCP peers)
    end_fds: list[int] = field(default_factory=list)  # the samples after the clients were gone
    etcd_port: int = 0
    to_etcd: list[tuple[float, int]] = field(default_factory=list)  # TCP connections to etcd

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def pid(self) -> int:
        return self.proc.popen.pid

    def sample(self, at: float) -> None:
        status = Path(f"/proc/{self.pid}/status").read_text()
        rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
        self.rss_kb.append((at, rss))
        self.fds.append((at, len(os.listdir(f"/proc/{self.pid}/fd"))))
        self.to_etcd.append((at, sum(p.endswith(f":{self.etcd_port}") for p in self.tcp_peers())))

    def tcp_peers(self) -> list[str]:
        """The remote address of each TCP connection this replica holds."""
        if not shutil.which("ss"):
            return []
        out = subprocess.run(["ss", "-tnpH"], capture_output=True, text=True).stdout
        return [line.split()[4] for line in out.splitlines() if f"pid={self.pid}," in line]

    def describe_fds(self) -> None:
        kinds: dict[str, int] = {}
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            with contextlib.suppress(OSError):
                kind = os.readlink(f"/proc/{self.pid}/fd/{fd}").split(":")[0]
                kinds[kind] = kinds.get(kind, 0) + 1
        peers = []
        if shutil.which("ss"):
            out = subprocess.run(["ss", "-tnpH"], capture_output=True, text=True).stdout
            peers = [" ".join(line.split()[:5]) for line in out.splitlines()
                     if f"pid={self.pid}," in line]  # fmt: skip
        self.open_at_end = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
        if peers:
            self.open_at_end += "; TCP: " + "; ".join(peers)


def start_replica(procs: Procs, etcd: EtcdServer, work: Path, name: str) -> Replica:
    log_path = work / f"{name}.log"
    argv = [
        *discovery_command(), "serve", "--etcd", etcd.client_url,
        "--dns", f"{HOST}:0", "--http", f"{HOST}:0", "--min-ttl", str(EXPIRE_TTL),
        "--node", name, "--log-level", "info",
    ]  # fmt: skip
    proc = procs.start(name, argv, log_path, 0)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{name} exited {proc.popen.returncode}:\n"
                               + log_path.read_text(errors="replace")[-3000:])  # fmt: skip
        text = log_path.read_text(errors="replace")
        dns, web = _DNS_LINE.search(text), _HTTP_LINE.search(text)
        if dns and web:
            return Replica(
                name, proc, int(dns.group(2)), int(web.group(2)), etcd_port=etcd.client_port
            )
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not start in 60 s")


async def ready(session: aiohttp.ClientSession, replica: Replica, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with session.get(replica.url + "/readyz") as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{replica.name} not ready in {timeout} s")


def stable_address(i: int) -> str:
    return f"10.{64 + i // 65536}.{i // 256 % 256}.{i % 256}"


def query_file(path: Path, stable: int, services: int) -> None:
    lines = []
    for s in range(services):
        lines.append(f"svc{s}.{NS}.svc.{ZONE} A")
        lines.append(f"_http._tcp.svc{s}.{NS}.svc.{ZONE} SRV")
    for i in range(stable):
        lines.append(f"i{i}.svc{i % services}.{NS}.svc.{ZONE} A")
    path.write_text("\n".join(lines) + "\n")


def dnsperf(procs: Procs, work: Path, replica: Replica, queries: Path, seconds: float,
            qps: int) -> Proc:  # fmt: skip
    argv = ["dnsperf", "-s", HOST, "-p", str(replica.dns_port), "-d", str(queries),
            "-l", f"{seconds:.0f}", "-Q", str(qps), "-c", "4", "-t", "2"]  # fmt: skip
    return procs.start(f"dnsperf-{replica.name}", argv, work / f"dnsperf-{replica.name}.log", 0)


async def check(etcd: EtcdServer, replicas: list[Replica]) -> tuple[int, str]:
    argv = [*discovery_command(), "check", "--etcd", etcd.client_url, "--wait", "30"]
    for r in replicas:
        argv += ["--replica", r.url]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


async def probe(session: aiohttp.ClientSession, replicas: list[Replica], stable: int,
                stop: asyncio.Event, note: Callable[[str], None]) -> None:  # fmt: skip
    """Once a second, how many stable instances each replica lists: a drop (what dnsperf would
    see as NXDOMAIN) and its end are noted as events, with how many were missing."""
    missing_since: dict[str, tuple[float, int]] = {}
    while not stop.is_set():
        for r in replicas:
            try:
                async with session.get(r.url + "/v1/registry?limit=5000") as response:
                    body = await response.json()
            except (aiohttp.ClientError, TimeoutError, ValueError):
                continue
            held = sum(i["service"].startswith("svc") for i in body["instances"])
            missing = stable - held
            began = missing_since.get(r.name)
            if missing > 0 and began is None:
                missing_since[r.name] = (time.monotonic(), missing)
                note(f"{r.name} lists {missing} of the {stable} stable instances as missing")
            elif missing > 0 and began is not None and missing > began[1]:
                missing_since[r.name] = (began[0], missing)
                note(f"{r.name}: {missing} stable instances missing")
            elif missing <= 0 and began is not None:
                del missing_since[r.name]
                note(f"{r.name} lists every stable instance again, "
                     f"after {time.monotonic() - began[0]:.1f} s")  # fmt: skip
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


@dataclass
class Churn:
    registered: int = 0
    deleted: int = 0
    left_to_expire: int = 0
    refused: int = 0
    unavailable: int = 0
    errors: list[str] = field(default_factory=list)


async def churn(urls: list[str], rate: float, stop: asyncio.Event, stats: Churn) -> None:
    """Registrations at about `rate` per second, each a short-lived instance in a churn service."""
    rng = random.Random(7)
    pending: set[asyncio.Task[None]] = set()
    async with DiscoveryClient(urls, timeout=10) as client:

        async def one(n: int) -> None:
            service, inst = f"churn{n % 50}", f"c{n % NAME_POOL}"
            kind = n % 3
            try:
                low = f"{n % NAME_POOL // 256}.{n % 256}"
                ttl = EXPIRE_TTL if kind == 1 else CHURN_TTL
                await client.register(NS, service, inst, address=f"10.200.{low}",
                                      ports=[("http", 80)], ttl=ttl)  # fmt: skip
                stats.registered += 1
                if kind == 1:
                    stats.left_to_expire += 1
                    return
                await asyncio.sleep(rng.uniform(0.2, 2.0))
                if kind == 2:
                    await client.register(NS, service, inst, address=f"10.201.{low}",
                                          ports=[("http", 81)], ttl=CHURN_TTL)  # fmt: skip
                if await client.deregister(NS, service, inst):
                    stats.deleted += 1
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await asyncio.shield(client.deregister(NS, service, inst))
                raise
            except Exception as e:
                name = type(e).__name__
                if name == "Unavailable":
                    stats.unavailable += 1
                else:
                    stats.refused += 1
                    if len(stats.errors) < 10:
                        stats.errors.append(f"{name}: {e}")
                with contextlib.suppress(Exception):
                    await client.deregister(NS, service, inst)

        n = 0
        started = time.monotonic()
        while not stop.is_set():
            due = started + n / rate
            delay = due - time.monotonic()
            if delay > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                continue
            task = asyncio.create_task(one(n))
            pending.add(task)
            task.add_done_callback(pending.discard)
            n += 1
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


@dataclass
class Event:
    at: float
    what: str


async def soak(args: argparse.Namespace, work: Path, procs: Procs) -> tuple[list[str], bool]:
    events: list[Event] = []
    t0 = time.monotonic()

    def note(what: str) -> None:
        events.append(Event(time.monotonic() - t0, what))
        log(what)

    etcd = EtcdServer(work / "etcd")
    etcd.start()
    replicas = [start_replica(procs, etcd, work, name) for name in ("replica-a", "replica-b")]
    urls = [r.url for r in replicas]
    failures: list[str] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for r in replicas:
            await ready(session, r)
        note("etcd and two replicas ready")
        queries = work / "queries.txt"
        query_file(queries, args.stable, args.stable_services)

        client = DiscoveryClient(urls, timeout=10)
        regs: list[Registration] = []
        for i in range(args.stable):
            regs.append(client.registration(
                NS, f"svc{i % args.stable_services}", f"i{i}", address=stable_address(i),
                ports=[("http", 8080)], ttl=STABLE_TTL))  # fmt: skip
        await asyncio.gather(*(reg.start() for reg in regs))
        note(f"{args.stable} stable instances registered")
        code, out = await check(etcd, replicas)
        if code != 0:
            failures.append(f"check after the stable registrations: {out}")

        t0 = time.monotonic()  # the soak proper starts now
        note(f"soak starts: {args.duration:.0f} s")
        perf = [dnsperf(procs, work, r, queries, args.duration, args.qps) for r in replicas]
        stop = asyncio.Event()
        churn_stats = Churn()
        churner = asyncio.create_task(churn(urls, args.churn, stop, churn_stats))
        prober = asyncio.create_task(probe(session, replicas, args.stable, stop, note))
        store = EtcdStore([etcd.endpoint], request_timeout=10.0, dial_timeout=5.0)
        restarts = [args.duration / 3, 2 * args.duration / 3]
        next_compact = args.compact_every
        next_sample = 0.0
        checks: list[tuple[float, int]] = []
        try:
            while (now := time.monotonic() - t0) < args.duration:
                if now >= next_sample:
                    for r in replicas:
                        r.sample(now)
                    next_sample += SAMPLE_EVERY
                if restarts and now >= restarts[0]:
                    restarts.pop(0)
                    etcd.stop()
                    note("etcd killed (SIGKILL)")
                    await asyncio.sleep(args.etcd_down)
                    await asyncio.to_thread(etcd.start)
                    note(f"etcd started again after {args.etcd_down:.0f} s down")
                    code, out = await check(etcd, replicas)
                    checks.append((time.monotonic() - t0, code))
                    note(f"discovery check after the restart: exit {code}")
                    if code != 0:
                        failures.append(f"check after an etcd restart: {out}")
                if now >= next_compact:
                    next_compact += args.compact_every
                    try:
                        revision = await store.revision()
                        await store.compact(revision)
                        note(f"etcd compacted at revision {revision}")
                    except Exception as e:
                        note(f"compaction skipped: {type(e).__name__}: {e}")
                await asyncio.sleep(0.2)
        finally:
            stop.set()
            await churner
            await prober
            await store.close()
        note(f"churn stopped: {churn_stats.registered} registered, {churn_stats.deleted} deleted, "
             f"{churn_stats.left_to_expire} left to expire, {churn_stats.unavailable} unavailable, "
             f"{churn_stats.refused} refused")  # fmt: skip
        for p in perf:
            p.popen.wait(timeout=60)
        unhealthy = sum(not reg.healthy for reg in regs)
        await asyncio.gather(*(reg.stop() for reg in regs))
        await client.close()
        note(f"stable registrations deregistered ({unhealthy} unhealthy at the end)")
        # every churn lease runs out within CHURN_TTL; wait for the registries to be empty of it
        deadline = time.monotonic() + CHURN_TTL + 10
        while time.monotonic() < deadline:
            async with session.get(urls[0] + "/v1/registry") as response:
                body = await response.json()
            if not _instances(body):
                break
            await asyncio.sleep(0.5)
        # a connection a client closed a moment ago may still be open on the server's side:
        # the count at the end is the lowest of END_SAMPLES samples over END_WINDOW seconds
        # (a leaked descriptor stays in every one of them)
        for _ in range(END_SAMPLES):
            end = time.monotonic() - t0
            for r in replicas:
                r.sample(end)
                # a connection to etcd opened after the settled samples (the keepalive stream is
                # opened at the first heartbeat a replica serves) is not a leak; any other is
                r.end_fds.append(r.fds[-1][1] - lazy_etcd_connections(r, args.duration))
            await asyncio.sleep(END_WINDOW / END_SAMPLES)
        for r in replicas:
            r.describe_fds()
        code, out = await check(etcd, replicas)
        checks.append((end, code))
        if code != 0:
            failures.append(f"check at the end: {out}")
        note(f"discovery check at the end: exit {code}")

    lines, ok = report(args, replicas, perf, churn_stats, events, checks, failures, unhealthy)
    etcd.stop()
    return lines, ok


def _instances(body: Any) -> int:
    """How many instances a `GET /v1/registry` body lists."""
    return len(body["instances"])


def _at(samples: list[tuple[float, int]], when: float) -> float:
    """The sample nearest to `when` seconds into the run."""
    return min(samples, key=lambda s: abs(s[0] - when))[1]


def settled(samples: list[tuple[float, int]], duration: float) -> float:
    window = [v for t, v in samples if 0.20 * duration <= t <= 0.35 * duration]
    return statistics.median(window or [v for _, v in samples])


def lazy_etcd_connections(r: Replica, duration: float) -> int:
    """Connections to etcd that the replica holds now and did not when it settled, up to the two
    it may hold (its gRPC channel, and its keepalive stream, which is opened at the first
    heartbeat it serves): those are not leaks; a third connection to etcd would be."""
    window = [v for t, v in r.to_etcd if 0.20 * duration <= t <= 0.35 * duration]
    return max(0, min(r.to_etcd[-1][1], ETCD_CONNECTIONS) - max(window or [0]))


def report(args: argparse.Namespace, replicas: list[Replica], perf: list[Proc], churn_stats: Churn,
           events: list[Event], checks: list[tuple[float, int]], failures: list[str],
           unhealthy: int) -> tuple[list[str], bool]:  # fmt: skip
    lines = ["| replica | queries sent | lost | NOERROR | other rcodes | RSS settled | RSS end | "
             "RSS max | fds settled | fds end |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r, p in zip(replicas, perf, strict=True):
        text = p.log_path.read_text(errors="replace")
        stats = parse_dnsperf(text)
        codes = stats.get("rcodes", {})
        sent = int(stats.get("sent", 0))
        lost = int(stats.get("lost", -1))
        noerror = codes.get("NOERROR", 0)
        other = {k: v for k, v in codes.items() if k != "NOERROR"}
        rss0 = settled(r.rss_kb, args.duration)
        rss_end = r.rss_kb[-1][1]
        rss_max = max(v for _, v in r.rss_kb)
        fd0 = settled(r.fds, args.duration)
        fd_end = min(r.end_fds)
        lines.append(f"| {r.name} | {sent:,} | {lost:,} | {noerror:,} | "
                     f"{', '.join(f'{k} {v}' for k, v in other.items()) or 'none'} | "
                     f"{rss0 / 1024:.1f} MB | {rss_end / 1024:.1f} MB | {rss_max / 1024:.1f} MB | "
                     f"{fd0:.0f} | {fd_end} |")  # fmt: skip
        if sent == 0:
            failures.append(f"{r.name}: dnsperf sent nothing:\n{text[-2000:]}")
        if lost != 0:
            failures.append(f"{r.name}: {lost} queries lost")
        if other:
            failures.append(f"{r.name}: answers other than NOERROR: {other}")
        if rss_end > 1.10 * rss0:
            failures.append(
                f"{r.name}: RSS {rss_end} kB at the end, settled at {rss0:.0f} kB (> 10%)"
            )
        if fd_end > fd0:
            failures.append(f"{r.name}: {fd_end} descriptors at the end, {fd0:.0f} when settled")
    c = churn_stats
    lines += ["", "RSS (MB) at 25%, 50%, 75% and 100% of the run: " + "; ".join(
        r.name + " " + ", ".join(f"{_at(r.rss_kb, f * args.duration) / 1024:.1f}"
                                 for f in (0.25, 0.5, 0.75, 1.0))
        for r in replicas)]  # fmt: skip
    lines += ["", "Open descriptors at 25%, 50%, 75% and 100% of the run (the last one: the lowest "
              f"of {END_SAMPLES} samples over {END_WINDOW:.0f} s after the clients were gone): "
              + "; ".join(
        r.name + " " + ", ".join(f"{_at(r.fds, f * args.duration):.0f}" for f in (0.25, 0.5, 0.75))
        + f", {min(r.end_fds)} (samples {', '.join(map(str, r.end_fds))})"
        for r in replicas)]  # fmt: skip
    lines += [""] + [f"Descriptors of {r.name} at the end: {r.open_at_end}" for r in replicas]
    lines += ["", f"Churn: {c.registered:,} registrations ({c.deleted:,} deleted "
              f"again, {churn_stats.left_to_expire:,} left to expire), "
              f"{churn_stats.unavailable:,} calls while no replica could reach etcd (503), "
              f"{churn_stats.refused:,} other failures; {args.stable} stable instances, "
              f"{unhealthy} of them unhealthy at the end.", ""]  # fmt: skip
    lines += ["`discovery check`: " + ", ".join(f"exit {c} at {t:.0f} s" for t, c in checks), ""]
    lines += ["Events:", ""] + [f"* {e.at:6.1f} s: {e.what}" for e in events] + [""]
    lines += ["Result: " + ("**every check held**" if not failures else "**FAILED**"), ""]
    lines += [f"* {f}" for f in failures]
    return lines, not failures


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--duration", type=float, default=600, help="seconds of churn and queries (600)")
    p.add_argument("--stable", type=int, default=300, help="instances held with heartbeats (300)")
    p.add_argument("--stable-services", type=int, default=30, help="services they belong to (30)")
    p.add_argument("--churn", type=float, default=40, help="churn registrations per second (40)")
    p.add_argument("--qps", type=int, default=2000, help="dnsperf queries/s per replica (2000)")
    p.add_argument(
        "--compact-every", type=float, default=60, help="seconds between compactions (60)"
    )
    p.add_argument("--etcd-down", type=float, default=3, help="seconds etcd stays down (3)")
    p.add_argument("--keep-logs", metavar="DIR", help="copy the logs (replicas, etcd) to DIR")
    p.add_argument("--no-docs", action="store_true", help=f"only print; do not write {DOCS}")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.ERROR)  # the client's retry warnings while etcd is down
    for tool in ("dnsperf", "etcd"):
        if shutil.which(tool) is None:
            print(f"soak: {tool} is not installed (make bench-deps test-deps)", file=sys.stderr)
            return 2
    command = "python bench/soak.py " + shlex.join(sys.argv[1:])
    started = dt.datetime.now(dt.UTC)
    procs = Procs()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    with tempfile.TemporaryDirectory(prefix="discovery-soak-") as tmp:
        if args.keep_logs:  # what the stable registrations' client did, too
            handler = logging.FileHandler(Path(tmp) / "client.log")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            logging.getLogger("discovery.client").addHandler(handler)
            logging.getLogger("discovery.client").setLevel(logging.INFO)
            logging.getLogger("discovery.client").propagate = False
        try:
            lines, ok = asyncio.run(soak(args, Path(tmp), procs))
        finally:
            procs.stop_all()
            if args.keep_logs:
                shutil.copytree(tmp, args.keep_logs, dirs_exist_ok=True)
    text = "\n".join(lines)
    print(text)
    if not args.no_docs:
        DOCS.write_text(
            "# Soak: two replicas over etcd, churn, dnsperf, etcd restarted and compacted\n\n"
            f"Made by `{command}` (`make soak`) on {started:%Y-%m-%d %H:%M} UTC, "
            f"{args.duration:.0f} s, on this project's 2-core machine; what it does and checks "
            "is in the script's docstring.\n\n" + text + "\n"
        )
        log(f"wrote {DOCS}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
