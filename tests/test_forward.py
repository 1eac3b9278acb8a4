"""Forwarding names outside the zones (`--upstream`) to real upstreams on loopback: dnsmasq, a
second discovery, and scripted ones that are dead, slow, truncating or lying."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from conftest import Client, make_config
from upstream_support import dnsmasq_binary, free_udp_port, scripted_upstream
from waiting import eventually

from discovery.config import Config, ConfigError, HostPort, parse_upstreams
from discovery.dns.forward import Entry, Forwarder, Rejected, Upstream, check_header
from discovery.server import Server, run_server

NAME = "www.example.test."
RECORDS = {NAME: (300, ["192.0.2.10"]), "two.example.test.": (300, ["192.0.2.21", "192.0.2.22"])}


def upstreams(*addresses: str) -> tuple[HostPort, ...]:
    return tuple(HostPort.parse(a) for a in addresses)


@asynccontextmanager
async def forwarding(*addresses: str, **overrides: object) -> AsyncIterator[Client]:
    config = make_config(upstream=upstreams(*addresses), **overrides)
    async with run_server(config) as server, aiohttp.ClientSession() as session:
        await server.registry.wait(lambda: server.registry.synced, 5)
        yield Client(server, session)


async def ask(
    client: Client, name: str, rdtype: str = "A", *, tcp: bool = False, **make: object
) -> dns.message.Message:
    message = dns.message.make_query(name, rdtype, **make)  # type: ignore[arg-type]
    host, port = client.dns
    if tcp:
        return await dns.asyncquery.tcp(message, host, port=port, timeout=10)
    return await dns.asyncquery.udp(message, host, port=port, timeout=10, ignore_trailing=False)


def addresses(response: dns.message.Message) -> list[str]:
    return sorted(rr.to_text() for rrset in response.answer for rr in rrset)


async def metric(client: Client, name: str) -> float:
    status, body, _ = await client.request("GET", "/metrics")
    assert status == 200
    for line in body.splitlines():
        if line.rsplit(" ", 1)[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


# dnsmasq and a second discovery


@pytest.fixture
def dnsmasq(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """dnsmasq answering www.example.test from a hosts file (TTL 60), NXDOMAIN for the rest of
    example.test: its address and process."""
    binary = dnsmasq_binary()
    hosts = tmp_path / "hosts"
    hosts.write_text("192.0.2.10 www.example.test\n")
    port = free_udp_port()
    proc = subprocess.Popen(
        [binary, "-k", "--no-resolv", "--no-hosts", f"--port={port}",
         "--listen-address=127.0.0.1", "--bind-interfaces", f"--addn-hosts={hosts}",
         "-C", "/dev/null", "--local=/example.test/", "--local-ttl=60", "--user=root",
         f"--pid-file={tmp_path / 'dnsmasq.pid'}", "--log-facility=-"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        query = dns.message.make_query(NAME, "A")
        for _ in range(100):
            try:
                if dns.query.udp(query, "127.0.0.1", port=port, timeout=0.2).answer:
                    break
            except (dns.exception.Timeout, ConnectionRefusedError):
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        else:
            raise AssertionError("dnsmasq did not answer")
        yield f"127.0.0.1:{port}", proc
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


async def test_forwards_to_dnsmasq_with_ra_and_caches(
    dnsmasq: tuple[str, subprocess.Popen[bytes]],
) -> None:
    address, process = dnsmasq
    async with forwarding(address) as client:
        response = await ask(client, "WwW.Example.TEST.")
        assert response.rcode() == dns.rcode.NOERROR
        assert addresses(response) == ["192.0.2.10"]
        assert response.flags & dns.flags.RA and not response.flags & dns.flags.AA
        assert response.question[0].name.to_text() == "WwW.Example.TEST."  # echoed as sent
        assert 0 < response.answer[0].ttl <= 60
        assert (await ask(client, "nope.example.test.")).rcode() == dns.rcode.NXDOMAIN
        # in-zone names are still ours, authoritative, now with RA=1
        await client.register("default", "web", "web-1", address="10.1.2.3")
        local = await ask(client, "web.default.svc.cluster.local.")
        assert addresses(local) == ["10.1.2.3"]
        assert local.flags & dns.flags.AA and local.flags & dns.flags.RA
        # dnsmasq stops: the cached answer is still served, over UDP and TCP, EDNS or not
        process.terminate()
        await asyncio.to_thread(process.wait, 10)
        for tcp in (False, True):
            for edns in (-1, 0):
                cached = await ask(client, NAME, tcp=tcp, use_edns=edns)
                assert addresses(cached) == ["192.0.2.10"], (tcp, edns)
                assert (cached.edns >= 0) == (edns >= 0)
        assert await metric(client, "discovery_forward_cache_hits_total") >= 4
        assert await metric(client, "discovery_forward_queries_total") >= 6


async def test_forwards_to_a_second_discovery_with_negative_caching() -> None:
    other = dataclasses.replace(make_config(), zones=("example.internal",), negative_ttl=300)
    async with run_server(other) as upstream, aiohttp.ClientSession() as session:
        await upstream.registry.wait(lambda: upstream.registry.synced, 5)
        remote = Client(upstream, session)
        await remote.register("default", "db", "db-1", address="10.9.0.1", ttl=60)
        host, port = upstream.dns_address
        async with forwarding(f"{host}:{port}") as client:
            found = await ask(client, "db.default.svc.example.internal.")
            assert addresses(found) == ["10.9.0.1"]
            assert found.flags & dns.flags.RA and not found.flags & dns.flags.AA
            missing = await ask(client, "cache.default.svc.example.internal.")
            assert missing.rcode() == dns.rcode.NXDOMAIN
            assert missing.authority[0].rdtype == dns.rdatatype.SOA  # RFC 2308: SOA kept
            # the name appears upstream, but the NXDOMAIN is cached for the SOA's minimum
            await remote.register("default", "cache", "cache-1", address="10.9.0.2", ttl=60)
            assert addresses(await remote.query("cache.default.svc.example.internal.")) == [
                "10.9.0.2"
            ]
            again = await ask(client, "cache.default.svc.example.internal.")
            assert again.rcode() == dns.rcode.NXDOMAIN
            # DO=1: not cached, asked upstream again
            fresh = await ask(client, "cache.default.svc.example.internal.", want_dnssec=True)
            assert addresses(fresh) == ["10.9.0.2"]


async def test_cached_ttls_count_down_and_negative_answers_expire_by_soa() -> None:
    async with scripted_upstream(RECORDS, negative_ttl=1) as upstream:
        async with forwarding(upstream.address) as client:
            first = await ask(client, NAME)
            assert first.answer[0].ttl == 300
            assert (await ask(client, "gone.example.test.")).rcode() == dns.rcode.NXDOMAIN
            asked = upstream.udp_queries

            async def aged() -> bool:
                return (await ask(client, NAME)).answer[0].ttl < 300

            await eventually(aged, "cached TTL counting down", within=5)
            assert upstream.udp_queries == asked  # all from the cache

            async def expired() -> bool:
                await ask(client, "gone.example.test.")
                return upstream.udp_queries > asked

            await eventually(expired, "negative answer expiring after the SOA minimum", within=5)


# unhealthy and hostile upstreams


async def test_dead_upstream_is_skipped_then_probed_back() -> None:
    dead = free_udp_port()
    async with scripted_upstream(RECORDS) as good:
        async with forwarding(f"127.0.0.1:{dead}", good.address, upstream_timeout=1.0) as client:
            for i in range(3):  # distinct names: none from the cache
                response = await ask(client, f"n{i}.example.test.")
                assert response.rcode() == dns.rcode.NXDOMAIN
            label = f'discovery_forward_upstream_up{{upstream="127.0.0.1:{dead}"}}'
            assert await metric(client, label) == 0
            failures = (
                f'discovery_forward_upstream_failures_total{{reason="refused",'
                f'upstream="127.0.0.1:{dead}"}}'
            )
            assert await metric(client, failures) == 2  # then skipped
            # something answers on that port again: the background probe marks it up
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Echo(), local_addr=("127.0.0.1", dead)
            )
            try:

                async def up() -> bool:
                    return await metric(client, label) == 1

                await eventually(up, "the revived upstream marked up", within=10)
            finally:
                transport.close()


class _Echo(asyncio.DatagramProtocol):
    """Answers every query with an empty NOERROR response: alive, as far as a probe cares."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        response = dns.message.make_response(dns.message.from_wire(data))
        self.transport.sendto(response.to_wire(), addr)  # type: ignore[attr-defined]


