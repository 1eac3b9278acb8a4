"""A scripted upstream resolver on loopback (UDP and TCP, dnspython): answers from a table, and
on request answers slowly, truncates over UDP, or lies (wrong ID, wrong question, another source
address). Real sockets; it counts what it was asked."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from needs import unavailable

ZONE = "example.test."
SOA_TEXT = "ns.example.test. hostmaster.example.test. 1 7200 1800 86400 {minimum}"


@dataclass
class Behaviour:
    delay: float = 0.0  # seconds before each answer
    truncate_udp: bool = False  # UDP answers: TC=1, no records (TCP answers in full)
    lie: str | None = None  # "id", "question" or "address": every UDP answer is not ours
    negative_ttl: int = 60  # SOA TTL and minimum in NXDOMAIN / NODATA answers


@dataclass
class ScriptedUpstream:
    """Answers A questions under example.test from `records` (name -> (ttl, addresses))."""

    records: dict[str, tuple[int, list[str]]] = field(default_factory=dict)
    behaviour: Behaviour = field(default_factory=Behaviour)
    udp_queries: int = 0
    tcp_queries: int = 0
    questions: list[str] = field(default_factory=list)
    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def respond(self, wire: bytes) -> dns.message.Message | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        question = query.question[0]
        self.questions.append(question.name.to_text())
        response = dns.message.make_response(query)
        response.flags |= dns.flags.RA
        name = question.name.to_text().lower()
        if not name.endswith(ZONE) and question.name != dns.name.root:
            response.set_rcode(dns.rcode.REFUSED)
            return response
        found = self.records.get(name)
        if found is not None and question.rdtype == dns.rdatatype.A:
            ttl, addresses = found
            response.answer.append(
                dns.rrset.from_text_list(question.name, ttl, "IN", "A", addresses)
            )
        elif question.name != dns.name.root:
            if found is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
            minimum = self.behaviour.negative_ttl
            response.authority.append(
                dns.rrset.from_text(
                    ZONE, minimum, "IN", "SOA", SOA_TEXT.format(minimum=minimum)
                )
            )
        return response


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, upstream: ScriptedUpstream, liar: socket.socket) -> None:
        self.upstream = upstream
        self.liar = liar
        self.transport: asyncio.DatagramTransport | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.upstream.udp_queries += 1
        task = asyncio.ensure_future(self._answer(data, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _answer(self, data: bytes, addr: tuple[str, int]) -> None:
        behaviour = self.upstream.behaviour
        if behaviour.delay:
            await asyncio.sleep(behaviour.delay)
        response = self.upstream.respond(data)
        if response is None or self.transport is None:
            return
        payload = response.request_payload if response.request_payload > 0 else 512
        if behaviour.truncate_udp:
            response.answer.clear()
            response.authority.clear()
            response.flags |= dns.flags.TC
        if behaviour.lie == "id":
            response.id ^= 0x5A5A
        elif behaviour.lie == "question":
            response.question[0] = dns.rrset.RRset(
                dns.name.from_text("other.example.test."), dns.rdataclass.IN, dns.rdatatype.A
            )
        try:
            wire = response.to_wire(max_size=max(512, payload))
        except dns.exception.TooBig:  # as servers do: TC=1, and the client asks over TCP
            response.answer.clear()
            response.flags |= dns.flags.TC
            wire = response.to_wire()
        if behaviour.lie == "address":
            self.liar.sendto(wire, addr)  # the right answer, from the wrong port
        else:
            self.transport.sendto(wire, addr)


async def _tcp(upstream: ScriptedUpstream, reader: asyncio.StreamReader,
               writer: asyncio.StreamWriter) -> None:  # fmt: skip
    try:
        while True:
            size = int.from_bytes(await reader.readexactly(2), "big")
            data = await reader.readexactly(size)
            upstream.tcp_queries += 1
            if upstream.behaviour.delay:
                await asyncio.sleep(upstream.behaviour.delay)
            response = upstream.respond(data)
            if response is None:
                break
            wire = response.to_wire(max_size=65535)
            writer.write(len(wire).to_bytes(2, "big") + wire)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


@asynccontextmanager
async def scripted_upstream(
    records: dict[str, tuple[int, list[str]]] | None = None, **behaviour: object
) -> AsyncIterator[ScriptedUpstream]:
    upstream = ScriptedUpstream(records or {}, Behaviour(**behaviour))  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    liar = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    liar.bind(("127.0.0.1", 0))
    udp = None
    tcp = None
    try:
        for _ in range(20):  # the same free port for UDP and TCP
            udp, protocol = await loop.create_datagram_endpoint(
                lambda: _Udp(upstream, liar), local_addr=("127.0.0.1", 0)
            )
            upstream.port = udp.get_extra_info("sockname")[1]
            try:
                tcp = await asyncio.start_server(
                    lambda r, w: _tcp(upstream, r, w), "127.0.0.1", upstream.port
                )
                break
            except OSError:
                udp.close()
                udp = None
        assert udp is not None and tcp is not None, "no free port for the scripted upstream"
        yield upstream
    finally:
        if udp is not None:
            udp.close()
            for task in list(protocol.tasks):
                task.cancel()
        if tcp is not None:
            tcp.close()
            await tcp.wait_closed()
        liar.close()


def free_udp_port() -> int:
    """A loopback port nothing listens on (ICMP port unreachable: a dead upstream)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def dnsmasq_binary() -> str:
    """dnsmasq's path (often /usr/sbin, outside a user's PATH), or skip the test."""

    found = shutil.which("dnsmasq") or shutil.which("dnsmasq", path="/usr/sbin:/sbin")
    if found is None or not os.access(found, os.X_OK):
        unavailable("dnsmasq is not installed (apt-get install dnsmasq-base)")
    return found
