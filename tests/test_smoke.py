"""The tour of the README, end to end on one server."""

from conftest import Client


async def test_register_then_resolve(client: Client) -> None:
    body = await client.register(
        "default", "web", "web-1", expect=201, address="10.1.2.3",
        ports=[{"name": "http", "port": 8080}], ttl=30,
    )
    assert body["lease"]["ttl"] == 30
    assert await client.addresses("web.default.svc.cluster.local") == {"10.1.2.3"}
    srv = await client.query("_http._tcp.web.default.svc.cluster.local", "SRV")
    assert [rr.to_text() for rrset in srv.answer for rr in rrset] == [
        "0 100 8080 web-1.web.default.svc.cluster.local."
    ]
