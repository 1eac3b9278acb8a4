"""CPU per lease renewal on the LeaseKeepAlive stream (discovery/store/leasestream.py).

    python bench/lease_stream.py                     # this checkout's code, 3 runs
    python bench/lease_stream.py --side old=/tmp/discovery-versus/COMMIT/venv/bin/python \
        --side new=.venv/bin/python --rounds 5       # two revisions, alternated

It starts one etcd (free loopback ports, data in a temporary directory, under `taskset -c 0`)
and, for every round and every `--side NAME=PYTHON` in turn, one process under `taskset -c 1`
run by that Python with `-P` (so that it imports the `discovery` installed there, not this
checkout; `python bench/versus.py setup REV` makes such a venv for any revision). Without
--side: $BENCH_SERVER_PYTHON or this Python. The process grants --leases leases, warms up
for 1 s, then renews them against that etcd for --duration seconds, keeping --in-flight
renewals outstanding, and reports renewals/s and its CPU time (user + system, all threads)
per renewal. The summary gives each side's median and its ratio to the first side's.

Modes: `stream` (default) drives one LeaseStream directly, a new renewal sent from the callback
of each answer, so that little besides the stream itself costs CPU; `store` runs --in-flight
tasks each calling `EtcdStore.keepalive` in a loop, as the heartbeat handler does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


async def child(args: argparse.Namespace) -> dict[str, float]:
    from discovery.store.etcd import EtcdStore
    from discovery.store.leasestream import LeaseStream

    host, _, port = args.child.removeprefix("http://").rpartition(":")
    store = EtcdStore([(host, int(port))], request_timeout=10.0, dial_timeout=10.0)
    try:
        leases = [await store.grant(600) for _ in range(args.leases)]
        loop = asyncio.get_running_loop()
        count = 0
        errors = 0
        stop_at = 0.0
        done: asyncio.Future[None] = loop.create_future()
        if args.mode == "stream":
            stream = LeaseStream(
                None,
                host,
                int(port),
                ssl_context=None,
                token=None,
                timeout=10.0,
                on_failure=lambda: None,
            )
            outstanding = 0
            at = 0

            def renew() -> None:
                nonlocal outstanding, at
                outstanding += 1
                at = (at + 1) % len(leases)
                stream.send(leases[at]).add_done_callback(answered)

            def answered(future: asyncio.Future[int]) -> None:
                nonlocal count, errors, outstanding
                outstanding -= 1
                if future.exception() is not None or future.result() <= 0:
                    errors += 1
                count += 1
                if loop.time() < stop_at and not stream.broken:
                    renew()
                elif outstanding == 0 and not done.done():
                    done.set_result(None)

            async def run(seconds: float) -> None:
                nonlocal stop_at, done
                stop_at = loop.time() + seconds
                done = loop.create_future()
                for _ in range(args.in_flight):
                    renew()
                await done

        else:

            async def worker(first: int) -> None:
                nonlocal count, errors
                at = first
                while loop.time() < stop_at:
                    at = (at + 1) % len(leases)
                    try:
                        await store.keepalive(leases[at])
                    except Exception:
                        errors += 1
                    count += 1

            async def run(seconds: float) -> None:
                nonlocal stop_at
                stop_at = loop.time() + seconds
                await asyncio.gather(*(worker(i * 7) for i in range(args.in_flight)))

        await run(1.0)  # warm-up: connection, windows, caches
        count = errors = 0
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await run(args.duration)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        if args.mode == "stream":
            stream.close(RuntimeError("done"))
        return {"renewals": count, "errors": errors, "cpu": cpu, "wall": wall}
    finally:
        await store.close()


def run_child(python: str, url: str, args: argparse.Namespace) -> dict[str, float]:
    argv = [
        python, "-P", str(HERE), "--child", url, "--mode", args.mode,
        "--duration", str(args.duration), "--in-flight", str(args.in_flight),
        "--leases", str(args.leases),
    ]  # fmt: skip
    if args.pin:
        argv = ["taskset", "-c", "1", *argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"{python} failed:\n{out.stderr[-3000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def parent(args: argparse.Namespace) -> None:
    # run as `python bench/lease_stream.py`: Python puts bench/ first on sys.path
    from etcd_harness import Cluster, log, machine, now, table
    from machine import SERVER_PYTHON

    sides = [side.partition("=")[::2] for side in args.side] or [
        ("this", os.environ.get(SERVER_PYTHON) or sys.executable)
    ]
    started = now()
    load_before = os.getloadavg()[0]
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _ in sides}
    rows = []
    with Cluster(replicas=0, etcd_cpu="0" if args.pin else None) as cluster:
        assert cluster.etcd is not None
        url = cluster.etcd.client_url
        for r in range(args.rounds):
            for name, python in sides if r % 2 == 0 else sides[::-1]:  # alternate who goes first
                result = run_child(python, url, args)
                results[name].append(result)
                per = result["cpu"] / max(result["renewals"], 1) * 1e6
                rate = result["renewals"] / result["wall"]
                log(f"round {r + 1} {name}: {rate:,.0f} renewals/s, {per:.1f} µs CPU each")
                rows.append(
                    [
                        r + 1,
                        name,
                        f"{rate:,.0f}",
                        int(result["errors"]),
                        f"{result['cpu'] / result['wall'] * 100:.0f}%",
                        f"{per:.1f}",
                    ]
                )
    headers = ["round", "side", "renewals/s", "errors", "CPU", "CPU µs per renewal"]
    medians = {
        name: statistics.median(r["cpu"] / max(r["renewals"], 1) * 1e6 for r in runs)
        for name, runs in results.items()
    }
    first = next(iter(medians.values()))
    summary = "; ".join(
        f"{name}: median {m:.1f} µs per renewal ({m / first:.2f}x, {m - first:+.1f} µs)"
        for name, m in medians.items()
    )
    print(f"\n{started}; {machine()}")
    print(f"command: {' '.join(['python', 'bench/lease_stream.py', *sys.argv[1:]])}")
    print(
        f"mode {args.mode}, {args.in_flight} renewals in flight over {args.leases} leases, "
        f"{args.duration:g} s per run; "
        + ("child on CPU 1, etcd on CPU 0; " if args.pin else "")
        + f"1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after\n"
    )
    print(table(headers, rows))
    print(f"\n{summary}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--side", action="append", default=[],
        help="NAME=PYTHON: a Python with the code to measure installed (repeatable)",
    )  # fmt: skip
    parser.add_argument("--mode", choices=["stream", "store"], default="stream")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--leases", type=int, default=1000)
    parser.add_argument(
        "--pin", action=argparse.BooleanOptionalAction, default=True,
        help="etcd on CPU 0, the renewing process on CPU 1 (default: on)",
    )  # fmt: skip
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is None:
        parent(args)
        return
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    print(json.dumps(asyncio.run(child(args))))


if __name__ == "__main__":
    main()
