"""The API over TLS (--http-cert, --http-key) and mutual TLS (--http-client-ca), with
certificates made in the test; and every client the project ships (discovery.client,
`discovery register`, `discovery check`) sending its token and certificate to such a server."""

from __future__ import annotations

import asyncio
import shutil
import signal
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import etcd_support
import pytest
from conftest import make_config
from needs import unavailable
from test_auth import ADMIN, PAYMENTS, READER, TOKENS, lines_with, write_auth
from test_check import check
from test_cli import serve
from test_sidecar import sidecar
from waiting import eventually

from discovery.client import DiscoveryClient, Refused, tls_context
from discovery.config import Config, ConfigError, HostPort
from discovery.server import Server, run_server
from discovery.testing import TlsFiles, make_tls_files

etcd_server = etcd_support.etcd_server  # the fixture


@pytest.fixture
def tls(tmp_path: Path) -> Iterator[TlsFiles]:
    if shutil.which("openssl") is None:
        unavailable("needs the openssl command")
    yield make_tls_files(tmp_path / "tls")


def https(server: Server) -> str:
    return f"https://127.0.0.1:{server.http_address[1]}"


def mtls_config(tls: TlsFiles, tmp_path: Path, **more: object) -> Config:
    return make_config(
        http_cert=tls.server_cert,
        http_key=tls.server_key,
        http_client_ca=tls.ca,
        auth_file=str(write_auth(tmp_path / "auth.json", TOKENS)),
        **more,
    )


async def curl(*args: str) -> tuple[int, str]:
    if shutil.which("curl") is None:
        unavailable("needs curl")
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode() + err.decode()


async def get_status(url: str, context: ssl.SSLContext | bool) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.get(url, ssl=context) as response:
            return response.status


async def test_the_api_over_tls(tls: TlsFiles) -> None:
    config = make_config(http_cert=tls.server_cert, http_key=tls.server_key)
    async with run_server(config) as server:
        trusting = ssl.create_default_context(cafile=tls.ca)
        assert await get_status(https(server) + "/healthz", trusting) == 200
        code, out = await curl("--cacert", tls.ca, https(server) + "/readyz")
        assert code == 0 and out == "200", out
        code, out = await curl(https(server) + "/healthz")  # not trusting the private CA
        assert code != 0, out
        with pytest.raises(aiohttp.ClientError):  # plain HTTP on the TLS port
            await get_status(f"http://127.0.0.1:{server.http_address[1]}/healthz", False)


async def test_mutual_tls_refuses_a_client_without_a_certificate(
    tls: TlsFiles, tmp_path: Path
) -> None:
    other = make_tls_files(tmp_path / "other-ca")
    async with run_server(mtls_config(tls, tmp_path)) as server:
        url = https(server) + "/healthz"
        for reloaded in (False, True):  # the same after SIGHUP re-read the files
            if reloaded:
                assert server.tls.reload()
            code, out = await curl("--cacert", tls.ca, url)
            assert code != 0 and "200" not in out, out  # the handshake is refused
            code, out = await curl("--cacert", tls.ca, "--cert", other.client_cert,
                                   "--key", other.client_key, url)  # fmt: skip
            assert code != 0 and "200" not in out, out  # a certificate of another CA
            with pytest.raises(aiohttp.ClientError):
                await get_status(url, ssl.create_default_context(cafile=tls.ca))
            code, out = await curl("--cacert", tls.ca, "--cert", tls.client_cert,
                                   "--key", tls.client_key, url)  # fmt: skip
            assert code == 0 and out == "200", out
        # TLS says who may connect; the token still says what it may do
        code, out = await curl("--cacert", tls.ca, "--cert", tls.client_cert,
                               "--key", tls.client_key, https(server) + "/v1/services")  # fmt: skip
        assert out == "401", out


async def test_the_python_client_sends_its_token_and_certificate(
    tls: TlsFiles, tmp_path: Path
) -> None:
    async with run_server(mtls_config(tls, tmp_path)) as server:
        context = tls_context(tls.ca, tls.client_cert, tls.client_key)
        async with DiscoveryClient(https(server), token=PAYMENTS, ssl=context) as client:
            await client.register("payments", "api", "api-1", address="10.7.0.1", ttl=30)
            assert [i.address for i in await client.instances("payments", "api")] == ["10.7.0.1"]
            with pytest.raises(Refused) as error:
                await client.register("prod", "api", "api-1", address="10.7.0.1", ttl=30)
            assert error.value.status == 403
        async with DiscoveryClient(https(server), ssl=context) as anonymous:
            with pytest.raises(Refused) as error:
                await anonymous.register("payments", "api", "api-2", address="10.7.0.2")
            assert error.value.status == 401
        assert server.registry.instances(("payments", "api")).keys() == {"api-1"}


