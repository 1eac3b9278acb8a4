"""In-process cost of the resolver's fast path per query, by registry size.

    python bench/resolver_cost.py SERVICES INSTANCES_PER_SERVICE

No sockets: it loads a cache with the registry, then times `Resolver._fast` over 20,000
queries (80% service names, 10% instance names, 10% names that do not exist), best of 7.
Compare sizes to see what the registry's size alone costs a query (memory latency).
"""

from __future__ import annotations

import gc
import random
import sys
import time

import dns.message

from discovery.dns.answers import Answers, DnsSettings
from discovery.dns.resolver import Resolver
from discovery.model import InstanceKey, Registration, encode_registration
from discovery.registry import Registry
from discovery.store.base import KeyValue, Snapshot


def main() -> int:
    services, per_service = int(sys.argv[1]), int(sys.argv[2])
    registry = Registry("/discovery/")
    dns_answers = Answers(DnsSettings(("cluster.local",), 5, 5))
    registry.subscribe(dns_answers)
    items = []
    for s in range(services):
        for n in range(per_service):
            i = s * per_service + n
            body = Registration(
                address=f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
                ports=({"name": "http", "port": 80},),  # type: ignore[arg-type]
            )
            key = InstanceKey("default", f"svc{s}", f"i{n}").store_key("/discovery/")
            items.append(KeyValue(key, encode_registration(body), i + 2, 1))
    registry.load(Snapshot(len(items) + 2, items))
    gc.freeze()  # as the server does after its first load
    resolver = Resolver(dns_answers)
    rng = random.Random(1)
    queries = []
    for _ in range(20000):
        x = rng.random()
        if x < 0.8:
            name = f"svc{rng.randrange(services)}.default.svc.cluster.local"
        elif x < 0.9:
            name = f"i{rng.randrange(per_service)}.svc{rng.randrange(services)}"
            name += ".default.svc.cluster.local"
        else:
            name = f"nosuch{rng.randrange(1000)}.default.svc.cluster.local"
        queries.append(dns.message.make_query(name, "A").to_wire())
    fast = resolver._fast
    best = float("inf")
    for _ in range(7):
        started = time.perf_counter()
        for query in queries:
            fast(query, False)
        best = min(best, (time.perf_counter() - started) / len(queries))
    answers = len(dns_answers.state.answers)
    print(f"{services} x {per_service}: {best * 1e6:.2f} us per query ({answers:,} answers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
