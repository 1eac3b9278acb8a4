"""The in-memory registry: instances by service, and every DNS answer pre-built.

The watcher hands batches of store events to `Cache.apply`; a full load builds a new
`CacheState` and swaps it in whole. Both run without awaiting, so a query always sees
one consistent state. Per batch only the names of changed instances, services and
addresses are rebuilt.
"""

from __future__ import annotations

import asyncio
import heapq
import ipaddress
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .dns.records import (
    AAAA,
    NS,
    PTR,
    RR,
    SOA,
    SRV,
    TXT,
    A,
    Answer,
    Negative,
    Packed,
    Soa,
    SrvTarget,
    address_bytes,
    name_to_wire,
    with_serial,
)
from .model import Instance, InstanceKey, decode_registration
from .store.base import Event, EventType, KeyValue, Snapshot

log = logging.getLogger(__name__)

REVERSE_ZONES = ("in-addr.arpa", "ip6.arpa")
DNS_SCHEMA_VERSION = "1.1.0"
MAX_PTR_TARGETS = 16
IN_WIRE = b"\x00\x01"
TYPE_KEYS = {t: t.to_bytes(2, "big") for t in (A, NS, SOA, PTR, TXT, AAAA, SRV)}


@dataclass(frozen=True, slots=True)
class DnsSettings:
    zones: tuple[str, ...]
    dns_ttl: int
    negative_ttl: int
    ns_address: str | None = None  # glue for ns.dns.<zone> when the listener has one


@dataclass(slots=True)
class Zone:
    name: str
    wire: bytes
    negative: Negative

    @property
    def labels(self) -> tuple[bytes, ...]:
        return tuple(label.encode() for label in self.name.split("."))


ServiceKey = tuple[str, str]


