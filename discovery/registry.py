"""The registry: indexes of everything the watch delivers, behind accessors.

The watcher hands it a full load (`load`) or batches of events (`apply`). It decodes each
store key into a record, keeps the indexes the API and the metrics read (instances by
service, networks, node blocks, attachments), and tells its feeds what changed: the DNS
answer builder (dns/answers.py) is one, the overlay programmer another. Both calls run
without awaiting, so readers always see one revision. Waiters (long polls, read-your-writes)
wake when a change lands.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from .model import Instance, InstanceKey, decode_registration, instances_prefix
from .net.records import Attachment, Block, Network, NetworkKeys, attachment_instance
from .store.base import Event, EventType, KeyValue, Snapshot

log = logging.getLogger(__name__)

ServiceKey = tuple[str, str]
ContainerName = tuple[str, str]  # (network, name)
_EMPTY: Mapping[str, Instance] = {}
K = TypeVar("K")
S = TypeVar("S")
V = TypeVar("V")


@dataclass(slots=True)
class Changes:
    """What one batch touched: each feed rebuilds only these."""

    revision: int = 0
    instances: set[InstanceKey] = field(default_factory=set)
    services: set[ServiceKey] = field(default_factory=set)
    addresses: set[str] = field(default_factory=set)
    containers: set[ContainerName] = field(default_factory=set)
    networks: set[str] = field(default_factory=set)
    blocks: set[str] = field(default_factory=set)  # networks whose node blocks changed

    def __bool__(self) -> bool:
        return bool(
            self.services or self.addresses or self.containers or self.networks or self.blocks
        )


class Feed(Protocol):
    """A consumer of the registry's changes (the DNS answers, the overlay)."""

    def reset(self, registry: Registry) -> None:
        """Rebuild everything from the registry (after a full load)."""

    def update(self, registry: Registry, changes: Changes) -> None:
        """Rebuild what `changes` names; the registry is at changes.revision."""


