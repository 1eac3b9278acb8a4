"""How `--workers N` scales: queries/s with 1, 2, … DNS processes on one port.

    python bench/workers.py [--workers 1 2] [--rounds 3] [--duration 10] [--clients 8]

Each server gets the workload of bench/dnsperf_compare.py (1,000 services, 200 with an
`http` port) through its HTTP API; dnsperf then runs against each in alternation with
several client sockets (`-c`), since SO_REUSEPORT spreads queries over the processes by
the client's address and port: one socket would always reach the same process. Nothing is
pinned: the processes and dnsperf share every core, as they would in production.
Results go to docs/workers.md.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dnsperf_compare import (
    HOST,
    Proc,
    Procs,
    _http,
    ensure_tools,
    free_port,
    machine_facts,
    make_queries,
    make_services,
    parse_dnsperf,
    register,
)

ROOT = Path(__file__).resolve().parent.parent


def start(procs: Procs, work: Path, workers: int) -> tuple[Proc, int]:
    dns_port, http_port = free_port(), free_port()
    argv = [
        sys.executable, "-m", "discovery", "serve", "--dns", f"{HOST}:{dns_port}",
        "--http", f"{HOST}:{http_port}", "--workers", str(workers), "--log-level", "warning",
    ]  # fmt: skip
    proc = procs.start(f"workers={workers}", argv, work / f"workers{workers}.log", dns_port)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if _http(http_port, "GET", "/readyz")[0] == 200:
                return proc, http_port
        if proc.popen.poll() is not None:
            break
        time.sleep(0.1)
    raise SystemExit(f"discovery --workers {workers} did not start; see {proc.log_path}")


def wait_answering(port: int, name: str, seconds: float = 30) -> None:
    """Every process must have loaded the registry before we measure: ask from many ports."""
    import dns.message
    import dns.query
    import dns.rcode

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        answers = set()
        for _ in range(32):
            reply = dns.query.udp(dns.message.make_query(name, "A"), HOST, port=port, timeout=2)
            answers.add(dns.rcode.to_text(reply.rcode()))
        if answers == {"NOERROR"}:
            return
        time.sleep(0.2)
    raise SystemExit(f"not every worker answers {name}")


def run_dnsperf(port: int, query_file: Path, seconds: int, clients: int) -> dict[str, float]:
    argv = ["dnsperf", "-s", HOST, "-p", str(port), "-d", str(query_file)]
    argv += ["-c", str(clients), "-T", "1", "-l", str(seconds)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)}: {out.stdout}{out.stderr}")
    return parse_dnsperf(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--clients", type=int, default=8, help="dnsperf client sockets (-c)")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    ensure_tools()
    services = make_services(1000, 200)
    procs = Procs()
    results: dict[int, list[dict[str, float]]] = {n: [] for n in args.workers}
    with tempfile.TemporaryDirectory(prefix="discovery-workers-") as tmp:
        work = Path(tmp)
        query_file = work / "queries.txt"
        lines = make_queries(services, 10000, 4)
        query_file.write_text("".join(f"{name} {qtype}\n" for name, qtype in lines))
        try:
            servers = {}
            for n in args.workers:
                proc, http_port = start(procs, work, n)
                register(http_port, services, 3600)
                wait_answering(proc.port, services[-1].name)
                servers[n] = proc
            for rnd in range(args.rounds):
                for n in args.workers:
                    values = run_dnsperf(servers[n].port, query_file, args.duration, args.clients)
                    results[n].append(values)
                    print(
                        f"round {rnd + 1} workers={n}: {values['qps']:,.0f} q/s, "
                        f"avg {values['avg'] * 1000:.3f} ms, lost {values['lost']:.0f}",
                        flush=True,
                    )
        finally:
            procs.stop_all()
    base = statistics.median(r["qps"] for r in results[args.workers[0]])
    rows = [
        "| workers | queries/s (median) | min-max | vs first row | lost |",
        "|---|---|---|---|---|",
    ]
    for n in args.workers:
        qps = [r["qps"] for r in results[n]]
        lost = sum(r["lost"] for r in results[n])
        rows.append(
            f"| {n} | {statistics.median(qps):,.0f} | {min(qps):,.0f}-{max(qps):,.0f} | "
            f"{statistics.median(qps) / base:.2f} | {lost:.0f} |"
        )
    print("\n".join(rows))
    if not args.no_docs:
        facts = machine_facts()
        command = "python bench/workers.py " + shlex.join(sys.argv[1:])
        text = [
            "# `--workers N`: DNS processes sharing one port",
            "",
            f"Command: `{command.strip()}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "",
            "Machine: " + ", ".join(f"{k} {v}" for k, v in facts.items()),
            "",
            f"dnsperf with `-c {args.clients}` client sockets, {args.duration} s per run, "
            f"{args.rounds} rounds in alternation; nothing pinned.",
            "",
            *rows,
            "",
        ]
        (ROOT / "docs" / "workers.md").write_text("\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
