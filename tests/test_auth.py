"""Access control of the HTTP API: bearer tokens per namespace from --auth-file (re-read on
SIGHUP, by a single server and by --workers), the Host check against DNS rebinding, and the
warning for an open listener. Real servers, real HTTP clients and dig-free DNS checks."""

from __future__ import annotations

import hashlib
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import etcd_support
import pytest
from conftest import Client, make_config
from test_cli import Process, run_to_exit, serve
from test_schemathesis import SECONDS, schemathesis
from waiting import eventually

from discovery import auth
from discovery.config import Config, ConfigError
from discovery.server import Server, run_server

etcd_server = etcd_support.etcd_server  # the fixture

PAYMENTS = "pay-token-1"  # read and write on "payments"
PROD = "prod-token-1"  # read and write on "prod"
READER = "reader-token-1"  # read on every namespace
ADMIN = "admin-token-1"  # admin
WRITER_STAR = "writer-star-1"  # read and write on every namespace, not admin
VICTIM = {"address": "10.1.2.3", "ports": [{"name": "http", "port": 8080}], "ttl": 60}
ATTACKER = {"address": "10.66.6.6", "ports": [{"name": "http", "port": 8080}], "ttl": 60}
PAY_1 = "/v1/services/prod/payments/instances/pay-1"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def entry(name: str, token: str, namespaces: list[str], rights: list[str]) -> dict[str, Any]:
    return {"name": name, "sha256": digest(token), "namespaces": namespaces, "rights": rights}


TOKENS = [
    entry("payments", PAYMENTS, ["payments"], ["read", "write"]),
    entry("prod", PROD, ["prod"], ["read", "write"]),
    entry("reader", READER, ["*"], ["read"]),
    entry("admin", ADMIN, ["*"], ["admin"]),
    entry("writer", WRITER_STAR, ["*"], ["read", "write"]),
]


def write_auth(path: Path, tokens: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"tokens": tokens}))
    return path


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    config = make_config(auth_file=str(write_auth(tmp_path / "auth.json", TOKENS)))
    async with run_server(config) as server, aiohttp.ClientSession() as session:
        await server.registry.wait(lambda: server.registry.synced, 5)
        yield Client(server, session)


def refused(server: Server, reason: str) -> float:
    value = server.metrics.registry.get_sample_value(
        "discovery_http_refused_total", {"reason": reason}
    )
    return value or 0.0


async def test_nobody_without_a_token_overwrites_or_deletes_an_instance(client: Client) -> None:
    """Issue 13, 1: anyone who reached the API could overwrite prod/payments/pay-1."""
    status, body, _ = await client.request("PUT", PAY_1, json=VICTIM, headers=bearer(PROD))
    assert status == 201, body
    before = refused(client.server, "unauthenticated")

    status, body, headers = await client.request("PUT", PAY_1, json=ATTACKER)
    assert status == 401, body
    assert headers["Content-Type"].startswith("application/problem+json")
    assert headers["WWW-Authenticate"] == 'Bearer realm="discovery"'
    assert body["status"] == 401 and "Bearer" in body["detail"]

    for method, path, kwargs in [
        ("PUT", PAY_1, {"json": ATTACKER, "headers": bearer("guessed")}),
        ("PUT", PAY_1, {"json": ATTACKER, "headers": {"Authorization": "Basic Zm9vOmJhcg=="}}),
        ("PUT", PAY_1, {"json": ATTACKER, "headers": {"Authorization": "Bearer"}}),
        ("PUT", PAY_1 + "/heartbeat", {}),
        ("DELETE", PAY_1, {}),
        ("PUT", "/v1/services/prod/payments/instances/rogue", {"json": ATTACKER}),
        ("GET", PAY_1, {}),
        ("GET", "/v1/services", {}),
        ("GET", "/v1/registry", {}),
        ("GET", "/v1/networks", {}),
        ("GET", "/no/such/path", {}),
    ]:
        status, body, headers = await client.request(method, path, **kwargs)
        assert status == 401, (method, path, body)
        assert headers["WWW-Authenticate"].startswith("Bearer"), (method, path)
    assert (
        'error="invalid_token"'
        in (await client.request("PUT", PAY_1, json=ATTACKER, headers=bearer("guessed")))[2][
            "WWW-Authenticate"
        ]
    )
    assert refused(client.server, "unauthenticated") == before + 13

    # the victim's record is untouched and still answers in DNS
    assert await client.addresses("pay-1.payments.prod.svc.cluster.local") == {"10.1.2.3"}
    assert await client.addresses("payments.prod.svc.cluster.local") == {"10.1.2.3"}
    status, body, _ = await client.request("GET", PAY_1, headers=bearer(PROD))
    assert status == 200 and body["address"] == "10.1.2.3"