async def test_slow_upstream_falls_through_to_the_next() -> None:
    async with scripted_upstream(RECORDS, delay=5) as slow, scripted_upstream(RECORDS) as fast:
        async with forwarding(slow.address, fast.address, upstream_timeout=0.5) as client:
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert addresses(await ask(client, NAME)) == ["192.0.2.10"]
            assert loop.time() - started < 4
            assert slow.udp_queries == 1 and fast.udp_queries == 1


async def test_truncated_udp_answer_is_asked_again_over_tcp() -> None:
    async with scripted_upstream(RECORDS, truncate_udp=True) as upstream:
        async with forwarding(upstream.address) as client:
            response = await ask(client, "two.example.test.")
            assert addresses(response) == ["192.0.2.21", "192.0.2.22"]
            assert not response.flags & dns.flags.TC
            assert (upstream.udp_queries, upstream.tcp_queries) == (1, 1)


@pytest.mark.parametrize("lie", ["id", "question", "address"])
async def test_lying_upstream_is_not_believed(lie: str) -> None:
    """Answers with another ID, another question, or from another port are dropped: the honest
    upstream's answer is used; alone, the liar gets the client a SERVFAIL."""
    async with scripted_upstream(RECORDS, lie=lie) as liar, scripted_upstream(
        {NAME: (300, ["192.0.2.99"])}
    ) as honest:
        async with forwarding(liar.address, honest.address, upstream_timeout=0.5) as client:
            assert addresses(await ask(client, NAME)) == ["192.0.2.99"]
            # another port: the connected socket never lets it through, so it ends in a timeout
            reason = "timeout" if lie == "address" else lie
            failures = "discovery_forward_upstream_failures_total"
            labels = f'{{reason="{reason}",upstream="{liar.address}"}}'
            assert await metric(client, failures + labels) == 1
        async with forwarding(liar.address, upstream_timeout=0.5) as client:
            response = await ask(client, "two.example.test.")
            assert response.rcode() == dns.rcode.SERVFAIL
            assert response.flags & dns.flags.RA
            assert await metric(client, "discovery_forward_servfail_total") == 1


