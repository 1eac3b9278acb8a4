"""`discovery register` as a subprocess around a real command with a real health endpoint,
against a real server (embedded store)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import make_config
from waiting import eventually

from discovery.server import Server, run_server
from discovery.testing import free_ports

NS, SVC = "default", "web"

# A service with a health endpoint steered by files in its directory: "fail" answers 503,
# "hang" never answers; SIGTERM exits 7; SIGHUP touches "hup".
SERVICE = """
import http.server, pathlib, signal, sys, time
port, flags = int(sys.argv[1]), pathlib.Path(sys.argv[2])
def term(*_): sys.exit(7)
signal.signal(signal.SIGTERM, term)
signal.signal(signal.SIGHUP, lambda *_: (flags / "hup").touch())
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if (flags / "hang").exists():
            time.sleep(30)
        self.send_response(503 if (flags / "fail").exists() else 200)
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args): pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Health)
server.daemon_threads = True
(flags / "ready").touch()
server.serve_forever()
"""


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    # --address auto registers the address that routes to the server: loopback here
    loopback = (ipaddress.ip_network("127.0.0.0/8"),)
    async with run_server(make_config(min_ttl=1, allow_address=loopback)) as running:
        await running.registry.wait(lambda: running.registry.synced, 5)
        yield running


def url(server: Server) -> str:
    return "http://{}:{}".format(*server.http_address)


def live(server: Server, inst: str) -> bool:
    return inst in server.registry.instances((NS, SVC))


async def until(server: Server, inst: str, present: bool, within: float = 15) -> None:
    assert await server.registry.wait(lambda: live(server, inst) is present, within), (
        f"{inst} {'never registered' if present else 'still registered'}"
    )


class Sidecar:
    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc = proc
        self.log = log

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def exit_code(self, within: float = 20) -> int:
        try:
            return await asyncio.wait_for(self.proc.wait(), within)
        except TimeoutError:
            pytest.fail(f"the sidecar did not exit:\n{self.output()}")


@contextlib.asynccontextmanager
async def sidecar(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[Sidecar]:
    log = _log_path(tmp_path)
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "discovery", "register", *args,
            stdout=out, stderr=out, stdin=asyncio.subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
    try:
        yield Sidecar(proc, log)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _log_path(directory: Path) -> Path:
    return directory / f"sidecar-{len(list(directory.glob('sidecar-*')))}.log"


def _exists(path: Path) -> bool:
    return path.exists()


async def exists(path: Path) -> bool:
    return _exists(path)


async def test_check_gates_the_registration_and_sigterm_ends_the_command(
    server: Server, tmp_path: Path
) -> None:
    port = free_ports(1)[0]
    script = tmp_path / "service.py"
    script.write_text(SERVICE)
    async with sidecar(
        tmp_path, "--server", url(server), "--service", SVC, "--instance", "s-1",
        "--address", "10.9.0.1", "--port", f"http:{port}", "--ttl", "3",
        "--metadata", "version=2.0",
        "--check", f"http://127.0.0.1:{port}/healthz", "--check-interval", "0.2",
        "--check-timeout", "1",
        "--", sys.executable, str(script), str(port), str(tmp_path),
    ) as running:  # fmt: skip
        await until(server, "s-1", True)
        instance = server.registry.instances((NS, SVC))["s-1"]
        assert instance.spec.address == "10.9.0.1" and instance.spec.ports[0].port == port
        # failing check: deregistered; passing again: registered again
        (tmp_path / "fail").touch()
        await until(server, "s-1", False)
        (tmp_path / "fail").unlink()
        await until(server, "s-1", True)
        # a check that hangs counts as failing after --check-timeout
        (tmp_path / "hang").touch()
        await until(server, "s-1", False)
        (tmp_path / "hang").unlink()
        await until(server, "s-1", True)
        # other signals reach the command
        running.proc.send_signal(signal.SIGHUP)
        await eventually(lambda: exists(tmp_path / "hup"), "SIGHUP forwarded")
        assert running.proc.returncode is None
        running.proc.send_signal(signal.SIGTERM)
        assert await running.exit_code() == 7, running.output()
        assert not live(server, "s-1")
        assert "check http://127.0.0.1" in running.output()


async def test_command_that_ends_deregisters_and_passes_its_exit_code(
    server: Server, tmp_path: Path
) -> None:
    gate = tmp_path / "go"
    wait_then_exit = (
        "import pathlib, sys, time\n"
        f"while not pathlib.Path({str(gate)!r}).exists(): time.sleep(0.05)\n"
        "sys.exit(5)\n"
    )
    async with sidecar(
        tmp_path, "--server", url(server), "--service", SVC, "--instance", "s-2",
        "--address", "10.9.0.2", "--ttl", "30",
        "--", sys.executable, "-c", wait_then_exit,
    ) as running:  # fmt: skip
        await until(server, "s-2", True)
        gate.touch()
        assert await running.exit_code() == 5, running.output()
        assert not live(server, "s-2"), "deregistered at once, not left to its 30 s lease"


async def test_command_ignoring_sigterm_is_killed_after_the_grace(
    server: Server, tmp_path: Path
) -> None:
    ready = tmp_path / "ready"
    stubborn = (
        "import pathlib, signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(120)\n"
    )
    async with sidecar(
        tmp_path, "--server", url(server), "--service", SVC, "--instance", "s-3",
        "--address", "10.9.0.3", "--grace", "1",
        "--", sys.executable, "-c", stubborn,
    ) as running:  # fmt: skip
        await until(server, "s-3", True)
        await eventually(lambda: exists(ready), "the command started")
        loop = asyncio.get_running_loop()
        started = loop.time()
        running.proc.send_signal(signal.SIGTERM)
        await until(server, "s-3", False, within=5)  # deregistered before the command ends
        assert await running.exit_code() == 128 + signal.SIGKILL, running.output()
        took = loop.time() - started
        assert 1.0 <= took < 10, took
        assert "killing it" in running.output()


async def test_environment_only_no_command_auto_address(server: Server, tmp_path: Path) -> None:
    env = {
        "DISCOVERY_SERVER": f"http://127.0.0.1:{free_ports(1)[0]},{url(server)}",  # failover
        "DISCOVERY_SERVICE": SVC,
        "DISCOVERY_INSTANCE": "s-4",
        "DISCOVERY_PORT": "http:80,dns:53/udp",
        "DISCOVERY_METADATA": "version=1.0,team=core",
        "DISCOVERY_TTL": "2",
    }
    async with sidecar(tmp_path, env=env) as running:
        await until(server, "s-4", True)
        instance = server.registry.instances((NS, SVC))["s-4"]
        assert instance.spec.address == "127.0.0.1", "auto: the address routing to the server"
        assert {(p.name, p.port, p.protocol) for p in instance.spec.ports} == {
            ("http", 80, "tcp"), ("dns", 53, "udp"),
        }  # fmt: skip
        assert instance.spec.ttl == 2
        running.proc.send_signal(signal.SIGINT)
        assert await running.exit_code() == 0, running.output()
        assert not live(server, "s-4")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--service", "web"], "--server"),
        (["--server", "http://127.0.0.1:1"], "--service"),
        (["--server", "127.0.0.1:8080", "--service", "web"], "http://"),
        (["--server", "http://127.0.0.1:1", "--service", "Web"], "DNS label"),
        (["--server", "http://127.0.0.1:1", "--service", "web", "--port", "http"], "NAME:PORT"),
        (["--server", "http://127.0.0.1:1", "--service", "web", "--port", "h:70000"], "PORT"),
        (["--server", "http://127.0.0.1:1", "--service", "web", "--metadata", "a=b=c"], None),
        (["--server", "http://127.0.0.1:1", "--service", "web", "--metadata", "k\x01=v"], "6763"),
        (["--server", "http://127.0.0.1:1", "--service", "web", "--check", "ftp://x"], "tcp://"),
        (["--server", "http://127.0.0.1:1", "--service", "web", "--address", "nope"], "address"),
        (["--server", "http://127.0.0.1:1", "--service", "web", "--ttl", "x"], "number"),
    ],
)
async def test_bad_options_exit_2_with_a_message(
    tmp_path: Path, args: list[str], message: str | None
) -> None:
    async with sidecar(tmp_path, *args, "--", "true") as running:
        code = await running.exit_code()
        if message is None:  # "a=b=c" is key "a", value "b=c": fine; `true` ends at once
            assert code == 0, running.output()
            return
        assert code == 2, running.output()
        assert message in running.output() and "Traceback" not in running.output()


async def test_refused_registration_exits_1(server: Server, tmp_path: Path) -> None:
    async with sidecar(
        tmp_path, "--server", url(server), "--service", SVC, "--instance", "s-5",
        "--address", "10.9.0.5", "--ttl", "100000", "--", sys.executable, "-c",
        "import time; time.sleep(60)",
    ) as running:  # fmt: skip
        assert await running.exit_code() == 1, running.output()
        assert "refuses" in running.output() and "ttl" in running.output()
        assert "Traceback" not in running.output()
