"""How many registrations with heartbeats one client process holds (discovery.client).

    python bench/client_scale.py                          # 10,000 at a 15 s TTL for 60 s
    python bench/client_scale.py --store etcd             # the same through etcd
    python bench/client_scale.py --instances 2000 --duration 20      # quick look
    python bench/client_scale.py --heartbeat-batch 1      # one call per heartbeat (no batches)

It starts one `discovery serve` (--store embedded, the default: the server's cheapest heartbeat,
so that the client is what is measured; or --store etcd: etcd and `discovery serve --etcd …`
through bench/etcd_harness.py), by default under `taskset -c 1` with etcd and this client on
CPU 0, then opens --instances `client.registration(...)` context managers in this one process
(one DiscoveryClient: one connection pool, and a few connections for heartbeats), all at --ttl,
and holds them for --duration seconds. Each registration heartbeats on its own at a third of
the TTL; the client coalesces the heartbeats that fall due together into `POST /v1/heartbeats`
calls (at most --heartbeat-batch each). It reports the time to register them all, the
heartbeats per second and the calls that carried them (and how long those took), the longest
gap between two successful heartbeats of any registration while held (a missed heartbeat is a
gap over two intervals; a lease is lost past the TTL), how many registrations had to register
again (404: lease lost) or were ever unhealthy, the fewest instances the server listed while
held (asked every 2 s: an expired lease would show as one missing) and at the end, and the CPU
this client, the server and etcd used while holding. Then it deregisters them all.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

from etcd_harness import Cluster, log, machine, now, percentile, pin_self, pinned, table
from machine import discovery_command

from discovery.client import DiscoveryClient, Registration, Unavailable
from discovery.testing import free_ports

NS = "scale"
PER_SERVICE = 100


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) another process has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def listed(client: DiscoveryClient) -> int:
    _, body, _ = await client.request("GET", "/v1/services", timeout=30)
    return sum(s["instances"] for s in body["services"] if s["namespace"] == NS)


async def hold(
    base: str,
    instances: int,
    ttl: int,
    duration: float,
    opening: int,
    connections: int,
    batch: int,
    pids: dict[str, int],
) -> dict[str, Any]:
    async with DiscoveryClient(
        base, timeout=10, connections=connections, heartbeat_batch=batch
    ) as client:
        registrations = [
            client.registration(
                NS,
                f"s{i // PER_SERVICE}",
                f"i{i % PER_SERVICE}",
                address=f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255 or 1}",
                ports=[("http", 8080)],
                ttl=ttl,
            )
            for i in range(instances)
        ]
        gate = asyncio.Semaphore(opening)

        async def start(registration: Registration) -> None:
            async with gate:
                await registration.start()

        latencies: list[float] = []  # of each POST /v1/heartbeats while held
        post = client.heartbeats._post

        async def timed(body: dict[str, Any]) -> Any:
            started = time.monotonic()
            try:
                return await post(body)
            finally:
                latencies.append(time.monotonic() - started)

        client.heartbeats._post = timed  # type: ignore[method-assign]
        started = time.monotonic()
        await asyncio.gather(*(start(r) for r in registrations))
        opened = time.monotonic() - started
        log(f"{instances} registrations open in {opened:.1f} s; holding them {duration:g} s")
        cpu_before, beats_before = cpu_seconds(), sum(r.heartbeats for r in registrations)
        calls_before = client.heartbeats.calls
        others_before = {name: process_cpu(pid) for name, pid in pids.items()}
        for registration in registrations:  # count gaps while held, not while opening
            registration.max_gap, registration.missed = 0.0, 0
        latencies.clear()
        held_from = time.monotonic()
        unhealthy_seen = 0
        fewest: int | str = instances
        while time.monotonic() - held_from < duration:
            await asyncio.sleep(2)
            unhealthy_seen = max(unhealthy_seen, sum(not r.healthy for r in registrations))
            try:
                count = await listed(client)
                fewest = count if isinstance(fewest, str) else min(fewest, count)
            except Unavailable as error:
                fewest = f"no answer ({error})"
        held = time.monotonic() - held_from
        cpu = cpu_seconds() - cpu_before
        others = {name: process_cpu(pid) - others_before[name] for name, pid in pids.items()}
        beats = sum(r.heartbeats for r in registrations) - beats_before
        calls = client.heartbeats.calls - calls_before
        try:
            at_end: object = await listed(client)
        except Unavailable as error:
            at_end = f"no answer ({error})"
        gaps = [r.max_gap for r in registrations]
        result = {
            "instances": instances,
            "ttl": ttl,
            "open_seconds": opened,
            "held_seconds": held,
            "heartbeats_per_second": beats / held,
            "expected_per_second": instances / (ttl / 3),
            "max_gap": max(gaps),
            "p99_gap": percentile(gaps, 99),
            "missed": sum(r.missed for r in registrations),
            "re_registered": sum(r.registrations > 1 for r in registrations),
            "unhealthy_max": unhealthy_seen,
            "fewest_listed": fewest,
            "listed": at_end,
            "batch_calls_per_second": calls / held,
            "batch_latency": (percentile(latencies, 50), percentile(latencies, 99), max(latencies))
            if latencies
            else (0.0, 0.0, 0.0),
            "client_cpu_percent": 100 * cpu / held,
            "client_cpu_per_heartbeat_us": 1e6 * cpu / beats if beats else 0.0,
        }
        for name, seconds in others.items():
            result[f"{name}_cpu_percent"] = 100 * seconds / held
        started = time.monotonic()
        await asyncio.gather(*(r.stop() for r in registrations))
        result["close_seconds"] = time.monotonic() - started
        return result


@contextlib.contextmanager
def embedded_server(cpu: str | None) -> Iterator[tuple[str, int]]:
    """One `discovery serve` on the embedded store; its API URL and process ID."""
    http_port = free_ports(1)[0]
    argv = [*discovery_command(), "serve", "--dns", "127.0.0.1:0",
            "--http", f"127.0.0.1:{http_port}", "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(pinned(cpu, argv), stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("discovery serve did not start") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{http_port}", proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--ttl", type=int, default=15)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--opening", type=int, default=64, help="registrations opened at once")
    parser.add_argument("--connections", type=int, default=64, help="the client's pool size")
    parser.add_argument(
        "--heartbeat-batch", type=int, default=256, help="most heartbeats per call (1: no batches)"
    )
    parser.add_argument("--store", choices=("embedded", "etcd"), default="embedded")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    args = parser.parse_args()
    pin = not args.no_pin
    pin_self("0" if pin else None)
    load = os.getloadavg()
    with contextlib.ExitStack() as stack:
        if args.store == "etcd":
            cluster = stack.enter_context(
                Cluster(replicas=1, etcd_cpu="0" if pin else None, server_cpu="1" if pin else None)
            )
            base = cluster.nodes[0].base
            assert cluster.etcd is not None and cluster.etcd._proc is not None
            pids = {"server": cluster.nodes[0].proc.pid, "etcd": cluster.etcd._proc.pid}
        else:
            base, pid = stack.enter_context(embedded_server("1" if pin else None))
            pids = {"server": pid}
        result = asyncio.run(
            hold(
                base,
                args.instances,
                args.ttl,
                args.duration,
                args.opening,
                args.connections,
                args.heartbeat_batch,
                pids,
            )
        )
    interval = args.ttl / 3
    print(f"# discovery.client: {args.instances} registrations in one process ({now()})\n")
    print(f"{machine()}; load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n")
    command = " ".join(["python", *sys.argv])
    print(f"`{command}` (store: {args.store})\n")
    rows = [
        ("registrations held", f"{result['instances']} at a {args.ttl} s TTL"),
        ("time to open them all", f"{result['open_seconds']:.1f} s ({args.opening} at once)"),
        ("held for", f"{result['held_seconds']:.0f} s"),
        ("heartbeats/s", f"{result['heartbeats_per_second']:.0f} "
                         f"(one per {interval:g} s each: {result['expected_per_second']:.0f})"),
        ("batch calls/s (at most --heartbeat-batch each)",
         f"{result['batch_calls_per_second']:.1f} (batch {args.heartbeat_batch})"),
        ("batch call time: median, p99, max",
         " · ".join(f"{1000 * t:.0f} ms" for t in result["batch_latency"])),
        ("longest gap between two heartbeats", f"{result['max_gap']:.2f} s "
                                               f"(p99 {result['p99_gap']:.2f} s)"),
        ("missed heartbeats (gap > 2 intervals)", result["missed"]),
        ("registered again after a 404", result["re_registered"]),
        ("most unhealthy at one time", result["unhealthy_max"]),
        ("fewest instances the server listed while held", result["fewest_listed"]),
        ("instances the server lists at the end", result["listed"]),
        ("client CPU while holding",
         f"{result['client_cpu_percent']:.1f} % of one core "
         f"({result['client_cpu_per_heartbeat_us']:.0f} µs per heartbeat)"),
        ("server CPU while holding", f"{result['server_cpu_percent']:.1f} % of one core"),
        *([("etcd CPU while holding", f"{result['etcd_cpu_percent']:.1f} % of one core")]
          if "etcd_cpu_percent" in result else []),
        ("time to deregister them all", f"{result['close_seconds']:.1f} s"),
    ]  # fmt: skip
    print(table(["", "measured"], rows))


if __name__ == "__main__":
    main()
