"""Forwarded queries per second with a warm cache: discovery --upstream against dnsmasq
forwarding to the same upstream, side by side under dnsperf.

    python bench/forward_compare.py                          # 3 rounds x 10 s, plain and EDNS
    python bench/forward_compare.py --rounds 1 --duration 2  # quick look

Needs dnsperf and dnsmasq (`make bench-deps`). Starts on free 127.0.0.1 ports: an upstream
(dnsmasq answering NAMES names under example.test from a hosts file, TTL 3600), discovery with
`--upstream` that upstream, and a forwarding dnsmasq (`--server` the same upstream,
`--cache-size` 10000), both forwarders pinned to CPU 1. Every name is asked once through each
forwarder (the warm-up fills both caches), the answers are compared, then `taskset -c 0 dnsperf
-c 1` runs against each forwarder in alternation, plain and with EDNS. Prints a table and writes
docs/forwarding.md. Everything it started is stopped on exit. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
from machine import cpu_model, discovery_command

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
SERVER_CPU, CLIENT_CPU = "1", "0"


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((HOST, 0))
            port: int = udp.getsockname()[1]
            with socket.socket() as tcp:
                try:
                    tcp.bind((HOST, port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")


def dnsmasq_binary() -> str:
    found = shutil.which("dnsmasq") or shutil.which("dnsmasq", path="/usr/sbin:/sbin")
    if found is None:
        sys.exit("dnsmasq is missing: make bench-deps (apt-get install dnsmasq-base)")
    return found


def answer(port: int, name: str, edns: bool = False) -> list[str]:
    query = dns.message.make_query(name, "A", use_edns=0 if edns else False)
    for _ in range(3):
        try:
            reply = dns.query.udp(query, HOST, port=port, timeout=2)
        except dns.exception.Timeout:
            continue
        if reply.rcode() == dns.rcode.NOERROR:
            return sorted(rr.to_text() for rrset in reply.answer for rr in rrset)
    return []


def wait_answers(port: int, name: str, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while not answer(port, name):
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"{what} does not answer")
        time.sleep(0.2)


def dnsperf(port: int, queries: Path, seconds: float, edns: bool) -> tuple[float, int]:
    argv = ["taskset", "-c", CLIENT_CPU, "dnsperf", "-s", HOST, "-p", str(port),
            "-d", str(queries), "-l", str(seconds), "-c", "1"]  # fmt: skip
    if edns:
        argv.append("-e")
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    qps = float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lost = int(re.search(r"Queries lost:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    return qps, lost


def metric(http_port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://{HOST}:{http_port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--names", type=int, default=1000)
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "forwarding.md")
    args = parser.parse_args()
    if shutil.which("dnsperf") is None:
        sys.exit("dnsperf is missing: make bench-deps")
    dnsmasq = dnsmasq_binary()
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        names = [f"host{i}.example.test" for i in range(args.names)]
        (work / "hosts").write_text(
            "".join(f"192.0.2.{i % 250 + 1} {name}\n" for i, name in enumerate(names))
        )
        queries = work / "queries"
        queries.write_text("".join(f"{name} A\n" for name in names))
        up, fwd, dns_port, http_port = (free_port() for _ in range(4))
        common = ["-k", "--no-resolv", "--no-hosts", "-C", "/dev/null", "--bind-interfaces",
                  f"--listen-address={HOST}", "--user=root", "--log-facility=-"]  # fmt: skip
        try:
            procs.append(subprocess.Popen(
                [dnsmasq, *common, f"--port={up}", f"--addn-hosts={work / 'hosts'}",
                 "--local=/example.test/", "--local-ttl=3600", f"--pid-file={work / 'up.pid'}"],
                stderr=subprocess.DEVNULL,
            ))  # fmt: skip
            procs.append(subprocess.Popen(
                ["taskset", "-c", SERVER_CPU, dnsmasq, *common, f"--port={fwd}",
                 f"--server={HOST}#{up}", "--cache-size=10000", f"--pid-file={work / 'fwd.pid'}"],
                stderr=subprocess.DEVNULL,
            ))  # fmt: skip
            env = {k: v for k, v in os.environ.items() if not k.startswith("DISCOVERY_")}
            procs.append(subprocess.Popen(
                ["taskset", "-c", SERVER_CPU, *discovery_command(), "serve",
                 "--dns", f"{HOST}:{dns_port}", "--http", f"{HOST}:{http_port}",
                 "--upstream", f"{HOST}:{up}", "--log-level", "warning"],
                env=env, stderr=subprocess.DEVNULL,
            ))  # fmt: skip
            wait_answers(up, names[0], procs[0], "the upstream dnsmasq")
            wait_answers(fwd, names[0], procs[1], "the forwarding dnsmasq")
            wait_answers(dns_port, names[0], procs[2], "discovery")
            for name in names:  # warm both caches, and check both give the upstream's answer
                expected = answer(up, name)
                got = (answer(dns_port, name), answer(fwd, name))
                assert got == (expected, expected), (name, expected, got)
            hits_before = metric(http_port, "discovery_forward_cache_hits_total")
            sent_before = metric(http_port, "discovery_forward_queries_total")
            runs: dict[tuple[str, bool], list[tuple[float, int]]] = {}
            load = os.getloadavg()
            for round_ in range(args.rounds):
                order = [("discovery", dns_port), ("dnsmasq", fwd)]
                if round_ % 2:
                    order.reverse()
                for edns in (False, True):
                    for label, port in order:
                        runs.setdefault((label, edns), []).append(
                            dnsperf(port, queries, args.duration, edns)
                        )
            hits = metric(http_port, "discovery_forward_cache_hits_total") - hits_before
            total = metric(http_port, "discovery_forward_queries_total") - sent_before
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    lines = report(args, runs, load, hits, total)
    print("\n".join(lines))
    args.output.write_text("\n".join(lines) + "\n")
    return 0


def report(
    args: argparse.Namespace,
    runs: dict[tuple[str, bool], list[tuple[float, int]]],
    load: tuple[float, float, float],
    hits: float,
    total: float,
) -> list[str]:
    lines = [
        "# Forwarding: queries/s with a warm cache, discovery vs dnsmasq",
        "",
        f"Run {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC on {cpu_model()} "
        f"({os.cpu_count()} CPUs); load average before the runs "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}.",
        "",
        "```sh",
        f"python bench/forward_compare.py --rounds {args.rounds} --duration {args.duration:g}"
        f" --names {args.names}",
        "```",
        "",
        f"{args.names} names (A) under example.test, answered by an upstream dnsmasq from a hosts "
        "file (TTL 3600). Both forwarders point at that upstream, are pinned to CPU 1 and were "
        "warmed with every name; `taskset -c 0 dnsperf -c 1 -l "
        f"{args.duration:g}` ran against each in alternation, {args.rounds} rounds. dnsmasq: "
        "`--server 127.0.0.1#UP --cache-size=10000`; discovery: `--upstream 127.0.0.1:UP` "
        "(defaults: cache 10,000 answers).",
        "",
        "| mode | discovery q/s (median) | dnsmasq q/s (median) | discovery/dnsmasq per round"
        " | lost (discovery, dnsmasq) |",
        "|---|---|---|---|---|",
    ]
    for edns in (False, True):
        ours, theirs = runs["discovery", edns], runs["dnsmasq", edns]
        ratios = [a[0] / b[0] for a, b in zip(ours, theirs, strict=True)]
        lines.append(
            f"| {'EDNS' if edns else 'plain'} | {statistics.median(q for q, _ in ours):,.0f} | "
            f"{statistics.median(q for q, _ in theirs):,.0f} | "
            f"{', '.join(f'{r:.2f}' for r in ratios)} (median **{statistics.median(ratios):.2f}x**)"
            f" | {sum(lost for _, lost in ours)}, {sum(lost for _, lost in theirs)} |"
        )
    lines += [
        "",
        f"During the runs discovery answered {hits:,.0f} of {total:,.0f} forwarded queries "
        "from its cache (the rest went upstream: entries whose TTL ran out, none here).",
        "",
        "Raw runs (q/s, lost): "
        + "; ".join(
            f"{label} {'EDNS' if edns else 'plain'}: "
            + ", ".join(f"{q:,.0f} ({lost})" for q, lost in values)
            for (label, edns), values in runs.items()
        ),
    ]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
