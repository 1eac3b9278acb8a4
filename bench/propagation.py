"""Two replicas on one etcd: PUT-on-A -> answer-on-B propagation, and lease expiry -> NXDOMAIN.

One command, run from anywhere with the Python that has `discovery` installed:

    python bench/propagation.py                  # 1,000 registrations, 3 x 20 expiries
    python bench/propagation.py --count 200 --expiry-rounds 1     # quick look

It starts etcd (free loopback ports, data in a temporary directory) and two `discovery serve
--etcd …` replicas A and B as subprocesses, and stops all of them at the end, also on error.

Propagation: for each of --count unique names, the PUT is sent to A and, at the same moment,
B is queried over UDP in a tight loop (one query in flight, the next sent as soon as the
previous answer arrives) until it answers the name; the figure is the time from just before
the PUT is handed to the HTTP client to the arrival of B's first positive answer.

Expiry: --expiry-count instances per round with a --expiry-ttl lease (registrations spread
over one second, so that expiries fall at every phase of etcd's lease-revocation tick). The
lease's end is taken as the moment the PUT returned + ttl (the grant happened slightly
earlier, so the figures are, if anything, a few ms too low). Each name is then polled on
every replica every --poll-ms until NXDOMAIN. An etcd watch held by this script tells
when etcd itself deleted the key (lease expired and DELETE event delivered): that part is
etcd's, the rest (watch event -> cache -> DNS answer) is discovery's.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import struct
import sys
import time
from collections.abc import Awaitable

import aiohttp
from etcd_harness import Cluster, Replica, log, machine, now, percentile, table

from discovery.store.etcd import EtcdStore

ZONE = "svc.cluster.local"
NOERROR, NXDOMAIN = 0, 3


class DnsClient(asyncio.DatagramProtocol):
    """A minimal UDP DNS client: A queries, answers matched by ID, (rcode, ancount) back."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: dict[int, asyncio.Future[tuple[int, int]]] = {}
        self.next_id = random.randrange(65536)

    @classmethod
    async def open(cls, address: tuple[str, int]) -> DnsClient:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_datagram_endpoint(cls, remote_addr=address)
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: object) -> None:
        if len(data) < 12:
            return
        qid, flags, _, ancount = struct.unpack_from("!HHHH", data)
        future = self.pending.pop(qid, None)
        if future is not None and not future.done():
            future.set_result((flags & 0xF, ancount))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def query(self, name: str, wait: float = 0.2) -> tuple[int, int] | None:
        """(rcode, answer count), or None when no answer came within `wait` seconds."""
        assert self.transport is not None
        self.next_id = (self.next_id + 1) & 0xFFFF
        qid = self.next_id
        wire = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
        packet = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + wire + b"\0\x01\0\x01"
        future = asyncio.get_running_loop().create_future()
        self.pending[qid] = future
        self.transport.sendto(packet)
        try:
            return await asyncio.wait_for(future, wait)
        except TimeoutError:
            self.pending.pop(qid, None)
            return None