async def test_a_token_for_one_namespace_cannot_touch_another(client: Client) -> None:
    status, body, _ = await client.request("PUT", PAY_1, json=VICTIM, headers=bearer(PROD))
    assert status == 201, body
    before = refused(client.server, "forbidden")
    for method, path, kwargs in [
        ("PUT", PAY_1, {"json": ATTACKER}),
        ("PUT", PAY_1 + "/heartbeat", {}),
        ("DELETE", PAY_1, {}),
        ("GET", PAY_1, {}),
        ("GET", "/v1/services/prod/payments", {}),
    ]:
        status, body, headers = await client.request(
            method, path, headers=bearer(PAYMENTS), **kwargs
        )
        assert status == 403, (method, path, body)
        assert (
            body["detail"]
            == "token 'payments' does not have the right "
            + ("'read'" if method == "GET" else "'write'")
            + " on namespace 'prod'"
        )
        assert 'error="insufficient_scope"' in headers["WWW-Authenticate"]
    assert refused(client.server, "forbidden") == before + 5
    # its own namespace: fine
    path = "/v1/services/payments/api/instances/api-1"
    status, body, _ = await client.request("PUT", path, json=VICTIM, headers=bearer(PAYMENTS))
    assert status == 201, body
    status, body, _ = await client.request("PUT", path + "/heartbeat", headers=bearer(PAYMENTS))
    assert status == 200, body
    assert await client.addresses("pay-1.payments.prod.svc.cluster.local") == {"10.1.2.3"}


async def test_rights_read_write_admin(client: Client) -> None:
    path = "/v1/services/default/web/instances/web-1"
    status, _, _ = await client.request("PUT", path, json=VICTIM, headers=bearer(READER))
    assert status == 403
    status, _, _ = await client.request("PUT", path, json=VICTIM, headers=bearer(WRITER_STAR))
    assert status == 201
    status, body, _ = await client.request("GET", path, headers=bearer(READER))
    assert status == 200 and body["address"] == "10.1.2.3"
    status, _, _ = await client.request("DELETE", path, headers=bearer(READER))
    assert status == 403
    # networks and attachments: admin only, whatever the namespaces
    for token in (READER, WRITER_STAR, PAYMENTS):
        status, body, _ = await client.request("GET", "/v1/networks", headers=bearer(token))
        assert status == 403, body
        assert "'admin'" in body["detail"]
        status, _, _ = await client.request(
            "PUT", "/v1/networks/pods", json={"subnet": "10.244.0.0/16"}, headers=bearer(token)
        )
        assert status == 403
    status, body, _ = await client.request("GET", "/v1/networks", headers=bearer(ADMIN))
    assert status == 200, body
    # admin covers every namespace too
    status, _, _ = await client.request("DELETE", path, headers=bearer(ADMIN))
    assert status == 204
    # a valid token on a path that does not exist: 404, not 401
    status, _, _ = await client.request("GET", "/v1/nothing", headers=bearer(READER))
    assert status == 404
    status, _, _ = await client.request("GET", path, headers={"Authorization": f"bearer {ADMIN}"})
    assert status == 404  # the scheme is case-insensitive (RFC 7235); deleted above