async def test_no_upstream_answers_servfail() -> None:
    async with forwarding(f"127.0.0.1:{free_udp_port()}", upstream_timeout=0.5) as client:
        for tcp in (False, True):
            response = await ask(client, NAME, tcp=tcp, use_edns=0)
            assert response.rcode() == dns.rcode.SERVFAIL
            assert response.question[0].name.to_text() == NAME


async def test_answer_larger_than_the_client_size_is_truncated_for_udp() -> None:
    many = [f"192.0.2.{i}" for i in range(1, 101)]  # 100 A records: 1,600+ bytes
    async with scripted_upstream({"many.example.test.": (300, many)}) as upstream:
        async with forwarding(upstream.address) as client:
            full = await ask(client, "many.example.test.", tcp=True)
            assert len(addresses(full)) == 100 and not full.flags & dns.flags.TC
            for edns, payload, limit in ((-1, 512, 512), (0, 1232, 1232), (0, 4096, 1232)):
                message = dns.message.make_query(
                    "many.example.test.", "A", use_edns=edns, payload=payload
                )
                host, port = client.dns
                wire = await _raw_udp(message.to_wire(), (host, port))
                assert len(wire) <= limit, (edns, payload, len(wire))
                response = dns.message.from_wire(wire)
                assert response.flags & dns.flags.TC
                assert 0 < len(addresses(response)) < 100
            assert upstream.tcp_queries == 1  # the full answer was cached once


