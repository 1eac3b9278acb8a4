"""Container networking: ADD and DEL latency through `discovery-cni`, allocations/s through the API.

1. Plugin latency (needs root): a "host" network namespace runs etcd and
   `discovery serve --etcd … --cni-socket …`; N "containers" are network namespaces made
   beforehand (not timed). Each ADD and each DEL is the `discovery-cni` executable started as
   a container runtime starts it (environment, config on stdin), timed from spawn to exit, one
   at a time. VERSION (answered by the plugin alone) gives the floor: process start-up.
2. Allocations per second: one `discovery serve --etcd …` on loopback, C concurrent callers
   (default 64) PUT attachments of distinct containers through the HTTP API (keep-alive), then
   DELETE them. With `--client wrk` the PUTs come from wrk (Debian's `wrk`, one thread, C
   connections, a Lua script naming a new container per request) for `--seconds`: a load
   generator that costs far less CPU than an aiohttp client, which shares the 2 cores.

    sudo .venv/bin/python bench/cni.py [--containers 100] [--allocations 5000] [--callers 64]
    .venv/bin/python bench/cni.py --skip-plugin --client wrk --seconds 10

Everything started here (namespaces, processes, temporary files) is removed at the end, also
on error or Ctrl-C. Prints a Markdown report on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import aiohttp

# run as `python bench/NAME.py`: Python puts bench/ first on sys.path
from etcd_harness import Cluster, log, machine, now, percentile
from machine import discovery_command

from discovery.net import cni
from discovery.testing import EtcdServer

CNI_BIN = Path(sys.executable).parent / "discovery-cni"
_HTTP_LINE = re.compile(r"HTTP listening on http://([0-9.]+):(\d+)")


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextmanager
def namespace(prefix: str) -> Iterator[str]:
    name = f"{prefix}-{secrets.token_hex(3)}"
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


class NetnsEtcd(EtcdServer):
    """etcd on the loopback of a namespace; ready when its log says so."""

    def __init__(self, directory: Path, host: str) -> None:
        super().__init__(directory, binary=shutil.which("etcd") or "etcd")
        self.host = host

    def _command(self) -> list[str]:
        return ["ip", "netns", "exec", self.host, *super()._command()]

    def _healthy(self) -> bool:
        try:
            return "ready to serve client requests" in self.log_path.read_text(errors="replace")
        except OSError:
            return False


def http_inside(host: str, method: str, url: str, body: object) -> str:
    """One HTTP call from inside a namespace (the API listens on its loopback)."""
    code = (
        "import sys, urllib.request as u; "
        "r = u.Request(sys.argv[2], data=sys.argv[3].encode(), method=sys.argv[1], "
        "headers={'Content-Type': 'application/json'}); "
        "print(u.urlopen(r, timeout=10).read().decode())"
    )
    out = subprocess.run(
        ["ip", "netns", "exec", host, sys.executable, "-c", code, method, url, json.dumps(body)],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return out.stdout


def run_plugin(plugin: str, env: dict[str, str], conf: bytes) -> tuple[float, int, str]:
    started = time.perf_counter()
    proc = subprocess.run([plugin], input=conf, env=env, capture_output=True, timeout=60)
    return time.perf_counter() - started, proc.returncode, proc.stdout.decode()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def row(name: str, samples: Sequence[float]) -> str:
    ms = [s * 1000 for s in samples]
    return (
        f"| {name:<28} | {len(ms):>4} | {percentile(ms, 50):7.1f} | {percentile(ms, 90):7.1f} "
        f"| {percentile(ms, 99):7.1f} | {max(ms):7.1f} |"
    )


def plugin_latency(containers: int, workdir: Path, plugins: Sequence[str]) -> list[str]:
    if os.geteuid() != 0:
        raise SystemExit("part 1 makes network namespaces: run as root (or --skip-plugin)")
    with ExitStack() as stack:
        host = stack.enter_context(namespace("bench-host"))
        etcd = NetnsEtcd(workdir / "etcd", host)
        stack.callback(etcd.stop)
        etcd.start()
        socket_path = str(workdir / "cni.sock")
        server_log = workdir / "server.log"
        argv = [
            "ip", "netns", "exec", host, *discovery_command(), "serve",
            "--etcd", f"http://127.0.0.1:{etcd.client_port}",
            "--dns", "127.0.0.1:0", "--http", "127.0.0.1:0",
            "--cni-socket", socket_path, "--node", "bench", "--log-level", "info",
        ]  # fmt: skip
        with open(server_log, "wb") as out:
            server = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        stack.callback(server.wait, 10)
        stack.callback(server.send_signal, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while not (found := _HTTP_LINE.search(server_log.read_text(errors="replace"))):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(server_log.read_text(errors="replace"))
            time.sleep(0.05)
        http = int(found.group(2))
        network = {"subnet": "10.200.0.0/16", "node_prefix": 22}
        deadline = time.monotonic() + 30
        while True:  # 503 until the server has loaded the registry
            try:
                http_inside(host, "PUT", f"http://127.0.0.1:{http}/v1/networks/bench", network)
                break
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        conf = json.dumps(
            {
                "cniVersion": "1.1.0",
                "name": "bench",
                "type": "discovery-cni",
                "bridge": "cni0",
                "isGateway": True,
                "mtu": 1450,
                "server": f"http://127.0.0.1:{http}",
                "socket": socket_path,
            }
        ).encode()
        names = [stack.enter_context(namespace("bench-c")) for _ in range(containers)]
        base = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
        version_env = {**base, "CNI_COMMAND": "VERSION"}
        pids = {"server": server.pid, "etcd": etcd_pid(etcd)}
        rows = []

        def env_for(command: str, i: int, name: str) -> dict[str, str]:
            return {
                **base,
                "CNI_COMMAND": command,
                "CNI_CONTAINERID": f"bench-{i}",
                "CNI_NETNS": f"/var/run/netns/{name}",
                "CNI_IFNAME": "eth0",
                "CNI_PATH": str(CNI_BIN.parent),
                "CNI_ARGS": f"K8S_POD_NAME=bench-{i}",
            }

        def direct(command: str, env: dict[str, str]) -> tuple[float, int, str]:
            """The plugin's own request on the socket, without starting a process."""
            started = time.perf_counter()
            cni_env = {k: v for k, v in env.items() if k.startswith("CNI_")}
            body = json.dumps({"env": cni_env, "config": json.loads(conf)}).encode()
            status, answer = cni.post(socket_path, f"/v1/cni/{command}", body, {})
            return time.perf_counter() - started, 0 if status < 300 else 1, answer.decode()

        passes: list[tuple[str, str, str]] = []  # command, label, plugin ("": on the socket)
        for number, plugin in enumerate(plugins, 1):
            tag = f" [{number}]" if len(plugins) > 1 else ""
            passes += [("VERSION", f"VERSION (plugin alone){tag}", plugin)]
            passes += [("ADD", f"ADD{tag}", plugin), ("DEL", f"DEL{tag}", plugin)]
        passes += [("ADD", "ADD, server only", ""), ("DEL", "DEL, server only", "")]
        for command, label, plugin in passes:
            on_socket = not plugin
            samples: list[float] = []
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            children = resource.getrusage(resource.RUSAGE_CHILDREN)
            for i, name in enumerate(names):
                env = version_env if command == "VERSION" else env_for(command, i, name)
                if on_socket:
                    seconds, code, output = direct(command, env)
                else:
                    seconds, code, output = run_plugin(
                        plugin, env, b"" if command == "VERSION" else conf
                    )
                if code != 0:
                    raise RuntimeError(f"{label} bench-{i} failed: {output}")
                samples.append(seconds)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
            plugin_cpu = (
                0.0
                if on_socket
                else (after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime)
            )
            per = [plugin_cpu, cpu["server"], cpu["etcd"]]
            rows.append(
                row(label, samples)
                + " "
                + " / ".join(f"{x / len(names) * 1000:.1f}" for x in per)
                + " |"
            )
            log(f"{label} x{len(samples)} done (load {load()})")
    return [
        "| command                      | n    | p50 ms  | p90 ms  | p99 ms  | max ms  "
        "| CPU ms/call: plugin / server / etcd |",
        "|------------------------------|------|---------|---------|---------|---------"
        "|-------------------------------------|",
        *rows,
    ]


