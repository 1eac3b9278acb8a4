"""What one large service costs: a change into it, and queries for it (issue 13, item 3).

    python bench/large_service.py [--against REV] [--instances 6000] [--srv-instances 4500]

In-process (the registry, the answer builder and the resolver as the server wires them, no
sockets): the time of one registry batch holding one PUT into a service of INSTANCES instances
(an existing instance moved to another address, so every change is real), and the CPU time of
one query for the service: A over UDP, A over TCP, SRV over TCP for SRV_INSTANCES instances.
With --against, the same measurement runs on the package as it was at REV (from `git archive`,
in a child process) and both are printed. Medians and maxima over repeated runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "/discovery/"


def measure(instances: int, srv_instances: int) -> dict[str, float]:
    import dns.message

    from discovery.dns.answers import Answers, DnsSettings
    from discovery.dns.resolver import Resolver
    from discovery.model import InstanceKey, Registration, encode_registration
    from discovery.registry import Registry
    from discovery.store.base import Event, EventType, KeyValue, Snapshot

    def value(i: int, moved: int = 0) -> bytes:
        address = f"10.{moved % 200}.{i // 250}.{i % 250 + 1}"
        ports = [{"name": "http", "port": 80, "protocol": "tcp"}]
        return encode_registration(Registration(address=address, ports=ports, ttl=60))

    def key(service: str, i: int) -> bytes:
        return InstanceKey("bench", service, f"instance-{i:05d}").store_key(PREFIX)

    registry = Registry(PREFIX)
    answers = Answers(DnsSettings(("cluster.local",), 5, 5))
    registry.subscribe(answers)
    items = [KeyValue(key("big", i), value(i), 1, 7) for i in range(instances)]
    items += [KeyValue(key("srv", i), value(i), 1, 7) for i in range(srv_instances)]
    started = time.perf_counter()
    registry.load(Snapshot(1, items))
    load = time.perf_counter() - started
    resolver = Resolver(answers)

    changes = []
    revision = 2
    for round_ in range(1, 101):
        event = Event(
            EventType.PUT, key("big", (round_ * 37) % instances), value(0, round_), revision, 7
        )
        started = time.perf_counter()
        registry.apply([event])
        changes.append(time.perf_counter() - started)
        revision += 1

    def cpu(name: str, qtype: str, tcp: bool, count: int) -> list[float]:
        times = []
        for qid in range(count):
            message = dns.message.make_query(name, qtype, use_edns=0)
            message.id = qid
            wire = message.to_wire()
            started = time.process_time()
            response = resolver.answer(wire, tcp)
            times.append(time.process_time() - started)
            assert isinstance(response, bytes)
        return times

    big = "big.bench.svc.cluster.local"
    srv = "_http._tcp.srv.bench.svc.cluster.local"
    a_udp = cpu(big, "A", False, 200)
    a_tcp = cpu(big, "A", True, 20)
    srv_tcp = cpu(srv, "SRV", True, 5)
    ms = 1000.0
    return {
        "full load of both services (ms)": load * ms,
        "PUT into the service, median (ms)": statistics.median(changes) * ms,
        "PUT into the service, max (ms)": max(changes) * ms,
        "A over UDP, median CPU (ms)": statistics.median(a_udp) * ms,
        "A over TCP, median CPU (ms)": statistics.median(a_tcp) * ms,
        "SRV over TCP, median CPU (ms)": statistics.median(srv_tcp) * ms,
        "SRV over TCP, max CPU (ms)": max(srv_tcp) * ms,
    }


def at_revision(revision: str, instances: int, srv_instances: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as directory:
        archive = subprocess.run(
            ["git", "archive", revision, "discovery"], cwd=ROOT, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", directory], input=archive, check=True)
        environment = dict(os.environ, PYTHONPATH=directory)
        output = subprocess.run(
            [sys.executable, __file__, "--json", f"--instances={instances}",
             f"--srv-instances={srv_instances}"],
            cwd=directory, env=environment, check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        result: dict[str, float] = json.loads(output)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against", help="a git revision to compare with")
    parser.add_argument("--instances", type=int, default=6000)
    parser.add_argument("--srv-instances", type=int, default=4500)
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    now = measure(args.instances, args.srv_instances)
    if args.json:
        print(json.dumps(now))
        return
    before = at_revision(args.against, args.instances, args.srv_instances) if args.against else {}
    print(f"{args.instances} instances (A), {args.srv_instances} instances (SRV)")
    header = f"| | {args.against} | this tree |" if before else "| | this tree |"
    print(header)
    print("|---|---:|---:|" if before else "|---|---:|")
    for name, value in now.items():
        old = f" {before[name]:.3f} |" if before else ""
        print(f"| {name} |{old} {value:.3f} |")


if __name__ == "__main__":
    main()