async def _raw_udp(wire: bytes, address: tuple[str, int]) -> bytes:
    loop = asyncio.get_running_loop()
    received: asyncio.Future[bytes] = loop.create_future()

    class Receiver(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            if not received.done():
                received.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(Receiver, remote_addr=address)
    try:
        transport.sendto(wire)
        async with asyncio.timeout(10):
            return await received
    finally:
        transport.close()


async def test_without_upstream_outside_names_are_refused(client: Client) -> None:
    response = await ask(client, NAME)
    assert response.rcode() == dns.rcode.REFUSED
    assert not response.flags & dns.flags.RA


async def test_zone_transfers_outside_the_zones_are_not_forwarded() -> None:
    async with scripted_upstream(RECORDS) as upstream, forwarding(upstream.address) as client:
        response = await ask(client, "example.test.", "AXFR", tcp=True)
        assert response.rcode() == dns.rcode.NOTIMP
        assert upstream.udp_queries == upstream.tcp_queries == 0


# --upstream parsing


def test_upstream_from_resolv_conf(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text(
        "# generated\nsearch example.test\nnameserver 192.0.2.53\noptions ndots:5\n"
        "nameserver 2001:db8::53 ; second\n"
    )
    assert parse_upstreams(str(conf)) == (HostPort("192.0.2.53", 53), HostPort("2001:db8::53", 53))
    assert parse_upstreams("192.0.2.1:5353,[2001:db8::1]:53,192.0.2.2") == (
        HostPort("192.0.2.1", 5353), HostPort("2001:db8::1", 53), HostPort("192.0.2.2", 53)
    )  # fmt: skip


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("/nonexistent/resolv.conf", "cannot read /nonexistent/resolv.conf: No such file"),
        ("EMPTY", "names no nameserver"),
        ("BAD", "'dns.example' is not an IP address"),
    ],
)
def test_bad_resolv_conf_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "EMPTY").write_text("search example.test\n# nameserver 192.0.2.1\n")
    (tmp_path / "BAD").write_text("nameserver dns.example\n")
    path = text if text.startswith("/") else str(tmp_path / text)
    with pytest.raises(ConfigError, match=message):
        parse_upstreams(path)


def test_forwarding_config_bounds() -> None:
    with pytest.raises(ConfigError, match="--upstream-timeout"):
        Config(upstream_timeout=0)
    with pytest.raises(ConfigError, match="--upstream-cache-size"):
        Config(upstream_cache_size=-1)


async def test_forwarder_survives_shutdown_with_queries_in_flight() -> None:
    async with scripted_upstream(RECORDS, delay=5) as slow:
        config = make_config(upstream=upstreams(slow.address), upstream_timeout=5.0)
        server = Server(config)
        await server.startup()
        try:
            message = dns.message.make_query(NAME, "A")
            host, port = server.dns_address
            pending = asyncio.ensure_future(
                dns.asyncquery.udp(message, host, port=port, timeout=1)
            )
            await eventually(_async(lambda: slow.udp_queries == 1), "query sent upstream", 5)
        finally:
            await server.shutdown()
        with pytest.raises(dns.exception.Timeout):
            await pending


def _async(check: object) -> object:
    async def run() -> bool:
        return bool(check())  # type: ignore[operator]

    return run



# the checks on upstream messages, without sockets


def _reply(query: dns.message.Message, **change: object) -> bytes:
    response = dns.message.make_response(query)
    response.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A", "192.0.2.1"))
    for key, value in change.items():
        setattr(response, key, value)
    return response.to_wire()


def test_check_header_rejects_what_is_not_our_answer() -> None:
    query = dns.message.make_query("www.Example.test.", "A", id=4660)
    question = query.to_wire()[12:]
    good = _reply(query)
    check_header(good, 4660, question)
    check_header(_reply(dns.message.make_query("WWW.example.TEST.", "A", id=4660)), 4660, question)
    with pytest.raises(Rejected, match="id"):
        check_header(good, 4661, question)
    with pytest.raises(Rejected, match="question"):
        check_header(_reply(dns.message.make_query("ww.example.test.", "A", id=4660)), 4660,
                     question)  # fmt: skip
    with pytest.raises(Rejected, match="question"):
        check_header(_reply(dns.message.make_query("www.example.test.", "AAAA", id=4660)), 4660,
                     question)  # fmt: skip
    with pytest.raises(Rejected, match="question"):
        check_header(query.to_wire(), 4660, question)  # a query (QR=0), not an answer
    with pytest.raises(Rejected, match="malformed"):
        check_header(good[:20], 4660, question)
    with pytest.raises(Rejected, match="malformed"):
        Entry(good[:-3], question, 0.0)


def test_sent_by_compares_address_and_port() -> None:
    upstream = Upstream("127.0.0.1", 53)
    assert upstream.sent_by(("127.0.0.1", 53))
    assert upstream.sent_by(("::ffff:127.0.0.1", 53, 0, 0))
    assert not upstream.sent_by(("127.0.0.1", 54))
    assert not upstream.sent_by(("127.0.0.2", 53))
    assert Upstream("2001:db8::1", 5353).sent_by(("2001:db8::1", 5353, 0, 0))