_addresses = (f"10.{9 + i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(1, 1 << 20))


async def register(
    session: aiohttp.ClientSession, node: Replica, ns: str, svc: str, inst: str, ttl: int
) -> None:
    # one address per instance: instances sharing one address share one PTR answer, rebuilt
    # (O(instances on it)) at every change of any of them
    body = {"address": next(_addresses), "ttl": ttl}
    url = f"{node.base}/v1/services/{ns}/{svc}/instances/{inst}"
    async with session.put(url, json=body) as response:
        body = await response.read()
        if response.status not in (200, 201):
            raise RuntimeError(f"PUT {url}: {response.status} {body[:200]!r}")


# ------------------------------------------------------------------ propagation


async def timed(coro: Awaitable[None]) -> float:
    """Await coro; the perf_counter() at which it finished."""
    await coro
    return time.perf_counter()


async def propagation(
    a: Replica, b: Replica, session: aiohttp.ClientSession, count: int, deadline: float
) -> tuple[list[float], list[float], list[float], int]:
    """(propagation ms, PUT latency ms, B's answer minus the PUT's return ms, per name;
    names B never answered)."""
    dns_b = await DnsClient.open(b.dns)
    run = f"{random.randrange(36**4):04x}"
    delays: list[float] = []
    puts: list[float] = []
    after_put: list[float] = []
    missed = 0
    try:
        for i in range(count):
            svc = f"p{run}-{i}"
            name = f"{svc}.bench.{ZONE}"
            t0 = time.perf_counter()
            put = asyncio.create_task(timed(register(session, a, "bench", svc, "i0", 300)))
            seen = None
            while time.perf_counter() - t0 < deadline:
                answer = await dns_b.query(name)
                if answer is not None and answer[0] == NOERROR and answer[1] > 0:
                    seen = time.perf_counter()
                    break
            put_done = await put
            if seen is None:
                missed += 1
                continue
            delays.append((seen - t0) * 1000)
            puts.append((put_done - t0) * 1000)
            after_put.append((seen - put_done) * 1000)
            if (i + 1) % 250 == 0:
                log(f"propagation: {i + 1}/{count}")
    finally:
        dns_b.close()
    return delays, puts, after_put, missed


# ------------------------------------------------------------------ expiry


async def expiry_round(
    nodes: list[Replica],
    session: aiohttp.ClientSession,
    etcd: EtcdStore,
    count: int,
    ttl: int,
    poll: float,
    deadline: float,
) -> tuple[list[float], list[float], list[float], int]:
    """(ms from TTL end to etcd's DELETE event, ms from TTL end to NXDOMAIN on all replicas,
    ms from the DELETE event to NXDOMAIN on all replicas, names never gone)."""
    run = f"{random.randrange(36**4):04x}"
    prefix = b"/discovery/v1/instances/exp/"
    deleted: dict[str, float] = {}
    revision = await etcd.revision()

    async def watch() -> None:
        async for events in etcd.watch(prefix, revision + 1):
            t = time.perf_counter()
            for event in events:
                if event.type.value == "delete":
                    deleted.setdefault(event.key.decode().rsplit("/", 2)[1], t)

    watcher = asyncio.create_task(watch())
    clients = [await DnsClient.open(node.dns) for node in nodes]
    ttl_end: dict[str, float] = {}
    gone: dict[str, list[float]] = {}

    async def lifecycle(svc: str, start_in: float, node: Replica) -> None:
        await asyncio.sleep(start_in)
        await register(session, node, "exp", svc, "i0", ttl)
        ttl_end[svc] = time.perf_counter() + ttl
        name = f"{svc}.exp.{ZONE}"
        for client in clients:  # every replica has it before it can expire
            for _ in range(100):
                answer = await client.query(name, 0.2)
                if answer is not None and answer[1] > 0:
                    break
                await asyncio.sleep(0.01)
            else:
                raise RuntimeError(f"{name} not answered after registration: {answer}")
        await asyncio.sleep(max(0.0, ttl_end[svc] - time.perf_counter() - 0.1))

        async def until_nxdomain(client: DnsClient) -> float | None:
            while True:
                answer = await client.query(name, 0.2)
                if answer is not None and answer[0] == NXDOMAIN:
                    return time.perf_counter()
                if time.perf_counter() > ttl_end[svc] + deadline:
                    return None
                await asyncio.sleep(poll)

        times = await asyncio.gather(*(until_nxdomain(c) for c in clients))
        if all(t is not None for t in times):
            gone[svc] = [t for t in times if t is not None]

    try:
        tasks = [lifecycle(f"x{run}-{i}", i / count, nodes[i % len(nodes)]) for i in range(count)]
        await asyncio.gather(*tasks)
        await asyncio.sleep(0.2)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        for client in clients:
            client.close()
    to_delete, to_nx, delete_to_nx = [], [], []
    for svc, end in ttl_end.items():
        if svc not in gone:
            continue
        last = max(gone[svc])
        to_nx.append((last - end) * 1000)
        if svc in deleted:
            to_delete.append((deleted[svc] - end) * 1000)
            delete_to_nx.append((last - deleted[svc]) * 1000)
    return to_delete, to_nx, delete_to_nx, count - len(gone)


# ------------------------------------------------------------------ main


def stats(values: list[float]) -> list[str]:
    return [f"{percentile(values, p):.1f}" for p in (50, 99)] + [f"{max(values):.1f}"]


async def run(args: argparse.Namespace, cluster: Cluster) -> str:
    a, b = cluster.nodes
    assert cluster.etcd is not None
    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(connector=connector) as session:
        for node in cluster.nodes:  # both replicas have loaded (readyz) before measuring
            for _ in range(200):
                async with session.get(node.base + "/readyz") as response:
                    if response.status == 200:
                        break
                await asyncio.sleep(0.05)
        for i in range(20):  # warm-up: connections, code paths
            await register(session, a, "bench", f"warm-{i}", "i0", 300)
        log(f"propagation: {args.count} registrations on A, answered by B")
        measured = await propagation(a, b, session, args.count, args.deadline)
        delays, puts, after_put, missed = measured
        etcd = EtcdStore([cluster.etcd.endpoint], request_timeout=5.0)
        results = []
        try:
            for r in range(args.expiry_rounds):
                log(f"expiry round {r + 1}/{args.expiry_rounds}: {args.expiry_count} x ttl "
                    f"{args.expiry_ttl} s")  # fmt: skip
                result = await expiry_round(
                    cluster.nodes, session, etcd, args.expiry_count, args.expiry_ttl,
                    args.poll_ms / 1000, args.deadline,
                )  # fmt: skip
                results.append(result)
        finally:
            await etcd.close()
    to_delete = [v for r in results for v in r[0]]
    to_nx = [v for r in results for v in r[1]]
    delete_to_nx = [v for r in results for v in r[2]]
    never = sum(r[3] for r in results)

    headers = ["measure", "n", "p50 ms", "p99 ms", "max ms", "target"]
    rows = [
        ["PUT sent to A -> B answers (propagation)", len(delays), *stats(delays), "p99 < 50"],
        ["PUT sent to A -> PUT returns (for reference)", len(puts), *stats(puts), ""],
        ["PUT returns -> B answers (negative: B first)", len(after_put), *stats(after_put), ""],
        ["TTL end -> NXDOMAIN on every replica", len(to_nx), *stats(to_nx), "< 1000"],
        ["  of which: TTL end -> etcd DELETE event (etcd)", len(to_delete), *stats(to_delete), ""],
        ["  of which: DELETE event -> NXDOMAIN on all (discovery)", len(delete_to_nx),
         *stats(delete_to_nx), ""],
    ]  # fmt: skip
    text = table(headers, rows)
    notes = [
        f"propagation: {args.count} names, {missed} not answered by B within {args.deadline} s",
        f"expiry: {args.expiry_rounds} rounds x {args.expiry_count} instances, ttl "
        f"{args.expiry_ttl} s, polled every {args.poll_ms} ms on {len(cluster.nodes)} replicas; "
        f"{never} never NXDOMAIN within {args.deadline} s after the TTL",
    ]
    return text + "\n\n" + "\n".join(notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="registrations to time")
    parser.add_argument("--expiry-count", type=int, default=20, help="instances per round")
    parser.add_argument("--expiry-rounds", type=int, default=3)
    parser.add_argument("--expiry-ttl", type=int, default=2, help="lease TTL, seconds")
    parser.add_argument("--poll-ms", type=float, default=2.0, help="NXDOMAIN poll interval")
    parser.add_argument("--deadline", type=float, default=5.0, help="give up on a name after")
    parser.add_argument(
        "--pin", action="store_true",
        help="etcd and this client on CPU 0, both replicas on CPU 1 (taskset)",
    )  # fmt: skip
    args = parser.parse_args()
    started = now()
    with Cluster(
        replicas=2,
        serve_args=["--min-ttl", str(min(2, args.expiry_ttl))],
        etcd_cpu="0" if args.pin else None,
        server_cpu="1" if args.pin else None,
    ) as cluster:
        if args.pin:
            from etcd_harness import pin_self

            pin_self("0")
        text = asyncio.run(run(args, cluster))
    print(f"\n{started}; {machine()}")
    print(f"command: {' '.join(['python', 'bench/propagation.py', *sys.argv[1:]])}\n")
    print(text)


if __name__ == "__main__":
    main()
