"""The resolver's fast path of a git revision against the working tree's, in one process.

    python bench/resolver_ab.py --against REV [--rounds 30] [--services 1000]

Loads `discovery/dns/resolver.py` as it was at REV (from `git show`) beside the current module,
feeds both the same pre-encoded answers (SERVICES services, one instance each), checks they give
byte-identical responses, then times `Resolver._fast` over 20,000 queries (90% names that exist,
10% NXDOMAIN), plain and with EDNS, alternating old and new for ROUNDS rounds and keeping each
side's best. Same process, same data, alternated: the ratio holds on a busy machine where
absolute figures do not. Only valid while REV's resolver imports what the current package has.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import dns.message

import discovery.dns.resolver as current
from discovery.dns.answers import Answers, DnsSettings
from discovery.model import InstanceKey, Registration, encode_registration
from discovery.registry import Registry
from discovery.store.base import KeyValue, Snapshot

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "/discovery/"


def resolver_at(revision: str, directory: Path) -> ModuleType:
    source = subprocess.run(
        ["git", "show", f"{revision}:discovery/dns/resolver.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = directory / "resolver_at_revision.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("discovery.dns.resolver_at_revision", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def answers_for(services: int) -> Answers:
    registry = Registry(PREFIX)
    answers = Answers(DnsSettings(("cluster.local",), 5, 5))
    registry.subscribe(answers)
    items = []
    for i in range(services):
        body = Registration(
            address=f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
            ports=({"name": "http", "port": 80},),  # type: ignore[arg-type]
        )
        key = InstanceKey("default", f"svc{i}", "i0").store_key(PREFIX)
        items.append(KeyValue(key, encode_registration(body), i + 2, 1))
    registry.load(Snapshot(len(items) + 2, items))
    gc.freeze()  # as the server does after its first load
    return answers


def queries(services: int, edns: bool, rng: random.Random) -> list[bytes]:
    out = []
    for _ in range(20000):
        if rng.random() < 0.9:
            name = f"svc{rng.randrange(services)}.default.svc.cluster.local"
        else:
            name = f"nosuch{rng.randrange(1000)}.default.svc.cluster.local"
        message = dns.message.make_query(name, "A", use_edns=0 if edns else False, payload=1232)
        out.append(message.to_wire())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="git revision to compare with")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--services", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = resolver_at(args.against, Path(tmp))
    answers = answers_for(args.services)
    rng = random.Random(1)
    print(f"resolver fast path, {args.against} (old) vs working tree (new), {args.rounds} rounds")
    for edns in (False, True):
        batch = queries(args.services, edns, rng)
        sides: dict[str, Callable[[bytes, bool], bytes | None]] = {
            "old": old.Resolver(answers)._fast,
            "new": current.Resolver(answers)._fast,
        }
        for query in batch[:500]:
            assert sides["old"](query, False) == sides["new"](query, False), query
        best = dict.fromkeys(sides, float("inf"))
        for round_ in range(args.rounds):
            order = ("old", "new") if round_ % 2 else ("new", "old")
            for label in order:
                fast = sides[label]
                started = time.perf_counter()
                for query in batch:
                    fast(query, False)
                best[label] = min(best[label], (time.perf_counter() - started) / len(batch))
        print(
            f"{'EDNS ' if edns else 'plain'}: old {best['old'] * 1e6:.3f} us, "
            f"new {best['new'] * 1e6:.3f} us per query, new/old {best['new'] / best['old']:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
