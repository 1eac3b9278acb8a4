"""The cache's incremental updates against a full rebuild, and its limits."""

from __future__ import annotations

import asyncio
from typing import Any

import dns.message
from dns_support import DnsCache
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery.dns.answers import MAX_PTR_TARGETS, DnsSettings
from discovery.dns.records import A, Answer, RecordSet, turned
from discovery.model import InstanceKey, Registration, encode_registration
from discovery.registry import Registry
from discovery.store.base import Event, EventType, KeyValue, Snapshot

PREFIX = "/discovery/"
SETTINGS = DnsSettings(("cluster.local", "corp.example"), 5, 5)

names = st.sampled_from(["a", "b", "c", "d"])
registrations = st.builds(
    dict,
    address=st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.1.1", "fd00::1"]),
    ttl=st.sampled_from([2, 3, 30]),
    ports=st.lists(
        st.builds(
            dict,
            name=st.sampled_from(["http", "grpc"]),
            port=st.sampled_from([80, 8080]),
            protocol=st.sampled_from(["tcp", "udp"]),
        ),
        max_size=2,
        unique_by=lambda p: (p["name"], p["protocol"]),
    ),
)
operations = st.lists(
    st.tuples(st.booleans(), names, names, names, registrations), min_size=1, max_size=80
)


def key(ns: str, svc: str, inst: str) -> bytes:
    return InstanceKey(ns, svc, inst).store_key(PREFIX)


@settings(max_examples=150, deadline=None)
@given(operations, st.integers(min_value=1, max_value=8))
def test_incremental_updates_equal_a_full_load(ops: list, batch: int) -> None:
    """Whatever the order and batching of events, the answers equal a fresh load's."""
    incremental = DnsCache(SETTINGS, PREFIX)
    incremental.load(Snapshot(1, []))
    store: dict[bytes, KeyValue] = {}
    events = []
    for revision, (is_put, ns, svc, inst, body) in enumerate(ops, start=2):
        k = key(ns, svc, inst)
        if is_put:
            value = encode_registration(Registration(**body))
            store[k] = KeyValue(k, value, revision, revision)
            events.append(Event(EventType.PUT, k, value, revision, revision))
        else:
            store.pop(k, None)
            events.append(Event(EventType.DELETE, k, b"", revision, 0))
    for start in range(0, len(events), batch):
        incremental.apply(events[start : start + batch])
    fresh = DnsCache(SETTINGS, PREFIX)
    fresh.load(Snapshot(len(ops) + 1, sorted(store.values(), key=lambda kv: kv.key)))
    assert incremental.state.names == fresh.state.names
    assert incremental.state.answers.keys() == fresh.state.answers.keys()
    assert incremental.state.answers == fresh.state.answers  # the same bytes, in the same order
    assert incremental.state.cuts == fresh.state.cuts


def test_reverse_answers_name_at_most_a_few_instances_of_a_shared_address() -> None:
    cache = DnsCache(SETTINGS, PREFIX)
    cache.load(Snapshot(1, []))
    value = encode_registration(Registration(address="10.7.7.7"))
    count = MAX_PTR_TARGETS * 3
    cache.apply(
        Event(EventType.PUT, key("default", "web", f"i{n}"), value, n + 2, 1) for n in range(count)
    )
    resolver = cache.resolver()

    def ptr_targets() -> set[str]:
        query = dns.message.make_query("7.7.7.10.in-addr.arpa", "PTR")
        response = resolver.answer(query.to_wire())
        assert response is not None
        message = dns.message.from_wire(response)
        return {rr.to_text() for rrset in message.answer for rr in rrset}

    first = ptr_targets()
    in_name_order = sorted(f"i{n}" for n in range(count))[:MAX_PTR_TARGETS]
    assert first == {f"{name}.web.default.svc.cluster.local." for name in in_name_order}
    cache.apply([Event(EventType.DELETE, key("default", "web", "i0"), b"", count + 2, 0)])
    after = ptr_targets()
    assert len(after) == MAX_PTR_TARGETS
    assert "i0.web.default.svc.cluster.local." not in after