def test_entry_drops_opt_wherever_it_is() -> None:
    query = dns.message.make_query("www.example.test.", "A", id=1, use_edns=0)
    question = dns.message.make_query("www.example.test.", "A").to_wire()[12:]
    response = dns.message.make_response(query)
    response.answer.append(dns.rrset.from_text("www.example.test.", 60, "IN", "A", "192.0.2.1"))
    response.additional.append(
        dns.rrset.from_text("ns.example.test.", 60, "IN", "A", "192.0.2.53")
    )
    wire = bytearray(response.to_wire())  # dnspython puts OPT last: move it first
    opt = wire[-11:]
    body_start = 12 + len(question) + 16  # header, question, the answer record
    wire = wire[:body_start] + opt + wire[body_start:-11]
    entry = Entry(bytes(wire), question, 0.0)
    assert entry.sections == (1, 0, 1)
    parsed = dns.message.from_wire(entry.response(b"\x00\x07", 1, question, False, 1000, 0.0))
    assert [rrset.to_text() for rrset in parsed.additional] == [
        "ns.example.test. 60 IN A 192.0.2.53"
    ]


async def test_an_upstream_that_is_this_server_is_dropped_or_refused() -> None:
    for _ in range(10):  # the port is free when picked; another process may take it first
        port = free_udp_port()
        looping = make_config(
            dns=HostPort("127.0.0.1", port), upstream=upstreams(f"127.0.0.1:{port}")
        )
        try:
            async with run_server(looping):
                pass
        except ConfigError as error:
            assert "own DNS listener: queries would loop" in str(error)
            break
        except OSError as error:
            assert "address already in use" in str(error)
            continue
        raise AssertionError("a server forwarding only to itself started")
    else:
        pytest.fail("no free port in 10 tries")
    async with scripted_upstream(RECORDS) as good:
        forwarder = Forwarder([("127.0.0.1", port), ("127.0.0.1", good.port)])
        forwarder.exclude_self("127.0.0.1", port)
        assert [u.label for u in forwarder.upstreams] == [good.address]
        forwarder = Forwarder([("127.0.0.1", port), ("192.0.2.53", port)])
        forwarder.exclude_self("0.0.0.0", port)  # a wildcard listener is reached on loopback
        assert [u.label for u in forwarder.upstreams] == [f"192.0.2.53:{port}"]
        # but not Docker's embedded DNS: in a container, 127.0.0.11:53 is NATed to dockerd
        forwarder = Forwarder([("127.0.0.11", 53)])
        forwarder.exclude_self("0.0.0.0", 53)
        assert [u.label for u in forwarder.upstreams] == ["127.0.0.11:53"]


async def test_identical_questions_in_flight_share_one_upstream_query() -> None:
    async with scripted_upstream(RECORDS, delay=0.5) as upstream:
        async with forwarding(upstream.address) as client:
            answers = await asyncio.gather(*(ask(client, NAME) for _ in range(5)))
            assert all(addresses(a) == ["192.0.2.10"] for a in answers)
            assert upstream.udp_queries == 1


async def test_tcp_answers_a_fast_query_while_a_forwarded_one_waits() -> None:
    """RFC 7766 6.2.1.1: pipelined queries on one connection, answered as they are ready."""
    async with scripted_upstream(RECORDS, delay=1.0) as upstream:
        async with forwarding(upstream.address) as client:
            await client.register("default", "web", "web-1", address="10.1.2.3")
            slow = dns.message.make_query(NAME, "A", id=1)
            fast = dns.message.make_query("web.default.svc.cluster.local.", "A", id=2)
            reader, writer = await asyncio.open_connection(*client.dns)
            try:
                for message in (slow, fast):
                    wire = message.to_wire()
                    writer.write(len(wire).to_bytes(2, "big") + wire)
                await writer.drain()
                order = []
                async with asyncio.timeout(10):
                    for _ in range(2):
                        size = int.from_bytes(await reader.readexactly(2), "big")
                        response = dns.message.from_wire(await reader.readexactly(size))
                        order.append((response.id, addresses(response)))
            finally:
                writer.close()
            assert order == [(2, ["10.1.2.3"]), (1, ["192.0.2.10"])]