async def test_listings_show_only_the_namespaces_a_token_reads(client: Client) -> None:
    for ns, token in (("payments", PAYMENTS), ("prod", PROD)):
        path = f"/v1/services/{ns}/api/instances/i-1"
        status, _, _ = await client.request("PUT", path, json=VICTIM, headers=bearer(token))
        assert status == 201

    async def namespaces(path: str, token: str) -> set[str]:
        status, body, _ = await client.request("GET", path, headers=bearer(token))
        assert status == 200, body
        items = body["services"] if "services" in body else body["instances"]
        return {item["namespace"] for item in items}

    assert await namespaces("/v1/services", PAYMENTS) == {"payments"}
    assert await namespaces("/v1/registry", PROD) == {"prod"}
    assert await namespaces("/v1/services", READER) == {"payments", "prod"}
    assert await namespaces("/v1/registry", ADMIN) == {"payments", "prod"}


async def test_probes_and_the_description_need_no_token(client: Client) -> None:
    for path in ("/healthz", "/readyz", "/openapi.json", "/metrics"):
        status, _, _ = await client.request("GET", path)
        assert status == 200, path


async def test_auth_metrics_puts_metrics_behind_a_token(tmp_path: Path) -> None:
    config = make_config(
        auth_file=str(write_auth(tmp_path / "auth.json", TOKENS)), auth_metrics=True
    )
    async with run_server(config) as server, aiohttp.ClientSession() as session:
        client = Client(server, session)
        status, _, _ = await client.request("GET", "/metrics")
        assert status == 401
        status, body, _ = await client.request("GET", "/metrics", headers=bearer(READER))
        assert status == 200 and "discovery_http_refused_total" in body
        status, _, _ = await client.request("GET", "/healthz")
        assert status == 200


@pytest.mark.parametrize(
    "host",
    [
        "localhost", "localhost:8080", "LOCALHOST.:8080", "api.localhost:1", "127.0.0.1:8080",
        "[::1]:8080", "[::1]", "10.0.0.5:8080", "192.0.2.1", "discovery-1:8080",
        "api.discovery.svc.cluster.local:8080", "",
    ],
)  # fmt: skip
async def test_host_check_accepts(host: str) -> None:
    config = make_config(http_allowed_hosts=("discovery-1", "*.svc.cluster.local"))
    async with run_server(config) as server, aiohttp.ClientSession() as session:
        status, body, _ = await Client(server, session).request(
            "GET", "/v1/services", headers={"Host": host}
        )
        assert status == 200, (host, body)


async def test_rebinding_host_gets_421_with_or_without_tokens(tmp_path: Path) -> None:
    """Issue 13, 1: any Host was accepted, so a web page could reach a loopback API."""
    for config in (
        make_config(),
        make_config(auth_file=str(write_auth(tmp_path / "auth.json", TOKENS))),
        make_config(http_allowed_hosts=("discovery-1", "*.svc.cluster.local")),
    ):
        async with run_server(config) as server, aiohttp.ClientSession() as session:
            client = Client(server, session)
            for host in (
                "evil.example:8080", "rebind.attacker.test", "discovery-2:8080",
                "svc.cluster.local.evil.example", "localhost.evil.example",
            ):  # fmt: skip
                status, body, headers = await client.request(
                    "PUT", PAY_1, json=ATTACKER, headers={"Host": host, **bearer(ADMIN)}
                )
                assert status == 421, (host, body)
                assert headers["Content-Type"].startswith("application/problem+json")
                assert "--http-allowed-hosts" in body["detail"]
                # probes too: a rebinding page learns nothing
                status, _, _ = await client.request("GET", "/readyz", headers={"Host": host})
                assert status == 421
            assert refused(server, "host") == 10
            assert server.registry.instances(("prod", "payments")) == {}


