"""Address management in the store: node leases, node blocks, attachments.

Correctness comes from store transactions, never from locks: a node's block is created
only if its key is absent, and an attachment only if both its key and its address's key
are absent (and the network is unchanged), so any number of allocators on any number of
nodes never hand out one address twice. The in-process state (a round-robin cursor per
block, addresses being tried right now) only makes collisions rare.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import ipaddress
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..model import InstanceKey, is_label
from ..registry import Registry
from ..store.base import (
    Delete,
    LeaseExists,
    LeaseNotFound,
    Put,
    Store,
    StoreError,
    StoreUnavailable,
)
from .records import (
    Attachment,
    AttachmentRequest,
    Block,
    Network,
    NetworkKeys,
    NetworkSpec,
)

log = logging.getLogger(__name__)

VISIBLE_WAIT = 1.0  # seconds a write waits for this replica's registry to show it
ATTEMPTS = 64  # transactions one call tries before giving up (collisions with other nodes)
# allocations one transaction carries at most: 2 puts and 2 compares each, under etcd's
# default --max-txn-ops of 128
GROUP = 32


class IpamError(Exception):
    """A refusal the API answers with `status` (problem+json)."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail


def vtep_mac(node: str, network: str) -> str:
    """A stable, locally administered unicast MAC for the node's VTEP in the network."""
    digest = hashlib.sha256(f"{node}/{network}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


class NodeLease:
    """This node's lease: every block, attachment and address key of the node is bound
    to it. Granted on first need, adopted again after a restart while it is still alive,
    renewed at a third of its TTL.

    The worker processes of one node (`--workers N`) share one lease: their parent picks
    its ID (`lease_id`), the first worker to need it grants it, and the others find it
    exists (LeaseExists) and use it. Each worker renews it; a lost lease is granted again
    under the same ID, so the workers meet on it again.
    """

    def __init__(
        self, store: Store, registry: Registry, node: str, ttl: int, lease_id: int = 0
    ) -> None:
        self.store = store
        self.registry = registry
        self.node = node
        self.ttl = ttl
        self.lease_id = lease_id
        self.id = 0
        self._lock = asyncio.Lock()
        self._renewing: asyncio.Task[None] | None = None

    def _held(self) -> Iterator[int]:
        for network in self.registry.networks():
            for block in self.registry.blocks(network).values():
                if block.node == self.node and block.lease:
                    yield block.lease

    async def adopt(self) -> None:
        """After the first load: keep the lease of this node's blocks alive, if any."""
        if any(True for _ in self._held()):
            await self.get()

    async def get(self) -> int:
        if self.id:
            return self.id
        async with self._lock:
            if self.id:
                return self.id
            for lease in dict.fromkeys(self._held()):
                try:
                    await self.store.keepalive(lease)
                except LeaseNotFound:
                    continue
                log.info("node %s took its lease %x over", self.node, lease)
                self.id = lease
                break
            else:
                self.id = await self._grant()
            if self._renewing is None or self._renewing.done():
                self._renewing = asyncio.create_task(self._renew(), name="node-lease")
            return self.id

    async def _grant(self) -> int:
        if not self.lease_id:
            lease = await self.store.grant(self.ttl)
            log.info("node %s holds lease %x (ttl %d s)", self.node, lease, self.ttl)
            return lease
        for _ in range(3):  # granted, or alive: only a lease expiring right now repeats
            try:
                lease = await self.store.grant(self.ttl, self.lease_id)
                log.info("node %s holds lease %x (ttl %d s)", self.node, lease, self.ttl)
                return lease
            except LeaseExists:
                pass
            try:
                await self.store.keepalive(self.lease_id)
            except LeaseNotFound:
                continue
            log.info("node %s shares lease %x with its other workers", self.node, self.lease_id)
            return self.lease_id
        raise StoreUnavailable(f"node lease {self.lease_id:x} neither grantable nor alive")

    def lost(self, lease: int) -> None:
        """The store says the lease is gone: the next call grants a new one."""
        if self.id == lease:
            log.warning("node %s lost its lease %x: its keys are gone", self.node, lease)
            self.id = 0

    async def _renew(self) -> None:
        interval = max(1.0, self.ttl / 3)
        while self.id:
            await asyncio.sleep(interval)
            lease = self.id
            if not lease:
                return
            try:
                await self.store.keepalive(lease)
                interval = max(1.0, self.ttl / 3)
            except LeaseNotFound:
                self.lost(lease)
                return
            except StoreUnavailable as error:
                log.warning("node lease renewal failed (%s): retrying", error)
                interval = 1.0
            except StoreError:
                return  # the store is closed

    async def close(self) -> None:
        """Stop renewing; the lease stays, so a restart within its TTL takes it over."""
        if self._renewing is not None:
            self._renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewing
            self._renewing = None


@dataclass(frozen=True, slots=True)
class Attached:
    body: dict[str, Any]
    created: bool


@functools.lru_cache(maxsize=4096)
def _subnet(cidr: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str, str]:
    """A block (parsed once: every attachment call describes one), its gateway and its
    canonical spelling."""
    subnet = ipaddress.ip_network(cidr)
    return subnet, str(next(subnet.hosts())), subnet.with_prefixlen


def attachment_body(attachment: Attachment, network: Network, block: str | None) -> dict[str, Any]:
    """What an attachment call answers: the address and how to plumb it (SPEC.md)."""
    if block is None or ipaddress.ip_address(attachment.address) not in _subnet(block)[0]:
        # the block is gone from this replica's view (its node died): describe the address
        # within a block of the network's node_prefix
        address = ipaddress.ip_address(attachment.address)
        block = ipaddress.ip_network(
            f"{address}/{network.spec.node_prefix}", strict=False
        ).with_prefixlen
    subnet, gateway, spelled = _subnet(block)
    body: dict[str, Any] = {
        "network": attachment.network,
        "container_id": attachment.container_id,
        "ifname": attachment.ifname,
        "address": attachment.address,
        "prefix_len": subnet.prefixlen,
        "gateway": gateway,
        "routes": [{"dst": network.spec.subnet, "gw": gateway}],
        "subnet": spelled,
        "mtu": network.spec.mtu,
        "node": attachment.node,
        "name": attachment.name,
    }
    if attachment.service is not None:
        body["service"] = attachment.service.model_dump(exclude_none=True)
    return body


ATTACHED = ("", 0)  # a claim's outcome: the container was attached meanwhile


@dataclass(slots=True)
class _Claim:
    """One allocation waiting for a group transaction (Ipam._commit)."""

    network: Network
    block: Block
    container_id: str
    ifname: str
    name: str
    request: AttachmentRequest
    # the address and the revision it was written at; None: the group's transaction failed
    # and this allocation tries on its own; ATTACHED
    done: asyncio.Future[tuple[str, int] | None]


class Ipam:
    """Networks, this node's blocks and its attachments, written through the store.

    Concurrent allocations in one block are committed together (group commit): while one
    transaction is on its way to the store, the allocations that arrive queue up, and the
    next transaction creates all of them (each attachment and address key only if absent,
    the network and the block unchanged). A group whose transaction fails (another worker of
    the node took one of its addresses, a container attached twice at once, the network
    changed) falls back to one transaction per allocation, so a conflict costs what it
    always did; uniqueness rests on the compares either way.
    """

    def __init__(
        self,
        store: Store,
        registry: Registry,
        node: str,
        node_ip: str | None,
        node_ttl: int,
        lease_id: int = 0,
    ) -> None:
        self.store = store
        self.registry = registry
        self.node = node
        self.node_ip = node_ip or ""
        self.keys = NetworkKeys(registry.prefix)
        self.lease = NodeLease(store, registry, node, node_ttl, lease_id)
        self._cursor: dict[str, int] = {}  # block -> offset of the last address handed out
        self._trying: set[tuple[str, str]] = set()  # (network, address) in a transaction now
        self._block_locks: dict[str, asyncio.Lock] = {}
        self._claims: dict[tuple[str, str], list[_Claim]] = {}  # (network, block) -> queue
        self._committers: dict[tuple[str, str], asyncio.Task[None]] = {}

    async def _visible(self, revision: int) -> None:
        await self.registry.reached(revision, VISIBLE_WAIT)

    async def _network_seen(self, name: str) -> Network | None:
        """The network as this replica knows it. When it does not know it yet, the store
        decides: a network just created through another replica or worker is waited for
        (its revision reaching this registry), not answered 404."""
        network = self.registry.network(name)
        if network is None:
            kv = await self.store.get(self.keys.network(name))
            if kv is not None:
                await self._visible(kv.mod_revision)
                network = self.registry.network(name)
        return network

    # networks

    async def put_network(self, name: str, spec: NetworkSpec) -> tuple[Network, bool]:
        spec = spec.checked()
        for _ in range(ATTEMPTS):
            current = self.registry.network(name)
            if current is not None and self.registry.attachments(name):
                old = current.spec
                if (old.subnet, old.node_prefix) != (spec.subnet, spec.node_prefix):
                    raise IpamError(
                        409,
                        "Network in use",
                        f"network {name} has attachments: its subnet and node_prefix cannot "
                        "change until they are gone",
                    )
            clash = self._vni_holder(name, spec)
            if clash is not None:
                raise IpamError(
                    409,
                    "VNI in use",
                    f"network {clash} uses VXLAN VNI {spec.vni} already: choose another vni",
                )
            expect = {self.keys.network(name): current.revision if current else 0}
            result = await self.store.txn(expect, [Put(self.keys.network(name), spec.encode())])
            if result.succeeded:
                await self._visible(result.revision)
                return Network(name, spec, result.revision), current is None
            await self._catch_up()
        raise StoreUnavailable(f"network {name} kept changing under this write")

    def _vni_holder(self, name: str, spec: NetworkSpec) -> str | None:
        """Another vxlan network with the same VNI (one VXLAN device per VNI on a node)."""
        if spec.backend != "vxlan":
            return None
        for other, network in self.registry.networks().items():
            theirs = network.spec
            if other != name and theirs.backend == "vxlan" and theirs.vni == spec.vni:
                return other
        return None

    async def delete_network(self, name: str) -> bool:
        for _ in range(ATTEMPTS):
            current = self.registry.network(name)
            if current is None:
                return False
            if self.registry.attachments(name):
                count = len(self.registry.attachments(name))
                raise IpamError(409, "Network in use", f"network {name} has {count} attachment(s)")
            ops: list[Put | Delete] = [Delete(self.keys.network(name))]
            ops += [Delete(self.keys.block(name, cidr)) for cidr in self.registry.blocks(name)]
            result = await self.store.txn({self.keys.network(name): current.revision}, ops)
            if result.succeeded:
                await self._visible(result.revision)
                return True
            await self._catch_up()
        raise StoreUnavailable(f"network {name} kept changing under this delete")

    async def _catch_up(self) -> None:
        """After a failed transaction: let this replica see what beat us."""
        await self._visible(await self.store.revision())

    # blocks

    def my_block(self, network: str) -> Block | None:
        for block in self.registry.blocks(network).values():
            if block.node == self.node and block.lease == self.lease.id:
                return block
        return None

    async def _block(self, network: Network, lease: int) -> Block:
        lock = self._block_locks.setdefault(network.name, asyncio.Lock())
        async with lock:
            block = self.my_block(network.name)
            if block is not None:
                return block
            subnet = ipaddress.ip_network(network.spec.subnet)
            taken = self.registry.blocks(network.name)
            # a restarted node whose lease ended asks for its old block first
            previous = [
                cidr for cidr, b in taken.items() if b.node == self.node and b.lease != lease
            ]
            candidates = previous + [
                block.with_prefixlen
                for block in subnet.subnets(new_prefix=network.spec.node_prefix)
                if block.with_prefixlen not in taken
            ]
            value = Block.encode(self.node, self.node_ip, vtep_mac(self.node, network.name))
            for cidr in candidates:
                key = self.keys.block(network.name, cidr)
                current = taken.get(cidr)
                expect = {key: current.revision if current is not None else 0}
                result = await self.store.txn(expect, [Put(key, value, lease)])
                if result.succeeded:
                    await self._visible(result.revision)
                    log.info("node %s leased block %s of %s", self.node, cidr, network.name)
                    return Block(
                        network.name,
                        cidr,
                        self.node,
                        self.node_ip,
                        vtep_mac(self.node, network.name),
                        lease,
                        result.revision,
                    )
            raise IpamError(
                507,
                "No free block",
                f"network {network.name} ({network.spec.subnet}) has no free "
                f"/{network.spec.node_prefix} block for node {self.node}",
            )

    async def republish(self) -> None:
        """After a restart: this node's blocks announce its current node_ip and VTEP MAC, so
        peers follow a node that came back with another --node-ip."""
        lease = self.lease.id
        if not lease:
            return
        for name in list(self.registry.networks()):
            mac = vtep_mac(self.node, name)
            for cidr, block in list(self.registry.blocks(name).items()):
                if block.node != self.node or block.lease != lease:
                    continue
                if (block.node_ip, block.vtep_mac) == (self.node_ip, mac):
                    continue
                key = self.keys.block(name, cidr)
                value = Block.encode(self.node, self.node_ip, mac)
                result = await self.store.txn({key: block.revision}, [Put(key, value, lease)])
                if result.succeeded:
                    log.info(
                        "node %s announces node_ip %s for block %s of %s (was %s)",
                        self.node,
                        self.node_ip or "-",
                        cidr,
                        name,
                        block.node_ip or "-",
                    )
                    await self._visible(result.revision)

    # attachments

    async def attach(
        self, network_name: str, container_id: str, ifname: str, request: AttachmentRequest
    ) -> Attached:
        name = request.name or container_id[:12].lower()
        if not is_label(name):
            raise IpamError(
                400,
                "Invalid request",
                f"name: the container ID does not start with a DNS label ({name!r}); give a name",
            )
        for _ in range(ATTEMPTS):
            network = await self._network_seen(network_name)
            if network is None:
                raise IpamError(404, "Network not found", f"no network {network_name}")
            existing = self.registry.attachment(network_name, container_id, ifname)
            if existing is not None:
                return Attached(self._body(existing, network), False)
            self._check_name(network_name, name, container_id, ifname, request)
            lease = await self.lease.get()
            try:
                block = await self._block(network, lease)
                attached = await self._allocate(network, block, container_id, ifname, name, request)
            except LeaseNotFound:
                self.lease.lost(lease)
                continue
            if attached is not None:
                return attached
            await self._catch_up()
        raise StoreUnavailable(f"could not allocate in {network_name}: too many collisions")

    def _check_name(
        self, network: str, name: str, container_id: str, ifname: str, request: AttachmentRequest
    ) -> None:
        key = self.keys.attachment(network, container_id, ifname)
        if any(k != key for k in self.registry.container((network, name))):
            raise IpamError(
                409, "Name in use", f"another container answers at {name}.{network}.net already"
            )
        if request.service is not None:
            ref = request.service
            instance = InstanceKey(ref.namespace, ref.service, ref.instance or name)
            if self.registry.registered(instance) is not None:
                raise IpamError(
                    409,
                    "Instance in use",
                    f"{instance.name} of {ref.service}.{ref.namespace} is registered already",
                )

    def _free(self, network: str, block: ipaddress.IPv4Network) -> Iterator[tuple[int, str]]:
        """Offsets and addresses of the block not in use, from after the cursor, round robin;
        never the network, gateway (first host) or broadcast address."""
        holders = self.registry.holders  # per candidate: O(1), not a set of the network
        size = block.num_addresses
        first, last = 2, size - 2  # .0 network, .1 gateway, last broadcast
        if last < first:
            return
        span = last - first + 1
        start = self._cursor.get(block.with_prefixlen, first - 1)
        base = int(block.network_address)
        for step in range(1, span + 1):
            offset = first + (start - first + step) % span
            address = str(ipaddress.IPv4Address(base + offset))
            if (network, address) in self._trying:
                continue
            if not any(
                isinstance(h, Attachment) and h.network == network
                for h in holders(address).values()
            ):
                yield offset, address

    async def _allocate(
        self,
        network: Network,
        block: Block,
        container_id: str,
        ifname: str,
        name: str,
        request: AttachmentRequest,
    ) -> Attached | None:
        """One attempt: None when a transaction lost a race that a retry may win."""
        loop = asyncio.get_running_loop()
        claim = _Claim(network, block, container_id, ifname, name, request, loop.create_future())
        group = (network.name, block.cidr)
        self._claims.setdefault(group, []).append(claim)
        if group not in self._committers:
            self._committers[group] = asyncio.create_task(self._commit(group), name="ipam-commit")
        written = await claim.done
        if written is None:
            return await self._allocate_alone(network, block, container_id, ifname, name, request)
        if written is ATTACHED:
            return None  # attach() answers the attachment there is
        address, revision = written  # visible here already (the group waited for it)
        return self._attached(
            network, block, container_id, ifname, name, request, address, revision
        )

    async def _commit(self, group: tuple[str, str]) -> None:
        """Commit the queued allocations of one block, a group per transaction, until none
        is left. Claims that arrive while a transaction is out wait for the next one."""
        try:
            while queue := self._claims.get(group):
                first = queue[0]
                batch: list[_Claim] = []
                rest: list[_Claim] = []
                for claim in queue:
                    if claim.done.done():
                        continue  # its caller went away
                    same = (claim.network.revision, claim.block.revision) == (
                        first.network.revision,
                        first.block.revision,
                    ) and claim.block.lease == first.block.lease
                    (batch if same and len(batch) < GROUP else rest).append(claim)
                if rest:
                    self._claims[group] = rest
                else:
                    del self._claims[group]
                if batch:
                    later = await self._commit_group(batch)
                    if later:
                        self._claims[group] = later + self._claims.get(group, [])
        finally:
            del self._committers[group]
            for claim in self._claims.pop(group, []):  # only when cancelled: none are left
                claim.done.cancel()

    async def _commit_group(self, batch: list[_Claim]) -> list[_Claim]:
        """Commit one group; the claims it leaves for the next (a container attached twice
        at once: the second waits to see what the first did)."""
        network, block = batch[0].network, batch[0].block
        subnet = _subnet(block.cidr)[0]
        assert isinstance(subnet, ipaddress.IPv4Network)
        free = self._free(network.name, subnet)
        expect = {
            self.keys.network(network.name): network.revision,
            self.keys.block(network.name, block.cidr): block.revision,
        }
        ops: list[Put | Delete] = []
        members: list[tuple[_Claim, str]] = []
        later: list[_Claim] = []
        last = None
        for claim in batch:
            attachment_key = self.keys.attachment(network.name, claim.container_id, claim.ifname)
            if attachment_key in expect:
                later.append(claim)
                continue
            if self.registry.attachment(network.name, claim.container_id, claim.ifname):
                claim.done.set_result(ATTACHED)  # its caller answers what is there
                continue
            picked = next(free, None)
            if picked is None:
                claim.done.set_exception(self._exhausted(network, block))
                continue
            last, address = picked
            self._trying.add((network.name, address))
            address_key = self.keys.address(network.name, address)
            expect[attachment_key] = expect[address_key] = 0
            value = Attachment.encode(address, self.node, claim.name, claim.request.service)
            guard = {"container_id": claim.container_id, "ifname": claim.ifname}
            ops.append(Put(attachment_key, value, block.lease))
            ops.append(Put(address_key, json.dumps(guard).encode(), block.lease))
            members.append((claim, address))
        if not members:
            return later
        try:
            result = await self.store.txn(expect, ops)
        except BaseException as error:
            for claim, _ in members:
                if not claim.done.done():
                    if isinstance(error, Exception):
                        claim.done.set_exception(error)
                    else:
                        claim.done.cancel()
            for _, address in members:
                self._trying.discard((network.name, address))
            if isinstance(error, Exception):
                return later  # each caller has the error
            raise
        try:
            if result.succeeded and last is not None:
                self._cursor[block.cidr] = last
                # one wait for the whole group; and the addresses stay taken for the next
                # group until this replica's registry shows them
                await self._visible(result.revision)
        finally:
            for claim, address in members:
                self._trying.discard((network.name, address))
                if not claim.done.done():
                    claim.done.set_result((address, result.revision) if result.succeeded else None)
        return later

    def _exhausted(self, network: Network, block: Block) -> IpamError:
        return IpamError(
            507,
            "Addresses exhausted",
            f"network {network.name}: block {block.cidr} of node {self.node} has no free address",
        )

    async def _allocate_alone(
        self,
        network: Network,
        block: Block,
        container_id: str,
        ifname: str,
        name: str,
        request: AttachmentRequest,
    ) -> Attached | None:
        """One attempt in a transaction of its own."""
        subnet = ipaddress.ip_network(block.cidr)
        assert isinstance(subnet, ipaddress.IPv4Network)
        picked = next(self._free(network.name, subnet), None)
        if picked is None:
            raise self._exhausted(network, block)
        offset, address = picked
        attachment_key = self.keys.attachment(network.name, container_id, ifname)
        address_key = self.keys.address(network.name, address)
        value = Attachment.encode(address, self.node, name, request.service)
        guard = json.dumps({"container_id": container_id, "ifname": ifname}).encode()
        self._trying.add((network.name, address))
        try:
            result = await self.store.txn(
                {
                    attachment_key: 0,
                    address_key: 0,
                    self.keys.network(network.name): network.revision,
                    self.keys.block(network.name, block.cidr): block.revision,
                },
                [Put(attachment_key, value, block.lease), Put(address_key, guard, block.lease)],
            )
        finally:
            self._trying.discard((network.name, address))
        if not result.succeeded:
            return None
        self._cursor[block.cidr] = offset
        await self._visible(result.revision)
        return self._attached(
            network, block, container_id, ifname, name, request, address, result.revision
        )

    def _attached(
        self,
        network: Network,
        block: Block,
        container_id: str,
        ifname: str,
        name: str,
        request: AttachmentRequest,
        address: str,
        revision: int,
    ) -> Attached:
        attachment = Attachment(
            self.keys.attachment(network.name, container_id, ifname),
            network.name,
            container_id,
            ifname,
            address,
            self.node,
            name,
            request.service,
            block.lease,
            revision,
        )
        return Attached(attachment_body(attachment, network, block.cidr), True)

    def _body(self, attachment: Attachment, network: Network) -> dict[str, Any]:
        blocks = self.registry.blocks(network.name)
        address = ipaddress.ip_address(attachment.address)
        block = next((c for c in blocks if address in _subnet(c)[0]), None)
        return attachment_body(attachment, network, block)

    def body(self, attachment: Attachment) -> dict[str, Any] | None:
        network = self.registry.network(attachment.network)
        return self._body(attachment, network) if network is not None else None

    async def detach(self, network: str, container_id: str, ifname: str) -> None:
        """Remove the attachment and free its address; nothing to do when unknown."""
        key = self.keys.attachment(network, container_id, ifname)
        for _ in range(ATTEMPTS):
            kv = await self.store.get(key)
            if kv is None:
                return
            try:
                address = json.loads(kv.value)["address"]
            except (ValueError, KeyError, TypeError):
                address = None
            ops: list[Put | Delete] = [Delete(key)]
            if isinstance(address, str):
                ops.append(Delete(self.keys.address(network, address)))
            result = await self.store.txn({key: kv.mod_revision}, ops)
            if result.succeeded:
                await self._visible(result.revision)
                return
        raise StoreUnavailable(f"attachment {container_id}/{ifname} kept changing")

    async def close(self) -> None:
        await self.lease.close()
