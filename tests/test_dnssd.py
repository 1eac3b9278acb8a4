"""DNS-SD (RFC 6763) browsing of a namespace, through a real server, with dnspython and dig."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from conftest import Client, make_config

from discovery.model import InstanceKey
from discovery.server import Server, run_server

ZONE = "cluster.local"
NS = "shop"
SUFFIX = f"{NS}.svc.{ZONE}"


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    async with run_server(make_config(zones=(ZONE, "example.org"))) as running:
        await running.registry.wait(lambda: running.registry.synced, 5)
        yield running


@pytest.fixture
async def client(server: Server) -> AsyncIterator[Client]:
    async with aiohttp.ClientSession() as session:
        yield Client(server, session)


async def populate(client: Client) -> None:
    await client.register(
        NS, "web", "web-1", address="10.1.0.1", ports=[{"name": "http", "port": 8080}],
        metadata={"version": "1.4.2", "path": "/api v2"}, priority=1, weight=20, ttl=30,
    )  # fmt: skip
    await client.register(
        NS, "web", "web-2", address="10.1.0.2", ports=[{"name": "http", "port": 8081}], ttl=30
    )
    await client.register(
        NS, "db", "db-1", address="fd00::5", ports=[{"name": "pg", "port": 5432}], ttl=3
    )
    await client.register(
        NS, "resolver", "r-1", address="10.1.0.9",
        ports=[{"name": "dns", "port": 53, "protocol": "udp"}], ttl=30,
    )  # fmt: skip
    await client.register(NS, "plain", "p-1", address="10.1.0.10", ttl=30)  # no ports
    await client.register("other", "web", "o-1", address="10.2.0.1",
                          ports=[{"name": "http", "port": 80}])  # fmt: skip


def texts(response: dns.message.Message, rdtype: int) -> set[str]:
    return {
        rr.to_text() for rrset in response.answer if rrset.rdtype == rdtype for rr in rrset
    }


async def browse(client: Client, namespace: str, zone: str = ZONE) -> dict[str, Any]:
    """What a DNS-SD browser does (RFC 6763 4, 9): enumerate service types, then instances,
    then resolve each to SRV, TXT and addresses."""
    found: dict[str, Any] = {}
    domain = f"{namespace}.svc.{zone}"
    types = await client.query(f"_services._dns-sd._udp.{domain}", "PTR")
    assert types.rcode() == dns.rcode.NOERROR and types.flags & dns.flags.AA
    for service_type in sorted(texts(types, dns.rdatatype.PTR)):
        instances = await client.query(service_type, "PTR")
        for instance_name in sorted(texts(instances, dns.rdatatype.PTR)):
            srv = await client.query(instance_name, "SRV")
            txt = await client.query(instance_name, "TXT")
            (srv_set,) = srv.answer
            (txt_set,) = txt.answer
            record = next(iter(srv_set))
            glue = {rr.to_text() for rrset in srv.additional for rr in rrset}
            pairs = [s.decode() for rr in txt_set for s in rr.strings]
            found[instance_name] = {
                "srv": (record.priority, record.weight, record.port, record.target.to_text()),
                "glue": glue,
                "txt": pairs,
            }
    return found


async def test_browse_a_namespace(client: Client) -> None:
    await populate(client)
    fast_before = client.server.resolver.stats.fast
    full_before = client.server.resolver.stats.full
    found = await browse(client, NS)
    assert found == {
        f"db-1._pg._tcp.{SUFFIX}.": {
            "srv": (0, 100, 5432, f"db-1.db.{SUFFIX}."), "glue": {"fd00::5"}, "txt": [""],
        },
        f"r-1._dns._udp.{SUFFIX}.": {
            "srv": (0, 100, 53, f"r-1.resolver.{SUFFIX}."), "glue": {"10.1.0.9"}, "txt": [""],
        },
        f"web-1._http._tcp.{SUFFIX}.": {
            "srv": (1, 20, 8080, f"web-1.web.{SUFFIX}."),
            "glue": {"10.1.0.1"},
            "txt": ["version=1.4.2", "path=/api v2"],
        },
        f"web-2._http._tcp.{SUFFIX}.": {
            "srv": (0, 100, 8081, f"web-2.web.{SUFFIX}."), "glue": {"10.1.0.2"}, "txt": [""],
        },
    }  # fmt: skip
    stats = client.server.resolver.stats
    assert stats.full == full_before, "DNS-SD names are served by the fast path"
    assert stats.fast - fast_before == 1 + 3 + 4 * 2  # types, instances, SRV + TXT each
    # every zone has the same names; other namespaces are apart
    assert (await browse(client, NS, "example.org")).keys() == {
        name.replace(ZONE, "example.org") for name in found
    }
    assert list(await browse(client, "other")) == [f"o-1._http._tcp.other.svc.{ZONE}."]


async def test_ttls_names_and_empty_non_terminals(client: Client) -> None:
    await populate(client)
    srv = await client.query(f"db-1._pg._tcp.{SUFFIX}", "SRV")
    assert srv.answer[0].ttl == 3, "never longer than the lease"
    pointers = await client.query(f"_pg._tcp.{SUFFIX}", "PTR")
    assert pointers.answer[0].ttl == 3
    for empty in (f"_tcp.{SUFFIX}", f"_udp.{SUFFIX}", f"_dns-sd._udp.{SUFFIX}", SUFFIX):
        response = await client.query(empty, "PTR")
        assert response.rcode() == dns.rcode.NOERROR and not response.answer, empty
        assert response.authority, "NODATA carries the SOA"
    missing_names = (
        f"web-9._http._tcp.{SUFFIX}",
        f"_ftp._tcp.{SUFFIX}",
        f"web-1._pg._tcp.{SUFFIX}",
        f"_services._dns-sd._udp.none.svc.{ZONE}",
    )
    for missing in missing_names:
        response = await client.query(missing, "PTR")
        assert response.rcode() == dns.rcode.NXDOMAIN, missing
    # the 0x20 spelling is echoed, the data stays lower case
    response = await client.query(f"WeB-1._HTTP._tcp.{SUFFIX.upper()}", "SRV")
    assert response.question[0].name.to_text().startswith("WeB-1._HTTP")
    assert next(iter(response.answer[0])).target.to_text() == f"web-1.web.{SUFFIX}."


async def test_changes_follow_registrations(client: Client) -> None:
    await populate(client)
    registry = client.server.registry
    status, _, _ = await client.request("DELETE", f"/v1/services/{NS}/web/instances/web-2")
    assert status == 204
    pointers = await client.query(f"_http._tcp.{SUFFIX}", "PTR")
    assert texts(pointers, dns.rdatatype.PTR) == {f"web-1._http._tcp.{SUFFIX}."}
    assert (await client.query(f"web-2._http._tcp.{SUFFIX}", "SRV")).rcode() == dns.rcode.NXDOMAIN
    # new metadata, new port: TXT and the service types follow
    await client.register(
        NS, "web", "web-1", address="10.1.0.1",
        ports=[{"name": "http", "port": 8080}, {"name": "metrics", "port": 9100}],
        metadata={"version": "1.5.0"},
    )  # fmt: skip
    txt = await client.query(f"web-1._http._tcp.{SUFFIX}", "TXT")
    assert texts(txt, dns.rdatatype.TXT) == {'"version=1.5.0"'}
    types = await client.query(f"_services._dns-sd._udp.{SUFFIX}", "PTR")
    assert f"_metrics._tcp.{SUFFIX}." in texts(types, dns.rdatatype.PTR)
    # the last instance with a port type goes: the type leaves the enumeration
    for path in ("web/instances/web-1", "db/instances/db-1", "resolver/instances/r-1"):
        await client.request("DELETE", f"/v1/services/{NS}/{path}")
    assert await registry.wait(lambda: not registry.instances((NS, "web")), 5)
    types = await client.query(f"_services._dns-sd._udp.{SUFFIX}", "PTR")
    assert types.rcode() == dns.rcode.NXDOMAIN, "p-1 has no ports: nothing to browse"
    assert (await client.query(f"_tcp.{SUFFIX}", "A")).rcode() == dns.rcode.NXDOMAIN
    assert (await client.query(SUFFIX, "A")).rcode() == dns.rcode.NOERROR  # p-1 is there


async def test_same_instance_name_in_two_services(client: Client) -> None:
    for service, address, port in (("web", "10.3.0.1", 80), ("api", "10.3.0.2", 81)):
        await client.register(
            NS, service, "x", address=address, ports=[{"name": "http", "port": port}],
            metadata={"service": service},
        )  # fmt: skip
    pointers = await client.query(f"_http._tcp.{SUFFIX}", "PTR")
    assert texts(pointers, dns.rdatatype.PTR) == {f"x._http._tcp.{SUFFIX}."}
    srv = await client.query(f"x._http._tcp.{SUFFIX}", "SRV")
    targets = {(rr.port, rr.target.to_text()) for rr in srv.answer[0]}
    assert targets == {(80, f"x.web.{SUFFIX}."), (81, f"x.api.{SUFFIX}.")}
    txt = await client.query(f"x._http._tcp.{SUFFIX}", "TXT")
    assert texts(txt, dns.rdatatype.TXT) == {'"service=api"'}, "the first service by name"
    await client.request("DELETE", f"/v1/services/{NS}/api/instances/x")
    txt = await client.query(f"x._http._tcp.{SUFFIX}", "TXT")
    assert texts(txt, dns.rdatatype.TXT) == {'"service=web"'}


@pytest.mark.parametrize(
    "metadata",
    [{"a=b": "x"}, {"clé": "x"}, {"new\nline": "x"}, {"k": "v" * 254}],
    ids=["equals-in-key", "non-ascii-key", "control-in-key", "over-255-bytes"],
)
async def test_metadata_txt_cannot_carry_is_refused(
    client: Client, metadata: dict[str, str]
) -> None:
    status, body, _ = await client.request(
        "PUT", f"/v1/services/{NS}/web/instances/bad",
        json={"address": "10.0.0.1", "ports": [{"name": "http", "port": 80}], "metadata": metadata},
    )  # fmt: skip
    assert status == 400, body
    assert body["errors"][0]["field"] == "metadata"
    assert "RFC 6763" in body["detail"] or "255 bytes" in body["detail"]
    # what TXT can carry: any UTF-8 value, '=' and spaces in values, printable keys
    fine = {"k~!": "a = b ünï", "empty": ""}
    await client.register(NS, "web", "fine", address="10.0.0.1",
                          ports=[{"name": "http", "port": 80}], metadata=fine)  # fmt: skip
    txt = await client.query(f"fine._http._tcp.{SUFFIX}", "TXT")
    strings = [s.decode() for rr in txt.answer[0] for s in rr.strings]
    assert strings == ["k~!=a = b ünï", "empty="]


async def test_records_stored_before_the_rule_leave_bad_entries_out(server: Server) -> None:
    key = InstanceKey(NS, "web", "old").store_key(server.config.etcd_prefix)
    value = {
        "address": "10.0.0.7", "ports": [{"name": "http", "port": 80, "protocol": "tcp"}],
        "ttl": 30, "priority": 0, "weight": 100, "tags": [],
        "metadata": {"ok": "1", "a=b": "2", "big": "x" * 300},
    }  # fmt: skip
    lease = await server.store.grant(30)
    await server.store.put(key, json.dumps(value).encode(), lease)
    assert await server.registry.wait(lambda: bool(server.registry.instances((NS, "web"))), 5)
    async with aiohttp.ClientSession() as session:
        client = Client(server, session)
        txt = await client.query(f"old._http._tcp.{SUFFIX}", "TXT")
        assert texts(txt, dns.rdatatype.TXT) == {'"ok=1"'}


DIG = shutil.which("dig")


@pytest.mark.skipif(DIG is None, reason="dig is not installed (apt-get install bind9-dnsutils)")
async def test_browse_with_dig(client: Client) -> None:
    await populate(client)
    host, port = client.dns

    async def dig(*args: str) -> list[str]:
        assert DIG is not None
        proc = await asyncio.create_subprocess_exec(
            DIG, f"@{host}", "-p", str(port), "+short", "+time=3", "+tries=2", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        out, _ = await proc.communicate()
        assert proc.returncode == 0
        return sorted(out.decode().split("\n")[:-1])

    assert await dig(f"_services._dns-sd._udp.{SUFFIX}", "PTR") == sorted(
        [f"_dns._udp.{SUFFIX}.", f"_http._tcp.{SUFFIX}.", f"_pg._tcp.{SUFFIX}."]
    )
    assert await dig(f"_http._tcp.{SUFFIX}", "PTR") == [
        f"web-1._http._tcp.{SUFFIX}.", f"web-2._http._tcp.{SUFFIX}.",
    ]  # fmt: skip
    assert await dig(f"web-1._http._tcp.{SUFFIX}", "SRV") == [f"1 20 8080 web-1.web.{SUFFIX}."]
    assert await dig(f"web-1._http._tcp.{SUFFIX}", "TXT") == ['"version=1.4.2" "path=/api v2"']
    assert await dig(f"web-1.web.{SUFFIX}", "A") == ["10.1.0.1"]
