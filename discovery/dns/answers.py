"""Every DNS answer, pre-encoded, fed by the registry's changes.

`Answers` is a feed of the registry (registry.py): on a full load it builds a new
`AnswerState` and swaps it in whole; on a batch it rebuilds only the names the batch
touched. Each source of names is a `NameSource`: services (and their instances and SRV
names), reverse names (PTR), container names and DNS-SD browsing. A new source is one more entry in
`SOURCES`, not one more branch here. The resolver reads `Answers.state`.
"""

from __future__ import annotations

import bisect
import functools
import heapq
import ipaddress
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ..model import TXT_MAX, Instance, InstanceKey, PortEntry
from ..net.records import Attachment
from .records import (
    AAAA,
    IN,
    MAX_NAME,
    NS,
    PTR,
    RR,
    SOA,
    SRV,
    TXT,
    TYPE_WIRE,
    A,
    Answer,
    Negative,
    RecordSet,
    Soa,
    SrvTarget,
    Stored,
    address_bytes,
    address_part,
    glue_record,
    legal_name,
    name_to_wire,
    srv_part,
    with_serial,
)

if TYPE_CHECKING:
    from ..registry import Changes, ContainerName, Registry, ServiceKey

REVERSE_ZONES = ("in-addr.arpa", "ip6.arpa")
DNS_SCHEMA_VERSION = "1.1.0"
MAX_PTR_TARGETS = 16
IN_WIRE = b"\x00\x01"


@dataclass(frozen=True, slots=True)
class DnsSettings:
    zones: tuple[str, ...]
    dns_ttl: int
    negative_ttl: int
    ns_address: str | None = None  # glue for ns.dns.<zone> when the listener has one
    max_answers: int = 0  # records per answer (a rotated subset); 0: as many as fit


@dataclass(slots=True)
class NameStats:
    """Plain counters of the answer builder, read by metrics.py at scrape time."""

    skipped: int = 0  # records left out: a name they need would be illegal (over 255 octets)


@dataclass(slots=True)
class Zone:
    name: str
    wire: bytes
    negative: Negative

    @property
    def labels(self) -> tuple[bytes, ...]:
        return tuple(label.encode() for label in self.name.split("."))


