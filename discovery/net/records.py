"""Container networking records: networks, node blocks, attachments, and their store keys.

Keys (all under the server's prefix, all delivered by the one watch):

    v1/networks/<net>                          network config           no lease
    v1/subnets/<net>/<a.b.c.d-len>             {"node", "node_ip", "vtep_mac"}   node lease
    v1/attachments/<net>/<container_id>/<if>   {"address", "node", "name", "service"?}
    v1/addresses/<net>/<address>               {"container_id", "ifname"}        node lease
"""

from __future__ import annotations

import ipaddress
import json
import re
import sys
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

from ..model import Instance, InstanceKey, Label, Port, PortEntry, Spec, is_label
from ..store.base import KeyValue

CONTAINER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,254}$")
IFNAME_RE = re.compile(r"^[^\s/:]{1,15}$")
DEFAULT_MTU = {"bridge": 1500, "vxlan": 1450}
DERIVED_TTL = 30  # the lease TTL an attachment's service instance shows (DNS: min(dns-ttl, it))


def is_container_id(text: str) -> bool:
    return CONTAINER_ID_RE.fullmatch(text) is not None


def is_ifname(text: str) -> bool:
    return IFNAME_RE.fullmatch(text) is not None and text not in (".", "..")


class NetworkSpec(BaseModel):
    """The body of PUT /v1/networks/{net}: what an admin says about a network."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    subnet: StrictStr
    node_prefix: StrictInt = 24
    backend: Literal["bridge", "vxlan"] = "bridge"
    vni: StrictInt = Field(default=1, ge=1, le=2**24 - 1)
    port: StrictInt = Field(default=8472, ge=1, le=65535)
    mtu: StrictInt | None = Field(default=None, ge=576, le=9000)

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, value: str) -> str:
        try:
            network = ipaddress.ip_network(value, strict=True)
        except ValueError as error:
            raise ValueError(f"must be a network in CIDR form ({error})") from None
        if network.version != 4:
            raise ValueError("only IPv4 networks are supported")
        return network.with_prefixlen

    def checked(self) -> NetworkSpec:
        """Cross-field rules; raises ValueError naming the field."""
        network = ipaddress.ip_network(self.subnet)
        if not network.prefixlen <= self.node_prefix <= 30:
            raise ValueError(f"node_prefix: must be between {network.prefixlen} and 30")
        if self.mtu is None:
            return self.model_copy(update={"mtu": DEFAULT_MTU[self.backend]})
        return self

    def encode(self) -> bytes:
        return self.model_dump_json().encode()


class ServiceRef(BaseModel):
    """An attachment's service: the container is an instance of it while attached."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    namespace: Label
    service: Label
    instance: Label | None = None
    ports: tuple[Port, ...] = ()


class AttachmentRequest(BaseModel):
    """The body of PUT /v1/networks/{net}/attachments/{container_id}/{ifname}."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Label | None = None
    service: ServiceRef | None = None


class NetworkKeys:
    """Store keys of the networking records under one prefix, built and parsed."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.root = f"{prefix}v1/".encode()

    def kind(self, key: bytes) -> str:
        if not key.startswith(self.root):
            return ""
        rest = key[len(self.root) :]
        return rest[: rest.find(b"/")].decode("ascii", "replace") if b"/" in rest else ""

    def parts(self, key: bytes) -> list[str]:
        return key[len(self.root) :].decode("utf-8", "replace").split("/")[1:]

    def network_of(self, key: bytes) -> str:
        parts = self.parts(key)
        return parts[0] if parts else ""

    def block_of(self, key: bytes) -> str:
        parts = self.parts(key)
        return parts[1].replace("-", "/") if len(parts) > 1 else ""

    def network(self, name: str) -> bytes:
        return f"{self.prefix}v1/networks/{name}".encode()

    def networks(self) -> bytes:
        return f"{self.prefix}v1/networks/".encode()

    def block(self, network: str, cidr: str) -> bytes:
        return f"{self.prefix}v1/subnets/{network}/{cidr.replace('/', '-')}".encode()

    def blocks(self, network: str) -> bytes:
        return f"{self.prefix}v1/subnets/{network}/".encode()

    def attachment(self, network: str, container_id: str, ifname: str) -> bytes:
        return f"{self.prefix}v1/attachments/{network}/{container_id}/{ifname}".encode()

    def attachments(self, network: str) -> bytes:
        return f"{self.prefix}v1/attachments/{network}/".encode()

    def address(self, network: str, address: str) -> bytes:
        return f"{self.prefix}v1/addresses/{network}/{address}".encode()


