"""`--workers N` against etcd: DNS queries/s with 1 and 2 worker processes, the code of another
revision beside this checkout's, every server measured in alternation in one run.

    python bench/versus.py setup 3730fc0      # once: the old code in a venv of its own
    python bench/workers.py --old 3730fc0 [--rounds 4] [--duration 10] [--clients 8]

One etcd; every server (old and new code, 1 and 2 workers) watches the same prefix, so the
workload of bench/dnsperf_compare.py (1,000 services, 200 with an `http` port) is registered
once, through the first server's API, and each server is measured only once it answers the last
name from every worker. dnsperf then runs against each server in turn, the order reversed every
other round, with several client sockets (`-c`): the old code spread queries over its processes
with SO_REUSEPORT by the client's address and port, the new one shares one socket between its
workers. Nothing is pinned: the servers' processes, etcd and dnsperf share both cores, as in
production. Ratios are taken within each round (servers measured minutes apart would see
different neighbours on a shared machine), and the load average is printed before each round.
Results go to docs/workers.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
from dnsperf_compare import (
    HOST,
    Proc,
    Procs,
    _http,
    free_port,
    machine_facts,
    make_queries,
    make_services,
    parse_dnsperf,
    register,
)
from machine import discovery_command
from versus import commit_of, home

from discovery.testing import EtcdServer

ROOT = Path(__file__).resolve().parent.parent


def start(
    procs: Procs, work: Path, name: str, python: str, etcd: EtcdServer, workers: int
) -> tuple[Proc, int]:
    dns_port, http_port = free_port(), free_port()
    argv = [
        python, *discovery_command()[1:], "serve", "--dns", f"{HOST}:{dns_port}",
        "--http", f"{HOST}:{http_port}", "--etcd", etcd.client_url,
        "--workers", str(workers), "--log-level", "warning",
    ]  # fmt: skip
    proc = procs.start(name, argv, work / f"{name}.log", dns_port)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if _http(http_port, "GET", "/readyz")[0] == 200:
                return proc, http_port
        if proc.popen.poll() is not None:
            break
        time.sleep(0.1)
    raise SystemExit(f"{name} did not start; see {proc.log_path}")


def wait_answering(port: int, name: str, seconds: float = 60) -> None:
    """Every process must have loaded the registry before we measure: ask from many ports."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        answers = set()
        for _ in range(32):
            try:
                reply = dns.query.udp(dns.message.make_query(name, "A"), HOST, port=port, timeout=2)
                answers.add(dns.rcode.to_text(reply.rcode()))
            except dns.exception.Timeout:
                answers.add("timeout")
        if answers == {"NOERROR"}:
            return
        time.sleep(0.2)
    raise SystemExit(f"not every worker on port {port} answers {name}")


_TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu(root: int) -> float:
    """CPU seconds (user + system) of a process and its descendants still running."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            parents[int(entry)] = int(fields[1])
            cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / _TICK
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        tree.update(children)
        frontier.extend(children)
    return sum(cpu.get(pid, 0.0) for pid in tree)


def run_dnsperf(port: int, query_file: Path, seconds: int, clients: int) -> dict[str, float]:
    argv = ["dnsperf", "-s", HOST, "-p", str(port), "-d", str(query_file)]
    argv += ["-c", str(clients), "-T", "1", "-l", str(seconds)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)}: {out.stdout}{out.stderr}")
    return parse_dnsperf(out.stdout)


def old_python(revision: str) -> tuple[str, str]:
    commit = commit_of(revision)
    python = home(commit) / "venv" / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"no venv for {commit}: run `python bench/versus.py setup {revision}`")
    return commit, str(python)


def ratio_line(label: str, top: list[float], bottom: list[float]) -> str:
    ratios = [a / b for a, b in zip(top, bottom, strict=True)]
    spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
    return f"| {label} | **{statistics.median(ratios):.2f}** | {spread} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--old", default="3730fc0", help="revision of the old code (versus.py)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--clients", type=int, default=8, help="dnsperf client sockets (-c)")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    old_commit, old = old_python(args.old)
    head = commit_of("HEAD")
    sides = {  # name -> (python, workers)
        "new, 1 worker": (sys.executable, 1),
        "new, 2 workers": (sys.executable, 2),
        "old, 1 worker": (old, 1),
        "old, 2 workers": (old, 2),
    }
    os.environ["DISCOVERY_CNI_SOCKET"] = ""  # no CNI agent (the old code has none)
    services = make_services(1000, 200)
    procs = Procs()
    results: dict[str, list[float]] = {name: [] for name in sides}
    cpu_us: dict[str, list[float]] = {name: [] for name in sides}
    loads: list[str] = []
    with tempfile.TemporaryDirectory(prefix="discovery-workers-") as tmp:
        work = Path(tmp)
        query_file = work / "queries.txt"
        lines = make_queries(services, 10000, 4)
        query_file.write_text("".join(f"{name} {qtype}\n" for name, qtype in lines))
        etcd = EtcdServer(work / "etcd")
        etcd.start()
        try:
            ports, pids = {}, {}
            for number, (name, (python, workers)) in enumerate(sides.items()):
                proc, http_port = start(procs, work, f"s{number}", python, etcd, workers)
                if number == 0:
                    register(http_port, services, 3600)
                ports[name] = proc.port
                pids[name] = proc.popen.pid
            for port in ports.values():
                wait_answering(port, services[-1].name)
            for rnd in range(args.rounds):
                load = " ".join(f"{x:.2f}" for x in os.getloadavg())
                loads.append(load)
                print(f"round {rnd + 1}, load average {load}", flush=True)
                order = list(sides) if rnd % 2 == 0 else list(reversed(sides))
                for name in order:
                    before = tree_cpu(pids[name])
                    values = run_dnsperf(ports[name], query_file, args.duration, args.clients)
                    used = tree_cpu(pids[name]) - before
                    answered = values["sent"] - values["lost"]
                    results[name].append(values["qps"])
                    cpu_us[name].append(used / answered * 1e6)
                    print(
                        f"  {name}: {values['qps']:,.0f} q/s, avg {values['avg'] * 1000:.3f} ms, "
                        f"lost {values['lost']:.0f}, {cpu_us[name][-1]:.1f} us CPU per query",
                        flush=True,
                    )
        finally:
            procs.stop_all()
            etcd.stop()
    names = list(sides)
    raw = [
        "| round | load average (1, 5, 15 min) | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for rnd, load in enumerate(loads):
        cells = " | ".join(f"{results[name][rnd]:,.0f}" for name in names)
        raw.append(f"| {rnd + 1} | {load} | {cells} |")
    rows = [
        "| server | queries/s (median) | min-max | CPU µs per query, all its processes (median)"
        " | min-max |",
        "|---|---|---|---|---|",
    ]
    for name, qps in results.items():
        cpu = cpu_us[name]
        rows.append(
            f"| {name} | {statistics.median(qps):,.0f} | {min(qps):,.0f}-{max(qps):,.0f} | "
            f"{statistics.median(cpu):.1f} | {min(cpu):.1f}-{max(cpu):.1f} |"
        )
    ratios = [
        "| ratio (queries/s unless named), within each round | median | min-max over rounds |",
        "|---|---|---|",
        ratio_line("new 2 workers / new 1", results["new, 2 workers"], results["new, 1 worker"]),
        ratio_line("old 2 workers / old 1", results["old, 2 workers"], results["old, 1 worker"]),
        ratio_line("new / old, 2 workers", results["new, 2 workers"], results["old, 2 workers"]),
        ratio_line("new / old, 1 worker", results["new, 1 worker"], results["old, 1 worker"]),
        ratio_line(
            "CPU per query: new / old, 2 workers",
            cpu_us["new, 2 workers"],
            cpu_us["old, 2 workers"],
        ),
        ratio_line(
            "CPU per query: new / old, 1 worker", cpu_us["new, 1 worker"], cpu_us["old, 1 worker"]
        ),
    ]
    print("\n".join([*rows, "", *ratios]))
    if not args.no_docs:
        facts = machine_facts()
        command = "python bench/workers.py " + shlex.join(sys.argv[1:])
        text = [
            "# `--workers N` against etcd: old and new code side by side",
            "",
            f"Command: `{command.strip()}` (after `python bench/versus.py setup {args.old}`)"
            f" — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "",
            "Machine: " + ", ".join(f"{k} {v}" for k, v in facts.items()),
            "",
            f"New: this checkout ({head}). Old: {old_commit} (first process runs everything, the"
            " others answer DNS on their own SO_REUSEPORT sockets). One etcd; 1,000 services"
            f" registered once; dnsperf with `-c {args.clients}` client sockets,"
            f" {args.duration} s per run, {args.rounds} rounds, the order of the four servers"
            " reversed every other round; nothing pinned (2 cores for the servers, etcd and"
            " dnsperf). Other work ran on the machine at the same time: load average before"
            f" each round {'; '.join(loads)}.",
            "",
            "Reading it: on two cores that the servers share with etcd, dnsperf and other work, a"
            " second worker has little room to help, and queries/s swing with the neighbours from"
            " one run to the next; the ratios within a round and the CPU each server spends per"
            " answered query (summed over all its processes, from /proc) are the steadier"
            " figures. The new workers share one socket, so a datagram can wake both of them"
            " (one reads it, the other finds nothing): that cost, if any, shows in CPU per"
            " query of the 2-worker rows. The 1-worker rows compare everything that changed"
            " between the two revisions, not only `--workers`.",
            "",
            *ratios,
            "",
            *rows,
            "",
            "Each round (queries/s; the order alternates):",
            "",
            *raw,
            "",
        ]
        (ROOT / "docs" / "workers.md").write_text("\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
