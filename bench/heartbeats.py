"""Heartbeat throughput through the HTTP API against etcd, on one replica.

One command, run from anywhere with the Python that has `discovery` installed:

    python bench/heartbeats.py                   # 10,000 instances, 64 connections, 3 x 10 s
    python bench/heartbeats.py --instances 2000 --duration 3 --rounds 1     # quick look

It starts etcd (free loopback ports, data in a temporary directory) and one `discovery serve
--etcd …` as subprocesses, and stops both at the end, also on error. By default (--pin) the
discovery server runs under `taskset -c 1` and etcd and this client under `taskset -c 0`.

It registers --instances instances (lease ttl 600 s) through the HTTP API, then for
--duration seconds per round keeps --connections keep-alive HTTP/1.1 connections busy with
`PUT /v1/services/hb/sN/instances/iM/heartbeat` on random instances (one request in flight per
connection, the next sent when the answer arrives; a small hand-written client so that the
client's own cost stays far below the server's). It reports heartbeats/s, non-200 answers and
errors, latency percentiles and the CPU time each process used per heartbeat.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
from pathlib import Path

from etcd_harness import Cluster, log, machine, now, percentile, pin_self, table

NS = "hb"
PER_SERVICE = 100


def instance_path(i: int) -> str:
    return f"/v1/services/{NS}/s{i // PER_SERVICE}/instances/i{i % PER_SERVICE}"


class HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time; answers (status, body)."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConnection:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(lambda: cls(f"{host}:{port}"), host, port)
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        if len(self.buffer) < end + 4 + length:
            return
        body = bytes(self.buffer[end + 4 : end + 4 + length])
        del self.buffer[: end + 4 + length]
        status = int(head[0].split(" ", 2)[1])
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((status, body))

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        assert self.transport is not None
        if self.transport.is_closing():
            raise ConnectionError("connection closed")
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
        if body:
            head += "Content-Type: application/json\r\n"
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(head.encode() + b"\r\n" + body)
        return await self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its reaped children), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


async def register_all(host: str, port: int, count: int, connections: int) -> None:
    todo = iter(range(count))

    async def worker() -> None:
        conn = await HttpConnection.open(host, port)
        try:
            for i in todo:
                # one address per instance: many instances on one address share one PTR
                # answer, rebuilt (O(instances)) at every change of any of them
                address = f"10.{20 + i // 65536}.{i // 256 % 256}.{i % 256}"
                body = json.dumps({"address": address, "ttl": 600}).encode()
                status, answer = await conn.request("PUT", instance_path(i), body)
                if status not in (200, 201):
                    raise RuntimeError(f"register {i}: {status} {answer[:200]!r}")
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(connections)))


async def cached(host: str, port: int) -> int:
    """Instances in the replica's cache (GET /v1/services)."""
    conn = await HttpConnection.open(host, port)
    try:
        status, body = await conn.request("GET", "/v1/services")
    finally:
        conn.close()
    return sum(s["instances"] for s in json.loads(body)["services"]) if status == 200 else 0


async def hammer(
    host: str, port: int, instances: int, connections: int, duration: float
) -> tuple[int, dict[int, int], int, list[float], float]:
    """(200 answers, other statuses, connection errors, latencies ms, elapsed s)."""
    stop_at = time.perf_counter() + duration
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0

    async def worker() -> None:
        nonlocal errors
        conn = await HttpConnection.open(host, port)
        rand = random.Random()
        try:
            while True:
                path = instance_path(rand.randrange(instances)) + "/heartbeat"
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    return
                try:
                    status, _ = await conn.request("PUT", path)
                except ConnectionError:
                    errors += 1
                    conn.close()
                    conn = await HttpConnection.open(host, port)
                    continue
                latencies.append((time.perf_counter() - t0) * 1000)
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    ok = statuses.pop(200, 0)
    return ok, statuses, errors, latencies, elapsed


async def run(args: argparse.Namespace, cluster: Cluster) -> str:
    (node,) = cluster.nodes
    assert cluster.etcd is not None and cluster.etcd._proc is not None
    host, port = node.http
    for _ in range(200):
        conn = await HttpConnection.open(host, port)
        status, _ = await conn.request("GET", "/readyz")
        conn.close()
        if status == 200:
            break
        await asyncio.sleep(0.05)
    t0 = time.perf_counter()
    await register_all(host, port, args.instances, 64)
    took = time.perf_counter() - t0
    for _ in range(600):  # until the watch has caught up
        if await cached(host, port) >= args.instances:
            break
        await asyncio.sleep(0.1)
    log(f"registered {args.instances} instances in {took:.1f} s")
    log("warm-up, 2 s")
    await hammer(host, port, args.instances, args.connections, 2.0)
    pids = {"discovery": node.proc.pid, "etcd": cluster.etcd._proc.pid, "client": os.getpid()}
    rows = []
    load_before = os.getloadavg()[0]
    for r in range(args.rounds):
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        ok, other, errors, latencies, elapsed = await hammer(
            host, port, args.instances, args.connections, args.duration
        )
        cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
        total = ok + sum(other.values())
        rate = ok / elapsed
        log(f"round {r + 1}: {rate:,.0f} heartbeats/s")
        rows.append(
            [
                r + 1,
                f"{rate:,.0f}",
                f"{total:,}",
                sum(other.values()) + errors,
                f"{percentile(latencies, 50):.2f}",
                f"{percentile(latencies, 99):.2f}",
                f"{max(latencies):.1f}",
                " / ".join(f"{cpu[n] / elapsed * 100:.0f}%" for n in pids),
                f"{cpu['discovery'] / max(total, 1) * 1e6:.0f}",
                f"{total / cpu['discovery']:,.0f}" if cpu["discovery"] > 0 else "-",
            ]
        )
        if other:
            log(f"non-200 answers: {other}")
    headers = [
        "round", "heartbeats/s", "requests", "errors", "p50 ms", "p99 ms", "max ms",
        "CPU discovery / etcd / client", "discovery CPU µs per heartbeat",
        "heartbeats per discovery CPU-second",
    ]  # fmt: skip
    notes = (
        f"{args.instances:,} instances registered in {took:.1f} s; {args.connections} keep-alive "
        f"connections, {args.duration:g} s per round; target >= 3,500 heartbeats/s; "
        + ("discovery on CPU 1, etcd and client on CPU 0 (taskset)" if args.pin else "no pinning")
        + f"; 1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
        "(other users of this machine)"
    )
    return table(headers, rows) + "\n\n" + notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=64, help="concurrent clients")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--pin", action=argparse.BooleanOptionalAction, default=True,
        help="discovery on CPU 1, etcd and this client on CPU 0 (default: on)",
    )  # fmt: skip
    parser.add_argument("--serve-arg", action="append", default=[], help="extra serve flag")
    args = parser.parse_args()
    started = now()
    with Cluster(
        replicas=1,
        serve_args=args.serve_arg,
        etcd_cpu="0" if args.pin else None,
        server_cpu="1" if args.pin else None,
    ) as cluster:
        if args.pin:
            pin_self("0")
        with contextlib.suppress(ImportError):
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        text = asyncio.run(run(args, cluster))
    print(f"\n{started}; {machine()}")
    print(f"command: {' '.join(['python', 'bench/heartbeats.py', *sys.argv[1:]])}\n")
    print(text)


if __name__ == "__main__":
    main()