class Registry:
    """Every record of one store revision, and the signals around it."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.revision = 0
        self.synced = False  # the first full load has finished
        self.store_healthy = False
        self.last_contact = 0.0  # monotonic time of the last word from the store
        self.closed = False
        self._feeds: list[Feed] = []
        self._changed: asyncio.Future[None] | None = None
        self._reaching: list[tuple[int, int, asyncio.Future[None]]] = []  # a heap by revision
        # waiters on one service each (long polls): a change wakes only its service's
        self._service_waiters: dict[ServiceKey, set[asyncio.Future[None]]] = {}
        self._sequence = 0
        self._abandoned = 0  # entries of _reaching whose waiter gave up
        self._keys = NetworkKeys(prefix)
        self._clear()

    def _clear(self) -> None:
        # instances: registered ones, and those that attachments with a service make
        self._registered: dict[ServiceKey, dict[str, Instance]] = {}
        self._derived: dict[ServiceKey, dict[str, Instance]] = {}
        self._services: dict[ServiceKey, dict[str, Instance]] = {}  # registered over derived
        self._instance_keys: dict[bytes, InstanceKey] = {}
        self._service_revision: dict[ServiceKey, int] = {}
        # for listings page by page: names in order, sorted once and then kept in order
        self._sorted_services: list[ServiceKey] | None = None
        self._sorted_names: dict[ServiceKey, list[str]] = {}
        self._namespace_counts: dict[str, int] = {}  # live instances per namespace
        # who holds an address: instances by key, attachments by store key
        self._by_address: dict[str, dict[object, Instance | Attachment]] = {}
        self._networks: dict[str, Network] = {}
        self._blocks: dict[str, dict[str, Block]] = {}  # network -> cidr -> block
        self._attachments: dict[str, dict[bytes, Attachment]] = {}  # network -> key -> it
        self._containers: dict[ContainerName, dict[bytes, Attachment]] = {}

    # feeds and waiting

    def subscribe(self, feed: Feed) -> None:
        self._feeds.append(feed)
        if self.synced:
            feed.reset(self)

    def mark_contact(self, healthy: bool) -> None:
        self.store_healthy = healthy
        if healthy:
            self.last_contact = time.monotonic()

    def close(self) -> None:
        """Wake every waiter for good: the server is shutting down."""
        self.closed = True
        self._notify()

    def _notify(self, services: Iterable[ServiceKey] | None = None) -> None:
        """Wake the waiters on any change, those whose revision has come, and the waiters
        on `services` (on every service when None: a full load, or closing)."""
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
        self._changed = None
        waiting = self._service_waiters
        if waiting:
            woken = list(waiting) if services is None else [s for s in services if s in waiting]
            for service in woken:
                for future in waiting.pop(service):
                    if not future.done():
                        future.set_result(None)
        reached = self._reaching
        while reached and (reached[0][0] <= self.revision or self.closed):
            _, _, waiter = heapq.heappop(reached)
            if not waiter.done():
                waiter.set_result(None)

    async def reached(self, revision: int, timeout: float) -> bool:
        """Wait until this registry has seen `revision` (a write becoming visible here).
        Each waiter wakes once, when its revision arrives: many concurrent writers waiting
        for their own revisions do not all wake on every change."""
        if self.revision >= revision:
            return True
        if self.closed:
            return False
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._sequence += 1
        heapq.heappush(self._reaching, (revision, self._sequence, waiter))
        timer = loop.call_later(timeout, _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            if self.revision < revision:  # gave up: its entry waits in the heap for nothing
                self._abandoned += 1
                if self._abandoned > 64 and self._abandoned * 2 > len(self._reaching):
                    self._reaching = [entry for entry in self._reaching if not entry[2].done()]
                    heapq.heapify(self._reaching)
                    self._abandoned = 0
        return self.revision >= revision

    async def wait_service(
        self, service: ServiceKey, predicate: Callable[[], bool], timeout: float
    ) -> bool:
        """Like wait(), but woken only by changes to `service` (a long poll on it): a change
        elsewhere costs these waiters nothing. Nothing is kept once they return."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0 or self.closed:
                return False
            waiter = loop.create_future()
            waiters = self._service_waiters.setdefault(service, set())
            waiters.add(waiter)
            timer = loop.call_later(remaining, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                waiters.discard(waiter)
                if not waiters and self._service_waiters.get(service) is waiters:
                    del self._service_waiters[service]
        return True

    def service_waiters(self) -> int:
        """How many waiters are parked on single services."""
        return sum(len(waiters) for waiters in self._service_waiters.values())

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

    # accessors: instances

    def services(self) -> Mapping[ServiceKey, Mapping[str, Instance]]:
        """Every service with at least one live instance."""
        return self._services

    def instances(self, service: ServiceKey) -> Mapping[str, Instance]:
        return self._services.get(service, _EMPTY)

    def instance(self, key: InstanceKey) -> Instance | None:
        return self._services.get(key.service_key, _EMPTY).get(key.name)

    def registered(self, key: InstanceKey) -> Instance | None:
        """The instance registered over the API under key (not one an attachment makes)."""
        return self._registered.get(key.service_key, _EMPTY).get(key.name)

    def derived(self, key: InstanceKey) -> Instance | None:
        """The instance an attachment with a service makes under key."""
        return self._derived.get(key.service_key, _EMPTY).get(key.name)

    def has_instance_key(self, store_key: bytes) -> bool:
        return store_key in self._instance_keys

    def sorted_services(self) -> list[ServiceKey]:
        """Every service with a live instance, in order (sorted once after a full load, then
        kept in order as services come and go: no listing sorts them all again)."""
        if self._sorted_services is None:
            self._sorted_services = sorted(self._services)
        return self._sorted_services

    def sorted_names(self, service: ServiceKey) -> list[str]:
        """The service's instance names in order (sorted once, then kept in order)."""
        names = self._sorted_names.get(service)
        if names is None:
            names = self._sorted_names[service] = sorted(self._services.get(service, _EMPTY))
        return names

    def namespace_size(self, namespace: str) -> int:
        """Live instances in the namespace."""
        return self._namespace_counts.get(namespace, 0)

    def service_revision(self, service: ServiceKey) -> int:
        """The revision of the service's last change (0: never seen)."""
        return self._service_revision.get(service, 0)

    def instance_count(self) -> int:
        return sum(len(instances) for instances in self._services.values())

    def holders(self, address: str) -> Mapping[object, Instance | Attachment]:
        """Instances and attachments holding address (for PTR)."""
        return self._by_address.get(address, {})

    # accessors: networks

    def networks(self) -> Mapping[str, Network]:
        return self._networks

    def network(self, name: str) -> Network | None:
        return self._networks.get(name)

    def blocks(self, network: str) -> Mapping[str, Block]:
        return self._blocks.get(network, {})

    def attachments(self, network: str) -> Mapping[bytes, Attachment]:
        return self._attachments.get(network, {})

    def attachment(self, network: str, container_id: str, ifname: str) -> Attachment | None:
        key = self._keys.attachment(network, container_id, ifname)
        return self._attachments.get(network, {}).get(key)

    def container(self, name: ContainerName) -> Mapping[bytes, Attachment]:
        """Attachments answering at <name>.<network>.net.<zone>."""
        return self._containers.get(name, {})

    def containers(self) -> Iterable[ContainerName]:
        return self._containers.keys()

    # updates

    def load(self, snapshot: Snapshot) -> None:
        """Replace everything with a full load taken at one revision."""
        known = self._services.keys() | self._service_revision.keys()
        self._clear()
        changes = Changes(snapshot.revision)
        instances = instances_prefix(self.prefix)
        for kv in snapshot.items:  # keys are unique in a snapshot: nothing to replace
            if kv.key.startswith(instances):
                self._load_instance(kv, changes)
            else:
                self._put(kv, changes, fresh=True)
        # Every service known before or after may have changed: long polls on any wake.
        for service in known | self._services.keys():
            self._service_revision[service] = snapshot.revision
        self.revision = snapshot.revision
        self.synced = True
        for feed in self._feeds:
            feed.reset(self)
        self._notify()

    def apply(self, events: Iterable[Event]) -> None:
        changes = Changes(self.revision)
        for event in events:
            if event.mod_revision <= self.revision:
                continue  # already part of the loaded state
            changes.revision = max(changes.revision, event.mod_revision)
            if event.type is EventType.PUT:
                kv = KeyValue(event.key, event.value, event.mod_revision, event.lease)
                self._put(kv, changes)
            else:
                self._delete(event.key, event.mod_revision, changes)
        if changes.revision == self.revision:
            return
        self.revision = changes.revision
        for feed in self._feeds:
            feed.update(self, changes)
        self._notify(changes.services)

    def _put(self, kv: KeyValue, changes: Changes, fresh: bool = False) -> None:
        if not fresh:
            self._delete(kv.key, kv.mod_revision, changes)
        kind = self._keys.kind(kv.key)
        if kind == "instances":
            self._put_instance(kv, changes)
        elif kind == "networks":
            network = Network.decode(self._keys, kv)
            if network is not None:
                self._networks[network.name] = network
                changes.networks.add(network.name)
                return
        elif kind == "subnets":
            block = Block.decode(self._keys, kv)
            if block is not None:
                self._blocks.setdefault(block.network, {})[block.cidr] = block
                changes.blocks.add(block.network)
                return
        elif kind == "attachments":
            attachment = Attachment.decode(self._keys, kv)
            if attachment is not None:
                self._put_attachment(attachment, changes)
                return
        elif kind == "addresses":
            return  # an allocation guard: the attachment carries the address
        if kind != "instances":
            log.warning("ignoring store key %r: not a record of this version", kv.key)

    def _decode_instance(self, kv: KeyValue) -> Instance | None:
        """The instance an instances/ key holds; None (logged) for one this version cannot read."""
        key = InstanceKey.from_store_key(self.prefix, kv.key)
        spec = decode_registration(kv.value) if key is not None else None
        if key is None or spec is None:
            log.warning("ignoring store key %r: not an instance record", kv.key)
            return None
        self._instance_keys[kv.key] = key
        return Instance(key, spec, kv.lease, kv.mod_revision)

    def _put_instance(self, kv: KeyValue, changes: Changes) -> None:
        instance = self._decode_instance(kv)
        if instance is None:
            return
        key = instance.key
        self._registered.setdefault(key.service_key, {})[key.name] = instance
        self._show(key, changes)

    def _load_instance(self, kv: KeyValue, changes: Changes) -> None:
        """_put_instance for a full load: the feeds are reset after it, so no change is
        recorded, and nothing is shown under the name yet unless an attachment made it."""
        instance = self._decode_instance(kv)
        if instance is None:
            return
        key = instance.key
        service = key.service_key
        registered = self._registered.get(service)
        if registered is None:
            registered = self._registered[service] = {}
        registered[key.name] = instance
        shown = self._services.get(service)
        if shown is None:
            shown = self._services[service] = {}
        elif key.name in shown:  # derived from an attachment: the general path replaces it
            self._show(key, changes)
            return
        shown[key.name] = instance
        self._by_address.setdefault(instance.spec.address, {})[key] = instance
        counts = self._namespace_counts
        counts[key.namespace] = counts.get(key.namespace, 0) + 1

    def _put_attachment(self, attachment: Attachment, changes: Changes) -> None:
        self._attachments.setdefault(attachment.network, {})[attachment.key] = attachment
        self._containers.setdefault(attachment.container, {})[attachment.key] = attachment
        self._by_address.setdefault(attachment.address, {})[attachment.key] = attachment
        changes.containers.add(attachment.container)
        changes.addresses.add(attachment.address)
        changes.networks.add(attachment.network)
        instance = attachment_instance(attachment)
        if instance is not None:
            self._derived.setdefault(instance.key.service_key, {})[instance.key.name] = instance
            self._show(instance.key, changes)

    def _show(self, key: InstanceKey, changes: Changes) -> None:
        """Make _services[key] what _registered or else _derived holds, and index it."""
        service = key.service_key
        old = self._services.get(service, _EMPTY).get(key.name)
        new = self._registered.get(service, _EMPTY).get(key.name) or self._derived.get(
            service, _EMPTY
        ).get(key.name)
        if old is new:
            return
        if old is not None:
            holders = self._by_address[old.spec.address]
            del holders[key]
            if not holders:
                del self._by_address[old.spec.address]
            changes.addresses.add(old.spec.address)
            del self._services[service][key.name]
            if not self._services[service]:
                del self._services[service]
                _remove(self._sorted_services, service)
        if new is not None:
            if service not in self._services and self._sorted_services is not None:
                bisect.insort(self._sorted_services, service)
            self._services.setdefault(service, {})[key.name] = new
            self._by_address.setdefault(new.spec.address, {})[key] = new
            changes.addresses.add(new.spec.address)
        if (old is None) != (new is None):  # a name comes or goes (not an update)
            names = self._sorted_names.get(service)
            if new is None:
                _remove(names, key.name)
                if not names:
                    self._sorted_names.pop(service, None)
            elif names is not None:
                bisect.insort(names, key.name)
            counts = self._namespace_counts
            counts[key.namespace] = counts.get(key.namespace, 0) + (1 if old is None else -1)
            if not counts[key.namespace]:
                del counts[key.namespace]
        changes.instances.add(key)
        changes.services.add(service)
        self._service_revision[service] = max(changes.revision, self.revision)

    def _delete(self, store_key: bytes, revision: int, changes: Changes) -> None:
        key = self._instance_keys.pop(store_key, None)
        if key is not None:
            _pop(self._registered, key.service_key, key.name)
            self._show(key, changes)
            return
        kind = self._keys.kind(store_key)
        if kind == "attachments":
            network = self._keys.network_of(store_key)
            attachment = self._attachments.get(network, {}).pop(store_key, None)
            if attachment is None:
                return
            if not self._attachments[network]:
                del self._attachments[network]
            _pop(self._containers, attachment.container, store_key)
            _pop(self._by_address, attachment.address, store_key)
            changes.containers.add(attachment.container)
            changes.addresses.add(attachment.address)
            changes.networks.add(network)
            instance = attachment_instance(attachment)
            if instance is not None:
                _pop(self._derived, instance.key.service_key, instance.key.name)
                self._show(instance.key, changes)
        elif kind == "networks":
            name = self._keys.network_of(store_key)
            if self._networks.pop(name, None) is not None:
                changes.networks.add(name)
        elif kind == "subnets":
            network = self._keys.network_of(store_key)
            cidr = self._keys.block_of(store_key)
            if _pop(self._blocks, network, cidr) is not None:
                changes.blocks.add(network)


def _remove(ordered: list[Any] | None, item: object) -> None:
    """Take item out of a sorted list (kept sorted: a listing never sorts it again)."""
    if ordered is not None:
        index = bisect.bisect_left(ordered, item)
        if index < len(ordered) and ordered[index] == item:
            del ordered[index]


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _pop(index: dict[K, dict[S, V]], outer: K, inner: S) -> V | None:
    """Remove index[outer][inner], and index[outer] when it is left empty."""
    found = index.get(outer)
    if found is None:
        return None
    value = found.pop(inner, None)
    if not found:
        del index[outer]
    return value
