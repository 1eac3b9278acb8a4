"""discovery against NSD, Knot DNS and dnsmasq (and a bare uvloop echo server as the ceiling)
under dnsperf.

One command, run from anywhere with the Python that has `discovery` installed:

    python bench/dnsperf_compare.py            # full: 3 rounds x 10 s per server and mode
    python bench/dnsperf_compare.py --rounds 3 --duration 5 --fixed-duration 5   # shorter
    python bench/dnsperf_compare.py --rounds 1 --duration 2 --fixed-duration 2   # quick look
    python bench/versus.py setup REV && python bench/dnsperf_compare.py --before REV

It needs dnsperf, dnsmasq, NSD, Knot DNS and matplotlib (`make bench-deps` installs them; the
bench itself installs nothing and says what is missing), starts the servers on free 127.0.0.1
ports pinned to CPU 1 (NSD with one server process, Knot with one UDP worker), loads the same 1,000
services into discovery (through its HTTP API), into NSD and Knot (one zone file) and into dnsmasq
(hosts file + srv-host lines), checks that all give the same answers to every distinct query of
the query file, then runs `taskset -c 0 dnsperf -c 1` against each server in alternation, plain,
with EDNS and over TCP (`-m tcp`: discovery, NSD and Knot), and once at a fixed rate. discovery
runs twice, with each way of reading UDP (`--dns-udp-io mmsg`, the default, and `loop`); with
`--before REV`, a third time with the code of REV (installed by `bench/versus.py setup REV`).
It prints a table and writes docs/benchmarks.md and docs/qps.png. Everything it started is
stopped on exit, Ctrl-C or error. Nothing but 127.0.0.1 is ever bound or queried.
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
LOOP = "discovery (loop)"  # --dns-udp-io loop: recvfrom/sendto in Python, no recvmmsg
SERVERS = ("discovery", LOOP, NSD, KNOT, DNSMASQ, ECHO)
TCP_SERVERS = ("discovery", NSD, KNOT)  # the ones measured over TCP too
PEERS = (NSD, KNOT, DNSMASQ)  # the ratio discovery/peer is reported for each
LABELS = {"discovery": "discovery", LOOP: "discovery\n(loop)", NSD: "NSD", KNOT: "Knot DNS",
          DNSMASQ: "dnsmasq", ECHO: "uvloop echo\n(ceiling)"}  # fmt: skip
ZONE = "cluster.local"
MODES = ("plain", "edns", "tcp")
MODE_LABELS = {"plain": "plain", "edns": "EDNS (-e)", "tcp": "TCP (-m tcp)"}
CORES = (1, 2, 4, 8, 16)  # the model of several cores


def lineup(mode: str, before: str | None = None) -> tuple[str, ...]:
    """The servers measured in a mode (the echo server and dnsmasq's forks: UDP only)."""
    names = TCP_SERVERS if mode == "tcp" else SERVERS
    return names + ((before,) if before else ())


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


def start_discovery(
    procs: Procs, work: Path, name: str = "discovery", python: str | None = None,
    extra: tuple[str, ...] = (),
) -> tuple[Proc, int]:  # fmt: skip
    """discovery (or, with `python`, the code installed in that venv), pinned, on free ports."""
    command = [python, "-P", "-m", "discovery"] if python else discovery_command()
    log_path = work / f"{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}.log"
    for attempt in range(3):
        dns_port, http_port = free_port(), free_port()
        argv = [
            *command, "serve",
            "--dns", f"{HOST}:{dns_port}", "--http", f"{HOST}:{http_port}",
            "--log-level", "warning", "--cni-socket", "", *extra,
        ]  # fmt: skip
        proc = procs.start(name, _pinned(SERVER_CPU, argv), log_path, dns_port)
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
    tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
    raise SystemExit(f"{name} would not start; its log ends:\n" + "\n".join(tail))


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


def ask(port: int, name: str, qtype: str, edns: bool, timeout: float = 2.0,
        tcp: bool = False) -> Any:  # fmt: skip
    from dnslib import EDNS0, DNSRecord

    query = DNSRecord.question(name, qtype)
    if edns:
        query.add_ar(EDNS0(udp_len=1232))
    if tcp:
        with socket.create_connection((HOST, port), timeout=timeout) as stream:
            wire = query.pack()
            stream.sendall(len(wire).to_bytes(2, "big") + wire)
            reader = stream.makefile("rb")
            size = int.from_bytes(reader.read(2), "big")
            return DNSRecord.parse(reader.read(size))
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
    ports: dict[str, int], services: list[Service], queries: list[tuple[str, str]],
    tcp_servers: tuple[str, ...] = (),
) -> list[str]:  # fmt: skip
    """Every distinct query of the file, plain and with EDNS, against discovery and its peers,
    and over TCP against `tcp_servers`: the expected data, and the same answer from all.
    Returns lines for the report."""
    by_name = {s.name: s for s in services}
    by_srv = {s.srv_name: s for s in services if s.http}
    distinct = sorted(set(queries))
    problems: list[str] = []
    for edns, tcp in ((False, False), (True, False), (False, True)):
        asked = [server for server in ports if not tcp or server in tcp_servers]
        for name, qtype in distinct:
            got = {
                server: summary(ask(ports[server], name, qtype, edns, tcp=tcp))
                for server in asked
            }
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
                    problems.append(
                        f"{server} {name} {qtype} edns={edns} tcp={tcp}: {summ} != {want}"
                    )
            if len(problems) > 20:
                raise SystemExit("wrong answers:\n" + "\n".join(problems))
    if problems:
        raise SystemExit("wrong answers:\n" + "\n".join(problems))
    checked = 2 * len(distinct)
    lines = [
        f"{checked} queries ({len(distinct)} distinct lines of the query file, plain and with "
        "EDNS) gave the expected rcode, answer and additional records (names, TTLs, data) and an "
        "OPT record exactly when asked, from " + ", ".join(ports) + " alike.",
    ]
    if tcp_servers:
        lines.append(
            f"The same {len(distinct)} queries over TCP gave the same answers from "
            + ", ".join(tcp_servers) + "."
        )
    return lines


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
                          qps_limit, tcp=mode == "tcp")  # fmt: skip
    cpu1, busy1, wall1 = _tree_cpu(server.popen.pid), _cpu_busy(SERVER_CPU), time.monotonic()
    client1, cbusy1 = children(), _cpu_busy(CLIENT_CPU)
    return Run(server.name, mode, rnd, slot, values["qps"], values["avg"] * 1000,
               values["max"] * 1000, values["stddev"] * 1000, int(values["sent"]),
               int(values["lost"]), values["rcodes"], int(values["response"]), cmd,
               wall1 - wall0, cpu1 - cpu0, busy1 - busy0, client1 - client0,
               cbusy1 - cbusy0)  # fmt: skip


