"""First load from etcd, this checkout against another revision, side by side.

    python bench/versus.py setup 7b7ecf0          # once: that revision's code in a venv of its own
    python bench/first_load.py --against 7b7ecf0  # 1,000 services x 100 instances, 4 rounds

One etcd (`taskset -c 0`) is filled once with SERVICES x PER_SERVICE instances in the layout of
bench/scale.py (key `/discovery/v1/instances/default/svcN/iK`, one port, each under its own
lease). Then every round starts a fresh `discovery serve --etcd …` (`taskset -c 1`) of each
side, the order flipping every round, and measures what bench/scale.py's "first load" columns
measure: the time from Popen to the first /readyz 200, and the process's CPU time (user +
system) at that moment. Only the server's code differs between the sides: the old side runs
the Python of `versus.py setup REV` (the same mechanism as `versus.py run`), in the same
rounds against the same etcd, so the machine's load falls on both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from dnsperf_compare import Procs
from machine import SERVER_PYTHON
from scale import PinnedEtcd, Registry, _py_spy, fill, log, start_server
from versus import commit_of, home


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", required=True, help="the other revision (versus.py setup)")
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--per-service", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=4, help="fresh processes per side")
    parser.add_argument("--concurrency", type=int, default=200, help="etcd writes in flight")
    parser.add_argument("--profile", type=Path, help="py-spy raw stacks: first loads")
    args = parser.parse_args()
    commit = commit_of(args.against)
    old_python = home(commit) / "venv" / "bin" / "python"
    if not old_python.exists():
        raise SystemExit(f"no venv for {commit}: run `python bench/versus.py setup {args.against}`")
    sides = {f"old {commit}": str(old_python), f"new {commit_of('HEAD')}": ""}
    registry = Registry("big", args.services, args.per_service)
    work = Path(tempfile.mkdtemp(prefix="first-load-"))
    procs = Procs()
    etcd = PinnedEtcd(work / "etcd", binary=shutil.which("etcd") or "etcd",
                      extra_args=["--quota-backend-bytes", str(8 * 2**30)])  # fmt: skip
    results: dict[str, list[tuple[float, float]]] = {side: [] for side in sides}
    load_before = os.getloadavg()
    try:
        etcd.start()
        log(f"writing {registry.instances:,} instances into etcd")
        _, took, _ = asyncio.run(fill(etcd, registry, 3600, args.concurrency))
        log(f"  written in {took:.1f} s")
        for round_ in range(args.rounds):
            order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
            for side in order:
                if sides[side]:
                    os.environ[SERVER_PYTHON] = sides[side]
                else:
                    os.environ.pop(SERVER_PYTHON, None)
                profilers: list[subprocess.Popen[bytes]] = []
                on_start = None
                if args.profile and round_ < 2:
                    args.profile.mkdir(parents=True, exist_ok=True)
                    out = args.profile / f"load-{side.split()[0]}.txt"

                    def on_start(pid: int, out: Path = out, into: list[Any] = profilers) -> None:
                        argv = [_py_spy() or "py-spy", "record", "--pid", str(pid), "--rate", "200",
                                "--format", "raw", "-o", str(out), "--nonblocking"]  # fmt: skip
                        into.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL))

                try:
                    server = start_server(
                        procs, etcd, work, f"{side.split()[0]}-{round_}", on_start=on_start
                    )
                finally:
                    for profiler in profilers:
                        profiler.send_signal(signal.SIGINT)
                        profiler.wait()
                procs.stop(server.proc)
                if server.records != registry.instances:
                    raise RuntimeError(f"{side}: loaded {server.records} of {registry.instances}")
                results[side].append((server.ready_s, server.cpu_s))
                log(f"  round {round_ + 1}, {side}: /readyz 200 after {server.ready_s:.2f} s, "
                    f"CPU {server.cpu_s:.2f} s, others {server.others:.0%} of CPU 1")  # fmt: skip
    finally:
        procs.stop_all()
        etcd.stop()
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    print(f"\n{registry.instances:,} instances ({args.services:,} x {args.per_service}); "
          f"{args.rounds} rounds, alternated; load average before {load_before[0]:.1f}, "
          f"after {load_after[0]:.1f}\n")  # fmt: skip
    print("| side | to /readyz 200 s per round | median | CPU s at /readyz per round | median |")
    print("|---|---|---|---|---|")
    for side, runs in results.items():
        ready = [r for r, _ in runs]
        cpu = [c for _, c in runs]
        print(f"| {side} | {', '.join(f'{r:.2f}' for r in ready)} | "
              f"**{statistics.median(ready):.2f}** | {', '.join(f'{c:.2f}' for c in cpu)} | "
              f"**{statistics.median(cpu):.2f}** |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
