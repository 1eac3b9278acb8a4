"""Scale: discovery with 100,000 instances in etcd, against the 1,000-instance case.

One command, run from anywhere with the Python that has `discovery` installed:

    python bench/scale.py            # full: 3 load repeats, 3 bursts, 5 dnsperf rounds x 10 s
    python bench/scale.py --quick    # smoke run: small registries, 1 repeat, 2 s dnsperf runs

For three registries, 1,000 services x 1 instance (the baseline), 1,000 x 100 and 10,000 x 10,
each in its own etcd (free 127.0.0.1 ports, data in a temporary directory), it writes the
instances straight into etcd in the layout the API uses (`/discovery/v1/instances/default/svcN/iK`
-> `encode_registration(Registration(...))`, one lease of --lease-ttl seconds per instance, each
instance with one port `http` 80), with discovery's own EtcdStore and --concurrency writes in
flight, then measures:

* the resident memory (VmRSS, and the peak VmHWM, from /proc/PID/status) of `discovery serve`
  with an empty registry and after the first full load;
* the time to the first full load: from the start of the process to /readyz answering 200, and to
  the timestamp of its "loaded N records" log line (--load-repeats fresh processes, median);
* the time to apply a burst of --burst puts that change the addresses of existing instances,
  written as fast as the client can: from the first write until discovery's
  `discovery_watch_revision` gauge (/metrics) reaches the revision of the last write, then a DNS
  query checks that a changed instance name answers its new address (--bursts bursts, median);
* DNS queries/s with `dnsperf -c 1 -l --duration` (plain, no EDNS) on a query file of --lines
  lines from that registry (80% A for service names, 10% A for instance names, 10% NXDOMAIN),
  in alternation with the 1,000-instance server that runs next to it the whole time (both loaded;
  --rounds rounds, the order flips every round), as a ratio to it.

discovery runs under `taskset -c 1`, dnsperf, etcd and this client under `taskset -c 0`. Every
process started here is stopped at the end, also on error or Ctrl-C. Nothing but 127.0.0.1 is
bound or queried. It prints a table and writes docs/scale.md (--no-docs: only print).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import http.client
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dnsperf_compare import (
    CLIENT_CPU,
    HOST,
    SERVER_CPU,
    Proc,
    Procs,
    Run,
    _cpu_busy,
    ask,
    how_it_was_run,
    machine_facts,
    measure,
)
from machine import discovery_command

from discovery.model import Port, Registration, encode_registration
from discovery.store.etcd import EtcdStore
from discovery.testing import EtcdServer

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

NS = "default"
ZONE_SUFFIX = f"{NS}.svc.cluster.local"
PREFIX = "/discovery/"
_DNS_LINE = re.compile(r"DNS listening on ([0-9.]+):(\d+)")
_HTTP_LINE = re.compile(r"HTTP listening on http://([0-9.]+):(\d+)")
_LOADED_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ \S+: loaded (\d+) records at revision (\d+)",
    re.M,
)
_LISTEN_TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ \S+: DNS listening", re.M)


def log(message: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _median(values: list[float]) -> float:
    ordered = sorted(v for v in values if v == v)
    if not ordered:
        return float("nan")
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Registry:
    label: str
    services: int
    per_service: int

    @property
    def instances(self) -> int:
        return self.services * self.per_service

    def split(self, i: int) -> tuple[int, int]:
        return i // self.per_service, i % self.per_service

    def key(self, i: int) -> bytes:
        svc, inst = self.split(i)
        return f"{PREFIX}v1/instances/{NS}/svc{svc}/i{inst}".encode()

    def instance_name(self, i: int) -> str:
        svc, inst = self.split(i)
        return f"i{inst}.svc{svc}.{ZONE_SUFFIX}"


def address(i: int, generation: int = 0) -> str:
    """Unique per (instance, generation): generation 0 in 10.0.0.0/10, later ones above."""
    n = generation * 1_048_576 + i  # 2**20 per generation: room for 100,000 instances
    return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


_PORTS = (Port(name="http", port=80),)


def value(i: int, lease_ttl: int, generation: int = 0) -> bytes:
    return encode_registration(Registration(address=address(i, generation), ports=_PORTS,
                                            ttl=lease_ttl))  # fmt: skip


def make_queries(
    registry: Registry, lines: int, seed: int, services: int | None = None
) -> list[tuple[str, str]]:
    """80% A on service names, 10% A on instance names, 10% names that do not exist; names
    from the first `services` services only when given (a smaller working set)."""
    rng = random.Random(seed)
    n_inst = lines // 10
    n_nx = lines // 10
    n_svc = lines - n_inst - n_nx
    pool = min(registry.services, services or registry.services)
    queries = [(f"svc{rng.randrange(pool)}.{ZONE_SUFFIX}", "A") for _ in range(n_svc)]
    queries += [(registry.instance_name(rng.randrange(pool * registry.per_service)), "A")
                for _ in range(n_inst)]  # fmt: skip
    queries += [(f"missing{rng.randrange(10**6)}.{ZONE_SUFFIX}", "A") for _ in range(n_nx)]
    rng.shuffle(queries)
    return queries


async def run_pool(count: int, concurrency: int, job: Callable[[int], Awaitable[None]]) -> None:
    """job(0) ... job(count-1) with at most `concurrency` in flight."""
    counter = iter(range(count))

    async def worker() -> None:
        for i in counter:
            await job(i)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))


async def fill(etcd: EtcdServer, registry: Registry, lease_ttl: int, concurrency: int
               ) -> tuple[list[int], float, int]:  # fmt: skip
    """Write every instance with its own lease; returns the leases, seconds and last revision."""
    leases = [0] * registry.instances
    last = 0
    async with _store(etcd) as store:
        started = time.perf_counter()

        async def one(i: int) -> None:
            nonlocal last
            lease = await store.grant(lease_ttl)
            result = await store.put(registry.key(i), value(i, lease_ttl), lease)
            leases[i] = lease
            last = max(last, result.revision)

        await run_pool(registry.instances, concurrency, one)
        took = time.perf_counter() - started
    return leases, took, last


@contextlib.asynccontextmanager
async def _store(etcd: EtcdServer) -> Any:
    store = EtcdStore([etcd.endpoint], request_timeout=30.0, dial_timeout=5.0)
    try:
        yield store
    finally:
        await store.close()


# --------------------------------------------------------------------------- processes


class PinnedEtcd(EtcdServer):
    """etcd under `taskset -c CLIENT_CPU`, so that CPU 1 is discovery's alone."""

    def _command(self) -> list[str]:
        return ["taskset", "-c", CLIENT_CPU, *super()._command()]