async def test_allowed_hosts_star_turns_the_check_off() -> None:
    async with (
        run_server(make_config(http_allowed_hosts=("*",))) as server,
        aiohttp.ClientSession() as session,
    ):
        status, _, _ = await Client(server, session).request(
            "GET", "/healthz", headers={"Host": "anything.example"}
        )
        assert status == 200


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("not json", "not JSON"),
        ('{"tokens": {}}', '"tokens" must be a list'),
        ('{"token": []}', 'expected {"tokens": [...]}'),
        ('{"tokens": [1]}', "token 0: must be an object"),
        ('{"tokens": [{"name": "a", "sha256": "ab", "namespaces": ["x"], "rights": ["read"]}]}',
         "sha256 must be 64 hex digits"),
        ('{"tokens": [{"name": "a", "sha256": "' + "a" * 64 + '", "namespaces": ["X_"], '
         '"rights": ["read"]}]}', "namespaces must be"),
        ('{"tokens": [{"name": "a", "sha256": "' + "a" * 64 + '", "namespaces": ["x"], '
         '"rights": ["root"]}]}', "rights must be"),
        ('{"tokens": [{"name": "a", "sha256": "' + "a" * 64 + '", "namespaces": ["x"], '
         '"rights": ["read"], "token": "plain"}]}', "unknown field(s) token"),
        ('{"tokens": [{"name": "a", "sha256": "' + "a" * 64 + '", "namespaces": ["x"], '
         '"rights": ["read"]}, {"name": "b", "sha256": "' + "A" * 64 + '", "namespaces": ["x"],'
         ' "rights": ["read"]}]}', "tokens 'a' and 'b' have the same sha256"),
    ],
)  # fmt: skip
def test_bad_auth_files_are_explained(tmp_path: Path, content: str, words: str) -> None:
    path = tmp_path / "auth.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as error:
        auth.read_tokens(str(path))
    assert words in str(error.value) and str(path) in str(error.value)


def test_a_token_is_found_by_its_digest_only() -> None:
    tokens = auth.Tokens.parse(json.dumps({"tokens": TOKENS}).encode(), "t")
    found = tokens.find(PAYMENTS)
    assert found is not None and found.name == "payments"
    assert tokens.find(digest(PAYMENTS)) is None  # the stored digest is not a token
    assert tokens.find(PAYMENTS + " ") is None and tokens.find("") is None


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--auth-file", "/nonexistent/auth.json"], "cannot read auth file"),
        (["--http-cert", "/nonexistent/cert.pem"], "--http-cert and --http-key go together"),
        (["--http-client-ca", "/x.pem"], "--http-client-ca needs --http-cert"),
        (["--http-cert", "/no/c.pem", "--http-key", "/no/k.pem"], "--http-cert /no/c.pem"),
        (["--auth-metrics"], "--auth-metrics needs --auth-file"),
        (["--http-allowed-hosts", "a b"], "is not a host name"),
    ],
)
async def test_bad_security_options_exit_2(args: list[str], words: str) -> None:
    code, _, err = await run_to_exit("serve", *args)
    assert code == 2, err
    assert words in err and "Traceback" not in err


def test_allowed_hosts_are_validated_in_config() -> None:
    with pytest.raises(ConfigError):
        Config(http_allowed_hosts=("Upper.Example",))


async def answering(process: Process) -> None:
    """Until the server answers HTTP (its signal handlers are in place by then)."""
    url = f"http://127.0.0.1:{process.http[1]}/healthz"

    async def healthy() -> bool:
        try:
            return await status_of(url, "") == 200
        except aiohttp.ClientError:
            return False

    await eventually(healthy, "the server answering", 20)


async def test_an_open_listener_without_auth_file_is_warned_about(tmp_path: Path) -> None:
    path = write_auth(tmp_path / "auth.json", TOKENS)
    for args, warned in [
        (["--http", "0.0.0.0:0"], True),
        ([], False),  # loopback
        (["--http", "0.0.0.0:0", "--auth-file", str(path)], False),
    ]:
        async with serve(*args) as process:
            await answering(process)
            assert await process.stop(signal.SIGTERM) == 0
        assert any("without --auth-file" in line for line in process.stderr) is warned, args