@dataclass(frozen=True, slots=True)
class Network:
    name: str
    spec: NetworkSpec
    revision: int

    @classmethod
    def decode(cls, keys: NetworkKeys, kv: KeyValue) -> Network | None:
        parts = keys.parts(kv.key)
        if len(parts) != 1 or not is_label(parts[0]):
            return None
        try:
            spec = NetworkSpec.model_validate_json(kv.value).checked()
        except ValueError:
            return None
        return cls(parts[0], spec, kv.mod_revision)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, **self.spec.model_dump()}


@dataclass(frozen=True, slots=True)
class Block:
    """One node's share of a network: a /node_prefix block leased by that node."""

    network: str
    cidr: str
    node: str
    node_ip: str
    vtep_mac: str
    lease: int
    revision: int

    @classmethod
    def decode(cls, keys: NetworkKeys, kv: KeyValue) -> Block | None:
        parts = keys.parts(kv.key)
        if len(parts) != 2:
            return None
        try:
            cidr = ipaddress.ip_network(parts[1].replace("-", "/")).with_prefixlen
            value = json.loads(kv.value)
            node, node_ip, mac = value["node"], value.get("node_ip", ""), value.get("vtep_mac", "")
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        if not all(isinstance(v, str) for v in (node, node_ip, mac)):
            return None
        return cls(parts[0], cidr, node, node_ip, mac, kv.lease, kv.mod_revision)

    @staticmethod
    def encode(node: str, node_ip: str, vtep_mac: str) -> bytes:
        return json.dumps({"node": node, "node_ip": node_ip, "vtep_mac": vtep_mac}).encode()

    def to_json(self) -> dict[str, Any]:
        return {
            "subnet": self.cidr,
            "node": self.node,
            "node_ip": self.node_ip,
            "vtep_mac": self.vtep_mac,
        }


@dataclass(frozen=True, slots=True)
class Attachment:
    """A container's interface on a network, with its address and DNS name."""

    key: bytes
    network: str
    container_id: str
    ifname: str
    address: str
    node: str
    name: str
    service: ServiceRef | None
    lease: int
    revision: int

    @property
    def container(self) -> tuple[str, str]:
        return (self.network, self.name)

    @classmethod
    def decode(cls, keys: NetworkKeys, kv: KeyValue) -> Attachment | None:
        parts = keys.parts(kv.key)
        if len(parts) != 3:
            return None
        network, container_id, ifname = parts
        try:
            value = json.loads(kv.value)
            address = ipaddress.ip_address(value["address"]).compressed
            node, name = value["node"], value["name"]
            service = ServiceRef.model_validate(value["service"]) if value.get("service") else None
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        if not isinstance(node, str) or not isinstance(name, str) or not is_label(name):
            return None
        return cls(
            kv.key,
            sys.intern(network),
            container_id,
            ifname,
            address,
            sys.intern(node),
            name,
            service,
            kv.lease,
            kv.mod_revision,
        )

    @staticmethod
    def encode(address: str, node: str, name: str, service: ServiceRef | None) -> bytes:
        body: dict[str, Any] = {"address": address, "node": node, "name": name}
        if service is not None:
            body["service"] = service.model_dump(exclude_none=True)
        return json.dumps(body).encode()

    def instance_key(self) -> InstanceKey | None:
        if self.service is None:
            return None
        return InstanceKey(
            sys.intern(self.service.namespace),
            sys.intern(self.service.service),
            self.service.instance or self.name,
        )


def attachment_instance(attachment: Attachment) -> Instance | None:
    """The service instance an attachment with a service makes, for as long as it exists."""
    key = attachment.instance_key()
    if key is None or attachment.service is None:
        return None
    ports = attachment.service.ports
    raw = json.dumps(
        {
            "address": attachment.address,
            "ports": [p.model_dump() for p in ports],
            "ttl": DERIVED_TTL,
            "priority": 0,
            "weight": 100,
            "tags": [],
            "metadata": {
                "attachment": f"{attachment.network}/{attachment.container_id}/{attachment.ifname}"
            },
        }
    ).encode()
    spec = Spec(
        attachment.address,
        DERIVED_TTL,
        0,
        100,
        tuple(PortEntry(sys.intern(p.name), p.port, sys.intern(p.protocol)) for p in ports),
        (),
        raw,
    )
    return Instance(key, spec, attachment.lease, attachment.revision)