@dataclass
class Server:
    """One `discovery serve --etcd …` process and what its start-up took."""

    proc: Proc
    http_port: int
    started_wall: float  # time.time() just before Popen
    ready_s: float = float("nan")  # Popen -> /readyz 200
    loaded_s: float = float("nan")  # Popen -> "loaded N records" log line
    listening_s: float = float("nan")  # Popen -> "DNS listening" log line
    records: int = -1
    cpu_s: float = float("nan")  # the process's CPU time (all threads) when /readyz said 200
    others: float = float("nan")  # share of CPU 1 other processes took meanwhile

    @property
    def pid(self) -> int:
        return self.proc.popen.pid


def _get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _log_time(stamp: str) -> float:
    return dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def start_server(procs: Procs, etcd: EtcdServer, work: Path, name: str, timeout: float = 900.0,
                 on_start: Callable[[int], None] | None = None) -> Server:  # fmt: skip
    log_path = work / f"discovery-{name}.log"
    argv = [
        "taskset", "-c", SERVER_CPU, *discovery_command(), "serve",
        "--etcd", etcd.client_url, "--dns", f"{HOST}:0", "--http", f"{HOST}:0",
        "--log-level", "info",
    ]  # fmt: skip
    busy0 = _cpu_busy(SERVER_CPU)
    started_wall = time.time()
    started = time.monotonic()
    proc = procs.start(name, argv, log_path, 0)
    if on_start is not None:
        on_start(proc.popen.pid)
    deadline = started + timeout
    http_port = 0
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"discovery {name} exited {proc.popen.returncode}:\n"
                               + log_path.read_text(errors="replace")[-3000:])  # fmt: skip
        if not http_port:
            text = log_path.read_text(errors="replace")
            dns, web = _DNS_LINE.search(text), _HTTP_LINE.search(text)
            if dns and web:
                proc.port, http_port = int(dns.group(2)), int(web.group(2))
        if http_port:
            with contextlib.suppress(OSError):
                if _get(http_port, "/readyz", timeout=2)[0] == 200:
                    break
        time.sleep(0.01)
    else:
        raise RuntimeError(f"discovery {name} not ready after {timeout:.0f} s")
    ready_s = time.monotonic() - started
    cpu_s = _proc_cpu(proc.popen.pid)
    others = max(0.0, _cpu_busy(SERVER_CPU) - busy0 - cpu_s) / ready_s
    server = Server(proc, http_port, started_wall, ready_s=ready_s, cpu_s=cpu_s, others=others)
    for _ in range(100):  # the log line is written just before /readyz can say 200
        text = log_path.read_text(errors="replace")
        loaded, listening = _LOADED_LINE.search(text), _LISTEN_TS.search(text)
        if loaded:
            server.loaded_s = _log_time(loaded.group(1)) - started_wall
            server.records = int(loaded.group(2))
            if listening:
                server.listening_s = _log_time(listening.group(1)) - started_wall
            break
        time.sleep(0.02)
    return server


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in kB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0])
    return out


