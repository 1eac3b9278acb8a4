"""The networks and attachments routes of the HTTP API (SPEC.md "Container networking")."""

from __future__ import annotations

import ipaddress
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from ..api import CONTEXT, Problem, invalid, read_body, read_json, validation_errors
from ..model import is_label
from .ipam import Ipam, IpamError
from .overlay import Overlay
from .records import AttachmentRequest, NetworkSpec, is_container_id, is_ifname

M = TypeVar("M", bound=BaseModel)


def _ipam(request: web.Request) -> Ipam:
    ipam = request.app[CONTEXT].ipam
    assert ipam is not None
    if not ipam.registry.synced:  # before the first load every network looks absent
        raise Problem(
            503,
            "Not ready",
            "this replica has not loaded the registry yet",
            headers={"Retry-After": "1"},
        )
    return ipam


def _network_name(request: web.Request) -> str:
    name = request.match_info["net"]
    if not is_label(name):
        raise invalid(
            [
                {
                    "field": "net",
                    "message": "must be a lower-case DNS label (RFC 1123), 1-63 characters",
                }
            ]
        )
    return name


def _attachment_path(request: web.Request) -> tuple[str, str, str]:
    network = _network_name(request)
    container_id, ifname = request.match_info["container_id"], request.match_info["ifname"]
    errors = []
    if not is_container_id(container_id):
        errors.append(
            {
                "field": "container_id",
                "message": "must be letters, digits, '_', '.' or '-' (1-255 characters)",
            }
        )
    if not is_ifname(ifname):
        errors.append(
            {"field": "ifname", "message": "must be an interface name: 1-15 characters, no '/'"}
        )
    if errors:
        raise invalid(errors)
    return network, container_id, ifname


def _model(model: type[M], data: Any) -> M:
    if not isinstance(data, dict):
        raise invalid([{"field": "body", "message": "must be a JSON object"}])
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise invalid(validation_errors(error)) from None


def _problem(error: IpamError) -> Problem:
    return Problem(error.status, error.title, error.detail)


def _network_body(ipam: Ipam, name: str, overlay: Overlay | None = None) -> dict[str, Any]:
    registry = ipam.registry
    network = registry.network(name)
    assert network is not None
    attachments = registry.attachments(name)
    per_block: dict[str, int] = {}
    for attachment in attachments.values():
        address = ipaddress.ip_address(attachment.address)
        for cidr in registry.blocks(name):
            if address in ipaddress.ip_network(cidr):
                per_block[cidr] = per_block.get(cidr, 0) + 1
    blocks = []
    for cidr, block in sorted(registry.blocks(name).items()):
        size = ipaddress.ip_network(cidr).num_addresses
        used = per_block.get(cidr, 0)
        blocks.append(
            {
                **block.to_json(),
                "attachments": used,
                "free": max(0, size - 3 - used),
                "mine": block.node == ipam.node,
                # another node's block: its route, neighbour and FDB entry are in this
                # node's kernel; this node's own block: its address is on the VXLAN device
                "programmed": overlay is not None and overlay.is_programmed(name, cidr),
            }
        )
    return {**network.to_json(), "blocks": blocks, "attachments": len(attachments)}


async def put_network(request: web.Request) -> web.Response:
    ipam = _ipam(request)
    name = _network_name(request)
    spec = _model(NetworkSpec, await read_json(request))
    try:
        network, created = await ipam.put_network(name, spec)
    except ValueError as error:  # cross-field rules: "field: message"
        field, _, message = str(error).partition(": ")
        raise invalid([{"field": field, "message": message}]) from None
    except IpamError as error:
        raise _problem(error) from None
    return web.json_response(_network_body(ipam, network.name), status=201 if created else 200)


async def list_networks(request: web.Request) -> web.Response:
    ipam = _ipam(request)
    names = sorted(ipam.registry.networks())
    overlay = request.app[CONTEXT].overlay
    return web.json_response({"networks": [_network_body(ipam, name, overlay) for name in names]})


async def get_network(request: web.Request) -> web.Response:
    ipam = _ipam(request)
    name = _network_name(request)
    if ipam.registry.network(name) is None:
        raise Problem(404, "Network not found", f"no network {name}")
    return web.json_response(_network_body(ipam, name, request.app[CONTEXT].overlay))


async def delete_network(request: web.Request) -> web.Response:
    ipam = _ipam(request)
    name = _network_name(request)
    try:
        found = await ipam.delete_network(name)
    except IpamError as error:
        raise _problem(error) from None
    if not found:
        raise Problem(404, "Network not found", f"no network {name}")
    return web.Response(status=204)


async def put_attachment(request: web.Request) -> web.Response:
    ipam = _ipam(request)
    network, container_id, ifname = _attachment_path(request)
    raw = await read_body(request) if request.body_exists else b""
    body = (
        AttachmentRequest()
        if not raw.strip()
        else _model(AttachmentRequest, await read_json(request))
    )
    try:
        attached = await ipam.attach(network, container_id, ifname, body)
    except IpamError as error:
        raise _problem(error) from None
    return web.json_response(attached.body, status=201 if attached.created else 200)


async def get_attachment(request: web.Request) -> web.Response:
    ipam = _ipam(request)
    network, container_id, ifname = _attachment_path(request)
    attachment = ipam.registry.attachment(network, container_id, ifname)
    body = ipam.body(attachment) if attachment is not None else None
    if body is None:
        raise Problem(
            404, "Attachment not found", f"no attachment {container_id}/{ifname} in {network}"
        )
    return web.json_response(body)


async def delete_attachment(request: web.Request) -> web.Response:
    ipam = _ipam(request)
    network, container_id, ifname = _attachment_path(request)
    await ipam.detach(network, container_id, ifname)
    return web.Response(status=204)


async def list_attachments(request: web.Request) -> web.Response:
    ipam = _ipam(request)
    network = _network_name(request)
    if ipam.registry.network(network) is None:
        raise Problem(404, "Network not found", f"no network {network}")
    attachments = sorted(
        ipam.registry.attachments(network).values(), key=lambda a: (a.container_id, a.ifname)
    )
    bodies = [body for a in attachments if (body := ipam.body(a)) is not None]
    return web.json_response({"attachments": bodies})


def add_routes(app: web.Application) -> None:
    base = "/v1/networks/{net}"
    app.router.add_get("/v1/networks", list_networks)
    app.router.add_put(base, put_network)
    app.router.add_get(base, get_network)
    app.router.add_delete(base, delete_network)
    app.router.add_get(base + "/attachments", list_attachments)
    attachment = base + "/attachments/{container_id}/{ifname}"
    app.router.add_put(attachment, put_attachment)
    app.router.add_get(attachment, get_attachment)
    app.router.add_delete(attachment, delete_attachment)