async def test_discovery_register_with_token_and_certificate(tls: TlsFiles, tmp_path: Path) -> None:
    async with run_server(mtls_config(tls, tmp_path, min_ttl=1)) as server:
        common = ["--server", https(server), "--namespace", "payments", "--service", "api",
                  "--address", "10.7.0.3", "--ttl", "3"]  # fmt: skip
        async with sidecar(
            tmp_path, *common, "--instance", "s-1", "--token", PAYMENTS,
            env={"DISCOVERY_CACERT": tls.ca, "DISCOVERY_CERT": tls.client_cert,
                 "DISCOVERY_KEY": tls.client_key},
        ) as running:  # fmt: skip
            assert await server.registry.wait(
                lambda: "s-1" in server.registry.instances(("payments", "api")), 20
            ), running.output()
        async with sidecar(
            tmp_path, *common, "--instance", "s-2", "--cacert", tls.ca,
            "--cert", tls.client_cert, "--key", tls.client_key,
            "--", sys.executable, "-c", "import time; time.sleep(60)",
        ) as anonymous:  # fmt: skip
            assert await anonymous.exit_code() == 1, anonymous.output()
            assert "401" in anonymous.output() and "Traceback" not in anonymous.output()
        async with sidecar(
            tmp_path, *common, "--instance", "s-3", "--token", PAYMENTS, "--cert", "/no/such.pem",
        ) as bad:  # fmt: skip
            assert await bad.exit_code() == 2, bad.output()
            assert "--cacert/--cert/--key" in bad.output()


@pytest.mark.etcd
async def test_discovery_check_with_token_and_certificate(
    tls: TlsFiles, tmp_path: Path, etcd_server: etcd_support.EtcdServer
) -> None:
    config = mtls_config(tls, tmp_path, etcd=(HostPort(*etcd_server.endpoint),))
    async with run_server(config) as server:
        assert await server.registry.wait(lambda: server.registry.synced, 15)
        context = tls_context(tls.ca, tls.client_cert, tls.client_key)
        async with DiscoveryClient(https(server), token=ADMIN, ssl=context) as client:
            for ns in ("payments", "prod"):
                await client.register(ns, "api", "api-1", address="10.7.0.4", ttl=60)
        tls_args = ["--cacert", tls.ca, "--cert", tls.client_cert, "--key", tls.client_key]
        base = ["--etcd", etcd_server.client_url, "--replica", https(server), *tls_args]
        code, out = await check(*base, "--token", READER)
        assert code == 0 and ": equal (revision" in out, out
        code, out = await check(*base)
        assert code == 1 and "answered 401" in out, out
        # a token that reads one namespace sees the other as missing: check needs "*"
        code, out = await check(*base, "--token", PAYMENTS)
        assert code == 1 and "missing   prod/api/api-1" in out, out
        code, out = await check("--etcd", etcd_server.client_url, "--replica", https(server),
                                "--token", READER)  # fmt: skip
        assert code == 1 and "unreachable" in out, out  # no client certificate


async def test_an_unreadable_certificate_stops_the_server_at_start(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate")
    with pytest.raises(ConfigError) as error:
        async with run_server(
            make_config(http_cert=str(tmp_path / "cert.pem"), http_key=str(tmp_path / "cert.pem"))
        ):
            pass
    assert "--http-cert" in str(error.value)


async def test_sighup_reloads_the_certificate_and_a_broken_one_keeps_the_old(
    tls: TlsFiles, tmp_path: Path
) -> None:
    """A rotated certificate (cert-manager, certbot) is taken on SIGHUP, for new connections."""
    rotated = make_tls_files(tmp_path / "rotated")  # another CA, another server certificate
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    shutil.copy(tls.server_cert, cert)
    shutil.copy(tls.server_key, key)
    old_ca = ssl.create_default_context(cafile=tls.ca)
    new_ca = ssl.create_default_context(cafile=rotated.ca)
    async with serve("--http-cert", str(cert), "--http-key", str(key)) as process:
        url = "https://{}:{}/healthz".format(*process.http)

        async def answering() -> bool:
            try:
                return await get_status(url, old_ca) == 200
            except aiohttp.ClientConnectionError:
                return False

        await eventually(answering, "the server answering over TLS", 20)
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await get_status(url, new_ca)

        shutil.copy(rotated.server_cert, cert)
        shutil.copy(rotated.server_key, key)
        process.proc.send_signal(signal.SIGHUP)
        await lines_with(process, "TLS certificate", 1)
        assert await get_status(url, new_ca) == 200
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await get_status(url, old_ca)

        key.write_text("not a key")  # a half-written rotation
        process.proc.send_signal(signal.SIGHUP)
        await lines_with(process, "keeping the certificate loaded before", 1)
        assert await get_status(url, new_ca) == 200
        assert process.proc.returncode is None
        assert await process.stop(signal.SIGTERM) == 0
