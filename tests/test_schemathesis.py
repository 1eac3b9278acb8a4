"""schemathesis against /openapi.json of a real server: no 5xx, every response as the document
says (status codes, content types, headers, bodies), schema-violating input refused, and the
stateful phase following the document's links (register -> get/heartbeat/deregister, network ->
attach -> detach).

`positive_data_acceptance` is left out: the server checks more than JSON Schema can say (address
classes, a subnet's host bits, an attachment's network must exist), so schema-valid input may
rightly be refused with 400/404.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from test_cli import run, serve

CHECKS_LEFT_OUT = "positive_data_acceptance"
SECONDS = 45  # the whole run's budget; coverage, fuzzing and stateful phases share it


async def schemathesis(url: str, tmp_path: Path, *extra: str) -> tuple[int, str]:
    config = tmp_path / "schemathesis.toml"
    # long polls answer at once (the document allows waits of hours)
    config.write_text('[parameters]\nwait = "1ms"\n')
    cmd = [
        sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()",
        "--config-file", str(config), "--no-color",
        "run", f"{url}/openapi.json",
        "--checks", "all", "--exclude-checks", CHECKS_LEFT_OUT,
        "--max-time", str(SECONDS), "--seed", "1", "--workers", "1",
        "--request-timeout", "10", "--report-dir", str(tmp_path / "reports"),
        "--generation-database", "none",  # no .schemathesis/ cache in the working tree
        *extra,
    ]  # fmt: skip
    # workers 1: CPython 3.11.7's ast module is not thread-safe (gh-106905), and hypothesis
    # parses lambdas while it generates
    code, out, err = await run(*cmd, timeout=SECONDS + 120)
    return code, out + err


@pytest.mark.timeout(SECONDS + 180)
async def test_the_api_keeps_every_promise_of_its_openapi_document(tmp_path: Path) -> None:
    async with serve("--min-ttl", "2") as server:
        url = f"http://{server.http[0]}:{server.http[1]}"
        code, output = await schemathesis(url, tmp_path)
    log = "".join(server.stderr)
    assert code == 0, output[-6000:]
    assert "passed" in output and "Stateful" in output, output[-3000:]
    # a client error never shows up as a traceback in the log (SPEC "Registration API")
    assert "Traceback" not in log and "Error handling request" not in log, log[-3000:]


async def test_a_request_aiohttp_cannot_parse_gets_400_and_no_traceback() -> None:
    async with serve() as server:
        reader, writer = await asyncio.open_connection(*server.http)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Bad: \x00\r\n\r\n")
        status = await asyncio.wait_for(reader.readline(), 10)
        writer.close()
        # the server goes on answering
        reader, writer = await asyncio.open_connection(*server.http)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        after = await asyncio.wait_for(reader.readline(), 10)
        writer.close()
    assert status.split()[1] == b"400", status
    assert after.startswith(b"HTTP/1.1 200"), after
    log = "".join(server.stderr)
    assert "Traceback" not in log and "Error handling request" not in log, log[-3000:]