async def status_of(url: str, token: str, fresh: bool = False) -> int:
    """GET with a token, on a new connection when `fresh` (another worker may take it)."""
    connector = aiohttp.TCPConnector(force_close=fresh)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(url, headers=bearer(token) if token else {}) as response:
            return response.status


async def lines_with(process: Any, words: str, count: int, within: float = 20) -> None:
    async def seen() -> bool:
        return sum(words in line for line in process.stderr) >= count

    await eventually(seen, f"{count} log lines with {words!r}", within)


async def test_sighup_reloads_the_auth_file_and_a_broken_one_keeps_the_old(
    tmp_path: Path,
) -> None:
    path = write_auth(tmp_path / "auth.json", [entry("old", "old-token", ["*"], ["read"])])
    async with serve("--auth-file", str(path)) as process:
        url = "http://{}:{}/v1/services".format(*process.http)
        await answering(process)
        assert await status_of(url, "old-token") == 200
        assert await status_of(url, "new-token") == 401

        write_auth(path, [entry("new", "new-token", ["*"], ["read"])])
        process.proc.send_signal(signal.SIGHUP)
        await lines_with(process, "loaded: 1 tokens", 1)
        assert await status_of(url, "new-token") == 200
        assert await status_of(url, "old-token") == 401

        path.write_text('{"tokens": [{"name": "half"')  # a broken edit
        process.proc.send_signal(signal.SIGHUP)
        await lines_with(process, "keeping the 1 tokens loaded before", 1)
        assert await status_of(url, "new-token") == 200
        assert process.proc.returncode is None
        assert await process.stop(signal.SIGTERM) == 0


@pytest.mark.etcd
async def test_workers_pass_sighup_on_to_every_worker(
    tmp_path: Path, etcd_server: etcd_support.EtcdServer
) -> None:
    path = write_auth(tmp_path / "auth.json", [entry("old", "old-token", ["*"], ["read"])])
    args = ("--workers", "2", "--etcd", etcd_server.client_url, "--auth-file", str(path))
    async with serve(*args) as process:
        url = "http://{}:{}/v1/services".format(*process.http)

        async def workers_serve() -> bool:
            return await status_of(url, "old-token", fresh=True) == 200

        await eventually(workers_serve, "a worker answering", 20)
        write_auth(path, [entry("new", "new-token", ["*"], ["read"])])
        process.proc.send_signal(signal.SIGHUP)

        async def every_worker_reloaded() -> bool:
            # fresh connections land on either worker: all must know the new token
            codes = [await status_of(url, "new-token", fresh=True) for _ in range(20)]
            return codes == [200] * 20

        await eventually(every_worker_reloaded, "the new token on every worker", 20)
        codes = {await status_of(url, "old-token", fresh=True) for _ in range(20)}
        assert codes == {401}
        await lines_with(process, "passing it to 2 workers", 1)
        assert await process.stop(signal.SIGTERM) == 0


