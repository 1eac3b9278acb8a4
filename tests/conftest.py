"""Shared fixtures: a real server on free ports, and independent DNS/HTTP clients."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import dns.asyncquery
import dns.message
import dns.rdatatype
import pytest

from discovery.config import Config, HostPort
from discovery.server import Server, run_server


def make_config(**overrides: Any) -> Config:
    """A config with both listeners on free loopback ports."""
    base = Config(dns=HostPort("127.0.0.1", 0), http=HostPort("127.0.0.1", 0))
    return dataclasses.replace(base, **overrides)


class Client:
    """Talks to one running server the way users do: HTTP for writes, DNS for reads."""

    def __init__(self, server: Server, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session
        host, port = server.http_address
        self.base = f"http://{host}:{port}"

    @property
    def dns(self) -> tuple[str, int]:
        return self.server.dns_address

    async def register(
        self, ns: str, svc: str, inst: str, expect: int | None = None, **body: Any
    ) -> dict[str, Any]:
        path = f"/v1/services/{ns}/{svc}/instances/{inst}"
        async with self.session.put(self.base + path, json=body) as response:
            data: dict[str, Any] = await response.json(content_type=None)
            if expect is not None:
                assert response.status == expect, data
            else:
                assert response.status in (200, 201), data
            return data

    async def request(
        self, method: str, path: str, **kwargs: Any
    ) -> tuple[int, Any, dict[str, str]]:
        async with self.session.request(method, self.base + path, **kwargs) as response:
            raw = await response.read()
            ctype = response.headers.get("Content-Type", "")
            body: Any = raw.decode() if raw else None
            if raw and "json" in ctype:
                body = json.loads(raw)
            return response.status, body, dict(response.headers)

    async def query(
        self,
        name: str,
        rdtype: str | int = "A",
        *,
        tcp: bool = False,
        edns: int | bool = False,
        payload: int = 1232,
    ) -> dns.message.Message:
        message = dns.message.make_query(
            name, rdtype, use_edns=0 if edns is True else edns, payload=payload
        )
        host, port = self.dns
        if tcp:
            return await dns.asyncquery.tcp(message, host, port=port, timeout=3)
        return await dns.asyncquery.udp(message, host, port=port, timeout=3, ignore_trailing=False)

    async def addresses(self, name: str, rdtype: str = "A") -> set[str]:
        response = await self.query(name, rdtype)
        return {rr.to_text() for rrset in response.answer for rr in rrset}

    async def wait_cache(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        return await self.server.registry.wait(predicate, timeout)


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    async with run_server(make_config()) as running:
        await running.registry.wait(lambda: running.registry.synced, 5)
        yield running


@pytest.fixture
async def client(server: Server) -> AsyncIterator[Client]:
    async with aiohttp.ClientSession() as session:
        yield Client(server, session)


def pytest_collection_finish(session: pytest.Session) -> None:
    # A run that collects nothing must fail loudly, not pass as "no tests ran".
    if not session.items and not session.config.option.collectonly:
        raise pytest.UsageError("no tests were collected")
