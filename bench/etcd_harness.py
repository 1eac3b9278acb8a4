"""Shared set-up for the etcd benchmarks: one etcd and N `discovery serve` processes.

Everything binds 127.0.0.1 on free ports, etcd keeps its data in a temporary directory, and
everything started here is stopped when the `Cluster` context exits (also on error or Ctrl-C).
Used by bench/propagation.py and bench/heartbeats.py; not a test and not part of the package.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# run as `python bench/NAME.py`: Python puts bench/ first on sys.path, so `machine` imports
from machine import cpu_model, discovery_command

from discovery.testing import EtcdServer, free_ports

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
_DNS_LINE = re.compile(r"DNS listening on ([0-9.]+):(\d+)")
_HTTP_LINE = re.compile(r"HTTP listening on http://([0-9.]+):(\d+)")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def pinned(cpu: str | None, argv: Sequence[str]) -> list[str]:
    """argv under `taskset -c cpu` when a CPU is given and taskset exists."""
    if cpu is None or shutil.which("taskset") is None:
        return list(argv)
    return ["taskset", "-c", cpu, *argv]


def pin_self(cpu: str | None) -> None:
    """Pin this (client) process to one CPU."""
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in cpu.split(",")})


@dataclass
class Replica:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    dns: tuple[str, int] = ("", 0)
    http: tuple[str, int] = ("", 0)

    @property
    def base(self) -> str:
        return f"http://{self.http[0]}:{self.http[1]}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Cluster:
    """etcd plus replicas; use as `with Cluster(...) as cluster:`."""

    replicas: int = 1
    serve_args: Sequence[str] = ()
    etcd_cpu: str | None = None
    server_cpu: str | None = None
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="etcd-bench-")))
    etcd: EtcdServer | None = None
    nodes: list[Replica] = field(default_factory=list)

    def __enter__(self) -> Cluster:
        self._previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        binary = shutil.which("etcd")
        if binary is None:
            raise SystemExit("the etcd binary is missing (apt-get install etcd-server)")
        self.etcd = _PinnedEtcd(self.workdir / "etcd", binary=binary)
        self.etcd.cpu = self.etcd_cpu
        log(f"starting etcd on {self.etcd.client_url} (data in {self.etcd.data_dir})")
        self.etcd.start()
        for i in range(self.replicas):
            self.nodes.append(self._start_replica(chr(ord("A") + i)))
        for node in self.nodes:
            self._wait_listening(node)
            log(f"replica {node.name}: DNS {node.dns[0]}:{node.dns[1]}, HTTP {node.base}")

    def _start_replica(self, name: str) -> Replica:
        assert self.etcd is not None
        log_path = self.workdir / f"discovery-{name}.log"
        argv = [
            *discovery_command(), "serve",
            "--etcd", self.etcd.client_url,
            "--dns", f"{HOST}:0", "--http", f"{HOST}:0",
            "--log-level", "info", *self.serve_args,
        ]  # fmt: skip
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                pinned(self.server_cpu, argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
            )
        return Replica(name, proc, log_path)

    def _wait_listening(self, node: Replica, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = node.log_path.read_text(errors="replace")
            dns, http = _DNS_LINE.search(text), _HTTP_LINE.search(text)
            if dns and http:
                node.dns = (dns.group(1), int(dns.group(2)))
                node.http = (http.group(1), int(http.group(2)))
                return
            if node.proc.poll() is not None:
                raise RuntimeError(f"replica {node.name} exited:\n{node.log_tail()}")
            time.sleep(0.05)
        raise RuntimeError(f"replica {node.name} did not start in {timeout} s:\n{node.log_tail()}")

    def close(self) -> None:
        for node in self.nodes:
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes:
            try:
                node.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(timeout=10)
        self.nodes = []
        if self.etcd is not None:
            self.etcd.stop()
            self.etcd = None
        shutil.rmtree(self.workdir, ignore_errors=True)
        if getattr(self, "_previous", None) is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class _PinnedEtcd(EtcdServer):
    """EtcdServer started under `taskset -c cpu` when cpu is set."""

    cpu: str | None = None

    def _command(self) -> list[str]:
        return pinned(self.cpu, super()._command())


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of the values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def machine() -> str:
    cpu = cpu_model()
    etcd = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["etcd", "--version"], capture_output=True, text=True, timeout=10)
        etcd = out.stdout.splitlines()[0].strip()
    return (
        f"{platform.node()}: {os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}, "
        f"Python {platform.python_version()}, {etcd}"
    )


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (also readable as plain text)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


__all__ = [
    "HOST", "Cluster", "Replica", "free_ports", "log", "machine", "now", "percentile",
    "pin_self", "pinned", "table",
]  # fmt: skip
