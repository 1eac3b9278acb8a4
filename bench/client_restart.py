"""How long after a server restart a client-held registration is back in DNS.

    python bench/client_restart.py                  # 20 restarts, TTL 15 s (heartbeats every 5 s)
    python bench/client_restart.py --rounds 5       # quick look

It starts `discovery serve` (embedded store: a restart forgets every registration, the worst
case) on fixed free ports, holds one `client.registration(...)` in this process, and then, at a
random moment of the heartbeat interval, stops the server (SIGTERM), starts it again on the same
ports, and polls DNS (dnspython, every 5 ms) for the instance's A record. It reports, per
restart, the seconds from the new server answering DNS to the record being back, against the
target: one heartbeat interval plus 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import dns.asyncquery
import dns.message
import dns.rcode
from etcd_harness import log, machine, now, percentile, table
from machine import discovery_command

from discovery.client import DiscoveryClient
from discovery.testing import free_ports

HOST = "127.0.0.1"
NAME = "r-1.web.default.svc.cluster.local"


class Server:
    def __init__(self, workdir: Path) -> None:
        self.dns_port, self.http_port = free_ports(2)
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        argv = [
            *discovery_command(), "serve", "--dns", f"{HOST}:{self.dns_port}",
            "--http", f"{HOST}:{self.http_port}", "--log-level", "warning",
        ]  # fmt: skip
        with open(self.workdir / f"server-{self.starts}.log", "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


async def answers(port: int, name: str, rdtype: str = "A") -> int | None:
    """The rcode for name (None: no answer in time), NOERROR only with records."""
    query = dns.message.make_query(name, rdtype)
    try:
        response = await dns.asyncquery.udp(query, HOST, port=port, timeout=0.2)
    except (TimeoutError, OSError, dns.exception.DNSException):
        return None
    if response.rcode() == dns.rcode.NOERROR and not response.answer:
        return -1  # NODATA
    return response.rcode()


async def until(check: object, within: float = 30.0) -> float:
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not await check():  # type: ignore[operator]
        if loop.time() - started > within:
            raise TimeoutError("not within the deadline")
        await asyncio.sleep(0.005)
    return loop.time()


async def run(rounds: int, ttl: int) -> list[tuple[float, float]]:
    results = []
    with tempfile.TemporaryDirectory(prefix="client-restart-") as workdir:
        server = Server(Path(workdir))
        server.start()
        try:
            loop = asyncio.get_running_loop()
            await until(lambda: _is(answers(server.dns_port, "cluster.local", "SOA"), 0))
            base = f"http://{HOST}:{server.http_port}"
            async with DiscoveryClient(base) as client:
                reg = client.registration("default", "web", "r-1", address="10.1.2.3", ttl=ttl)
                async with reg:
                    interval = reg.interval
                    for n in range(rounds):
                        await asyncio.sleep(random.uniform(0, interval))
                        stopped = loop.time()
                        server.stop()
                        server.start()
                        ready = await until(
                            lambda: _is(answers(server.dns_port, "cluster.local", "SOA"), 0)
                        )
                        back = await until(
                            lambda: _is(answers(server.dns_port, NAME), 0), within=4 * interval
                        )
                        results.append((back - ready, back - stopped))
                        log(f"restart {n + 1}: back in DNS {back - ready:.3f} s after the "
                            f"server answered ({back - stopped:.3f} s after the stop)")  # fmt: skip
                    assert reg.registrations == rounds + 1, reg.registrations
        finally:
            server.stop()
    return results


async def _is(pending: object, rcode: int) -> bool:
    return await pending == rcode  # type: ignore[misc]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--ttl", type=int, default=15)
    args = parser.parse_args()
    load = os.getloadavg()
    results = asyncio.run(run(args.rounds, args.ttl))
    interval = args.ttl / 3
    after_ready = [r[0] for r in results]
    after_stop = [r[1] for r in results]
    print(f"# Registration back in DNS after a server restart ({now()})\n")
    print(f"{machine()}; load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n")
    print(f"`{' '.join([os.path.basename(sys.executable), *sys.argv])}`: {len(results)} "
          f"restarts, TTL {args.ttl} s, heartbeat interval {interval:g} s, target "
          f"< {interval + 0.1:.1f} s\n")  # fmt: skip
    rows = [
        (what, f"{percentile(v, 50):.3f}", f"{percentile(v, 90):.3f}", f"{max(v):.3f}")
        for what, v in (
            ("new server answers DNS → record back", after_ready),
            ("server stopped → record back", after_stop),
        )
    ]
    print(table(["seconds", "median", "p90", "max"], rows))
    print(f"\nwithin target: {sum(v < interval + 0.1 for v in after_ready)}/{len(results)}")


if __name__ == "__main__":
    main()
