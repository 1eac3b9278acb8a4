"""The instance record, its validation, and the mapping between names and store keys."""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
DEFAULT_LEASE_TTL = 30


def is_label(text: str) -> bool:
    """True for an RFC 1123 DNS label in lower case, at most 63 characters."""
    return LABEL_RE.fullmatch(text) is not None


TXT_MAX = 255  # bytes in one TXT character-string (RFC 1035 3.3.14)


def txt_problems(metadata: Mapping[str, str]) -> list[str]:
    """Why metadata cannot be served as DNS-SD TXT strings (RFC 6763 6): empty when it can.
    Keys are printable US-ASCII without '='; each "key=value" fits one TXT string."""
    problems = []
    for key, value in metadata.items():
        if not key or any(not 0x20 <= ord(c) <= 0x7E or c == "=" for c in key):
            problems.append(f"key {key!r}: must be printable ASCII without '=' (RFC 6763 6.4)")
        elif len(f"{key}={value}".encode()) > TXT_MAX:
            problems.append(f"key {key!r}: 'key=value' is over {TXT_MAX} bytes in UTF-8")
    return problems


Label = Annotated[str, Field(min_length=1, max_length=63, pattern=LABEL_RE.pattern)]
PORT_NAME_MAX = 15  # a service name in the sense of RFC 6335 5.1 (the SRV label `_<name>`)
MAX_NAME = 255  # octets of a domain name on the wire (RFC 1035 2.3.4)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPV4_RESERVED = ipaddress.ip_network("240.0.0.0/4")  # includes the broadcast 255.255.255.255
IPV4_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # a source only (RFC 1122 3.2.1.3)
CLOUD_METADATA = ipaddress.ip_address("169.254.169.254")


def address_problem(text: str, allowed: tuple[Network, ...] = ()) -> str | None:
    """Why a (validated, compressed) address cannot be a service's address, or None.

    Never: unspecified, multicast, broadcast, reserved, in any spelling (an IPv4-mapped IPv6
    address is judged as the IPv4 address it maps). Unless `allowed` admits it: loopback and
    link-local (169.254.169.254, the cloud metadata service, among them), which mean another
    host to every client that resolves them.
    """
    address = ipaddress.ip_address(text)
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    judged = mapped if mapped is not None else address
    if judged.is_unspecified or judged.is_multicast:
        return "must be a unicast address (not unspecified or multicast)"
    if isinstance(judged, ipaddress.IPv4Address) and (
        judged in IPV4_RESERVED or judged in IPV4_THIS_NETWORK
    ):
        return "must be a unicast address (not broadcast, reserved or 0.0.0.0/8)"
    if judged.is_loopback or judged.is_link_local:
        if any(judged in net or address in net for net in allowed):
            return None
        kind = "a loopback address" if judged.is_loopback else "a link-local address"
        if judged == CLOUD_METADATA:
            kind = "the cloud metadata address"
        return f"is {kind}: refused unless the server's --allow-address admits it"
    return None


def _wire_length(*labels: str) -> int:
    return sum(1 + len(label.encode()) for label in labels) + 1


def name_problems(
    namespace: str, service: str, name: str, ports: tuple[Port, ...], zones: tuple[str, ...]
) -> list[dict[str, str]]:
    """The fields that would make illegal DNS names: a port name over 15 characters, or any
    name over 255 octets in the longest zone: the instance name <inst>.<svc>.<ns>.svc.Z (A,
    PTR and SRV targets), _<port>._<proto>.<svc>.<ns>.svc.Z and the DNS-SD instance
    <inst>._<port>._<proto>.<ns>.svc.Z. (Checked at registration only: records stored
    before these rules still load.)"""
    zone = max(zones, key=len).split(".")
    problems = [
        {
            "field": f"ports.{index}.name",
            "message": f"must have at most {PORT_NAME_MAX} characters (RFC 6335 5.1)",
        }
        for index, port in enumerate(ports)
        if len(port.name) > PORT_NAME_MAX
    ]
    longest = _wire_length(name, service, namespace, "svc", *zone)
    if longest > MAX_NAME:
        problems.append(
            {
                "field": "inst",
                "message": f"{name}.{service}.{namespace}.svc.{'.'.join(zone)} would be "
                f"{longest} octets, over the {MAX_NAME} of a DNS name: use shorter names",
            }
        )
    for index, port in enumerate(ports):
        srv = _wire_length(f"_{port.name}", f"_{port.protocol}", service, namespace, "svc", *zone)
        sd = _wire_length(name, f"_{port.name}", f"_{port.protocol}", namespace, "svc", *zone)
        if max(srv, sd) > MAX_NAME:
            problems.append(
                {
                    "field": f"ports.{index}.name",
                    "message": f"its SRV names would be {max(srv, sd)} octets, over the "
                    f"{MAX_NAME} of a DNS name: use shorter names",
                }
            )
    return problems