@dataclass
class AnswerState:
    """Everything one registry revision answers with. Mutated only by `Answers`."""

    settings: DnsSettings
    stats: NameStats = field(default_factory=NameStats)
    zones: list[Zone] = field(default_factory=list)
    names: dict[bytes, Zone] = field(default_factory=dict)  # every name that exists
    # the question as it is on the wire (name lower-cased, type, class IN) -> its answer
    answers: dict[bytes, Stored] = field(default_factory=dict)
    # the same key -> Answer.cuts, for the answers with additional records
    cuts: dict[bytes, tuple[int, ...]] = field(default_factory=dict)
    revision: int = 0
    # names owned by a source's key (an instance, a service, an address, a container)
    _owned: dict[object, list[bytes]] = field(default_factory=dict)
    _ent_refs: dict[bytes, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for zone_name in (*self.settings.zones, *REVERSE_ZONES):
            zone = Zone(zone_name, name_to_wire(zone_name), self._negative(zone_name))
            self.zones.append(zone)
        self.zones.sort(key=lambda z: -len(z.wire))
        self.zones_by_name = {zone.name: zone for zone in self.zones}
        self.forward = [self.zones_by_name[name] for name in self.settings.zones]
        self.apex = self.forward[0]
        self._build_static()

    # zone data

    def zone_of(self, name: str) -> Zone | None:
        for zone in self.zones:
            if name == zone.name or name.endswith("." + zone.name):
                return zone
        return None

    def ttl(self, lease_ttl: int) -> int:
        dns_ttl = self.settings.dns_ttl
        return lease_ttl if lease_ttl < dns_ttl else dns_ttl

    def _soa(self, zone: str) -> RR:
        settings = self.settings
        apex = settings.zones[0]
        soa = Soa(
            f"ns.dns.{apex}",
            f"hostmaster.{apex}",
            self.revision % 2**32,
            minimum=settings.negative_ttl,
        )
        return RR(zone, SOA, settings.negative_ttl, soa)

    def _negative(self, zone: str) -> Negative:
        return Negative.build(self._soa(zone))

    def _build_static(self) -> None:
        ttl = self.settings.dns_ttl
        for zone in self.zones:
            self.set(zone.name, zone, self._apex_types(zone), self._apex_glue())
            if zone.name in REVERSE_ZONES:
                continue
            glue = self._ns_records(zone.name)
            self.set(f"ns.dns.{zone.name}", zone, {rr.rtype: (rr,) for rr in glue})
            for empty in ("dns", "svc", "net"):
                self.set(f"{empty}.{zone.name}", zone, {})
            version = f"dns-version.{zone.name}"
            self.set(version, zone, {TXT: (RR(version, TXT, ttl, (DNS_SCHEMA_VERSION,)),)})

    def _apex_types(self, zone: Zone) -> dict[int, tuple[RR, ...]]:
        return {
            SOA: (self._soa(zone.name),),
            NS: (RR(zone.name, NS, self.settings.dns_ttl, f"ns.dns.{self.apex.name}"),),
        }

    def _ns_records(self, zone: str) -> tuple[RR, ...]:
        """The A/AAAA of ns.dns.<zone>, when the listener names one address."""
        address = self.settings.ns_address
        if not address:
            return ()
        rtype = AAAA if ":" in address else A
        return (RR(f"ns.dns.{zone}", rtype, self.settings.dns_ttl, address),)

    def _apex_glue(self) -> dict[int, tuple[RR, ...]]:
        return {NS: self._ns_records(self.settings.zones[0])}

    def finish(self, revision: int) -> None:
        """Stamp the revision: SOA serials and negative answers carry it. Both end with the
        zone's SOA record, so the new serial is written over the old one in place."""
        self.revision = revision
        serial = revision % 2**32
        soa_key = TYPE_WIRE[SOA] + IN_WIRE
        for zone in self.zones:
            zone.negative = zone.negative.with_serial(serial)
            key = zone.wire + soa_key
            apex = self.answers[key]
            assert isinstance(apex, bytes)
            self.answers[key] = with_serial(apex, serial)

    # names: every name belongs to one owner, empty non-terminals are reference-counted

    def set(
        self,
        name: str,
        zone: Zone,
        types: dict[int, tuple[RR, ...]],
        additional: dict[int, tuple[RR, ...]] | None = None,
    ) -> bytes:
        """A name with records of any type, through the general encoder."""
        extra = additional or {}
        answers = {
            TYPE_WIRE[t]: Answer.build(name, rrs, extra.get(t, ())) for t, rrs in types.items()
        }
        return self.node(name_to_wire(name), zone, answers)

    def node(self, wire: bytes, zone: Zone, types: dict[bytes, Answer]) -> bytes:
        """A name with pre-built answers by type (wire); replaces what it had."""
        self._drop(wire)
        self.names[wire] = zone
        for qtype, answer in types.items():
            key = wire + qtype + IN_WIRE
            self.answers[key] = answer.packed()
            if answer.cuts:
                self.cuts[key] = answer.cuts
        return wire

    def publish(
        self, wire: bytes, zone: Zone, types: dict[bytes, tuple[Stored, tuple[int, ...]]]
    ) -> None:
        """A name with stored answers (and their additional records' cuts) by type (wire);
        replaces what it had."""
        self._drop(wire)
        self.names[wire] = zone
        for qtype, (stored, cuts) in types.items():
            key = wire + qtype + IN_WIRE
            self.answers[key] = stored
            if cuts:
                self.cuts[key] = cuts

    def drop(self, wire: bytes) -> None:
        self._drop(wire)

    def legal(self, wire: bytes, records: int = 1) -> bool:
        """True when a name may be sent; else the records that needed it are counted."""
        if legal_name(wire):
            return True
        self.stats.skipped += records
        return False

    def own(self, owner: object, names: list[bytes]) -> None:
        self._owned[owner] = names

    def release(self, owner: object) -> None:
        for wire in self._owned.pop(owner, ()):
            if wire in self._ent_refs:
                self._ent_refs[wire] -= 1
                if self._ent_refs[wire] == 0:
                    del self._ent_refs[wire]
                    del self.names[wire]
            else:
                self._drop(wire)

    def _drop(self, wire: bytes) -> None:
        if self.names.pop(wire, None) is not None:
            for qtype in TYPE_WIRE.values():
                key = wire + qtype + IN_WIRE
                if self.answers.pop(key, None) is not None:
                    self.cuts.pop(key, None)

    def ent(self, name: str, zone: Zone) -> bytes:
        """Hold an empty non-terminal (b"" for a static name, which is never released)."""
        return self.ent_wire(name_to_wire(name), zone)

    def ent_wire(self, wire: bytes, zone: Zone) -> bytes:
        count = self._ent_refs.get(wire, 0)
        if count == 0:
            if wire in self.names:  # a static name (svc.<zone>): never released
                return b""
            self.names[wire] = zone
        self._ent_refs[wire] = count + 1
        return wire


class NameSource(Protocol):
    """One kind of registry record turned into DNS names."""

    def keys(self, registry: Registry) -> Iterable[object]:
        """Every key this source has names for (a full build)."""

    def touched(self, changes: Changes) -> Iterable[object]:
        """The keys a batch changed."""

    def build(self, state: AnswerState, registry: Registry, key: object) -> None:
        """Release the names of key and build them again from the registry."""


class Answers:
    """The registry feed that owns the pre-encoded answers."""

    def __init__(self, settings: DnsSettings, sources: Iterable[NameSource] = ()) -> None:
        self.settings = settings
        self.sources = list(sources) or [
            InstanceNames(),
            ServiceNames(),
            ReverseNames(),
            ContainerNames(),
            DnsSdNames(),
        ]
        self.stats = NameStats()
        self.state = AnswerState(settings, self.stats)
        self.synced = False

    def reset(self, registry: Registry) -> None:
        state = AnswerState(self.settings, self.stats)
        for source in self.sources:
            for key in source.keys(registry):
                source.build(state, registry, key)
        state.finish(registry.revision)
        self.state = state
        self.synced = True

    def update(self, registry: Registry, changes: Changes) -> None:
        state = self.state
        for source in self.sources:
            for key in source.touched(changes):
                source.build(state, registry, key)
        state.finish(changes.revision)


# the sources


def _label(text: str) -> bytes:
    raw = text.encode("ascii")
    size = len(raw)
    return _LENGTHS[size if size < 255 else 255] + raw  # over 63: an illegal name, never sent


_LENGTHS = [bytes((size,)) for size in range(256)]


def _service_wire(service: ServiceKey, zone: Zone) -> bytes:
    return _service_wire_of(service, zone.wire)


@functools.lru_cache(maxsize=65_536)  # every instance of a service names it (one each)
def _service_wire_of(service: ServiceKey, zone_wire: bytes) -> bytes:
    ns, svc = service
    return _label(svc) + _label(ns) + b"\x03svc" + zone_wire


def _container_wire(container: ContainerName, zone: Zone) -> bytes:
    network, name = container
    return _label(name) + _label(network) + b"\x03net" + zone.wire


def instance_name(key: InstanceKey, zone: str) -> str:
    return f"{key.name}.{key.service}.{key.namespace}.svc.{zone}"


PortType = tuple[str, str]  # (port name, protocol)
_Entry = tuple[object, bytes, int, tuple[bytes, bytes] | None]  # RecordSet.fill's


class ServiceNames:
    """<svc>.<ns>.svc.Z (A/AAAA, SRV), _<port>._<proto>.<svc>… (SRV), _<proto>.<svc>… (empty).

    Each service keeps its answers as record sets (records.RecordSet) that a change updates
    one instance at a time: a change to a service of any size costs the records of the
    instances it touched. Small sets are re-encoded whole (bounded by records.EAGER)."""

    def __init__(self) -> None:
        self._services: dict[ServiceKey, _Service] = {}
        self._changed: dict[ServiceKey, set[str] | None] = {}  # None: every instance

    def keys(self, registry: Registry) -> Iterable[object]:
        self._services.clear()
        services = list(registry.services())
        self._changed = dict.fromkeys(services)
        return services

    def touched(self, changes: Changes) -> Iterable[object]:
        for key in changes.instances:
            names = self._changed.setdefault(key.service_key, set())
            if names is not None:
                names.add(key.name)
        return changes.services

    def build(self, state: AnswerState, registry: Registry, key: object) -> None:
        service: ServiceKey = key  # type: ignore[assignment]
        changed = self._changed.pop(service, None)
        instances = registry.instances(service)
        entry = self._services.get(service)
        if entry is None:  # a service new to this source: every instance, in one pass
            entry = self._services[service] = _Service(service, state)
            entry.fill(state, instances)
        else:
            for name in sorted(instances) if changed is None else sorted(changed):
                entry.update(state, name, instances.get(name))
        entry.publish(state)
        if not entry.held:
            del self._services[service]


class _Service:
    def __init__(self, service: ServiceKey, state: AnswerState) -> None:
        self.service = service
        limit = state.settings.max_answers
        self.limit = limit
        self.bases = [(zone, _service_wire(service, zone)) for zone in state.forward]
        self.legal = [legal_name(base) for _, base in self.bases]  # so <label>.<base> is
        self.addresses: dict[int, RecordSet] = {
            A: RecordSet(A, limit),
            AAAA: RecordSet(AAAA, limit),
        }
        self.srv = [RecordSet(SRV, limit) for _ in self.bases]  # every named port, per zone
        self.ports: dict[PortType, list[RecordSet]] = {}  # one named port, per zone
        # instance -> its records: the set, the key in it, the named port's type (if one)
        self.held: dict[str, list[tuple[RecordSet, object, PortType | None]]] = {}
        self.dirty: set[PortType] = set()
        self.ent = False  # holds <ns>.svc.Z

    def update(self, state: AnswerState, name: str, instance: Instance | None) -> None:
        for records, key, port_type in self.held.pop(name, ()):
            records.remove(key)
            if port_type is not None:
                self.dirty.add(port_type)
        if instance is None:
            return
        held: list[tuple[RecordSet, object, PortType | None]] = []
        for records, key, part, ttl, glue, port_type in self._records(state, name, instance):
            records.put(key, part, ttl, glue)
            held.append((records, key, port_type))
            if port_type is not None:
                self.dirty.add(port_type)
        self.held[name] = held

    def fill(self, state: AnswerState, instances: Mapping[str, Instance]) -> None:
        """Every instance of a service new to this source (a full load): each record set's
        records gathered in key order, then set in one pass (no insertion one by one)."""
        gathered: dict[int, tuple[RecordSet, list[_Entry]]] = {}
        for name in sorted(instances):
            held: list[tuple[RecordSet, object, PortType | None]] = []
            for records, key, part, ttl, glue, port_type in self._records(
                state, name, instances[name]
            ):
                found = gathered.get(id(records))
                if found is None:
                    found = gathered[id(records)] = (records, [])
                found[1].append((key, part, ttl, glue))
                held.append((records, key, port_type))
                if port_type is not None:
                    self.dirty.add(port_type)
            self.held[name] = held
        for records, entries in gathered.values():
            records.fill(entries)

    def _records(
        self, state: AnswerState, name: str, instance: Instance
    ) -> list[tuple[RecordSet, object, bytes, int, tuple[bytes, bytes] | None, PortType | None]]:
        """The records of one instance: (its set, key in it, record, TTL, glue, port type)."""
        spec = instance.spec
        ttl = state.ttl(spec.ttl)
        rtype, part = address_part(spec.address)
        found: list[
            tuple[RecordSet, object, bytes, int, tuple[bytes, bytes] | None, PortType | None]
        ] = [(self.addresses[rtype], name, part, ttl, None, None)]
        if not spec.ports:
            return found
        glue = glue_record(spec.address, ttl)
        numbers, named = _port_lists(spec.ports)
        label = _label(name)
        for index, (_, base) in enumerate(self.bases):
            target = label + base
            if not ((self.legal[index] and len(label) <= 64 and len(target) <= MAX_NAME)
                    or state.legal(target, len(numbers) + len(named))):  # fmt: skip
                continue
            parts = {n: srv_part(spec.priority, spec.weight, n, target) for n in numbers}
            pair = (target, glue)
            every = self.srv[index]
            for number in numbers:
                found.append((every, (name, number), parts[number], ttl, pair, None))
            for port_name, protocol, number in named:
                port_type = (port_name, protocol)
                sets = self.ports.get(port_type)
                if sets is None:
                    sets = self.ports[port_type] = [RecordSet(SRV, self.limit) for _ in self.bases]
                found.append((sets[index], (name, number), parts[number], ttl, pair, port_type))
        return found

    def publish(self, state: AnswerState) -> None:
        """Set the service's names in the state from its record sets."""
        for index, (zone, base) in enumerate(self.bases):
            offset = 12 + len(base) + 4
            types: dict[bytes, tuple[Stored, tuple[int, ...]]] = {}
            for rtype, records in self.addresses.items():
                if len(records):
                    types[TYPE_WIRE[rtype]] = _stored(records, offset)
            if len(self.srv[index]):
                types[TYPE_WIRE[SRV]] = _stored(self.srv[index], offset)
            if types and state.legal(base, len(types)):
                state.publish(base, zone, types)
            else:
                state.drop(base)
            protocols: dict[str, bool] = {}
            for port_type, sets in self.ports.items():
                present = bool(len(sets[index]))
                protocols[port_type[1]] = protocols.get(port_type[1], False) or present
                if port_type not in self.dirty:
                    continue
                wire = _label(f"_{port_type[0]}") + _label(f"_{port_type[1]}") + base
                if present and state.legal(wire):
                    srv = {TYPE_WIRE[SRV]: _stored(sets[index], 12 + len(wire) + 4)}
                    state.publish(wire, zone, srv)
                else:
                    state.drop(wire)
            for protocol, present in protocols.items():
                wire = _label(f"_{protocol}") + base
                if present and legal_name(wire):
                    if wire not in state.names:
                        state.publish(wire, zone, {})
                else:
                    state.drop(wire)
        for port_type in [t for t, sets in self.ports.items() if not any(map(len, sets))]:
            del self.ports[port_type]
        self.dirty.clear()
        if self.held and not self.ent:
            owned = [
                state.ent(f"{self.service[0]}.svc.{zone.name}", zone) for zone, _ in self.bases
            ]
            state.own(("service", self.service), [wire for wire in owned if wire])
            self.ent = True
        elif not self.held and self.ent:
            state.release(("service", self.service))
            self.ent = False


@functools.lru_cache(maxsize=4096)  # instances of a service mostly have the same ports
def _port_lists(
    ports: tuple[PortEntry, ...],
) -> tuple[tuple[int, ...], tuple[tuple[str, str, int], ...]]:
    """The port numbers, and the (name, protocol, number) of the named ports, in order."""
    numbers = tuple(sorted({port.port for port in ports}))
    return numbers, tuple(sorted({(port.name, port.protocol, port.port) for port in ports}))


def _stored(records: RecordSet, offset: int) -> tuple[Stored, tuple[int, ...]]:
    """A small set encoded whole (served like any pre-encoded answer), else the set."""
    if records.small:
        return records.packed(offset)
    return records, ()


class InstanceNames:
    """<inst>.<svc>.<ns>.svc.Z: one instance's address (rebuilt alone: a change to one
    instance of a large service costs one name here)."""

    def keys(self, registry: Registry) -> Iterable[object]:
        return [i.key for instances in registry.services().values() for i in instances.values()]

    def touched(self, changes: Changes) -> Iterable[object]:
        return changes.instances

    def build(self, state: AnswerState, registry: Registry, key: object) -> None:
        instance_key: InstanceKey = key  # type: ignore[assignment]
        state.release(instance_key)
        instance = registry.instance(instance_key)
        if instance is None:
            return
        rtype = address_bytes(instance.spec.address)[0]
        answer = {
            TYPE_WIRE[rtype]: Answer.addresses(
                state.ttl(instance.spec.ttl), [instance.spec.address]
            )
        }
        label = _label(instance_key.name)
        wires = [(label + _service_wire(instance_key.service_key, z), z) for z in state.forward]
        state.own(
            instance_key,
            [state.node(wire, zone, answer) for wire, zone in wires if state.legal(wire)],
        )


def _srv(qname: bytes, targets: list[SrvTarget]) -> Answer:
    return Answer.services(qname, min(t.ttl for t in targets), targets)


def _holder_order(holder: Instance | Attachment) -> tuple[int, str, str, str]:
    if isinstance(holder, Attachment):
        return (0, holder.network, holder.name, holder.container_id)
    key = holder.key
    return (1, key.namespace, key.service, key.name)


class ReverseNames:
    """PTR for every address an instance or a container holds."""

    def keys(self, registry: Registry) -> Iterable[object]:
        addresses: set[str] = set()
        for instances in registry.services().values():
            addresses.update(i.spec.address for i in instances.values())
        for name in registry.containers():
            addresses.update(a.address for a in registry.container(name).values())
        return addresses

    def touched(self, changes: Changes) -> Iterable[object]:
        return changes.addresses

    def build(self, state: AnswerState, registry: Registry, key: object) -> None:
        address: str = key  # type: ignore[assignment]
        state.release(("address", address))
        holders = registry.holders(address)
        if not holders:
            return
        # Many instances may share a node's address: name the first few in name order
        # (the same on every replica, however their updates arrived), so the answer stays
        # small and a change costs one pass over the holders, not a sort.
        if len(holders) == 1:
            first = list(holders.values())
        else:
            first = heapq.nsmallest(MAX_PTR_TARGETS, holders.values(), key=_holder_order)
        apex = state.apex
        named = [(h, wire) for h in first if state.legal(wire := _holder_wire(h, apex))]
        if not named:
            return
        reverse = _reverse_name(address)
        zone = state.zone_of(reverse)
        assert zone is not None
        if len(named) == 1:
            answer = Answer.pointers(_holder_ttl(state, named[0][0]), [named[0][1]])
        else:  # several targets share a suffix: the general encoder compresses them
            ttl = min(_holder_ttl(state, h) for h, _ in named)
            records = tuple(RR(reverse, PTR, ttl, _holder_name(h, apex.name)) for h, _ in named)
            answer = Answer.build(reverse, records)
        wire = name_to_wire(reverse)
        owned = [state.node(wire, zone, {TYPE_WIRE[PTR]: answer})]
        # the empty non-terminals between the name and its zone: suffixes of its wire
        at = wire[0] + 1
        while len(wire) - at > len(zone.wire):
            if parent := state.ent_wire(wire[at:], zone):
                owned.append(parent)
            at += wire[at] + 1
        state.own(("address", address), owned)


def _holder_ttl(state: AnswerState, holder: Instance | Attachment) -> int:
    return state.settings.dns_ttl if isinstance(holder, Attachment) else state.ttl(holder.spec.ttl)


def _holder_wire(holder: Instance | Attachment, zone: Zone) -> bytes:
    if isinstance(holder, Attachment):
        return _container_wire(holder.container, zone)
    return _label(holder.key.name) + _service_wire(holder.key.service_key, zone)


def _holder_name(holder: Instance | Attachment, zone: str) -> str:
    if isinstance(holder, Attachment):
        return f"{holder.name}.{holder.network}.net.{zone}"
    return instance_name(holder.key, zone)


def _reverse_name(address: str) -> str:
    if ":" in address:
        return ipaddress.ip_address(address).reverse_pointer
    return ".".join(reversed(address.split("."))) + ".in-addr.arpa"


class ContainerNames:
    """<name>.<net>.net.Z: A/AAAA of every attachment with that name in the network."""

    def keys(self, registry: Registry) -> Iterable[object]:
        return list(registry.containers())

    def touched(self, changes: Changes) -> Iterable[object]:
        return changes.containers

    def build(self, state: AnswerState, registry: Registry, key: object) -> None:
        container: ContainerName = key  # type: ignore[assignment]
        state.release(("container", container))
        attachments = registry.container(container)
        if not attachments:
            return
        addresses = sorted({a.address for a in attachments.values()})
        by_type: dict[int, list[str]] = defaultdict(list)
        for address in addresses:
            by_type[address_bytes(address)[0]].append(address)
        ttl = state.settings.dns_ttl
        owned = []
        for zone in state.forward:
            wire = _container_wire(container, zone)
            if not state.legal(wire):
                continue
            types = {TYPE_WIRE[t]: Answer.addresses(ttl, group) for t, group in by_type.items()}
            owned.append(state.node(wire, zone, types))
            if ent := state.ent(f"{container[0]}.net.{zone.name}", zone):
                owned.append(ent)
        state.own(("container", container), owned)


# DNS-SD (RFC 6763) browsing of every namespace: one more name source.
#
# In every forward zone Z, for a namespace NS with instances that expose named ports:
#
#     _services._dns-sd._udp.NS.svc.Z  PTR  _<port>._<proto>.NS.svc.Z      (service types, 9)
#     _<port>._<proto>.NS.svc.Z         PTR  <inst>._<port>._<proto>.NS.svc.Z  (instances, 4.1)
#     <inst>._<port>._<proto>.NS.svc.Z  SRV  priority weight port <inst>.<svc>.NS.svc.Z (+ glue)
#                                       TXT  "key=value" per metadata entry, or one empty string (6)
#
# Instance names of two services of one namespace may coincide: such a service instance name
# answers one SRV record per instance (clients choose by priority and weight) and the TXT of the
# first service in name order. The SRV and TXT of an instance name are rebuilt alone; the source
# keeps the members of each service type, so a change re-encodes only the pointer lists of the
# types it touched (one PTR per member, from a list kept sorted).

_SERVICES = b"\x09_services\x07_dns-sd\x04_udp"  # the service type enumeration (RFC 6763 9)
_TO_QUESTION = b"\xc0\x0c"
_PTR_IN = PTR.to_bytes(2, "big") + IN.to_bytes(2, "big")


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
        longest = max(state.forward, key=lambda zone: len(zone.wire))
        base = _namespace_wire(namespace, longest.wire)
        for port_type in [t for t in by_type if not legal_name(_label(name) + _type_wire(t, base))]:
            state.stats.skipped += len(by_type.pop(port_type))
        types = {
            port_type: min(state.ttl(instance.spec.ttl) for instance, _ in pairs)
            for port_type, pairs in by_type.items()
        }
        self._record(state, namespace, name, types)
        if not by_type:
            return
        txt: dict[str, tuple[bytes, ...]] = {}
        owned: list[bytes] = []
        label = _label(name)
        for zone in state.forward:
            base = _namespace_wire(namespace, zone.wire)
            for port_type, pairs in sorted(by_type.items()):
                first = pairs[0][0]
                if first.key.service not in txt:
                    txt[first.key.service] = txt_strings(first)
                targets = [
                    SrvTarget(
                        (spec := instance.spec).priority,
                        spec.weight,
                        port,
                        target,
                        spec.address,
                        state.ttl(spec.ttl),
                    )
                    for instance, port in pairs
                    if state.legal(target := label + _label(instance.key.service) + base)
                ]
                if not targets:
                    continue
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