def metrics(port: int) -> dict[str, float]:
    status, body = _get(port, "/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, number = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(number)
    return out


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- burst


@dataclass
class Burst:
    writes: int
    write_s: float  # first write -> last write acknowledged by etcd
    apply_s: float  # first write -> discovery's revision reaches the last write's
    target_revision: int
    cpu_s: float  # discovery's CPU time from the first write until it caught up
    others: float  # share of CPU 1 other processes took meanwhile
    checked: str


def burst(etcd: EtcdServer, server: Server, registry: Registry, leases: list[int],
          writes: int, number: int, lease_ttl: int, concurrency: int) -> Burst:  # fmt: skip
    """`writes` puts changing addresses of existing instances (distinct instances when the
    registry is big enough), each with an address never used before, as fast as possible; then
    wait until discovery reflects them all and check a few changed names over DNS."""
    rng = random.Random(100 + number)
    n = registry.instances
    targets = (
        rng.sample(range(n), writes) if writes <= n else [rng.randrange(n) for _ in range(writes)]
    )
    newest: dict[int, tuple[int, str]] = {}  # instance -> (revision, address) of its last write
    values = [
        encode_registration(Registration(address=address(number * writes + j, generation=1),
                                         ports=_PORTS, ttl=lease_ttl))
        for j in range(writes)
    ]  # fmt: skip
    cpu0 = busy0 = started = 0.0

    async def write_all() -> tuple[float, int]:
        nonlocal cpu0, busy0, started
        async with _store(etcd) as store:
            await store.revision()  # connected before the clock starts
            cpu0, busy0 = _proc_cpu(server.pid), _cpu_busy(SERVER_CPU)
            started = time.monotonic()

            async def one(j: int) -> None:
                i = targets[j]
                result = await store.put(registry.key(i), values[j], leases[i])
                if result.revision > newest.get(i, (0, ""))[0]:
                    newest[i] = (result.revision, address(number * writes + j, generation=1))

            await run_pool(writes, concurrency, one)
            write_s = time.monotonic() - started
            return write_s, await store.revision()

    write_s, target = asyncio.run(write_all())
    # /readyz carries the same number as the discovery_watch_revision gauge (cache.revision)
    # and costs the server far less than rendering /metrics every few milliseconds
    while True:
        _, body = _get(server.http_port, "/readyz")
        if json.loads(body)["revision"] >= target:
            break
        if time.monotonic() - started > 600:
            raise RuntimeError(f"discovery stuck at revision {body!r}, etcd at {target}")
        time.sleep(0.01)
    apply_s = time.monotonic() - started
    cpu_s = _proc_cpu(server.pid) - cpu0
    others = max(0.0, _cpu_busy(SERVER_CPU) - busy0 - cpu_s) / apply_s
    gauge = metrics(server.http_port).get("discovery_watch_revision", 0)
    if gauge < target:
        raise RuntimeError(f"discovery_watch_revision {gauge} < {target} after /readyz said so")
    last = sorted(newest.items(), key=lambda item: item[1][0])[-3:]  # the three last writes
    checked = []
    for i, (_, want) in last:
        name = registry.instance_name(i)
        got_addresses = sorted(str(rr.rdata) for rr in ask(server.proc.port, name, "A", False).rr)
        if got_addresses != [want]:
            raise RuntimeError(f"DNS {name} A answered {got_addresses}, last write was {want}")
        checked.append(f"{name} -> {want}")
    return Burst(writes, write_s, apply_s, target, cpu_s, others, "; ".join(checked[-1:]))


def check_answers(server: Server, registry: Registry) -> str:
    """A few names answered as written: a service (every address, over TCP when it does not
    fit UDP), an instance, a name that does not exist."""
    from dnslib import DNSRecord

    svc = registry.services - 1
    name = f"svc{svc}.{ZONE_SUFFIX}"
    reply = ask(server.proc.port, name, "A", False)
    truncated = bool(reply.header.tc)
    if truncated:
        query = DNSRecord.question(name, "A")
        reply = DNSRecord.parse(query.send(HOST, server.proc.port, tcp=True, timeout=5))
    got = {str(rr.rdata) for rr in reply.rr}
    first = svc * registry.per_service
    want = {address(i) for i in range(first, first + registry.per_service)}
    if got != want:
        raise RuntimeError(f"{name} A: {len(got)} addresses, not the {len(want)} written")
    inst = registry.instance_name(0)
    if len(ask(server.proc.port, inst, "A", False).rr) != 1:
        raise RuntimeError(f"{inst} A: no answer")
    if ask(server.proc.port, f"missing.{ZONE_SUFFIX}", "A", False).header.rcode != 3:
        raise RuntimeError("missing name: not NXDOMAIN")
    how = " (TC over UDP, read over TCP)" if truncated else ""
    return f"{name} A: {len(got)} addresses{how}; {inst} A: 1 address; NXDOMAIN for missing"


# --------------------------------------------------------------------------- results


NOTES_MARKER = "<!-- observations: kept when bench/scale.py rewrites this file -->"
PATH_KEYS = {
    "fast": 'discovery_dns_queries_total{path="fast"}',
    "full": 'discovery_dns_queries_total{path="full"}',
    "tc": "discovery_dns_truncated_total",
}


@dataclass
class Result:
    registry: Registry
    fill_s: float = float("nan")
    loads: list[Server] = field(default_factory=list)
    rss_kb: int = 0
    hwm_kb: int = 0
    rss_after_kb: int = 0  # after dnsperf and the bursts
    bursts: list[Burst] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)  # dnsperf against this registry's server
    base_runs: list[Run] = field(default_factory=list)  # the 1k server, same rounds
    discarded: list[Run] = field(default_factory=list)  # pairs re-run for noisy neighbours
    paths: dict[str, dict[str, float]] = field(default_factory=dict)  # mode -> fast/full/tc
    checks: list[str] = field(default_factory=list)

    def of(self, mode: str, base: bool = False) -> list[Run]:
        runs = self.base_runs if base else self.runs
        return sorted((r for r in runs if r.mode == mode), key=lambda r: r.round)

    def ratios(self, mode: str) -> list[float]:
        pairs = zip(self.of(mode), self.of(mode, base=True), strict=True)
        return [r.qps / b.qps for r, b in pairs]

    def cpu_ratios(self, mode: str) -> list[float]:
        """Server CPU per query, 1k over this one: the same ratio with neighbours' time left out."""
        pairs = zip(self.of(mode), self.of(mode, base=True), strict=True)
        return [b.us_per_query / r.us_per_query for r, b in pairs]


