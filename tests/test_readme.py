"""The README's five-minute tour, run as written (curl and dig against a real server), with only
the ports changed to the test server's free ones."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import pytest
from conftest import make_config

from discovery.server import run_server

README = Path(__file__).resolve().parent.parent / "README.md"


def tour() -> str:
    text = README.read_text()
    section = text[text.index("## A five-minute tour") :]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "no sh block in the tour"
    return match.group(1)


@pytest.mark.skipif(
    not (shutil.which("curl") and shutil.which("dig") and shutil.which("bash")),
    reason="needs curl, dig and bash",
)
async def test_the_tour_runs_as_written() -> None:
    async with run_server(make_config()) as server:
        await server.registry.wait(lambda: server.registry.synced, 5)
        http_host, http_port = server.http_address
        dns_port = server.dns_address[1]
        script = tour().replace("localhost:8080", f"{http_host}:{http_port}")
        script = script.replace("-p 8053", f"-p {dns_port}")
        assert "8053" not in script and "localhost" not in script, "a port left unchanged"
        proc = await asyncio.create_subprocess_exec(
            "bash", "-euo", "pipefail", "-c", script,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    output = out.decode()
    assert proc.returncode == 0, output + err.decode()
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    expected = [
        ("register", r'"name": "web-1".*"ttl": 600.* 201$'),
        ("A of the service", r"^10\.1\.2\.3$"),
        ("A of the instance", r"^10\.1\.2\.3$"),
        ("SRV", r"^_http\._tcp\.web\.default\.svc\.cluster\.local\.\s+\d+\s+IN\s+SRV\s+0 100 "
                r"8080 web-1\.web\.default\.svc\.cluster\.local\.$"),
        ("its address", r"^web-1\.web\.default\.svc\.cluster\.local\.\s+\d+\s+IN\s+A\s+"
                        r"10\.1\.2\.3$"),
        ("PTR", r"^web-1\.web\.default\.svc\.cluster\.local\.$"),
        ("heartbeat", r'"expires_at".* 200$'),
        ("short lease", r"^201$"),
        ("expired", r"status: NXDOMAIN"),
        ("listing", r'"service": "web".* 200$'),
        ("change", r"^201$"),
        ("delete", r"^204$"),
    ]  # fmt: skip
    at = 0
    for what, pattern in expected:
        while at < len(lines) and not re.search(pattern, lines[at]):
            at += 1
        assert at < len(lines), f"{what}: no line matching {pattern!r} in order:\n{output}"
        at += 1
    poll = [line for line in lines if line.startswith("long poll:")]
    assert len(poll) == 1, output
    code, seconds = re.fullmatch(r"long poll: (\d+) after ([\d.]+) s", poll[0]).groups()  # type: ignore[union-attr]
    assert code == "200" and float(seconds) < 10, poll  # woken by the change, not the 30 s wait
