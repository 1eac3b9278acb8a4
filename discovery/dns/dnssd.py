"""DNS-SD (RFC 6763) browsing of every namespace, as one more name source of the answers.

In every forward zone Z, for a namespace NS with instances that expose named ports:

    _services._dns-sd._udp.NS.svc.Z  PTR  _<port>._<proto>.NS.svc.Z      (service types, 9)
    _<port>._<proto>.NS.svc.Z         PTR  <inst>._<port>._<proto>.NS.svc.Z  (instances, 4.1)
    <inst>._<port>._<proto>.NS.svc.Z  SRV  priority weight port <inst>.<svc>.NS.svc.Z (+ glue)
                                      TXT  "key=value" per metadata entry, or one empty string (6)

Instance names of two services of one namespace may coincide: such a service instance name
answers one SRV record per instance (clients choose by priority and weight) and the TXT of the
first service in name order. The SRV and TXT of an instance name are rebuilt alone; the source
keeps the members of each service type, so a change re-encodes only the pointer lists of the
types it touched (one PTR per member, from a list kept sorted).
"""

from __future__ import annotations

import bisect
import json
import re
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..model import TXT_MAX, Instance, InstanceKey
from .answers import AnswerState, _label
from .records import IN, PTR, SRV, TXT, TYPE_WIRE, Answer, SrvTarget

if TYPE_CHECKING:
    from ..registry import Changes, Registry

_SERVICES = b"\x09_services\x07_dns-sd\x04_udp"  # the service type enumeration (RFC 6763 9)
_TO_QUESTION = b"\xc0\x0c"
_PTR_IN = PTR.to_bytes(2, "big") + IN.to_bytes(2, "big")

PortType = tuple[str, str]  # (port name, protocol)


def _namespace_wire(namespace: str, zone_wire: bytes) -> bytes:
    return _label(namespace) + b"\x03svc" + zone_wire


def _type_wire(port_type: PortType, namespace_wire: bytes) -> bytes:
    return _label(f"_{port_type[0]}") + _label(f"_{port_type[1]}") + namespace_wire


_TXT_KEY = re.compile(r"[\x20-\x3c\x3e-\x7e]+")  # printable ASCII but '=' (RFC 6763 6.4)
_NO_METADATA = b'"metadata":{}'  # how the stored JSON (model_dump_json) spells none


def txt_strings(instance: Instance) -> tuple[bytes, ...]:
    """The instance's metadata as TXT character-strings; one empty string when it has none
    (RFC 6763 6.1). Entries that TXT cannot carry are refused at registration; any stored
    before that rule are left out here."""
    raw = instance.spec.raw
    if _NO_METADATA in raw:
        return (b"",)
    metadata = json.loads(raw).get("metadata") or {}
    strings = []
    for key, value in metadata.items():
        text = f"{key}={value}".encode()
        if len(text) <= TXT_MAX and _TXT_KEY.fullmatch(key):
            strings.append(text)
    return tuple(strings) or (b"",)


def _txt(ttl: int, strings: tuple[bytes, ...]) -> Answer:
    rdata = b"".join(bytes((len(s),)) + s for s in strings)
    head = _TO_QUESTION + TXT.to_bytes(2, "big") + IN.to_bytes(2, "big") + ttl.to_bytes(4, "big")
    return Answer.of(head + len(rdata).to_bytes(2, "big") + rdata, 1)