def _fmt_s(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return (f"**{_median(values):.{digits}f}** ({min(values):.{digits}f}-"
            f"{max(values):.{digits}f})")  # fmt: skip


def _ratio(values: list[float]) -> str:
    if not values:
        return "-"
    return " / ".join(f"{x:.2f}" for x in values) + f" (**{_median(values):.2f}**)"


def _mb(kb: int) -> str:
    return f"{kb / 1024:,.0f}"


def _row(cells: tuple[str, ...] | list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _head(cells: tuple[str, ...]) -> list[str]:
    return [_row(cells), "|" + "---|" * len(cells)]


def table_lines(results: list[Result], empty: dict[str, int]) -> list[str]:
    """One row per registry: memory, first load, burst, plain DNS against the 1k server."""
    lines = _head(("registry", "instances", "RSS MB: empty / loaded (peak) / at the end",
                   "first load s: to /readyz 200", "load: discovery CPU s",
                   "burst of 10k: applied s", "burst: discovery CPU s",
                   "DNS plain: q/s ratio to 1k per round (median)",
                   "DNS plain: CPU/query ratio (median)"))  # fmt: skip
    for res in results:
        reg = res.registry
        base = not res.runs
        lines.append(_row((
            reg.label, f"{reg.instances:,}",
            f"{_mb(empty.get('rss', 0))} / {_mb(res.rss_kb)} ({_mb(res.hwm_kb)}) / "
            f"{_mb(res.rss_after_kb)}",
            _fmt_s([s.ready_s for s in res.loads]), _fmt_s([s.cpu_s for s in res.loads]),
            _fmt_s([b.apply_s for b in res.bursts]), _fmt_s([b.cpu_s for b in res.bursts]),
            "baseline" if base else _ratio(res.ratios("plain")),
            "baseline" if base else _ratio(res.cpu_ratios("plain")),
        )))  # fmt: skip
    return lines


def dns_lines(results: list[Result], modes: list[str]) -> list[str]:
    lines = _head(("registry", "mode", "q/s (median, min-max)", "1k x 1: q/s same rounds",
                   "ratio per round (median)", "server CPU us/query: this / 1k",
                   "CPU ratio 1k/this (median)", "lost: this / 1k",
                   "answered by the full resolver", "TC=1"))  # fmt: skip
    for res in results:
        for mode in modes:
            mine, base = res.of(mode), res.of(mode, base=True)
            if not mine:
                continue
            paths = res.paths.get(mode, {})
            total = paths.get("fast", 0) + paths.get("full", 0)
            full = f"{paths.get('full', 0) / total:.0%}" if total else "-"
            tc = f"{paths.get('tc', 0) / total:.0%}" if total else "-"
            q, bq = [r.qps for r in mine], [r.qps for r in base]
            lines.append(_row((
                res.registry.label, "EDNS (-e)" if mode == "edns" else "plain",
                f"{_median(q):,.0f} ({min(q):,.0f}-{max(q):,.0f})", f"{_median(bq):,.0f}",
                _ratio(res.ratios(mode)),
                f"{_median([r.us_per_query for r in mine]):.2f} / "
                f"{_median([r.us_per_query for r in base]):.2f}",
                _ratio(res.cpu_ratios(mode)),
                f"{sum(r.lost for r in mine)} of {sum(r.sent for r in mine):,} / "
                f"{sum(r.lost for r in base)}",
                full, tc,
            )))  # fmt: skip
    return lines


def run_lines(results: list[Result]) -> list[str]:
    lines = _head(("registry", "mode", "round", "server", "queries/s", "avg ms", "max ms", "lost",
                   "server CPU us/query", "neighbours CPU 1 / 0", "rcodes"))  # fmt: skip
    for res in results:
        runs = [(r, "") for r in res.runs + res.base_runs]
        runs += [(r, " (discarded: neighbours)") for r in res.discarded]
        for r, note in sorted(runs, key=lambda x: (x[0].mode, x[0].round, x[0].order)):
            codes = ", ".join(f"{k} {v}" for k, v in sorted(r.rcodes.items()))
            lines.append(_row((
                res.registry.label, r.mode, str(r.round + 1), r.server + note, f"{r.qps:,.0f}",
                f"{r.avg_ms:.3f}", f"{r.max_ms:.3f}", f"{r.lost} of {r.sent:,}",
                f"{r.us_per_query:.2f}", r.neighbours, codes,
            )))  # fmt: skip
    return lines


def load_lines(results: list[Result]) -> list[str]:
    lines = _head(("registry", "records loaded", "to 'DNS listening' s", "to 'loaded' log s",
                   "to /readyz 200 s", "discovery CPU s at /readyz",
                   "neighbours' share of CPU 1"))  # fmt: skip
    for res in results:
        for s in res.loads:
            lines.append(f"| {res.registry.label} | {s.records:,} | {s.listening_s:.2f} | "
                         f"{s.loaded_s:.2f} | {s.ready_s:.2f} | {s.cpu_s:.2f} | "
                         f"{s.others:.0%} |")  # fmt: skip
    return lines


def burst_lines(results: list[Result]) -> list[str]:
    lines = _head(("registry", "puts", "write s", "puts/s",
                   "applied s (first write -> revision seen)", "lag after last write s",
                   "discovery CPU s", "neighbours' share of CPU 1", "DNS check"))  # fmt: skip
    for res in results:
        for b in res.bursts:
            lines.append(
                f"| {res.registry.label} | {b.writes:,} | {b.write_s:.2f} | "
                f"{b.writes / b.write_s:,.0f} | {b.apply_s:.2f} | "
                f"{b.apply_s - b.write_s:.2f} | {b.cpu_s:.2f} | {b.others:.0%} | {b.checked} |"
            )
    return lines


# --------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: registries /20, 1 load, 1 burst of 1,000, 1 round of 2 s",
    )
    p.add_argument("--scale", type=int, default=1, help="divide the big registries by this")
    p.add_argument("--load-repeats", type=int, default=3, help="fresh processes per registry")
    p.add_argument("--bursts", type=int, default=3)
    p.add_argument("--burst", type=int, default=10_000, help="puts per burst")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=int, default=10, help="seconds per dnsperf run")
    p.add_argument("--lines", type=int, default=10_000, help="lines of the query file")
    p.add_argument(
        "--modes",
        default="plain,edns",
        help="dnsperf modes, comma-separated: plain (the measure of issue 4) and edns "
        "(dnsperf -e, for comparison)",
    )
    p.add_argument(
        "--max-neighbours",
        type=float,
        default=0.3,
        help="re-run a dnsperf pair when other processes took more than this share "
        "of CPU 0 or CPU 1",
    )
    p.add_argument("--retries", type=int, default=2, help="re-runs of a noisy dnsperf pair")
    p.add_argument("--concurrency", type=int, default=200, help="etcd writes in flight")
    p.add_argument("--lease-ttl", type=int, default=3600)
    p.add_argument(
        "--query-services",
        type=int,
        default=None,
        help="query names of the first N services only (default: all): the same working set "
        "for every registry, to tell the registry's size from the number of names queried",
    )
    p.add_argument(
        "--only",
        choices=("1000x100", "10000x10"),
        action="append",
        help="only this big registry (may repeat)",
    )
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="directory for py-spy flame graphs of the first load and first burst",
    )
    p.add_argument("--docs", type=Path, default=None, help="default: docs/scale.md")
    p.add_argument("--no-docs", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args()
    if args.docs is None and not args.quick:
        args.docs = ROOT / "docs" / "scale.md"
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(args.modes) <= {"plain", "edns"}:
        p.error("--modes takes plain and/or edns")
    if args.quick:
        args.scale = max(args.scale, 20)
        args.load_repeats, args.bursts, args.burst = 1, 1, 1_000
        args.rounds, args.duration, args.lines, args.retries = 1, 2, 2_000, 0
        args.no_docs = args.docs is None  # a smoke run writes docs only when asked to
    return args


def registries(args: argparse.Namespace) -> tuple[Registry, list[Registry]]:
    base = Registry("1,000 x 1", 1000, 1)
    big = [Registry("1,000 x 100", 1000, max(1, 100 // args.scale)),
           Registry("10,000 x 10", max(1, 10_000 // args.scale), 10)]  # fmt: skip
    if args.scale > 1:
        big = [Registry(f"{r.services:,} x {r.per_service}", r.services, r.per_service)
               for r in big]  # fmt: skip
    if args.only:
        keep = {"1000x100": 0, "10000x10": 1}
        big = [big[keep[o]] for o in args.only]
    return base, big


def _py_spy() -> str | None:
    """py-spy on PATH or next to this Python (a venv not activated)."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


class Profiler:
    """py-spy record on one process, stopped (and its SVG written) by stop()."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        argv = ["taskset", "-c", CLIENT_CPU, _py_spy() or "py-spy", "record", "--pid", str(pid),
                "--rate", "200", "-o", str(out), "--nonblocking"]  # fmt: skip
        with open(out.with_suffix(".log"), "wb") as sink:
            self.popen = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT,
                                          start_new_session=True)  # fmt: skip

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def dnsperf_rounds(procs: Procs, res: Result, big: Server, base: Server, work: Path,
                   args: argparse.Namespace) -> None:  # fmt: skip
    """--rounds rounds per mode, the big server and the 1k server one after the other (the
    order flips every round); a pair where neighbours took more than --max-neighbours of a CPU
    is run again, up to --retries times."""
    qfile = work / f"queries-{res.registry.services}x{res.registry.per_service}.txt"
    queries = make_queries(res.registry, args.lines, 4, args.query_services)
    qfile.write_text("".join(f"{n} {t}\n" for n, t in queries))
    bfile = work / "queries-base.txt"
    for mode in args.modes:
        before = metrics(big.http_port)
        for rnd in range(args.rounds):
            for attempt in range(args.retries + 1):
                order = [(big, qfile), (base, bfile)]
                if rnd % 2:
                    order.reverse()
                pair = []
                for slot, (server, query_file) in enumerate(order):
                    run = measure(procs, server.proc, mode, rnd, slot, query_file, args.duration)
                    pair.append((server, run))
                    log(f"  {mode} round {rnd + 1}: {server.proc.name}: {run.qps:,.0f} q/s, avg "
                        f"{run.avg_ms:.3f} ms, lost {run.lost}, {run.us_per_query:.2f} "
                        f"us/query, neighbours {run.neighbours}")  # fmt: skip
                    if server.proc.popen.poll() is not None:
                        raise RuntimeError(f"{server.proc.name} exited during dnsperf")
                noisy = max(max(r.others_share, r.client_others_share) for _, r in pair)
                if noisy <= args.max_neighbours or attempt == args.retries:
                    break
                log(f"  neighbours took {noisy:.0%} of a CPU: running round {rnd + 1} again")
                res.discarded += [r for _, r in pair]
            for server, run in pair:
                (res.runs if server is big else res.base_runs).append(run)
        after = metrics(big.http_port)
        res.paths[mode] = {k: after.get(key, 0) - before.get(key, 0)
                           for k, key in PATH_KEYS.items()}  # fmt: skip


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started ignoring it
    for tool in ("etcd", "dnsperf", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing (apt-get install etcd-server dnsperf util-linux)")
    if args.profile and _py_spy() is None:
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    os.sched_setaffinity(0, {int(CLIENT_CPU)})
    base_reg, big_regs = registries(args)
    started = dt.datetime.now(dt.UTC)
    command = shlex.join(["python", "bench/scale.py", *sys.argv[1:]])
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    work = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    procs = Procs()
    etcds: list[EtcdServer] = []
    results: list[Result] = []
    empty: dict[str, int] = {}
    empty_load: list[Server] = []

    def new_etcd(name: str) -> EtcdServer:
        etcd = PinnedEtcd(work / name, binary=shutil.which("etcd") or "etcd",
                          extra_args=["--quota-backend-bytes", str(8 * 2**30)])  # fmt: skip
        etcds.append(etcd)
        etcd.start()
        log(f"etcd {name} on {etcd.client_url}")
        return etcd

    def stop_etcd(etcd: EtcdServer) -> None:
        etcd.stop()
        etcds.remove(etcd)
        shutil.rmtree(etcd.directory, ignore_errors=True)

    def loads(res: Result, etcd: EtcdServer, name: str) -> Server:
        """--load-repeats fresh processes; the last one stays up. Returns it."""
        server: Server | None = None
        for rep in range(args.load_repeats):
            if server is not None:
                procs.stop(server.proc)
            profiler: list[Profiler] = []
            on_start = None
            if args.profile and rep == 0 and res.registry is not base_reg:
                args.profile.mkdir(parents=True, exist_ok=True)

                def on_start(pid: int, out: Path = args.profile / f"load-{name}.svg",
                             into: list[Profiler] = profiler) -> None:  # fmt: skip
                    into.append(Profiler(pid, out))

            try:
                server = start_server(procs, etcd, work, f"{name}-{rep}", on_start=on_start)
            finally:
                for p in profiler:
                    p.stop()
            res.loads.append(server)
            log(
                f"  load {rep + 1}: {server.records:,} records; DNS listening at "
                f"{server.listening_s:.2f} s, loaded at {server.loaded_s:.2f} s, /readyz 200 at "
                f"{server.ready_s:.2f} s"
            )
            if server.records != res.registry.instances:
                raise RuntimeError(f"loaded {server.records} records, wrote "
                                   f"{res.registry.instances}")  # fmt: skip
        assert server is not None
        time.sleep(1.0)
        mem = memory(server.pid)
        res.rss_kb, res.hwm_kb = mem["VmRSS"], mem["VmHWM"]
        log(f"  RSS {_mb(res.rss_kb)} MB (peak {_mb(res.hwm_kb)} MB)")
        return server

    def bursts(res: Result, etcd: EtcdServer, server: Server, leases: list[int]) -> None:
        for b in range(args.bursts):
            profiler = None
            if args.profile and b == 0 and res.registry is not base_reg:
                profiler = Profiler(server.pid, args.profile / f"burst-{len(results)}.svg")
                time.sleep(1.0)
            try:
                result = burst(etcd, server, res.registry, leases, args.burst, b,
                               args.lease_ttl, args.concurrency)  # fmt: skip
            finally:
                if profiler:
                    profiler.stop()
            res.bursts.append(result)
            log(
                f"  burst {b + 1}: {result.writes:,} puts in {result.write_s:.2f} s, applied "
                f"after {result.apply_s:.2f} s (discovery CPU {result.cpu_s:.2f} s); "
                f"{result.checked}"
            )

    try:
        # the baseline: an empty registry, then 1,000 x 1; that server stays up throughout
        etcd = new_etcd("etcd-base")
        log("empty registry")
        for rep in range(args.load_repeats):
            server = start_server(procs, etcd, work, f"empty-{rep}")
            empty_load.append(server)
            time.sleep(1.0)
            mem = memory(server.pid)
            empty = {"rss": mem["VmRSS"], "hwm": mem["VmHWM"]}
            log(f"  /readyz at {server.ready_s:.2f} s; RSS {_mb(empty['rss'])} MB")
            procs.stop(server.proc)
        res = Result(base_reg)
        log(f"registry {base_reg.label}: writing {base_reg.instances:,} instances")
        leases, res.fill_s, _ = asyncio.run(fill(etcd, base_reg, args.lease_ttl, args.concurrency))
        log(f"  written in {res.fill_s:.1f} s")
        base = loads(res, etcd, "base")
        res.checks.append(check_answers(base, base_reg))
        bursts(res, etcd, base, leases)
        results.append(res)
        (work / "queries-base.txt").write_text(
            "".join(
                f"{n} {t}\n" for n, t in make_queries(base_reg, args.lines, 4, args.query_services)
            )
        )

        for reg in big_regs:
            res = Result(reg)
            etcd_big = new_etcd(f"etcd-{reg.services}x{reg.per_service}")
            log(f"registry {reg.label}: writing {reg.instances:,} instances")
            leases, res.fill_s, _ = asyncio.run(fill(etcd_big, reg, args.lease_ttl,
                                                     args.concurrency))  # fmt: skip
            log(f"  written in {res.fill_s:.1f} s ({reg.instances / res.fill_s:,.0f}/s)")
            big = loads(res, etcd_big, f"{reg.services}x{reg.per_service}")
            res.checks.append(check_answers(big, reg))
            log(f"  dnsperf: {args.rounds} rounds, alternating with the 1,000 x 1 server")
            dnsperf_rounds(procs, res, big, base, work, args)
            bursts(res, etcd_big, big, leases)
            res.rss_after_kb = memory(big.pid)["VmRSS"]
            results.append(res)
            procs.stop(big.proc)
            stop_etcd(etcd_big)
        results[0].rss_after_kb = memory(base.pid)["VmRSS"]
    finally:
        procs.stop_all()
        for etcd in list(etcds):
            with contextlib.suppress(Exception):
                etcd.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"work directory kept: {work}")

    table = table_lines(results, empty)
    print()
    print("\n".join(table))
    print()
    print("\n".join(dns_lines(results[1:], args.modes)))
    print()
    print("\n".join(run_lines(results[1:])))
    if not args.no_docs:
        facts = machine_facts()
        facts["nproc"] = str(os.cpu_count())  # `nproc` in this process, pinned to CPU 0, says 1
        load_after = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        write_markdown(args.docs, command=command, started=started, facts=facts, args=args,
                       results=results, empty=empty, empty_load=empty_load, table=table,
                       loadavg=(load_before, load_after))  # fmt: skip
        log(f"wrote {args.docs}")
    return 0


def write_markdown(path: Path, *, command: str, started: dt.datetime, facts: dict[str, str],
                   args: argparse.Namespace, results: list[Result], empty: dict[str, int],
                   empty_load: list[Server], table: list[str],
                   loadavg: tuple[str, str]) -> None:  # fmt: skip
    # hand-written observations below the marker survive a new run
    old = path.read_text() if path.exists() else ""
    extra = old[old.index(NOTES_MARKER) :] if NOTES_MARKER in old else ""
    lines = [
        "# Scale: 100,000 instances from etcd",
        "",
        "Generated by `bench/scale.py`; run it again rather than edit the tables by hand.",
        "",
        "## Summary",
        "",
        *table,
        "",
        "RSS: VmRSS of `discovery serve` 1 s after /readyz answered 200 (peak: VmHWM); empty: "
        f"the same with no instance in etcd ({_mb(empty.get('rss', 0))} MB, peak "
        f"{_mb(empty.get('hwm', 0))} MB; /readyz after "
        f"{_fmt_s([s.ready_s for s in empty_load])} s). "
        "Times are medians over fresh processes or bursts (min-max in brackets). Wall times "
        "include whatever other processes took from CPU 1; the CPU columns (the discovery "
        "process's own user+system time) do not, so they are the steadier measure here. DNS "
        "ratio: queries/s with this registry over queries/s of the 1,000 x 1 server measured in "
        "the same round (issue 4 asks for at least 0.90); CPU/query ratio: the 1k server's CPU "
        "time per answered query over this one's (1.00: as cheap; below 1: dearer).",
        "",
        "## DNS",
        "",
        *dns_lines(results[1:], args.modes),
        "",
        *how_it_was_run(
            command,
            started,
            facts,
            f"etcd {_etcd_version()}",
            loadavg[0],
            loadavg[1],
            ", shared with other engineers running tests",
        ),
        f"* Settings: {args.load_repeats} load repeats, {args.bursts} bursts of "
        f"{args.burst:,} puts, {args.rounds} dnsperf rounds x {args.duration} s, query file "
        f"{args.lines:,} lines, {args.concurrency} etcd writes in flight, leases of "
        f"{args.lease_ttl} s"
        + (
            f"; py-spy attached to the first load and first burst of the big registries "
            f"(flame graphs in {args.profile})"
            if args.profile
            else ""
        ),
        "",
        "Each registry lives in its own etcd (one member, loopback, temporary data directory, "
        "`taskset -c 0`). The instances are written straight into etcd in the layout of the API: "
        "key `/discovery/v1/instances/default/svcN/iK`, value "
        "`encode_registration(Registration(address=…, ports=(Port(name='http', port=80),), "
        f"ttl={args.lease_ttl}))`, each under its own lease of {args.lease_ttl} s (grant, then "
        "put), with discovery's EtcdStore. Every instance has a port, so every service also "
        "has SRV answers (`_http._tcp.svcN…` and `svcN…`) with glue, as in production.",
        "",
        "`discovery serve --etcd URL --dns 127.0.0.1:0 --http 127.0.0.1:0 --log-level info` runs "
        "under `taskset -c 1`; dnsperf, etcd and the bench client under `taskset -c 0`.",
        "",
        "* **Load**: from just before `Popen` to the first /readyz 200 (polled every 10 ms), and "
        'to the timestamp of the "loaded N records" log line; the time to "DNS listening" is '
        "the interpreter start-up and imports.",
        f"* **Burst**: {args.burst:,} puts to distinct random instances (each with a new address, "
        f'under its own lease), {args.concurrency} in flight; "applied" is from the first write '
        "until discovery's revision (the `revision` of /readyz, polled every 10 ms once the "
        "writes are done: the same number as the `discovery_watch_revision` gauge, which is "
        "read once at the end to confirm, but far cheaper for the server than rendering "
        "/metrics every few ms) reaches etcd's revision after the burst. DNS A queries for the "
        "last changed instance names then check the new addresses. For the 1,000 x 1 registry "
        "the puts change each instance about 10 times.",
        "* **DNS**: `taskset -c 0 dnsperf -s 127.0.0.1 -p PORT -d FILE -c 1 -l "
        f"{args.duration}` (plain, the measure of the issue; `-e` for EDNS as a comparison). "
        f"Query files of {args.lines:,} lines from each registry: 80% A for service names "
        "`svcN.default.svc.cluster.local`, 10% A for instance names `iK.svcN…`, 10% names that "
        "do not exist. The 1,000 x 1 server stays up (loaded) for the whole run; each round "
        "measures the big server and it one after the other, the order flipping every round; "
        f"a pair where other processes took more than {args.max_neighbours:.0%} of CPU 0 or 1 "
        f"is run again (up to {args.retries} times; the discarded runs are listed).",
        "",
        "## Load, per process",
        "",
        *load_lines(results),
        "",
        "## Bursts",
        "",
        *burst_lines(results),
        "",
        "## dnsperf runs",
        "",
        *run_lines(results[1:]),
        "",
    ]
    lines += ["", "Answers checked before measuring:", ""]
    for res in results:
        lines += [f"* {res.registry.label}: {c}" for c in res.checks]
    lines += ["", extra.rstrip() or NOTES_MARKER]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _etcd_version() -> str:
    try:
        out = subprocess.run(["etcd", "--version"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    match = re.search(r"etcd Version: (\S+)", out)
    return match.group(1) if match else "unknown"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        sys.exit(130)