class Port(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Label
    port: StrictInt = Field(ge=1, le=65535)
    protocol: Literal["tcp", "udp", "sctp"] = "tcp"


class Registration(BaseModel):
    """The body of a register call: what a service says about one of its instances."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: StrictStr
    ports: tuple[Port, ...] = ()
    ttl: StrictInt = Field(default=DEFAULT_LEASE_TTL, ge=1)
    priority: StrictInt = Field(default=0, ge=0, le=65535)
    weight: StrictInt = Field(default=100, ge=0, le=65535)
    tags: tuple[Annotated[str, Field(min_length=1, max_length=255)], ...] = Field(
        default=(), max_length=64
    )
    metadata: dict[Annotated[str, Field(min_length=1, max_length=255)], str] = Field(
        default_factory=dict, max_length=64
    )

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        if "%" in value:  # fe80::1%eth0 means nothing to a DNS client
            raise ValueError("must not carry a zone index (%scope)")
        try:  # IPv4 without ipaddress (every instance of a full load passes here)
            packed = socket.inet_pton(socket.AF_INET, value)
        except OSError:
            pass
        else:
            if packed == b"\0\0\0\0" or 224 <= packed[0] <= 239:  # unspecified, multicast
                raise ValueError("must be a unicast address")
            return socket.inet_ntop(socket.AF_INET, packed)
        try:
            packed = socket.inet_pton(socket.AF_INET6, value)
        except OSError:
            raise ValueError("must be an IPv4 or IPv6 address") from None
        address = ipaddress.ip_address(packed)
        if address.is_unspecified or address.is_multicast:
            raise ValueError("must be a unicast address")
        return address.compressed

    @field_validator("ports")
    @classmethod
    def _unique_ports(cls, ports: tuple[Port, ...]) -> tuple[Port, ...]:
        seen = set()
        for port in ports:
            if (port.name, port.protocol) in seen:
                raise ValueError(f"port {port.name}/{port.protocol} is listed twice")
            seen.add((port.name, port.protocol))
        return ports


@dataclass(frozen=True, slots=True)
class InstanceKey:
    namespace: str
    service: str
    name: str

    @property
    def service_key(self) -> tuple[str, str]:
        return (self.namespace, self.service)

    def store_key(self, prefix: str) -> bytes:
        return f"{prefix}v1/instances/{self.namespace}/{self.service}/{self.name}".encode()

    @classmethod
    def from_store_key(cls, prefix: str, key: bytes) -> InstanceKey | None:
        """The instance a store key names, or None for a key this version does not own."""
        try:
            text = key.decode()
        except UnicodeDecodeError:
            return None
        head = f"{prefix}v1/instances/"
        if not text.startswith(head):
            return None
        parts = text[len(head) :].split("/")
        if len(parts) != 3 or not all(is_label(p) for p in parts):
            return None
        namespace, service, name = parts
        return cls(sys.intern(namespace), sys.intern(service), name)


def instances_prefix(prefix: str) -> bytes:
    return f"{prefix}v1/instances/".encode()


def records_prefix(prefix: str) -> bytes:
    """Everything this version keeps under the prefix (instances and networking)."""
    return f"{prefix}v1/".encode()


class PortEntry(NamedTuple):
    name: str
    port: int
    protocol: str


@dataclass(frozen=True, slots=True)
class Spec:
    """What the cache keeps of a registration: the fields DNS needs, and the JSON as
    stored (a pydantic model per instance would cost several times the memory)."""

    address: str
    ttl: int
    priority: int
    weight: int
    ports: tuple[PortEntry, ...]
    tags: tuple[str, ...]
    raw: bytes

    @classmethod
    def of(cls, registration: Registration, raw: bytes) -> Spec:
        return cls(
            registration.address,
            registration.ttl,
            registration.priority,
            registration.weight,
            tuple(
                PortEntry(sys.intern(p.name), p.port, sys.intern(p.protocol))
                for p in registration.ports
            ),
            registration.tags,
            raw,
        )


@dataclass(frozen=True, slots=True)
class Instance:
    """A live instance as the cache holds it: its key, its registration and its lease."""

    key: InstanceKey
    spec: Spec
    lease: int
    revision: int

    def to_json(self) -> dict[str, object]:
        return {
            "namespace": self.key.namespace,
            "service": self.key.service,
            "name": self.key.name,
            **json.loads(self.spec.raw),
            "lease": {"id": format(self.lease, "x"), "ttl": self.spec.ttl},
        }


def encode_registration(spec: Registration) -> bytes:
    return spec.model_dump_json().encode()


def decode_registration(value: bytes) -> Spec | None:
    """The registration stored under a key, or None when the value is not one of ours."""
    try:
        return Spec.of(Registration.model_validate_json(value), value)
    except ValueError:
        return None