def test_openapi_describes_the_bearer_scheme_and_the_refusals() -> None:
    from discovery.openapi import openapi_document

    plain = openapi_document()
    assert "security" not in plain and "securitySchemes" not in plain["components"]
    doc = openapi_document(auth=True)
    scheme = doc["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert doc["security"] == [{"bearer": []}]
    for document in (plain, doc):
        for path, item in document["paths"].items():
            for method, operation in item.items():
                if method == "parameters":
                    continue
                codes = operation["responses"].keys()
                assert "421" in codes, (path, method)
                if document is plain or path in (
                    "/healthz",
                    "/readyz",
                    "/openapi.json",
                    "/metrics",
                ):
                    assert "401" not in codes and "403" not in codes, (path, method)
                    assert document is plain or operation["security"] == []
                else:
                    assert {"401", "403"} <= codes, (path, method)
    metrics = openapi_document(auth=True, auth_metrics=True)["paths"]["/metrics"]["get"]
    assert "security" not in metrics and "401" in metrics["responses"]


@pytest.mark.timeout(SECONDS + 180)
async def test_schemathesis_with_tokens(tmp_path: Path) -> None:
    """The document of a server with an auth file, every operation with an admin token, and
    schemathesis's own checks that requests without or with a wrong token are refused."""
    path = write_auth(tmp_path / "auth.json", TOKENS)
    async with serve("--min-ttl", "2", "--auth-file", str(path)) as server:
        url = f"http://{server.http[0]}:{server.http[1]}"
        code, output = await schemathesis(url, tmp_path, "-H", f"Authorization: Bearer {ADMIN}")
    assert code == 0, output[-6000:]
    assert "passed" in output and "Stateful" in output, output[-3000:]


def test_the_readme_auth_file_is_valid_and_its_tokens_match() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Tokens (`--auth-file`)") :]
    example = section[
        section.index("```json\n") + 8 : section.index("\n```", section.index("```json"))
    ]
    tokens = auth.Tokens.parse(example.encode(), "README")
    for token, name, rights in [
        ("s3cr3t-payments-ci", "payments-ci", {"read", "write"}),
        ("s3cr3t-dashboard", "dashboard", {"read"}),
        ("s3cr3t-ops", "ops", {"admin"}),
    ]:
        found = tokens.find(token)
        assert found is not None and found.name == name and found.rights == rights


async def test_the_dashboard_pages_load_without_a_token_but_show_no_data(client: Client) -> None:
    status, _, _ = await client.request("PUT", PAY_1, json=VICTIM, headers=bearer(PROD))
    assert status == 201
    for path in ("/ui/", "/ui/services/prod/payments", "/ui/networks"):
        status, body, _ = await client.request("GET", path)
        assert status == 200, path
        assert "pay-1" not in body and "10.1.2.3" not in body, path
    status, _, _ = await client.request("GET", "/ui/", headers={"Host": "evil.example"})
    assert status == 421


async def test_batched_heartbeats_need_write_on_every_namespace(client: Client) -> None:
    """POST /v1/heartbeats names its namespaces in the body: a token for one namespace renews
    nothing of another (the whole call is refused, naming the namespace)."""
    mine = "/v1/services/payments/api/instances/api-1"
    assert (await client.request("PUT", mine, json=VICTIM, headers=bearer(PAYMENTS)))[0] == 201
    assert (await client.request("PUT", PAY_1, json=VICTIM, headers=bearer(PROD)))[0] == 201
    own = {"namespace": "payments", "service": "api", "instance": "api-1"}
    other = {"namespace": "prod", "service": "payments", "instance": "pay-1"}
    before = refused(client.server, "forbidden")

    status, body, headers = await client.request(
        "POST", "/v1/heartbeats", json={"instances": [own, other]}, headers=bearer(PAYMENTS)
    )
    assert status == 403, body
    assert "'prod'" in body["detail"] and "'payments'" not in body["detail"]
    assert 'error="insufficient_scope"' in headers["WWW-Authenticate"]
    assert refused(client.server, "forbidden") == before + 1
    for token in (READER,):  # read is not write
        status, body, _ = await client.request(
            "POST", "/v1/heartbeats", json={"instances": [own]}, headers=bearer(token)
        )
        assert status == 403, body

    status, body, _ = await client.request(
        "POST", "/v1/heartbeats", json={"instances": [own]}, headers=bearer(PAYMENTS)
    )
    assert status == 200 and body["results"][0]["status"] == 200, body
    status, body, _ = await client.request(
        "POST", "/v1/heartbeats", json={"instances": [own, other]}, headers=bearer(WRITER_STAR)
    )
    assert status == 200 and [r["status"] for r in body["results"]] == [200, 200], body