def etcd_pid(etcd: EtcdServer) -> int:
    assert etcd._proc is not None
    return etcd._proc.pid


WRK_SCRIPT = r"""
local threads = {}
local made = 0
function setup(thread)
  made = made + 1
  thread:set("id", made)
  table.insert(threads, thread)
end
function init(args)
  counter = 0
end
function request()
  counter = counter + 1
  local path = "/v1/networks/bench/attachments/w%d-%07d/eth0"
  return wrk.format("PUT", string.format(path, id, counter))
end
function done(summary, latency, requests)
  for _, t in ipairs(threads) do
    io.write(string.format("THREAD %d %d\n", t:get("id"), t:get("counter")))
  end
  io.write(string.format("DONE %d BAD %d ERRORS %d P50_US %d P99_US %d\n", summary.requests,
    summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


def wrk_allocations(base: str, seconds: float, connections: int, workdir: Path) -> dict[str, Any]:
    """PUT new attachments from wrk for `seconds`; what it did and the names it used."""
    script = workdir / "allocate.lua"
    script.write_text(WRK_SCRIPT)
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{round(seconds)}s", "-s", str(script), base]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed:\n{out.stdout}\n{out.stderr}")
    done = re.search(r"DONE (\d+) BAD (\d+) ERRORS (\d+) P50_US (\d+) P99_US (\d+)", out.stdout)
    if done is None:
        raise RuntimeError(f"wrk printed no summary:\n{out.stdout}")
    names = [
        f"w{thread}-{i:07d}"
        for thread, count in re.findall(r"THREAD (\d+) (\d+)", out.stdout)
        for i in range(1, int(count) + 1)
    ]
    ok, bad, errors, p50, p99 = (int(x) for x in done.groups())
    return {"done": ok, "bad": bad, "errors": errors, "p50_ms": p50 / 1000, "p99_ms": p99 / 1000,
            "names": names}  # fmt: skip


async def allocation_rate(
    allocations: int, callers: int, client: str = "aiohttp", seconds: float = 10.0
) -> list[str]:
    with Cluster(replicas=1, serve_args=["--node", "bench", "--cni-socket", ""]) as cluster:
        base = cluster.nodes[0].base
        assert cluster.etcd is not None
        etcd = etcd_pid(cluster.etcd)
        connector = aiohttp.TCPConnector(limit=callers)
        async with aiohttp.ClientSession(connector=connector) as session:
            body = {"subnet": "10.0.0.0/16", "node_prefix": 16}
            deadline = time.monotonic() + 30
            while True:  # 503 until the server has loaded the registry
                async with session.put(f"{base}/v1/networks/bench", json=body) as response:
                    if response.status in (200, 201):
                        break
                    assert response.status == 503 and time.monotonic() < deadline
                await asyncio.sleep(0.2)
            rows = []
            names = [f"c{i:06d}" for i in range(allocations)]
            if client == "wrk":
                pids = {"server": cluster.nodes[0].proc.pid, "etcd": etcd}
                cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                started = time.perf_counter()
                with tempfile.TemporaryDirectory() as tmp:
                    result = await asyncio.to_thread(
                        wrk_allocations, base, seconds, callers, Path(tmp)
                    )
                elapsed = time.perf_counter() - started
                cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
                done = result["done"]
                if result["bad"] or result["errors"]:
                    raise RuntimeError(f"wrk: {result['bad']} non-2xx, {result['errors']} errors")
                per_call = " / ".join(f"{cpu[n] / done * 1000:.2f}" for n in ("server", "etcd"))
                rows.append(
                    f"| allocate (PUT, wrk) | {done:>6} | {callers:>7} "
                    f"| {done / seconds:8.0f} | {result['p50_ms']:6.1f} "
                    f"| {result['p99_ms']:6.1f} | {per_call + ' / (wrk)':<20} |"
                )
                log(f"allocate (PUT, wrk): {done / seconds:.0f}/s over {elapsed:.1f} s "
                    f"(load {load()})")  # fmt: skip
                names = result["names"]
                allocations = len(names)
            for method, expect in (("PUT", {200, 201}), ("DELETE", {204})):
                if client == "wrk" and method == "PUT":
                    continue
                latencies: list[float] = []
                queue = iter(names)

                async def caller(
                    method: str = method,
                    expect: set[int] = expect,
                    queue: Iterator[str] = queue,
                    latencies: list[float] = latencies,
                ) -> None:
                    for name in queue:
                        url = f"{base}/v1/networks/bench/attachments/{name}/eth0"
                        started = time.perf_counter()
                        async with session.request(method, url) as response:
                            await response.read()
                            if response.status not in expect:
                                raise RuntimeError(f"{method} {name}: {response.status}")
                        latencies.append(time.perf_counter() - started)

                pids = {"server": cluster.nodes[0].proc.pid, "etcd": etcd}
                cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                client_before = time.process_time()
                started = time.perf_counter()
                await asyncio.gather(*(caller() for _ in range(callers)))
                elapsed = time.perf_counter() - started
                cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
                cpu["client"] = time.process_time() - client_before
                what = "allocate (PUT)" if method == "PUT" else "release (DELETE)"
                ms = [x * 1000 for x in latencies]
                per_call = " / ".join(
                    f"{cpu[name] / allocations * 1000:.2f}" for name in ("server", "etcd", "client")
                )
                rows.append(
                    f"| {what:<17} | {allocations:>6} | {callers:>7} "
                    f"| {allocations / elapsed:8.0f} | {percentile(ms, 50):6.1f} "
                    f"| {percentile(ms, 99):6.1f} | {per_call:<20} |"
                )
                log(f"{what}: {allocations / elapsed:.0f}/s (load {load()})")
    return [
        "| API call          | calls  | callers | calls/s  | p50 ms | p99 ms "
        "| CPU ms/call: server / etcd / client |",
        "|-------------------|--------|---------|----------|--------|--------"
        "|-------------------------------------|",
        *rows,
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--containers", type=int, default=100)
    parser.add_argument("--allocations", type=int, default=5000)
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument(
        "--plugin",
        action="append",
        help="discovery-cni executable to time (may repeat; default: the one beside this Python)",
    )
    parser.add_argument("--skip-plugin", action="store_true", help="only the API part")
    parser.add_argument("--skip-api", action="store_true", help="only the plugin part")
    parser.add_argument(
        "--client",
        choices=("aiohttp", "wrk"),
        default="aiohttp",
        help="what sends the allocating PUTs (wrk: Debian's wrk, --seconds long)",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="how long wrk sends PUTs")
    args = parser.parse_args(argv)
    before = load()
    print(f"`{' '.join(['bench/cni.py', *(argv or sys.argv[1:])])}`, {now()}, {machine()}")
    print(f"\nload average before: {before}\n")
    workdir = Path(tempfile.mkdtemp(prefix="cni-bench-"))
    try:
        if not args.skip_plugin:
            plugins = args.plugin or [str(CNI_BIN)]
            for number, plugin in enumerate(plugins, 1):
                print(f"[{number}] {plugin}")
            print()
            print("\n".join(plugin_latency(args.containers, workdir, plugins)))
            print(f"\nload average after the plugin part: {load()}\n")
        if not args.skip_api:
            if args.client == "wrk" and shutil.which("wrk") is None:
                raise SystemExit("--client wrk: wrk is not installed (apt-get install wrk)")
            rows = asyncio.run(
                allocation_rate(args.allocations, args.callers, args.client, args.seconds)
            )
            print("\n".join(rows))
            print(f"\nload average after the API part: {load()}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