class DnsSdNames:
    """The DNS-SD names of each namespace. Keys: ("instance", ns, name) for the SRV and TXT of
    an instance name, then ("types", ns) for the pointer lists, which read what the instance
    builds recorded (so a batch builds instances first)."""

    def __init__(self) -> None:
        self._clear()

    def _clear(self) -> None:
        # services that may hold an instance name (a superset, pruned by the instance build)
        self._named: dict[tuple[str, str], set[str]] = {}
        # what the names of an instance name are: its port types and their TTL
        self._types_of: dict[tuple[str, str], dict[PortType, int]] = {}
        # the members of each service type of a namespace (name -> TTL), and in name order
        self._members: dict[tuple[str, PortType], dict[str, int]] = {}
        self._order: dict[tuple[str, PortType], list[str]] = {}
        # in the same order, per zone: each member's PTR rdata with its length in front
        self._rdata: dict[tuple[str, PortType], dict[bytes, list[bytes]]] = {}
        self._types: dict[str, set[PortType]] = {}  # types with members, per namespace
        self._type_ttl: dict[tuple[str, PortType], int] = {}
        self._dirty: dict[str, set[PortType]] = {}  # types whose members changed

    def keys(self, registry: Registry) -> Iterable[object]:
        self._clear()
        namespaces: dict[str, None] = {}
        for (namespace, service), instances in registry.services().items():
            namespaces[namespace] = None
            for name in instances:
                self._named.setdefault((namespace, name), set()).add(service)
        # in name order: each type's members are then appended, never inserted
        keys: list[object] = [("instance", ns, name) for ns, name in sorted(self._named)]
        return keys + [("types", ns) for ns in namespaces]

    def touched(self, changes: Changes) -> Iterable[object]:
        keys: dict[object, None] = {}
        for key in changes.instances:
            self._named.setdefault((key.namespace, key.name), set()).add(key.service)
            keys[("instance", key.namespace, key.name)] = None
        return [*keys, *{("types", key.namespace): None for key in changes.instances}]

    def build(self, state: AnswerState, registry: Registry, key: object) -> None:
        assert isinstance(key, tuple)
        if key[0] == "types":
            self._build_types(state, key[1])
        else:
            self._build_instance(state, registry, key[1], key[2])

    def _build_instance(
        self, state: AnswerState, registry: Registry, namespace: str, name: str
    ) -> None:
        owner = ("dns-sd instance", namespace, name)
        state.release(owner)
        services = self._named.get((namespace, name), set())
        by_type: dict[PortType, list[tuple[Instance, int]]] = defaultdict(list)
        for service in sorted(services):
            instance = registry.instance(InstanceKey(namespace, service, name))
            if instance is None:
                services.discard(service)
                continue
            for port in instance.spec.ports:
                by_type[(port.name, port.protocol)].append((instance, port.port))
        if not services:
            self._named.pop((namespace, name), None)
        types = {
            port_type: min(state.ttl(instance.spec.ttl) for instance, _ in pairs)
            for port_type, pairs in by_type.items()
        }
        self._record(state, namespace, name, types)
        if not by_type:
            return
        txt: dict[str, tuple[bytes, ...]] = {}
        owned: list[bytes] = []
        for zone in state.forward:
            base = _namespace_wire(namespace, zone.wire)
            for port_type, pairs in sorted(by_type.items()):
                first = pairs[0][0]
                if first.key.service not in txt:
                    txt[first.key.service] = txt_strings(first)
                targets = [
                    SrvTarget(
                        instance.spec.priority,
                        instance.spec.weight,
                        port,
                        _label(name) + _label(instance.key.service) + base,
                        instance.spec.address,
                        state.ttl(instance.spec.ttl),
                    )
                    for instance, port in pairs
                ]
                wire = _label(name) + _type_wire(port_type, base)
                answers = {
                    TYPE_WIRE[SRV]: Answer.services(wire, types[port_type], targets),
                    TYPE_WIRE[TXT]: _txt(state.ttl(first.spec.ttl), txt[first.key.service]),
                }
                owned.append(state.node(wire, zone, answers))
        state.own(owner, owned)

    def _record(
        self, state: AnswerState, namespace: str, name: str, types: dict[PortType, int]
    ) -> None:
        """Note the instance name's port types in the members of each type."""
        old = self._types_of.pop((namespace, name), {})
        if types:
            self._types_of[(namespace, name)] = types
        for port_type in old.keys() | types.keys():
            ttl = types.get(port_type)
            if old.get(port_type) == ttl:
                continue
            key = (namespace, port_type)
            members = self._members.setdefault(key, {})
            order = self._order.setdefault(key, [])
            rdata = self._rdata.setdefault(key, {})
            at = bisect.bisect_left(order, name)
            if ttl is None:
                del members[name]
                del order[at]
                for parts in rdata.values():
                    del parts[at]
            else:
                if name not in members:
                    order.insert(at, name)
                    for zone in state.forward:
                        target = _label(name) + _type_wire(
                            port_type, _namespace_wire(namespace, zone.wire)
                        )
                        part = len(target).to_bytes(2, "big") + target
                        rdata.setdefault(zone.wire, []).insert(at, part)
                members[name] = ttl
            self._dirty.setdefault(namespace, set()).add(port_type)

    def _build_types(self, state: AnswerState, namespace: str) -> None:
        types = self._types.setdefault(namespace, set())
        for port_type in self._dirty.pop(namespace, ()):
            key = (namespace, port_type)
            state.release(("dns-sd type", *key))
            members = self._members.get(key)
            if not members:
                self._members.pop(key, None)
                self._order.pop(key, None)
                self._rdata.pop(key, None)
                self._type_ttl.pop(key, None)
                types.discard(port_type)
                continue
            types.add(port_type)
            ttl = self._type_ttl[key] = min(members.values())
            head = _TO_QUESTION + _PTR_IN + ttl.to_bytes(4, "big")
            owned = []
            for zone in state.forward:
                wire = _type_wire(port_type, _namespace_wire(namespace, zone.wire))
                parts = self._rdata[key][zone.wire]
                pointers = Answer.of(head + head.join(parts), len(parts))  # a PTR per member
                owned.append(state.node(wire, zone, {TYPE_WIRE[PTR]: pointers}))
            state.own(("dns-sd type", *key), owned)
        owner = ("dns-sd types", namespace)
        state.release(owner)
        if not types:
            del self._types[namespace]
            return
        listed = sorted(types)
        ttl = min(self._type_ttl[(namespace, t)] for t in listed)
        owned = []
        for zone in state.forward:
            base = _namespace_wire(namespace, zone.wire)
            listing = Answer.pointers(ttl, [_type_wire(t, base) for t in listed])
            owned.append(state.node(_SERVICES + base, zone, {TYPE_WIRE[PTR]: listing}))
            suffix = f"{namespace}.svc.{zone.name}"
            parents = {f"_{proto}.{suffix}" for _, proto in listed}
            parents |= {f"_dns-sd._udp.{suffix}", f"_udp.{suffix}", suffix}
            for parent in sorted(parents):
                if wire := state.ent(parent, zone):
                    owned.append(wire)
        state.own(owner, owned)