def dnsperf(
    procs: Procs, server: str, port: int, query_file: Path, seconds: int, edns: bool,
    qps_limit: int | None = None, tcp: bool = False,
) -> tuple[dict[str, Any], str]:  # fmt: skip
    argv = ["dnsperf", "-s", HOST, "-p", str(port), "-d", str(query_file), "-c", "1"]
    argv += ["-l", str(seconds)]
    if edns:
        argv.append("-e")
    if tcp:
        argv += ["-m", "tcp"]
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
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            return done.stdout + done.stderr  # nsd -v writes to stderr
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


def build_rows(runs: list[Run], rounds: int, before: str | None = None) -> list[Row]:
    rows = []
    for mode in MODES:
        names = lineup(mode, before)
        for server in names:
            mine = sorted((r for r in runs if r.server == server and r.mode == mode),
                          key=lambda r: r.round)  # fmt: skip
            ratios: dict[str, list[float]] = {}
            if server == "discovery":
                for peer in [n for n in names if n not in ("discovery", ECHO)]:
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
                    MODE_LABELS[row.mode],
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
    width = 0.8 / len(MODES)
    top = 0.0
    servers = list(dict.fromkeys(r.server for r in rows))
    for k, mode in enumerate(MODES):
        offset = (k - (len(MODES) - 1) / 2) * width
        xs, heights, lo, hi = [], [], [], []
        for i, server in enumerate(servers):
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
        drawn = ax.bar(xs, heights, width, yerr=[lo, hi], capsize=3, label=MODE_LABELS[mode],
                       color=colors[mode])  # fmt: skip
        ax.bar_label(drawn, labels=[fmt.format(h) for h in heights], padding=2, fontsize=7,
                     rotation=90)  # fmt: skip
    ax.set_xticks(range(len(servers)), [LABELS.get(s, s) for s in servers], fontsize=8)
    ax.set_ylim(0, top * 1.2 or 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)


