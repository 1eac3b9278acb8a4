"""discovery against NSD, Knot DNS and dnsmasq (and a bare uvloop echo server as the ceiling)
under dnsperf.

One command, run from anywhere with the Python that has `discovery` installed:

    python bench/dnsperf_compare.py            # full: 3 rounds x 10 s per server and mode
    python bench/dnsperf_compare.py --rounds 1 --duration 2 --fixed-duration 2   # quick look

It needs dnsperf, dnsmasq, NSD, Knot DNS and matplotlib (`make bench-deps` installs them; the
bench itself installs nothing and says what is missing), starts the five servers on free 127.0.0.1
ports pinned to CPU 1 (NSD with one server process, Knot with one UDP worker), loads the same 1,000
services into discovery (through its HTTP API), into NSD and Knot (one zone file) and into dnsmasq
(hosts file + srv-host lines), checks that all give the same answers to every distinct query of
the query file, then runs `taskset -c 0 dnsperf -c 1` against each server in alternation, plain and
with EDNS, and once at a fixed rate. It prints a table and writes docs/benchmarks.md and
docs/qps.png. Everything it started is stopped on exit, Ctrl-C or error. Nothing but 127.0.0.1 is
ever bound or queried.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import importlib
import importlib.metadata
import json
import os
import platform
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from machine import cpu_model, discovery_command

HOST = "127.0.0.1"  # the only address this script ever binds or queries
ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
ZONE_SUFFIX = "default.svc.cluster.local"
SERVER_CPU = "1"
CLIENT_CPU = "0"
DNSMASQ = "dnsmasq"
NSD = "NSD"
KNOT = "Knot"
ECHO = "uvloop echo"
SERVERS = ("discovery", NSD, KNOT, DNSMASQ, ECHO)
PEERS = (NSD, KNOT, DNSMASQ)  # the ratio discovery/peer is reported for each
LABELS = {"discovery": "discovery", NSD: "NSD", KNOT: "Knot DNS", DNSMASQ: "dnsmasq",
          ECHO: "uvloop echo\n(ceiling)"}  # fmt: skip
ZONE = "cluster.local"
MODES = ("plain", "edns")


# --------------------------------------------------------------------------- set-up


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def find_dnsmasq() -> str | None:
    found = shutil.which("dnsmasq")
    if found:
        return found
    for candidate in ("/usr/sbin/dnsmasq", "/sbin/dnsmasq"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def find_sbin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/sbin"):
        if os.access(f"{directory}/{name}", os.X_OK):
            return f"{directory}/{name}"
    return None


def ensure_tools() -> str:
    """dnsperf, dnsmasq (the binary only: dnsmasq-base starts no system service), nsd, knotd,
    taskset.

    Nothing is installed at run time: `make bench-deps` (or `make bench`) installs them."""
    missing = []
    if shutil.which("dnsperf") is None:
        missing.append("dnsperf")
    if find_sbin("nsd") is None:
        missing.append("nsd")
    if find_sbin("knotd") is None:
        missing.append("knot")
    dnsmasq = find_dnsmasq()
    if dnsmasq is None:
        missing.append("dnsmasq-base")
    if shutil.which("taskset") is None:
        missing.append("util-linux")
    if missing or dnsmasq is None:
        raise SystemExit(
            f"missing: {' '.join(missing)} (run `make bench-deps`, or apt-get install them)"
        )
    return dnsmasq


def ensure_python_packages(plot: bool) -> None:
    needed = ["discovery", "uvloop", "dnslib"] + (["matplotlib"] if plot else [])
    for module in needed:
        try:
            importlib.import_module(module)
        except ImportError:
            raise SystemExit(
                f"{sys.executable} cannot import {module}: run `make bench-deps` in {ROOT}"
                " (pip install -e '.[test,bench]'), or pass --no-docs to skip the plot"
            ) from None


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 right now (the server may still lose a race:
    callers check that the server they start is the one answering)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((HOST, 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((HOST, port))
                except OSError:
                    continue
                return int(port)
    raise RuntimeError("no free port")


# --------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Service:
    index: int
    address: str
    http: bool

    @property
    def name(self) -> str:
        return f"svc{self.index}.{ZONE_SUFFIX}"

    @property
    def target(self) -> str:
        return f"i0.svc{self.index}.{ZONE_SUFFIX}"

    @property
    def srv_name(self) -> str:
        return f"_http._tcp.svc{self.index}.{ZONE_SUFFIX}"


def make_services(count: int, with_http: int) -> list[Service]:
    every = max(1, count // with_http) if with_http else 0
    services = []
    for i in range(count):
        http = bool(every) and i % every == 0 and i // every < with_http
        services.append(Service(i, f"10.{1 + i // 65536}.{(i // 256) % 256}.{i % 256}", http))
    return services


def make_queries(services: list[Service], lines: int, seed: int) -> list[tuple[str, str]]:
    """80% A hits, 10% SRV hits, 10% names that do not exist, shuffled."""
    rng = random.Random(seed)
    http = [s for s in services if s.http]
    n_srv = lines // 10
    n_nx = lines // 10
    n_a = lines - n_srv - n_nx
    queries = [(rng.choice(services).name, "A") for _ in range(n_a)]
    queries += [(rng.choice(http).srv_name, "SRV") for _ in range(n_srv)]
    queries += [(f"missing{rng.randrange(10**6)}.{ZONE_SUFFIX}", "A") for _ in range(n_nx)]
    rng.shuffle(queries)
    return queries


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    port: int


@dataclass
class Procs:
    running: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: list[str], log_path: Path, port: int) -> Proc:
        out = open(log_path, "wb")
        popen = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches only this script; it stops them in order
        )
        out.close()
        proc = Proc(name, popen, log_path, port)
        self.running.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.running)):
            with contextlib.suppress(Exception):
                self.stop(proc)


def _pinned(cpu: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *argv]


def _http(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"content-type": "application/json"} if payload else {}
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else None
    finally:
        conn.close()


def start_discovery(procs: Procs, work: Path) -> tuple[Proc, int]:
    for attempt in range(3):
        dns_port, http_port = free_port(), free_port()
        argv = [
            *discovery_command(), "serve",
            "--dns", f"{HOST}:{dns_port}", "--http", f"{HOST}:{http_port}",
            "--log-level", "warning",
        ]  # fmt: skip
        proc = procs.start("discovery", _pinned(SERVER_CPU, argv), work / "discovery.log", dns_port)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.popen.poll() is None:
            with contextlib.suppress(OSError):
                if _http(http_port, "GET", "/healthz")[0] == 200:
                    break
            time.sleep(0.1)
        if proc.popen.poll() is None:
            # the HTTP port answers and our process is alive: it is ours unless another
            # server shares the port, which a fresh embedded store rules out below
            status, listing = _http(http_port, "GET", "/v1/services")
            if status == 200 and not listing.get("services"):
                return proc, http_port
        procs.stop(proc)
        log(f"discovery did not start on its ports (attempt {attempt + 1}); retrying")
    raise SystemExit(f"discovery would not start; see {work / 'discovery.log'}")


def register(http_port: int, services: list[Service], ttl: int) -> float:
    started = time.perf_counter()
    conn = http.client.HTTPConnection(HOST, http_port, timeout=10)
    try:
        for s in services:
            body: dict[str, Any] = {"address": s.address, "ttl": ttl}
            body["ports"] = [{"name": "http", "port": 80}] if s.http else []
            conn.request(
                "PUT",
                f"/v1/services/default/svc{s.index}/instances/i0",
                body=json.dumps(body).encode(),
                headers={"content-type": "application/json"},
            )
            response = conn.getresponse()
            text = response.read()
            if response.status not in (200, 201):
                raise SystemExit(f"registering svc{s.index}: HTTP {response.status} {text[:300]!r}")
    finally:
        conn.close()
    return time.perf_counter() - started


def start_dnsmasq(procs: Procs, work: Path, dnsmasq: str, services: list[Service]) -> Proc:
    hosts = work / "hosts"
    hosts.write_text("".join(f"{s.address} {s.name} {s.target}\n" for s in services))
    conf = work / "dnsmasq.conf"
    conf.write_text(
        "".join(f"srv-host={s.srv_name},{s.target},80,0,100\n" for s in services if s.http)
    )
    for _ in range(3):
        port = free_port()
        argv = [
            dnsmasq, "-k", "--no-resolv", "--no-hosts", "--port", str(port),
            "--listen-address", HOST, "--bind-interfaces", f"--addn-hosts={hosts}",
            "-C", str(conf), "--local=/cluster.local/", "--local-ttl=5",
            "--pid-file", "--log-facility=-",
        ]  # fmt: skip
        if os.geteuid() == 0:
            argv.append("--user=root")
        proc = procs.start("dnsmasq", _pinned(SERVER_CPU, argv), work / "dnsmasq.log", port)
        if wait_dns(proc, services[0].name):
            return proc
        procs.stop(proc)
    raise SystemExit(f"dnsmasq would not start; see {work / 'dnsmasq.log'}")


def write_zone(work: Path, services: list[Service]) -> Path:
    """One zone file with what discovery answers: A for each service and instance name, SRV for
    the services with an http port, TTL 5 (discovery's --dns-ttl) and the negative TTL 5."""
    lines = [
        f"$ORIGIN {ZONE}.", "$TTL 5",
        f"@ IN SOA ns.{ZONE}. hostmaster.{ZONE}. 1 3600 600 86400 5",
        f"@ IN NS ns.{ZONE}.", "ns IN A 127.0.0.1",
    ]  # fmt: skip
    suffix = "." + ZONE
    for s in services:
        lines.append(f"{s.name.removesuffix(suffix)} IN A {s.address}")
        lines.append(f"{s.target.removesuffix(suffix)} IN A {s.address}")
        if s.http:
            lines.append(f"{s.srv_name.removesuffix(suffix)} IN SRV 0 100 80 {s.target}.")
    path = work / f"{ZONE}.zone"
    path.write_text("\n".join(lines) + "\n")
    return path


def _start_peer(procs: Procs, name: str, work: Path, services: list[Service],
                configure: Any) -> Proc:  # fmt: skip
    """Start a server whose config `configure(port, directory)` writes; retry on a lost port."""
    for attempt in range(3):
        port = free_port()
        directory = work / f"{name.lower()}-{attempt}"
        directory.mkdir()
        argv = configure(port, directory)
        proc = procs.start(name, _pinned(SERVER_CPU, argv), directory / "out.log", port)
        if wait_dns(proc, services[0].name):
            return proc
        procs.stop(proc)
    raise SystemExit(f"{name} would not start; see {work}/{name.lower()}-*/out.log")


def start_nsd(procs: Procs, work: Path, zone: Path, services: list[Service]) -> Proc:
    """NSD 4 with one server process, response rate limiting off, its default (not minimal)
    responses, no database file, everything in its own directory."""

    def configure(port: int, d: Path) -> list[str]:
        (d / "nsd.conf").write_text(
            "server:\n"
            f'  ip-address: {HOST}@{port}\n  server-count: 1\n  username: ""\n'
            f'  zonesdir: {d}\n  database: ""\n  pidfile: {d}/nsd.pid\n'
            f"  xfrdfile: {d}/xfrd.state\n  zonelistfile: {d}/zone.list\n  xfrdir: {d}\n"
            f"  logfile: {d}/nsd.log\n  rrl-ratelimit: 0\n  verbosity: 0\n"
            "remote-control:\n  control-enable: no\n"
            f"zone:\n  name: {ZONE}\n  zonefile: {zone}\n"
        )
        return [find_sbin("nsd") or "nsd", "-d", "-c", str(d / "nsd.conf")]

    return _start_peer(procs, NSD, work, services, configure)


def start_knot(procs: Procs, work: Path, zone: Path, services: list[Service]) -> Proc:
    """Knot DNS 3 with one UDP worker (and one TCP and one background worker)."""

    def configure(port: int, d: Path) -> list[str]:
        user = "root:root" if os.geteuid() == 0 else ""
        (d / "knot.conf").write_text(
            "server:\n"
            f"    listen: {HOST}@{port}\n    rundir: {d}\n"
            + (f"    user: {user}\n" if user else "")
            + "    udp-workers: 1\n    tcp-workers: 1\n    background-workers: 1\n"
            f"database:\n    storage: {d}/db\n"
            f"control:\n    listen: {d}/knot.sock\n"
            "log:\n  - target: stderr\n    any: warning\n"
            f"zone:\n  - domain: {ZONE}\n    storage: {zone.parent}\n    file: {zone.name}\n"
        )
        return [find_sbin("knotd") or "knotd", "-c", str(d / "knot.conf")]

    return _start_peer(procs, KNOT, work, services, configure)


def start_echo(procs: Procs, work: Path) -> Proc:
    argv = [sys.executable, str(BENCH / "echo_server.py"), "0"]
    proc = procs.start(ECHO, _pinned(SERVER_CPU, argv), work / "echo.log", 0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.popen.poll() is None:
        match = re.search(r"PORT (\d+)", proc.log_path.read_text())
        if match:
            proc.port = int(match.group(1))
            return proc
        time.sleep(0.05)
    raise SystemExit(f"echo server would not start; see {proc.log_path}")


# --------------------------------------------------------------------------- DNS checks


def ask(port: int, name: str, qtype: str, edns: bool, timeout: float = 2.0) -> Any:
    from dnslib import EDNS0, DNSRecord

    query = DNSRecord.question(name, qtype)
    if edns:
        query.add_ar(EDNS0(udp_len=1232))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.connect((HOST, port))
        sock.send(query.pack())
        while True:
            data = sock.recv(65535)
            if data[:2] == query.pack()[:2]:
                return DNSRecord.parse(data)


def wait_dns(proc: Proc, name: str, seconds: float = 15) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.popen.poll() is None:
        with contextlib.suppress(OSError):
            if ask(proc.port, name, "A", False, timeout=0.3).rr:
                return True
        time.sleep(0.1)
    return False


def summary(reply: Any) -> tuple[Any, ...]:
    """What must match between the servers: rcode, answers and additional records with TTLs,
    and whether an OPT record came back. (The authority section may differ: discovery puts the
    zone's SOA in NXDOMAIN and NODATA answers, as RFC 2308 asks; dnsmasq sends none; NSD adds the
    zone's NS record to positive answers, and its glue, the address of ns.cluster.local, to the
    additional section, which is left out here.)"""
    from dnslib import QTYPE, RCODE

    def rrs(section: list[Any]) -> tuple[tuple[str, str, int, str], ...]:
        return tuple(
            sorted(
                (str(rr.rname).lower(), QTYPE.get(rr.rtype), rr.ttl, str(rr.rdata).lower())
                for rr in section
                if rr.rtype != QTYPE.OPT and str(rr.rname).lower() != f"ns.{ZONE}."
            )
        )

    has_opt = any(rr.rtype == QTYPE.OPT for rr in reply.ar)
    return RCODE.get(reply.header.rcode), rrs(reply.rr), rrs(reply.ar), has_opt


def check_answers(
    ports: dict[str, int], services: list[Service], queries: list[tuple[str, str]]
) -> list[str]:
    """Every distinct query of the file, plain and with EDNS, against discovery and its peers:
    the expected data, and the same answer from all. Returns lines for the report."""
    by_name = {s.name: s for s in services}
    by_srv = {s.srv_name: s for s in services if s.http}
    distinct = sorted(set(queries))
    problems: list[str] = []
    for edns in (False, True):
        for name, qtype in distinct:
            got = {server: summary(ask(ports[server], name, qtype, edns)) for server in ports}
            want: tuple[Any, ...]
            fqdn = name + "."
            if qtype == "A" and name in by_name:
                s = by_name[name]
                want = ("NOERROR", ((fqdn, "A", 5, s.address),), (), edns)
            elif qtype == "SRV" and name in by_srv:
                s = by_srv[name]
                srv = (fqdn, "SRV", 5, f"0 100 80 {s.target}.")
                want = ("NOERROR", (srv,), ((s.target + ".", "A", 5, s.address),), edns)
            else:
                want = ("NXDOMAIN", (), (), edns)
            for server, summ in got.items():
                if summ != want:
                    problems.append(f"{server} {name} {qtype} edns={edns}: {summ} != {want}")
            if len(problems) > 20:
                raise SystemExit("wrong answers:\n" + "\n".join(problems))
    if problems:
        raise SystemExit("wrong answers:\n" + "\n".join(problems))
    checked = 2 * len(distinct)
    return [
        f"{checked} queries ({len(distinct)} distinct lines of the query file, plain and with "
        "EDNS) gave the expected rcode, answer and additional records (names, TTLs, data) and an "
        "OPT record exactly when asked, from " + ", ".join(ports) + " alike.",
    ]


def check_echo(port: int) -> None:
    from dnslib import DNSRecord

    query = DNSRecord.question(f"svc0.{ZONE_SUFFIX}", "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.connect((HOST, port))
        sock.send(query.pack())
        reply = sock.recv(65535)
    if reply[:2] != query.pack()[:2] or not reply[2] & 0x80:
        raise SystemExit("the echo server's reply is not the query with QR set")


# --------------------------------------------------------------------------- dnsperf


@dataclass
class Run:
    server: str
    mode: str
    round: int
    order: int
    qps: float
    avg_ms: float
    max_ms: float
    stddev_ms: float
    sent: int
    lost: int
    rcodes: dict[str, int]
    response_bytes: int
    command: str
    wall_s: float = 0.0
    cpu_s: float = 0.0  # the server's own CPU time (all its threads) during the run
    cpu1_busy_s: float = 0.0  # everything that ran on the server's CPU meanwhile
    client_cpu_s: float = 0.0  # dnsperf's CPU time
    cpu0_busy_s: float = 0.0  # everything that ran on dnsperf's CPU meanwhile

    @property
    def cpu_share(self) -> float:
        """How much of its CPU the server used: below 100% it waited for queries or for CPU."""
        return self.cpu_s / self.wall_s if self.wall_s else float("nan")

    @property
    def others_share(self) -> float:
        """Time other processes (and interrupts) took on the server's CPU during the run."""
        return max(0.0, self.cpu1_busy_s - self.cpu_s) / self.wall_s if self.wall_s else 0.0

    @property
    def client_others_share(self) -> float:
        """Time other processes took on dnsperf's CPU during the run."""
        busy = self.cpu0_busy_s - self.client_cpu_s
        return max(0.0, busy) / self.wall_s if self.wall_s else 0.0

    @property
    def neighbours(self) -> str:
        return f"{self.others_share:.0%} / {self.client_others_share:.0%}"

    @property
    def us_per_query(self) -> float:
        """The server's CPU time per answered query: much less noisy than queries/s on a
        shared machine, since time taken by neighbours is not counted."""
        done = self.sent - self.lost
        return self.cpu_s / done * 1e6 if done else float("nan")


_FIELDS = {
    "sent": r"Queries sent:\s+(\d+)",
    "lost": r"Queries lost:\s+(\d+)",
    "qps": r"Queries per second:\s+([\d.]+)",
    "avg": r"Average Latency \(s\):\s+([\d.]+)",
    "max": r"Average Latency \(s\):.*max ([\d.]+)\)",
    "stddev": r"Latency StdDev \(s\):\s+([\d.]+)",
    "response": r"Average packet size:\s+request \d+, response (\d+)",
}


def parse_dnsperf(text: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, pattern in _FIELDS.items():
        match = re.search(pattern, text)
        if match is None:
            raise RuntimeError(f"dnsperf output without {key!r}:\n{text}")
        values[key] = float(match.group(1))
    codes = re.search(r"Response codes:\s+(.*)", text)
    values["rcodes"] = (
        {m.group(1): int(m.group(2)) for m in re.finditer(r"([A-Z]+) (\d+) \(", codes.group(1))}
        if codes
        else {}
    )
    return values


_TICK = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime, all threads


def _tree_cpu(pid: int) -> float:
    """CPU time of a process and of its live children (NSD answers from a forked child)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            total += _proc_cpu(current)
        except (OSError, ValueError, IndexError):
            continue
        todo += children.get(current, [])
    return total


def _cpu_busy(cpu: str) -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            ticks = [int(x) for x in line.split()[1:]]
            return (sum(ticks[:8]) - ticks[3] - ticks[4]) / _TICK  # all but idle and iowait
    return 0.0


def measure(
    procs: Procs, server: Proc, mode: str, rnd: int, slot: int, query_file: Path, seconds: int,
    qps_limit: int | None = None,
) -> Run:  # fmt: skip
    def children() -> float:  # dnsperf's CPU time once it has been waited for
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    cpu0, busy0, wall0 = _tree_cpu(server.popen.pid), _cpu_busy(SERVER_CPU), time.monotonic()
    client0, cbusy0 = children(), _cpu_busy(CLIENT_CPU)
    values, cmd = dnsperf(procs, server.name, server.port, query_file, seconds, mode == "edns",
                          qps_limit)  # fmt: skip
    cpu1, busy1, wall1 = _tree_cpu(server.popen.pid), _cpu_busy(SERVER_CPU), time.monotonic()
    client1, cbusy1 = children(), _cpu_busy(CLIENT_CPU)
    return Run(server.name, mode, rnd, slot, values["qps"], values["avg"] * 1000,
               values["max"] * 1000, values["stddev"] * 1000, int(values["sent"]),
               int(values["lost"]), values["rcodes"], int(values["response"]), cmd,
               wall1 - wall0, cpu1 - cpu0, busy1 - busy0, client1 - client0,
               cbusy1 - cbusy0)  # fmt: skip


def dnsperf(
    procs: Procs, server: str, port: int, query_file: Path, seconds: int, edns: bool,
    qps_limit: int | None = None,
) -> tuple[dict[str, Any], str]:  # fmt: skip
    argv = ["dnsperf", "-s", HOST, "-p", str(port), "-d", str(query_file), "-c", "1"]
    argv += ["-l", str(seconds)]
    if edns:
        argv.append("-e")
    if qps_limit:
        argv += ["-Q", str(qps_limit)]
    full = _pinned(CLIENT_CPU, argv)
    popen = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    runner = Proc(f"dnsperf → {server}", popen, Path(os.devnull), port)  # type: ignore[arg-type]
    procs.running.append(runner)
    try:
        out, _ = popen.communicate(timeout=seconds + 60)
    finally:
        procs.stop(runner)
    text = out.decode(errors="replace")
    if popen.returncode != 0:
        raise RuntimeError(f"{shlex.join(full)} exited {popen.returncode}:\n{text}")
    return parse_dnsperf(text), shlex.join(full)


# --------------------------------------------------------------------------- report


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def how_it_was_run(
    command: str,
    started: dt.datetime,
    facts: dict[str, str],
    peer: str,
    load_before: str,
    load_after: str,
    machine_note: str = "",
) -> list[str]:
    """The section of a report that says how to run it again and where it ran."""
    return [
        "## How it was run",
        "",
        "```",
        command,
        "```",
        "",
        f"* Date: {started.strftime('%Y-%m-%d %H:%M UTC')}",
        f"* Machine: `nproc` = {facts['nproc']}, {facts['cpu']}, Linux {facts['kernel']}"
        + machine_note,
        f"* Python {facts['python']}, uvloop {facts['uvloop']}, dnsperf {facts['dnsperf']}, "
        + peer,
        f"* discovery at commit {facts['commit']}"
        + (f" with uncommitted changes in {facts['dirty']}" if facts["dirty"] else ""),
        f"* Load average (1, 5, 15 min) before / after: {load_before} / {load_after}",
    ]


def machine_facts() -> dict[str, str]:
    def run(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, check=False).stdout
        except OSError:
            return ""

    dnsperf_version = re.search(r"Version (\S+)", run(["dnsperf", "-h"]))
    dnsmasq_path = find_dnsmasq()
    dnsmasq_version = re.search(
        r"version (\S+)", run([dnsmasq_path, "--version"]) if dnsmasq_path else ""
    )
    nsd_version = re.search(r"NSD version (\S+)", run([find_sbin("nsd") or "nsd", "-v"]) + "")
    knot_version = re.search(r"version (\S+)", run([find_sbin("knotd") or "knotd", "-V"]))
    commit = run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]).strip() or "unknown"
    dirty = run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "discovery"]).split("\n")
    dirty_files = [line[3:] for line in dirty if line.strip()]
    return {
        "nproc": run(["nproc"]).strip() or str(os.cpu_count()),
        "cpu": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": importlib.metadata.version("uvloop"),
        "dnsperf": dnsperf_version.group(1) if dnsperf_version else "unknown",
        "dnsmasq": dnsmasq_version.group(1) if dnsmasq_version else "unknown",
        "nsd": nsd_version.group(1) if nsd_version else "unknown",
        "knot": knot_version.group(1) if knot_version else "unknown",
        "commit": commit,
        "dirty": ", ".join(dirty_files) if dirty_files else "",
    }


@dataclass
class Row:
    server: str
    mode: str
    runs: list[Run]
    ratios: dict[str, list[float]]  # for discovery: peer -> discovery/peer queries/s per round

    @property
    def qps(self) -> list[float]:
        return [r.qps for r in self.runs]


def build_rows(runs: list[Run], rounds: int) -> list[Row]:
    rows = []
    for mode in MODES:
        for server in SERVERS:
            mine = sorted((r for r in runs if r.server == server and r.mode == mode),
                          key=lambda r: r.round)  # fmt: skip
            ratios: dict[str, list[float]] = {}
            if server == "discovery":
                for peer in PEERS:
                    for rnd in range(rounds):
                        d = [
                            r.qps
                            for r in runs
                            if (r.server, r.mode, r.round) == (server, mode, rnd)
                        ]
                        m = [
                            r.qps for r in runs if (r.server, r.mode, r.round) == (peer, mode, rnd)
                        ]
                        if d and m:
                            ratios.setdefault(peer, []).append(d[0] / m[0])
            if mine:
                rows.append(Row(server, mode, mine, ratios))
    return rows


def table_lines(rows: list[Row]) -> list[str]:
    head = ("server", "mode", "queries/s (median)", "min-max", "avg latency ms", "max latency ms",
            "lost", "response bytes", "server CPU us/query",
            f"neighbours on CPU {SERVER_CPU} / {CLIENT_CPU}",
            "discovery/peer queries/s per round (median)")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        qps = row.qps
        ratio = "<br>".join(
            f"/{peer}: " + " / ".join(f"{x:.2f}" for x in xs) + f" (**{_median(xs):.2f}**)"
            for peer, xs in row.ratios.items()
        )
        lines.append(
            "| "
            + " | ".join(
                (
                    row.server,
                    "EDNS (-e)" if row.mode == "edns" else "plain",
                    f"{_median(qps):,.0f}",
                    f"{min(qps):,.0f}-{max(qps):,.0f}",
                    f"{_median([r.avg_ms for r in row.runs]):.3f}",
                    f"{max(r.max_ms for r in row.runs):.3f}",
                    f"{sum(r.lost for r in row.runs)} of {sum(r.sent for r in row.runs):,}",
                    str(row.runs[0].response_bytes),
                    f"{_median([r.us_per_query for r in row.runs]):.2f}",
                    f"{_median([r.others_share for r in row.runs]):.0%} / "
                    f"{_median([r.client_others_share for r in row.runs]):.0%}",
                    ratio,
                )
            )
            + " |"
        )
    return lines


def fixed_lines(fixed: list[Run]) -> list[str]:
    head = ("server", "asked queries/s", "got queries/s", "avg latency ms", "stddev ms",
            "max latency ms", "lost", f"neighbours on CPU {SERVER_CPU} / {CLIENT_CPU}")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in fixed:
        lines.append(
            f"| {r.server} | {r.command.split('-Q ')[1].split()[0]} | {r.qps:,.0f} | "
            f"{r.avg_ms:.3f} | {r.stddev_ms:.3f} | {r.max_ms:.3f} | {r.lost} of {r.sent:,} | "
            f"{r.neighbours} |"
        )
    return lines


def raw_lines(runs: list[Run]) -> list[str]:
    lines = ["| round | slot | mode | server | queries/s | avg ms | max ms | lost | server CPU "
             "| us/query | neighbours on CPU 1 / 0 | rcodes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(runs, key=lambda r: (r.round, MODES.index(r.mode), r.order)):
        codes = ", ".join(f"{k} {v}" for k, v in sorted(r.rcodes.items()))
        lines.append(
            f"| {r.round + 1} | {r.order + 1} | {r.mode} | {r.server} | {r.qps:,.0f} | "
            f"{r.avg_ms:.3f} | {r.max_ms:.3f} | {r.lost} | {r.cpu_share:.0%} | "
            f"{r.us_per_query:.2f} | {r.neighbours} | {codes} |"
        )
    return lines


def _grouped_bars(ax: Any, rows: list[Row], metric: Any, fmt: str, colors: dict[str, str]) -> None:
    """Median of the rounds per server and mode, whiskers from min to max."""
    width = 0.38
    top = 0.0
    for offset, mode in ((-width / 2, "plain"), (width / 2, "edns")):
        xs, heights, lo, hi = [], [], [], []
        for i, server in enumerate(SERVERS):
            row = next((r for r in rows if r.server == server and r.mode == mode), None)
            if row is None:
                continue
            values = [metric(run) for run in row.runs]
            med = _median(values)
            xs.append(i + offset)
            heights.append(med)
            lo.append(med - min(values))
            hi.append(max(values) - med)
            top = max(top, max(values))
        label = "EDNS (dnsperf -e)" if mode == "edns" else "plain"
        drawn = ax.bar(xs, heights, width, yerr=[lo, hi], capsize=4, label=label,
                       color=colors[mode])  # fmt: skip
        ax.bar_label(drawn, labels=[fmt.format(h) for h in heights], padding=3, fontsize=9)
    ax.set_xticks(range(len(SERVERS)), [LABELS[s] for s in SERVERS])
    ax.set_ylim(0, top * 1.2 or 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)


def plot(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, cost, ratios) = plt.subplots(
        1, 3, figsize=(19, 5.5), gridspec_kw={"width_ratios": [1.8, 1.5, 1]}, layout="constrained"
    )
    colors = {"plain": "#4C72B0", "edns": "#DD8452"}
    _grouped_bars(bars, rows, lambda r: r.qps / 1000, "{:.0f}k", colors)
    bars.set_ylabel("thousand queries/s")
    bars.set_title("Queries/s (median of rounds, whiskers min-max)")
    _grouped_bars(cost, rows, lambda r: r.us_per_query, "{:.2f}", colors)
    cost.set_ylabel("server CPU microseconds per query")
    cost.set_title("Server CPU time per query (lower is better)")

    styles = {NSD: "o-", KNOT: "s--", DNSMASQ: "^:"}
    for mode in MODES:
        row = next((r for r in rows if r.server == "discovery" and r.mode == mode), None)
        for peer, xs in (row.ratios if row else {}).items():
            label = f"/{LABELS[peer]}, " + ("EDNS" if mode == "edns" else "plain")
            ratios.plot(range(1, len(xs) + 1), xs, styles[peer], color=colors[mode], label=label)
    ratios.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ratios.set_xlabel("round")
    ratios.set_ylabel("discovery / peer (queries/s)")
    ratios.set_title("discovery / peer, per round")
    ratios.legend(loc="best", fontsize=8)
    ratios.grid(alpha=0.3)
    all_ratios = [x for r in rows for xs in r.ratios.values() for x in xs] or [1.0]
    ratios.set_ylim(min(0.0, min(all_ratios)), max(1.2, max(all_ratios) * 1.1))
    longest = max((len(xs) for r in rows for xs in r.ratios.values()), default=1)
    ratios.set_xticks(range(1, longest + 1))
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(
    path: Path, *, command: str, started: dt.datetime, facts: dict[str, str], args: Any,
    rows: list[Row], fixed: list[Run], runs: list[Run], checks: list[str], load: list[str],
    registration_s: float, discovery_log: list[str], png: Path | None,
) -> None:  # fmt: skip
    plain = next((r for r in rows if r.server == "discovery" and r.mode == "plain"), None)
    edns = next((r for r in rows if r.server == "discovery" and r.mode == "edns"), None)
    verdict: dict[str, list[str]] = {}
    for label, row in (("plain", plain), ("EDNS", edns)):
        for peer, xs in (row.ratios if row else {}).items():
            verdict.setdefault(peer, []).append(f"{label} {_median(xs):.2f}")
    fixed_disc = next((r for r in fixed if r.server == "discovery"), None)
    peers = f"dnsmasq {facts['dnsmasq']}, NSD {facts['nsd']}, Knot DNS {facts['knot']}"
    lost = sum(r.lost for r in runs if r.server == "discovery")
    text = [
        "# DNS benchmark: discovery against NSD, Knot DNS and dnsmasq",
        "",
        "Generated by `bench/dnsperf_compare.py`; do not edit by hand, run it again.",
        "",
        "## Result",
        "",
    ]
    for peer, parts in verdict.items():
        text.append(
            f"* discovery / {LABELS[peer]} queries per second (median of the per-round ratios): "
            f"{', '.join(parts)}."
        )
    text.append(f"* Queries lost by discovery over all runs: {lost}.")
    for label, mode in (("plain", "plain"), ("EDNS", "edns")):
        cost = {r.server: _median([x.us_per_query for x in r.runs]) for r in rows if r.mode == mode}
        if "discovery" in cost:
            text.append(
                f"* Server CPU time per answered query, {label}: "
                + ", ".join(f"{LABELS[k].splitlines()[0]} {v:.2f} us" for k, v in cost.items())
                + " (this measure leaves out the time neighbours took, so it is steadier than "
                "queries/s here)."
            )
    if fixed_disc:
        ok = "met" if fixed_disc.avg_ms < 0.1 else "NOT met"
        text.append(
            f"* Average latency at a fixed {args.fixed_qps:,} queries/s: discovery "
            f"{fixed_disc.avg_ms:.3f} ms (target < 0.1 ms: {ok})."
        )
    text += [
        "",
        *how_it_was_run(command, started, facts, peers, load[0], load[-1]),
        "",
        "Workload: 1,000 services `svcN.default.svc.cluster.local`, one instance `i0` each, "
        "200 of them with a named port `http` (SRV `_http._tcp.svcN…` → "
        "`i0.svcN.default.svc.cluster.local`, port 80). discovery got them through its HTTP API "
        f"(`PUT /v1/services/default/svcN/instances/i0`, {registration_s:.1f} s for all 1,000, "
        "embedded store, `--log-level warning`); NSD and Knot DNS serve one zone file with the "
        "same records, TTL 5 (NSD: `server-count: 1`, `rrl-ratelimit: 0`, its default responses, "
        "which carry the zone's NS record and glue; Knot: `udp-workers: 1`, `tcp-workers: 1`, "
        "`background-workers: 1`); dnsmasq got the same names and addresses in an "
        "`--addn-hosts` file and `srv-host=` lines, `--local=/cluster.local/ --local-ttl=5` (the "
        "TTL discovery gives). The query file has "
        f"{args.lines:,} lines: 80% A hits, 10% SRV hits, 10% names that do not exist, shuffled.",
        "",
        "The five servers are pinned to CPU 1 (`taskset -c 1`) and measured one at a time "
        "(the others sit idle), dnsperf on CPU 0 "
        f"(`taskset -c 0 dnsperf -c 1 -l {args.duration}`, at most 100 queries in flight, so "
        "latency at full speed is mostly queueing). "
        f"{args.rounds} rounds; in each round every server is measured plain and with `-e` "
        "(EDNS0), one after the other, and the order of the servers rotates from round to round. "
        "The ratio discovery/peer is taken within a round, from runs a few seconds apart.",
        "",
        "The uvloop echo server (`bench/echo_server.py`) sends each query back with the QR bit "
        "set: no parsing, no lookup. It is the ceiling for any Python server on uvloop.",
        "",
        "Before measuring, the script checks the answers:",
        "",
        *[f"* {line}" for line in checks],
        "* The echo server returns the query with QR set.",
        "",
        "## Queries per second",
        "",
        *table_lines(rows),
        "",
        "Latency columns: the median of the rounds' averages and the largest maximum. "
        "Server CPU us/query: the server process's user+system time during the run (from "
        "/proc) divided by the queries answered, median of the rounds. Neighbours: the share of "
        f"the time of CPU {SERVER_CPU} (the server's) and CPU {CLIENT_CPU} (dnsperf's) that went "
        "to anything but the server and dnsperf (other engineers' test suites, interrupts), "
        "median of the rounds. "
        "Response bytes: dnsperf's average response size; discovery's NXDOMAIN answers carry "
        "the zone's SOA (dnsmasq's carry none), so its responses are a little larger; NSD's "
        "positive answers carry the zone's NS record and its glue.",
        "",
    ]
    if png:
        text += [f"![queries per second]({png.name})", ""]
    text += [
        f"## Latency at a fixed rate (`dnsperf -Q {args.fixed_qps} -l {args.fixed_duration}`)",
        "",
        *fixed_lines(fixed),
        "",
        "## Every run",
        "",
        *raw_lines(runs),
        "",
        "## Noise",
        "",
        "This machine is shared: other engineers run test suites on it while the benchmark runs, "
        "and it has only 2 cores, so a busy neighbour takes time from the server's or from "
        "dnsperf's core. Single runs can be off by 10% or more; that is why the servers "
        "alternate within each round, the ratio is computed per round and the medians are "
        "reported with their min-max. Compare ratios rather than absolute numbers across runs. "
        "The neighbours column says how much of each core went elsewhere during a run. Where the "
        "server CPU column of the last table is well below 100%, the server was waiting for "
        "queries: dnsperf, on a core shared with neighbours too, was the limit, and queries/s "
        "says more about the client than the server. Server CPU time per query does not count "
        "the neighbours' time and is the steadier figure for comparing the servers' own cost "
        "(neighbours still cost some of it through shared caches). The fixed-rate latency is "
        "the most exposed: a server that sleeps between queries waits for its core to be "
        "scheduled whenever a neighbour holds it.",
        "",
        "## discovery's log during the run (warning and above)",
        "",
    ]
    if discovery_log:
        text += ["```", *discovery_log[-40:], "```"]
    else:
        text.append("Empty: no warnings or errors.")
    text.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", "-l", type=int, default=10, help="seconds per dnsperf run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of alternating runs")
    parser.add_argument("--fixed-qps", type=int, default=5000, help="rate of the latency run")
    parser.add_argument("--fixed-duration", type=int, default=10, help="seconds of that run")
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--http-services", type=int, default=200)
    parser.add_argument("--lines", type=int, default=10000, help="lines of the query file")
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help="where results go")
    parser.add_argument("--no-docs", action="store_true", help="print the table only")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser.parse_args(argv)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    # Ctrl-C too, even where SIGINT came in ignored (a background job of a script)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    command = shlex.join(
        ["python", os.path.relpath(__file__, ROOT), *(sys.argv[1:] if argv is None else argv)]
    )
    dnsmasq = ensure_tools()
    ensure_python_packages(plot=not args.no_docs)
    services = make_services(args.services, args.http_services)
    queries = make_queries(services, args.lines, args.seed)
    work = Path(tempfile.mkdtemp(prefix="dnsbench-"))
    query_file = work / "queries.txt"
    query_file.write_text("".join(f"{name} {qtype}\n" for name, qtype in queries))
    procs = Procs()
    load = [" ".join(f"{x:.2f}" for x in os.getloadavg())]
    try:
        with sigterm_as_interrupt():
            discovery, http_port = start_discovery(procs, work)
            log(f"discovery pid {discovery.popen.pid}: dns {HOST}:{discovery.port}, "
                f"http {HOST}:{http_port}")  # fmt: skip
            took = register(http_port, services, ttl=3600)
            log(f"registered {len(services)} services in {took:.1f} s")
            if not wait_dns(discovery, services[-1].name):
                raise SystemExit("discovery does not answer for the last registered service")
            dnsm = start_dnsmasq(procs, work, dnsmasq, services)
            zone = write_zone(work, services)
            nsd = start_nsd(procs, work, zone, services)
            knot = start_knot(procs, work, zone, services)
            echo = start_echo(procs, work)
            by_name = {"discovery": discovery, NSD: nsd, KNOT: knot, DNSMASQ: dnsm, ECHO: echo}
            log(", ".join(f"{k} pid {p.popen.pid} port {p.port}" for k, p in by_name.items()))
            checks = check_answers(
                {name: by_name[name].port for name in ("discovery", *PEERS)}, services, queries
            )
            check_echo(echo.port)
            log("answers checked: " + checks[0])
            runs: list[Run] = []
            for rnd in range(args.rounds):
                turn = rnd % len(SERVERS)
                order = list(SERVERS[turn:] + SERVERS[:turn])
                for mode in MODES:
                    for slot, server in enumerate(order):
                        for proc in procs.running:
                            if proc.popen.poll() is not None:
                                raise SystemExit(f"{proc.name} exited; see {proc.log_path}")
                        run = measure(procs, by_name[server], mode, rnd, slot, query_file,
                                      args.duration)  # fmt: skip
                        runs.append(run)
                        log(f"round {rnd + 1}/{args.rounds} {mode:5} {server:12} "
                            f"{run.qps:9,.0f} q/s  avg {run.avg_ms:.3f} ms  "
                            f"max {run.max_ms:.3f} ms  lost {run.lost}  "
                            f"{run.us_per_query:.2f} us CPU/query  server CPU "
                            f"{run.cpu_share:.0%}, neighbours {run.neighbours}")  # fmt: skip
            fixed: list[Run] = []
            for server in ("discovery", NSD, DNSMASQ):
                run = measure(procs, by_name[server], "plain", 0, 0, query_file,
                              args.fixed_duration, args.fixed_qps)  # fmt: skip
                fixed.append(run)
                log(f"fixed {args.fixed_qps} q/s {server}: avg {run.avg_ms:.3f} ms, "
                    f"neighbours on CPU {SERVER_CPU} / {CLIENT_CPU}: {run.neighbours}")  # fmt: skip
            load.append(" ".join(f"{x:.2f}" for x in os.getloadavg()))
            # the rcode mix under load must match the query file: 10% NXDOMAIN
            for run in runs:
                if run.server == ECHO:
                    continue
                nx = run.rcodes.get("NXDOMAIN", 0) / max(1, sum(run.rcodes.values()))
                if not 0.08 < nx < 0.12 or set(run.rcodes) - {"NOERROR", "NXDOMAIN"}:
                    log(f"WARNING: odd rcodes from {run.server}: {run.rcodes}")
            if discovery.popen.poll() is not None:
                raise SystemExit("discovery exited during the run")
        discovery_log = [
            line for line in discovery.log_path.read_text().splitlines() if line.strip()
        ]
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"work directory kept: {work}")

    rows = build_rows(runs, args.rounds)
    print()
    print("\n".join(table_lines(rows)))
    print()
    print("\n".join(fixed_lines(fixed)))
    if discovery_log:
        print("\ndiscovery log:\n" + "\n".join(discovery_log[-20:]))
    if not args.no_docs:
        facts = machine_facts()
        png = args.docs / "qps.png"
        title = (
            f"{started:%Y-%m-%d}, {facts['nproc']} CPUs ({facts['cpu']}), rounds: {args.rounds}"
            f" x {args.duration} s, {args.services:,} services; shared, noisy machine"
        )
        plot(rows, png, title)
        md = args.docs / "benchmarks.md"
        write_markdown(md, command=command, started=started, facts=facts, args=args, rows=rows,
                       fixed=fixed, runs=runs, checks=checks, load=load, registration_s=took,
                       discovery_log=discovery_log, png=png)  # fmt: skip
        log(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        sys.exit(130)
