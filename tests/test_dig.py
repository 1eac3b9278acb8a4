"""`dig` as an independent client of a running server."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from dataclasses import dataclass, field

import pytest
from conftest import Client

SERVICE = "web.default.svc.cluster.local"
INSTANCE = f"web-1.{SERVICE}"


@pytest.fixture(autouse=True)
def dig_installed() -> None:
    if shutil.which("dig") is None:
        if os.environ.get("CI"):
            pytest.fail("dig is not installed (apt-get install dnsutils / bind-utils)")
        pytest.skip("dig is not installed")


@dataclass
class Dig:
    """dig's default output, split into header fields and sections of record lines."""

    status: str = ""
    flags: set[str] = field(default_factory=set)
    transport: str = ""
    edns: int | None = None
    sections: dict[str, list[list[str]]] = field(default_factory=dict)

    def records(self, section: str) -> list[list[str]]:
        return self.sections.get(section, [])

    def rdata(self, section: str, rdtype: str) -> list[str]:
        return [" ".join(r[4:]) for r in self.records(section) if r[3] == rdtype]

    @classmethod
    def parse(cls, text: str) -> Dig:
        out = cls()
        section = ""
        for line in text.splitlines():
            if match := re.search(r"status: (\w+)", line):
                out.status = match.group(1)
            elif match := re.match(r";; flags: ([\w ]*);", line):
                out.flags = set(match.group(1).split())
            elif match := re.match(r"; EDNS: version: (\d+)", line):
                out.edns = int(match.group(1))
            elif match := re.match(r";; SERVER: .*\((UDP|TCP)\)", line):
                out.transport = match.group(1)
            elif match := re.match(r";; (\w+) SECTION:", line):
                section = match.group(1)
                out.sections[section] = []
            elif not line.strip():
                section = ""
            elif section == "QUESTION":
                out.sections[section].append(line.lstrip(";").split())
            elif section and not line.startswith(";"):
                out.sections[section].append(line.split())
        return out


async def dig(client: Client, *args: str) -> Dig:
    host, port = client.dns
    process = await asyncio.create_subprocess_exec(
        "dig",
        f"@{host}",
        "-p",
        str(port),
        "+tries=1",
        "+time=3",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(15):
        stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode() + stdout.decode()
    return Dig.parse(stdout.decode())


@pytest.fixture
async def registered(client: Client) -> Client:
    await client.register(
        "default",
        "web",
        "web-1",
        address="10.1.2.3",
        ports=[{"name": "http", "port": 8080, "protocol": "tcp"}],
        ttl=30,
    )
    await client.register("default", "web6", "web6-1", address="fd00::1", ttl=30)
    server = client.server
    assert await client.wait_cache(
        lambda: all(("default", s) in server.registry.services() for s in ("web", "web6"))
    )
    return client


async def test_a(registered: Client) -> None:
    result = await dig(registered, SERVICE, "A")
    assert result.status == "NOERROR"
    assert {"qr", "aa"} <= result.flags
    assert result.rdata("ANSWER", "A") == ["10.1.2.3"]
    assert result.records("ANSWER")[0][:3] == [SERVICE + ".", "5", "IN"]
    assert result.transport == "UDP"
    assert result.edns == 0  # dig asks with EDNS (and a cookie); the answer has an OPT


async def test_aaaa(registered: Client) -> None:
    result = await dig(registered, "web6.default.svc.cluster.local", "AAAA")
    assert result.status == "NOERROR"
    assert result.rdata("ANSWER", "AAAA") == ["fd00::1"]


async def test_aaaa_of_an_ipv4_name_is_nodata(registered: Client) -> None:
    result = await dig(registered, SERVICE, "AAAA")
    assert result.status == "NOERROR"
    assert result.records("ANSWER") == []
    assert [r[3] for r in result.records("AUTHORITY")] == ["SOA"]


async def test_srv_with_target_address_in_additional(registered: Client) -> None:
    result = await dig(registered, f"_http._tcp.{SERVICE}", "SRV")
    assert result.status == "NOERROR"
    assert result.rdata("ANSWER", "SRV") == [f"0 100 8080 {INSTANCE}."]
    additional = [(r[0], r[3], r[4]) for r in result.records("ADDITIONAL")]
    assert additional == [(INSTANCE + ".", "A", "10.1.2.3")]


async def test_reverse_lookup(registered: Client) -> None:
    result = await dig(registered, "-x", "10.1.2.3")
    assert result.status == "NOERROR"
    assert result.records("ANSWER")[0][0] == "3.2.1.10.in-addr.arpa."
    assert result.rdata("ANSWER", "PTR") == [INSTANCE + "."]


async def test_reverse_lookup_ipv6(registered: Client) -> None:
    result = await dig(registered, "-x", "fd00::1")
    assert result.status == "NOERROR"
    assert result.rdata("ANSWER", "PTR") == ["web6-1.web6.default.svc.cluster.local."]


async def test_soa(registered: Client) -> None:
    result = await dig(registered, "cluster.local", "SOA")
    assert result.status == "NOERROR"
    assert "aa" in result.flags
    (soa,) = result.rdata("ANSWER", "SOA")
    mname, rname, serial, *_timers, minimum = soa.split()
    assert mname.endswith("cluster.local.") and rname.endswith(".")
    assert int(serial) > 0  # two registrations happened
    assert minimum == "5"  # the negative TTL


async def test_nxdomain(registered: Client) -> None:
    result = await dig(registered, "nope.default.svc.cluster.local", "A")
    assert result.status == "NXDOMAIN"
    assert "aa" in result.flags
    assert result.records("ANSWER") == []
    assert [(r[0], r[3]) for r in result.records("AUTHORITY")] == [("cluster.local.", "SOA")]


async def test_outside_the_zone_is_refused(registered: Client) -> None:
    result = await dig(registered, "example.org", "A")
    assert result.status == "REFUSED"


async def test_over_tcp(registered: Client) -> None:
    result = await dig(registered, "+tcp", SERVICE, "A")
    assert result.transport == "TCP"
    assert result.status == "NOERROR"
    assert result.rdata("ANSWER", "A") == ["10.1.2.3"]


async def test_srv_over_tcp_without_edns(registered: Client) -> None:
    result = await dig(registered, "+tcp", "+noedns", f"_http._tcp.{SERVICE}", "SRV")
    assert result.transport == "TCP"
    assert result.rdata("ANSWER", "SRV") == [f"0 100 8080 {INSTANCE}."]
    assert result.edns is None


async def test_mixed_case_name_is_echoed_as_sent(registered: Client) -> None:
    name = "WeB.DeFaUlT.SvC.ClUsTeR.LoCaL"
    result = await dig(registered, name, "A")
    assert result.status == "NOERROR"
    assert result.records("QUESTION") == [[name + ".", "IN", "A"]]
    assert result.rdata("ANSWER", "A") == ["10.1.2.3"]
    assert result.records("ANSWER")[0][0].lower() == SERVICE + "."


async def test_mixed_case_name_is_echoed_as_sent_over_tcp(registered: Client) -> None:
    name = "_HTTP._Tcp.wEb.default.svc.CLUSTER.local"
    result = await dig(registered, "+tcp", name, "SRV")
    assert result.records("QUESTION") == [[name + ".", "IN", "SRV"]]
    assert result.rdata("ANSWER", "SRV") == [f"0 100 8080 {INSTANCE}."]