@dataclass
class CacheState:
    """Everything one registry revision answers with. Mutated only by `Cache`."""

    settings: DnsSettings
    zones: list[Zone] = field(default_factory=list)
    names: dict[bytes, Zone] = field(default_factory=dict)  # every name that exists
    # the question as it is on the wire (name lower-cased, type, class IN) -> its answer
    answers: dict[bytes, Packed] = field(default_factory=dict)
    # the same key -> Answer.cuts, for the answers with additional records
    cuts: dict[bytes, tuple[int, ...]] = field(default_factory=dict)
    services: dict[ServiceKey, dict[str, Instance]] = field(default_factory=dict)
    by_address: dict[str, dict[InstanceKey, Instance]] = field(default_factory=dict)
    keys: dict[bytes, InstanceKey] = field(default_factory=dict)
    service_revision: dict[ServiceKey, int] = field(default_factory=dict)
    revision: int = 0
    # names owned by an instance, a service (its own names) and an address (its PTR)
    _owned: dict[object, list[bytes]] = field(default_factory=dict)
    _ent_refs: dict[bytes, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for zone_name in (*self.settings.zones, *REVERSE_ZONES):
            zone = Zone(zone_name, name_to_wire(zone_name), self._negative(zone_name))
            self.zones.append(zone)
        self.zones.sort(key=lambda z: -len(z.wire))
        self.zones_by_name = {zone.name: zone for zone in self.zones}
        self._forward = [self.zones_by_name[name] for name in self.settings.zones]
        self._build_static()

    # zone data

    def forward_zones(self) -> list[Zone]:
        return self._forward

    def zone_of(self, name: str) -> Zone | None:
        for zone in self.zones:
            if name == zone.name or name.endswith("." + zone.name):
                return zone
        return None

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
            self._set(zone.name, zone, self._apex_types(zone), self._apex_glue(zone))
            if zone.name in REVERSE_ZONES:
                continue
            glue = self._ns_records(zone.name)
            self._set(f"ns.dns.{zone.name}", zone, {rr.rtype: (rr,) for rr in glue})
            self._set(f"dns.{zone.name}", zone, {})
            self._set(f"svc.{zone.name}", zone, {})
            version = f"dns-version.{zone.name}"
            self._set(version, zone, {TXT: (RR(version, TXT, ttl, (DNS_SCHEMA_VERSION,)),)})

    def _apex_types(self, zone: Zone) -> dict[int, tuple[RR, ...]]:
        apex = self.settings.zones[0]
        return {
            SOA: (self._soa(zone.name),),
            NS: (RR(zone.name, NS, self.settings.dns_ttl, f"ns.dns.{apex}"),),
        }

    def _set(
        self,
        name: str,
        zone: Zone,
        types: dict[int, tuple[RR, ...]],
        additional: dict[int, tuple[RR, ...]] | None = None,
    ) -> bytes:
        extra = additional or {}
        answers = {
            TYPE_KEYS[t]: Answer.build(name, rrs, extra.get(t, ())) for t, rrs in types.items()
        }
        return self._node(name_to_wire(name), zone, answers)

    def _ns_records(self, zone: str) -> tuple[RR, ...]:
        """The A/AAAA of ns.dns.<zone>, when the listener names one address."""
        address = self.settings.ns_address
        if not address:
            return ()
        rtype = AAAA if ":" in address else A
        return (RR(f"ns.dns.{zone}", rtype, self.settings.dns_ttl, address),)

    def _apex_glue(self, zone: Zone) -> dict[int, tuple[RR, ...]]:
        return {NS: self._ns_records(self.settings.zones[0])}

    def finish(self, revision: int) -> None:
        """Stamp the revision: SOA serials and negative answers carry it. Both end with the
        zone's SOA record, so the new serial is written over the old one in place."""
        self.revision = revision
        serial = revision % 2**32
        soa_key = TYPE_KEYS[SOA] + IN_WIRE
        for zone in self.zones:
            zone.negative = zone.negative.with_serial(serial)
            key = zone.wire + soa_key
            apex = self.answers[key]
            assert isinstance(apex, bytes)
            self.answers[key] = with_serial(apex, serial)

    # ownership: every name belongs to one owner, ancestors are reference-counted

    def _release(self, owner: object) -> None:
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
            for qtype in TYPE_KEYS.values():
                key = wire + qtype + IN_WIRE
                if self.answers.pop(key, None) is not None:
                    self.cuts.pop(key, None)

    def _ent(self, name: str, zone: Zone) -> bytes:
        wire = name_to_wire(name)
        count = self._ent_refs.get(wire, 0)
        if count == 0:
            if wire in self.names:  # a static name (svc.<zone>): never released
                return b""
            self.names[wire] = zone
        self._ent_refs[wire] = count + 1
        return wire

    # instances

    def put(self, kv: KeyValue, prefix: str) -> tuple[ServiceKey, set[str]] | None:
        key = InstanceKey.from_store_key(prefix, kv.key)
        spec = decode_registration(kv.value) if key is not None else None
        if key is None or spec is None:
            log.warning("ignoring store key %r: not an instance record", kv.key)
            return None
        old = self._remove(kv.key)
        instance = Instance(key, spec, kv.lease, kv.mod_revision)
        self.keys[kv.key] = key
        self.services.setdefault(key.service_key, {})[key.name] = instance
        self.by_address.setdefault(spec.address, {})[key] = instance
        self._build_instance(instance)
        addresses = {spec.address}
        if old is not None:
            addresses.add(old.spec.address)
        self.service_revision[key.service_key] = kv.mod_revision
        return key.service_key, addresses

    def delete(self, store_key: bytes, revision: int) -> tuple[ServiceKey, set[str]] | None:
        old = self._remove(store_key)
        if old is None:
            return None
        self.service_revision[old.key.service_key] = revision
        return old.key.service_key, {old.spec.address}

    def _remove(self, store_key: bytes) -> Instance | None:
        key = self.keys.pop(store_key, None)
        if key is None:
            return None
        instances = self.services[key.service_key]
        old = instances.pop(key.name)
        if not instances:
            del self.services[key.service_key]
        holders = self.by_address[old.spec.address]
        del holders[key]
        if not holders:
            del self.by_address[old.spec.address]
        self._release(key)
        return old

    def _ttl(self, instance: Instance) -> int:
        return min(self.settings.dns_ttl, instance.spec.ttl)

    def _node(self, wire: bytes, zone: Zone, types: dict[bytes, Answer]) -> bytes:
        self._drop(wire)
        self.names[wire] = zone
        for qtype, answer in types.items():
            key = wire + qtype + IN_WIRE
            self.answers[key] = answer.packed()
            if answer.cuts:
                self.cuts[key] = answer.cuts
        return wire

    def _build_instance(self, instance: Instance) -> None:
        rtype, _ = address_bytes(instance.spec.address)
        answer = Answer.addresses(self._ttl(instance), [instance.spec.address])
        label = _label(instance.key.name)
        self._owned[instance.key] = [
            self._node(
                label + self._service_wire(instance.key.service_key, zone),
                zone,
                {TYPE_KEYS[rtype]: answer},
            )
            for zone in self.forward_zones()
        ]

    @staticmethod
    def _service_wire(service: ServiceKey, zone: Zone) -> bytes:
        ns, svc = service
        return _label(svc) + _label(ns) + b"\x03svc" + zone.wire

    def rebuild_service(self, service: ServiceKey) -> None:
        self._release(("service", service))
        instances = sorted(self.services.get(service, {}).values(), key=lambda i: i.key.name)
        if not instances:
            return
        by_type: dict[int, list[Instance]] = defaultdict(list)
        by_port: dict[tuple[str, str], list[tuple[Instance, int]]] = defaultdict(list)
        for instance in instances:
            by_type[address_bytes(instance.spec.address)[0]].append(instance)
            for port in instance.spec.ports:
                by_port[(port.name, port.protocol)].append((instance, port.port))
        all_ports = sorted(
            (pair for pairs in by_port.values() for pair in pairs),
            key=lambda pair: (pair[0].key.name, pair[1]),
        )
        owned: list[bytes] = []
        for zone in self.forward_zones():
            base = self._service_wire(service, zone)
            types = {
                TYPE_KEYS[rtype]: Answer.addresses(
                    min(self._ttl(i) for i in group), [i.spec.address for i in group]
                )
                for rtype, group in by_type.items()
            }
            all_targets = self._targets(all_ports, base)
            if all_targets:
                types[TYPE_KEYS[SRV]] = self._srv(base, all_targets)
            owned.append(self._node(base, zone, types))
            protocols = set()
            for (port_name, protocol), pairs in sorted(by_port.items()):
                wire = _label(f"_{port_name}") + _label(f"_{protocol}") + base
                # one named port (the usual case): the same targets as the service name's
                targets = all_targets if pairs == all_ports else self._targets(pairs, base)
                owned.append(self._node(wire, zone, {TYPE_KEYS[SRV]: self._srv(wire, targets)}))
                protocols.add(protocol)
            for protocol in sorted(protocols):
                owned.append(self._node(_label(f"_{protocol}") + base, zone, {}))
            if ent := self._ent(f"{service[0]}.svc.{zone.name}", zone):
                owned.append(ent)
        self._owned[("service", service)] = owned

    def _targets(self, pairs: list[tuple[Instance, int]], base: bytes) -> list[SrvTarget]:
        dns_ttl = self.settings.dns_ttl
        targets = [
            SrvTarget(
                (spec := instance.spec).priority,
                spec.weight,
                port,
                _label(instance.key.name) + base,
                spec.address,
                min(dns_ttl, spec.ttl),
            )
            for instance, port in pairs
        ]
        # one port number under two protocols is one SRV record (RFC 2181 5: no duplicates)
        return list(dict.fromkeys(targets))

    @staticmethod
    def _srv(qname: bytes, targets: list[SrvTarget]) -> Answer:
        return Answer.services(qname, min(t.ttl for t in targets), targets)

    def rebuild_address(self, address: str) -> None:
        self._release(("address", address))
        holders = self.by_address.get(address)
        if not holders:
            return
        reverse = _reverse_name(address)
        zone = self.zone_of(reverse)
        assert zone is not None
        apex = self.zones_by_name[self.settings.zones[0]]
        # Many instances may share a node's address: name the first few in name order
        # (the same on every replica, however their updates arrived), so the answer stays
        # small and a change costs one pass over the holders, not a sort.
        named = heapq.nsmallest(MAX_PTR_TARGETS, holders.values(), key=_name_order)
        ttl = min(self._ttl(i) for i in named)
        if len(named) == 1:
            target = _label(named[0].key.name) + self._service_wire(named[0].key.service_key, apex)
            answer = Answer.pointers(ttl, [target])
        else:  # several targets share a suffix: the general encoder compresses them
            records = tuple(RR(reverse, PTR, ttl, instance_name(i.key, apex.name)) for i in named)
            answer = Answer.build(reverse, records)
        owned = [self._node(name_to_wire(reverse), zone, {TYPE_KEYS[PTR]: answer})]
        labels = reverse.split(".")
        for depth in range(1, len(labels) - len(zone.name.split("."))):
            if wire := self._ent(".".join(labels[depth:]), zone):
                owned.append(wire)
        self._owned[("address", address)] = owned


def _name_order(instance: Instance) -> tuple[str, str, str]:
    key = instance.key
    return (key.namespace, key.service, key.name)


def _label(text: str) -> bytes:
    raw = text.encode("ascii")
    return bytes((len(raw),)) + raw


def _reverse_name(address: str) -> str:
    if ":" in address:
        return ipaddress.ip_address(address).reverse_pointer
    return ".".join(reversed(address.split("."))) + ".in-addr.arpa"


def instance_name(key: InstanceKey, zone: str) -> str:
    return f"{key.name}.{key.service}.{key.namespace}.svc.{zone}"


class Cache:
    """The registry every replica answers from, and the signals around it."""

    def __init__(self, settings: DnsSettings, prefix: str) -> None:
        self.settings = settings
        self.prefix = prefix
        self.state = CacheState(settings)
        self.synced = False
        self.last_contact = 0.0  # monotonic time of the last word from the store
        self.store_healthy = False
        self._changed: asyncio.Future[None] | None = None
        self.closed = False

    @property
    def revision(self) -> int:
        return self.state.revision

    def load(self, snapshot: Snapshot) -> None:
        """Replace everything with a full load taken at one revision."""
        state = CacheState(self.settings)
        services: set[ServiceKey] = set()
        addresses: set[str] = set()
        for kv in snapshot.items:
            if touched := state.put(kv, self.prefix):
                services.add(touched[0])
                addresses |= touched[1]
        self._finish(state, services, addresses, snapshot.revision)
        # Every service known before or after may have changed: long polls on any wake.
        for service in state.services.keys() | self.state.service_revision.keys():
            state.service_revision[service] = snapshot.revision
        self.state = state
        self.synced = True
        self._notify()

    def apply(self, events: Iterable[Event]) -> None:
        state = self.state
        services: set[ServiceKey] = set()
        addresses: set[str] = set()
        revision = state.revision
        for event in events:
            if event.mod_revision <= state.revision:
                continue  # already part of the loaded state
            revision = max(revision, event.mod_revision)
            if event.type is EventType.PUT:
                kv = KeyValue(event.key, event.value, event.mod_revision, event.lease)
                touched = state.put(kv, self.prefix)
            else:
                touched = state.delete(event.key, event.mod_revision)
            if touched:
                services.add(touched[0])
                addresses |= touched[1]
        if revision == state.revision:
            return
        self._finish(state, services, addresses, revision)
        self._notify()

    @staticmethod
    def _finish(
        state: CacheState, services: set[ServiceKey], addresses: set[str], rev: int
    ) -> None:
        for service in services:
            state.rebuild_service(service)
        for address in addresses:
            state.rebuild_address(address)
        state.finish(rev)

    def mark_contact(self, healthy: bool) -> None:
        self.store_healthy = healthy
        if healthy:
            self.last_contact = time.monotonic()

    def close(self) -> None:
        """Wake every waiter for good: the server is shutting down."""
        self.closed = True
        self._notify()

    def _notify(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
        self._changed = None

    async def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until predicate() holds or the timeout passes; returns predicate()."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0 or self.closed:
                return False
            if self._changed is None:
                self._changed = loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._changed), remaining)
            except TimeoutError:
                return predicate()
        return True
