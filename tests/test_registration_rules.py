"""What a registration may say (SPEC "Security": addresses and names), and requests that must
never count as the server's failure: a lone surrogate, a client that leaves mid-body."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import AsyncIterator

import aiohttp
import dns.name
import pytest
from conftest import Client, make_config
from test_api import INST, ZONE, assert_problem, scrape, settle
from waiting import eventually

from discovery.cli import build_parser, config_from
from discovery.config import ConfigError
from discovery.server import Server, run_server

REFUSED_ALWAYS = [
    "0.0.0.0", "::", "::ffff:0.0.0.0", "0.1.2.3",
    "224.0.0.1", "::ffff:224.0.0.1", "ff02::1", "239.255.255.250",
    "255.255.255.255", "::ffff:255.255.255.255", "240.0.0.1", "::ffff:240.0.0.1",
]  # fmt: skip
REFUSED_UNLESS_ALLOWED = [
    "127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1",
    "169.254.169.254", "::ffff:169.254.169.254", "169.254.1.1", "fe80::1",
]  # fmt: skip
ACCEPTED = ["10.0.0.1", "192.0.2.7", "fd00::1", "2001:db8::1", "::ffff:10.0.0.1"]


@pytest.mark.parametrize("address", REFUSED_ALWAYS + REFUSED_UNLESS_ALLOWED)
async def test_addresses_refused_by_default(client: Client, address: str) -> None:
    body = json.dumps({"address": address}).encode()
    problem = assert_problem(await client.request("PUT", INST + "web-1", data=body), 400, "address")
    assert "address" in problem["detail"]
    await settle(client)
    assert client.server.registry.services() == {}


@pytest.mark.parametrize("address", ACCEPTED)
async def test_routable_addresses_accepted(client: Client, address: str) -> None:
    body = await client.register("default", "web", "web-1", expect=201, address=address)
    assert body["address"] == ipaddress.ip_address(address).compressed


@pytest.fixture
async def allowing() -> AsyncIterator[Client]:
    config = make_config(
        allow_address=(ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("169.254.0.0/16"))
    )
    async with run_server(config) as server, aiohttp.ClientSession() as session:
        await server.registry.wait(lambda: server.registry.synced, 5)
        yield Client(server, session)


async def test_allow_address_admits_loopback_and_link_local(allowing: Client) -> None:
    for index, address in enumerate(["127.0.0.1", "::ffff:127.0.0.2", "169.254.169.254"]):
        await allowing.register("default", "web", f"web-{index}", expect=201, address=address)
    for address in ["::1", "fe80::1", *REFUSED_ALWAYS]:  # not admitted, or never admissible
        body = json.dumps({"address": address}).encode()
        assert_problem(await allowing.request("PUT", INST + "x", data=body), 400, "address")
    await settle(allowing)
    assert await allowing.addresses(f"web-0.web.default.svc.{ZONE}") == {"127.0.0.1"}


def test_allow_address_flag_and_environment() -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["serve", "--allow-address", "127.0.0.0/8", "--allow-address", "fe80::/10"]
    )
    config = config_from(args, {})
    assert config.allow_address == (
        ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("fe80::/10")
    )
    env = {"DISCOVERY_ALLOW_ADDRESS": "127.0.0.1, 169.254.169.254/32"}
    config = config_from(parser.parse_args(["serve"]), env)
    assert config.allow_address == (
        ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("169.254.169.254/32")
    )
    assert config_from(parser.parse_args(["serve"]), {}).allow_address == ()
    with pytest.raises(ConfigError, match="--allow-address: 'nope'"):
        config_from(parser.parse_args(["serve", "--allow-address", "nope"]), {})


# names (RFC 1035 2.3.4: 255 octets; RFC 6335 5.1: a service name of at most 15 characters)


async def test_port_name_over_15_characters_is_refused(client: Client) -> None:
    ok = {"address": "10.0.0.1", "ports": [{"name": "a" * 15, "port": 80}]}
    await client.register("default", "web", "web-1", expect=201, **ok)
    long = {"address": "10.0.0.1", "ports": [{"name": "a" * 16, "port": 80}]}
    response = await client.request("PUT", INST + "web-2", data=json.dumps(long).encode())
    problem = assert_problem(response, 400, "ports.0.name")
    assert "15" in problem["detail"]
    status, doc, _ = await client.request("GET", "/openapi.json")
    assert status == 200
    assert doc["components"]["schemas"]["Port"]["properties"]["name"]["maxLength"] == 15


@pytest.fixture
async def long_zone() -> AsyncIterator[Client]:
    zone = ".".join(["z" * 63, "y" * 35])  # 99 characters: legal, and long
    async with run_server(make_config(zones=(zone,))) as server:
        async with aiohttp.ClientSession() as session:
            await server.registry.wait(lambda: server.registry.synced, 5)
            yield Client(server, session)


async def test_names_over_255_octets_are_refused(long_zone: Client) -> None:
    client, zone = long_zone, long_zone.server.config.zones[0]
    label = "a" * 63
    path = f"/v1/services/{label}/{label}/instances/{label}"
    body = json.dumps({"address": "10.0.0.1"}).encode()
    problem = assert_problem(await client.request("PUT", path, data=body), 400, "inst")
    assert "255" in problem["detail"]
    # a port that makes only the SRV names too long
    ns, svc, inst, port = "a" * 63, "b" * 63, "c", "p" * 15
    with_port = {"address": "10.0.0.1", "ports": [{"name": port, "port": 80, "protocol": "sctp"}]}
    path = f"/v1/services/{ns}/{svc}/instances/{inst}"
    srv = f"_{port}._sctp.{svc}.{ns}.svc.{zone}"
    target = dns.name.from_text(f"{inst}.{svc}.{ns}.svc.{zone}")
    assert len(target.to_wire()) <= 255 < len(srv) + 2  # the case is the one meant
    with pytest.raises(dns.name.NameTooLong):
        dns.name.from_text(srv)
    response = await client.request("PUT", path, data=json.dumps(with_port).encode())
    assert_problem(response, 400, "ports.0.name")
    # what fits is served, and dig-able names come back
    await client.register(ns, svc, inst, expect=201, address="10.0.0.1")
    await settle(client)
    answer = await client.query(target.to_text(), "A")
    assert [rr.to_text() for rrset in answer.answer for rr in rrset] == ["10.0.0.1"]
    ptr = await client.query("1.0.0.10.in-addr.arpa", "PTR")
    assert [rr.target for rrset in ptr.answer for rr in rrset] == [target]


# failures that are the client's, never the server's


@pytest.mark.parametrize(
    "metadata",
    [b'"\\ud800"', b'"x\\udfff"', b'"\xed\xa0\x80"'],
    ids=["escaped-high", "escaped-low", "raw-bytes"],
)
async def test_lone_surrogate_is_400(client: Client, metadata: bytes) -> None:
    body = b'{"address": "10.0.0.1", "metadata": {"k": ' + metadata + b"}}"
    problem = assert_problem(await client.request("PUT", INST + "web-1", data=body), 400, "body")
    assert "surrogate" in problem["detail"]
    pair = b'{"address": "10.0.0.1", "metadata": {"k": "\\ud83d\\ude00"}}'  # a real character
    status, stored, _ = await client.request("PUT", INST + "web-1", data=pair)
    assert status == 201 and stored["metadata"] == {"k": "\U0001f600"}


async def test_client_leaving_mid_body_is_no_server_error(
    client: Client, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    host, port = server.http_address
    for _ in range(3):
        _, writer = await asyncio.open_connection(host, port)
        writer.write(
            b"PUT " + INST.encode() + b"web-1 HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"addr"
        )
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    route = '"route": "/v1/services/{ns}/{svc}/instances/{inst}"'

    async def counted() -> float:
        return sum(v for k, v in (await scrape(client)).items() if route in k and "499" in k)

    async def all_counted() -> bool:  # the server's side of a closed socket raises no event
        return await counted() >= 3

    await eventually(all_counted, "three requests counted as 499", within=5)
    samples = await scrape(client)
    assert not [k for k in samples if route in k and '"status": "5' in k]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