def plot(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, cost, ratios) = plt.subplots(
        1, 3, figsize=(22, 6), gridspec_kw={"width_ratios": [1.8, 1.6, 1]}, layout="constrained"
    )
    colors = {"plain": "#4C72B0", "edns": "#DD8452", "tcp": "#55A868"}
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
            if peer not in styles:
                continue
            label = f"/{LABELS[peer]}, {MODE_LABELS[mode]}"
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


def _plain_label(server: str) -> str:
    return " ".join(LABELS.get(server, server).split())


def model_lines(costs: dict[str, dict[str, float]], before: str | None) -> list[str]:
    """Queries/s on N cores from the CPU time per query measured on one."""
    servers = [s for s in ("discovery", NSD, KNOT, DNSMASQ) if s in costs.get("plain", {})]
    head = ["server", "mode", "CPU us/query", *(f"{n} core{'s' * (n > 1)}" for n in CORES)]
    lines = [
        "## A model for several cores",
        "",
        "This machine has 2 cores, one of them for dnsperf, so scaling is modelled, not "
        "measured: a server process busy on one core answers at most 1 / (its CPU time per "
        "query) queries per second, and N of them (`--workers N` for discovery, `server-count: "
        "N` for NSD, `udp-workers: N` for Knot), each on its own core with the clients "
        "elsewhere, N times that. The CPU time per query is the median measured above, so the "
        "model inherits its noise, and the ratio between two servers is the same on any number "
        "of cores. What it leaves out: discovery's workers share one UDP socket (the parent "
        "binds it), so they take datagrams from one receive queue under its lock, where NSD "
        "and Knot open one socket per process with SO_REUSEPORT; each discovery worker keeps "
        "its own copy of the registry (memory, and one etcd watch each); and on loopback the "
        "CPU time of a server includes delivering its answers into the client's socket, which "
        "a real network card takes partly off the server's core.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for mode in MODES:
        for server in servers:
            cost = costs.get(mode, {}).get(server)
            if not cost or cost != cost:  # not measured in this mode, or NaN
                continue
            cells = [f"{n * 1e6 / cost:,.0f}" for n in CORES]
            lines.append(
                f"| {_plain_label(server)} | {MODE_LABELS[mode]} | {cost:.2f} | "
                + " | ".join(cells) + " |"
            )
    return lines


def write_markdown(
    path: Path, *, command: str, started: dt.datetime, facts: dict[str, str], args: Any,
    rows: list[Row], fixed: list[Run], runs: list[Run], checks: list[str], load: list[str],
    registration_s: float, discovery_log: list[str], png: Path | None,
    before: str | None = None, before_rev: str | None = None,
) -> None:  # fmt: skip
    verdict: dict[str, list[str]] = {}
    for mode in MODES:
        row = next((r for r in rows if r.server == "discovery" and r.mode == mode), None)
        for peer, xs in (row.ratios if row else {}).items():
            verdict.setdefault(peer, []).append(f"{MODE_LABELS[mode]} {_median(xs):.2f}")
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
        what = {
            LOOP: "discovery (`--dns-udp-io loop`, recvfrom/sendto per datagram in Python)",
            before: f"discovery at {before_rev} (the code before)",
        }.get(peer, LABELS.get(peer, peer))
        text.append(
            f"* discovery / {what} queries per second (median of the per-round ratios): "
            f"{', '.join(parts)}."
        )
    text.append(f"* Queries lost by discovery over all runs: {lost}.")
    costs: dict[str, dict[str, float]] = {}
    for mode in MODES:
        cost = {r.server: _median([x.us_per_query for x in r.runs]) for r in rows if r.mode == mode}
        costs[mode] = cost
        if "discovery" in cost:
            text.append(
                f"* Server CPU time per answered query, {MODE_LABELS[mode]}: "
                + ", ".join(f"{_plain_label(k)} {v:.2f} us" for k, v in cost.items())
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
        "The servers are pinned to CPU 1 (`taskset -c 1`) and measured one at a time "
        "(the others sit idle), dnsperf on CPU 0 "
        f"(`taskset -c 0 dnsperf -c 1 -l {args.duration}`, at most 100 queries in flight, so "
        "latency at full speed is mostly queueing). "
        f"{args.rounds} rounds; in each round every server is measured plain and with `-e` "
        "(EDNS0), and discovery, NSD and Knot DNS over TCP too (`-m tcp`: one connection, "
        "queries pipelined), one after the other, and the order of the servers rotates from "
        "round to round. The ratio discovery/peer is taken within a round, from runs a few "
        "seconds apart.",
        "",
        "discovery runs twice: as it starts by default (`--dns-udp-io mmsg`: each wake-up of the "
        "event loop reads up to 64 datagrams with one `recvmmsg` and sends their answers with "
        "one `sendmmsg`) and as `discovery (loop)` (`--dns-udp-io loop`: the same loop with "
        "`recvfrom` and `sendto` for each datagram, in Python: what runs where the C extension "
        "is not built)"
        + (f", and a third time with the code of {before_rev} (`python bench/versus.py setup "
           f"{before_rev}`) as `{before}`" if before else "")
        + ".",
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
        *model_lines(costs, before),
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
    parser.add_argument(
        "--before", metavar="REV",
        help="also run discovery at REV (installed first by `python bench/versus.py setup REV`)",
    )  # fmt: skip
    return parser.parse_args(argv)


def before_python(revision: str) -> tuple[str, str]:
    """The name of the server of REV in the tables and the Python of its venv."""
    from versus import commit_of, home

    commit = commit_of(revision)
    python = home(commit) / "venv" / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"no venv for {revision}: run `python bench/versus.py setup {revision}`")
    LABELS[f"discovery {commit[:7]}"] = f"discovery\n{commit[:7]}"
    return f"discovery {commit[:7]}", str(python)


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
    before, before_py = before_python(args.before) if args.before else (None, None)
    services = make_services(args.services, args.http_services)
    queries = make_queries(services, args.lines, args.seed)
    work = Path(tempfile.mkdtemp(prefix="dnsbench-"))
    query_file = work / "queries.txt"
    query_file.write_text("".join(f"{name} {qtype}\n" for name, qtype in queries))
    procs = Procs()
    load = [" ".join(f"{x:.2f}" for x in os.getloadavg())]
    try:
        with sigterm_as_interrupt():
            # mmsg named, so that a tree without the C extension fails here rather than
            # measure its pure-Python loop twice
            discovery, http_port = start_discovery(procs, work, extra=("--dns-udp-io", "mmsg"))
            log(f"discovery pid {discovery.popen.pid}: dns {HOST}:{discovery.port}, "
                f"http {HOST}:{http_port}")  # fmt: skip
            took = register(http_port, services, ttl=3600)
            log(f"registered {len(services)} services in {took:.1f} s")
            if not wait_dns(discovery, services[-1].name):
                raise SystemExit("discovery does not answer for the last registered service")
            by_name = {"discovery": discovery}
            others = [(LOOP, None, ("--dns-udp-io", "loop"))]
            if before:
                others.append((before, before_py, ()))
            for name, python, extra in others:
                proc, port = start_discovery(procs, work, name, python, extra)
                register(port, services, ttl=3600)
                if not wait_dns(proc, services[-1].name):
                    raise SystemExit(f"{name} does not answer for the last registered service")
                by_name[name] = proc
            by_name[DNSMASQ] = start_dnsmasq(procs, work, dnsmasq, services)
            zone = write_zone(work, services)
            by_name[NSD] = start_nsd(procs, work, zone, services)
            by_name[KNOT] = start_knot(procs, work, zone, services)
            by_name[ECHO] = echo = start_echo(procs, work)
            log(", ".join(f"{k} pid {p.popen.pid} port {p.port}" for k, p in by_name.items()))
            checks = check_answers(
                {name: p.port for name, p in by_name.items() if name != ECHO}, services, queries,
                lineup("tcp", before),
            )  # fmt: skip
            check_echo(echo.port)
            log("answers checked: " + checks[0])
            runs: list[Run] = []
            for rnd in range(args.rounds):
                for mode in MODES:
                    names = lineup(mode, before)
                    turn = rnd % len(names)
                    order = list(names[turn:] + names[:turn])
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

    rows = build_rows(runs, args.rounds, before)
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
                       discovery_log=discovery_log, png=png, before=before,
                       before_rev=args.before)  # fmt: skip
        log(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        sys.exit(130)