def test_soa_serials_carry_the_revision_in_every_zone_and_answer() -> None:
    """finish() writes the serial over the previous one in place: the apex SOA and the SOA
    of negative answers (forward and reverse zones) carry revision mod 2**32, with the rest
    of the record unchanged."""
    cache = DnsCache(SETTINGS, PREFIX)
    cache.load(Snapshot(2**32 + 5, []))
    resolver = cache.resolver()
    value = encode_registration(Registration(address="10.1.2.3"))
    for revision in (2**32 + 9, 2**32 + 10):
        cache.apply([Event(EventType.PUT, key("default", "web", "a"), value, revision, 1)])
        for name, qtype, section in (
            ("cluster.local", "SOA", "answer"),
            ("corp.example", "SOA", "answer"),
            ("nosuch.cluster.local", "A", "authority"),
            ("web.default.svc.cluster.local", "TXT", "authority"),
            ("9.9.9.10.in-addr.arpa", "PTR", "authority"),
            ("1." + "0." * 31 + "ip6.arpa", "PTR", "authority"),
        ):
            wire = resolver.answer(dns.message.make_query(name, qtype).to_wire())
            assert wire is not None
            (rrset,) = getattr(dns.message.from_wire(wire), section)
            soa = rrset[0]
            assert soa.serial == revision - 2**32, (name, qtype)
            assert (soa.mname.to_text(), soa.minimum) == ("ns.dns.cluster.local.", 5)
            assert (soa.refresh, soa.retry, soa.expire) == (7200, 1800, 86400)


def test_a_rotation_is_one_slice_of_the_doubled_records() -> None:
    """turned() (what both paths send) gives the records rotated to start at record
    (start mod count), with the answer's counts, for A and AAAA answers of 1 to 40 addresses
    and IDs across the 16-bit range."""
    for count in (1, 2, 3, 10, 40):
        for six in (False, True):
            addresses = [f"2001:db8::{i + 1:x}" if six else f"10.9.0.{i + 1}" for i in range(count)]
            answer = Answer.addresses(30, addresses)
            record = len(answer.body) // count
            packed = answer.packed()
            for start in (0, 1, count - 1, count, 255, 256, 65535):
                cut = start % count * record
                rotated = answer.body[cut:] + answer.body[:cut]
                assert turned(packed, start) == (answer.counts, rotated)
            assert len({turned(packed, start) for start in range(count)}) == count


async def test_a_writer_waits_for_its_own_revision_only() -> None:
    registry = Registry(PREFIX)
    registry.load(Snapshot(3, []))
    assert await registry.reached(3, 0)  # seen already: no wait
    value = encode_registration(Registration(address="10.0.0.1"))
    waiters = [asyncio.create_task(registry.reached(r, 5)) for r in (4, 5, 6)]
    await asyncio.sleep(0)
    registry.apply([Event(EventType.PUT, key("a", "b", "c"), value, 5, 0)])
    done, pending = await asyncio.wait(waiters, timeout=1)
    assert {t.result() for t in done} == {True} and len(done) == 2  # 4 and 5, not 6
    assert not await registry.reached(7, 0.01)  # a timeout says False
    registry.close()  # shutting down: every waiter answers now
    assert await asyncio.wait_for(asyncio.gather(*pending), 1) == [False]


record_entries = st.dictionaries(
    st.text("abcdefgh", min_size=1, max_size=3),
    st.tuples(st.integers(1, 250), st.sampled_from([5, 30, 300])),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(record_entries, st.lists(st.text("abcdefgh", min_size=1, max_size=3), max_size=10),
       st.randoms())  # fmt: skip
def test_a_record_set_filled_at_once_equals_one_put_record_by_record(
    entries: dict[str, tuple[int, int]], removed: list[str], random: Any
) -> None:
    """A full load fills each record set in one pass; changes put and remove one record at a
    time, in any order: both give the same set and the same answers."""

    def part(byte: int) -> bytes:
        return b"\x00\x04" + bytes((10, 0, 0, byte))

    kept = {name: value for name, value in entries.items() if name not in removed}
    filled = RecordSet(A)
    filled.fill([(name, part(b), ttl, None) for name, (b, ttl) in sorted(kept.items())])
    one_by_one = RecordSet(A)
    order = list(entries.items())
    random.shuffle(order)
    for name, (b, ttl) in order:
        one_by_one.put(name, part((b + 1) % 256), 7)  # then replaced
        one_by_one.put(name, part(b), ttl)
    for name in removed:
        one_by_one.remove(name)
    for records in (filled, one_by_one):
        assert records.keys == sorted(kept)
    assert (filled.parts, filled.ttls, filled.glue, filled.total) == (
        one_by_one.parts, one_by_one.ttls, one_by_one.glue, one_by_one.total
    )
    assert +filled._ttl_counts == +one_by_one._ttl_counts
    assert +filled._size_counts == +one_by_one._size_counts
    if kept:
        assert filled.packed(40) == one_by_one.packed(40)
        for qid in (0, 1, 7):
            assert filled.window(qid, 100, 40) == one_by_one.window(qid, 100, 40)
