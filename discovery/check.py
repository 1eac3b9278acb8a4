"""`discovery check`: does every replica hold what etcd holds?

    discovery check --etcd http://10.0.0.5:2379 --replica http://A:8080 --replica http://B:8080

Reads the instances under the prefix from etcd at one revision R, then asks each replica for
its registry (`GET /v1/registry`, long-polling until it reflects R or `--wait` runs out) and
compares them: a replica at revision r > R is compared with etcd at r (so writes during the
check are no difference), one below R with etcd at R (nothing it lacks may be missing). Prints
one line per replica and one per difference (missing, extra, different); exit 0 when every
replica is equal, 1 otherwise (a replica that cannot be reached included), 2 for a bad option.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .config import ConfigError, HostPort, env_name
from .model import InstanceKey, decode_registration, instances_prefix
from .sidecar import OptionError, client_tls
from .store.base import Compacted, Snapshot, StoreError
from .store.etcd import EtcdStore

COMPARED = ("address", "ports", "ttl", "priority", "weight", "tags", "metadata")
Record = dict[str, Any]  # the compared fields and the lease of one instance

_FLAGS: list[tuple[str, Any, str]] = [
    ("--etcd", None, "etcd endpoints URL[,URL...] (required)"),
    ("--etcd-prefix", "/discovery/", "key prefix in etcd"),
    ("--etcd-ca", None, "CA bundle for TLS to etcd"),
    ("--etcd-cert", None, "client certificate for mutual TLS to etcd"),
    ("--etcd-key", None, "client key for mutual TLS to etcd"),
    ("--etcd-user", None, "etcd user name"),
    ("--etcd-password", None, "etcd password"),
    ("--replica", None, "replica API URL; may repeat (comma-separated in the environment)"),
    ("--wait", "10", "seconds a replica may take to reach etcd's revision"),
    ("--token", None, "bearer token for the replicas' API"),
    ("--cacert", None, "CA bundle to trust for https:// replicas (default: the system's)"),
    ("--cert", None, "client certificate (PEM) for replicas that require one (mutual TLS)"),
    ("--key", None, "private key of --cert (PEM; default: in the --cert file)"),
]


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        "check",
        help="compare every replica's registry with etcd at one revision",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for flag, default, text in _FLAGS:
        shown = f"; default {default}" if default is not None else ""
        parser.add_argument(
            flag,
            action="append" if flag == "--replica" else "store",
            default=None,
            help=f"{text} [{env_name(flag)}{shown}]",
        )
    return parser


@dataclass
class Report:
    replica: str
    revision: int | None = None
    compared_with: int | None = None
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    different: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def equal(self) -> bool:
        return self.error is None and not (self.missing or self.extra or self.different)

    def lines(self) -> list[str]:
        if self.error is not None:
            return [f"{self.replica}: DIFFERENT: {self.error}"]
        at = f"revision {self.revision}"
        if self.compared_with != self.revision:
            at += f", etcd at {self.compared_with}"
        if self.equal:
            return [f"{self.replica}: equal ({at})"]
        counts = f"{len(self.missing)} missing, {len(self.extra)} extra, "
        counts += f"{len(self.different)} different"
        lines = [f"{self.replica}: DIFFERENT ({at}): {counts}"]
        lines += [f"  missing   {name}" for name in self.missing]
        lines += [f"  extra     {name}" for name in self.extra]
        lines += [f"  different {detail}" for detail in self.different]
        return lines


def _name(key: InstanceKey) -> str:
    return f"{key.namespace}/{key.service}/{key.name}"


def etcd_records(snapshot: Snapshot, prefix: str) -> dict[str, Record]:
    records = {}
    for kv in snapshot.items:
        key = InstanceKey.from_store_key(prefix, kv.key)
        spec = decode_registration(kv.value) if key is not None else None
        if key is None or spec is None:
            continue  # the replicas ignore it as well
        body = json.loads(spec.raw)
        records[_name(key)] = {f: body.get(f) for f in COMPARED} | {"lease": format(kv.lease, "x")}
    return records


def replica_records(body: Mapping[str, Any]) -> dict[str, Record]:
    records = {}
    for item in body.get("instances", ()):
        name = f"{item['namespace']}/{item['service']}/{item['name']}"
        lease = item.get("lease", {}).get("id")
        records[name] = {f: item.get(f) for f in COMPARED} | {"lease": lease}
    return records


def compare(report: Report, expected: dict[str, Record], held: dict[str, Record]) -> None:
    report.missing = sorted(expected.keys() - held.keys())
    report.extra = sorted(held.keys() - expected.keys())
    report.different = []
    for name in sorted(expected.keys() & held.keys()):
        want, have = expected[name], held[name]
        fields = [f for f in (*COMPARED, "lease") if want.get(f) != have.get(f)]
        if fields:
            detail = ", ".join(f"{f} {have.get(f)!r} (etcd {want.get(f)!r})" for f in fields)
            report.different.append(f"{name}: {detail}")


async def check_replica(
    session: aiohttp.ClientSession,
    store: EtcdStore,
    prefix: str,
    replica: str,
    snapshot: Snapshot,
    wait: float,
) -> Report:
    """Compare at once; a replica behind the snapshot that differs gets until `wait` to
    reach its revision (a long poll), then is compared again."""
    report = Report(replica)
    body = await _registry(session, replica, report, None, wait)
    if body is not None and int(body.get("revision", 0)) < snapshot.revision:
        await _compare(store, prefix, snapshot, report, body)
        if report.equal:
            return report
        body = await _registry(session, replica, report, snapshot.revision - 1, wait)
    if body is not None:
        await _compare(store, prefix, snapshot, report, body)
    return report


PAGE_ATTEMPTS = 5


async def _registry(
    session: aiohttp.ClientSession, replica: str, report: Report, index: int | None, wait: float
) -> dict[str, Any] | None:
    """The replica's whole registry at one revision, read page by page (again from the first
    page when the revision moved between pages, a few times)."""
    for _ in range(PAGE_ATTEMPTS):
        first = await _registry_page(session, replica, report, index, wait, None)
        if first is None:
            return None
        instances = list(first.get("instances") or ())
        page: dict[str, Any] | None = first
        while page is not None and isinstance(page.get("next"), str):
            page = await _registry_page(session, replica, report, None, wait, page["next"])
            if page is None:
                return None
            if page.get("revision") != first.get("revision"):
                break  # changed under the listing: start again
            instances.extend(page.get("instances") or ())
        else:
            return first | {"instances": instances}
        index = None
    report.error = f"its registry kept changing while read ({PAGE_ATTEMPTS} attempts)"
    return None


async def _registry_page(
    session: aiohttp.ClientSession,
    replica: str,
    report: Report,
    index: int | None,
    wait: float,
    after: str | None,
) -> dict[str, Any] | None:
    url = replica.rstrip("/") + "/v1/registry"
    # the largest page: a registry that fits one is read at one revision whatever churns
    params = {"index": str(index), "wait": f"{wait:g}s"} if index is not None else {}
    params["limit"] = "5000"
    if after is not None:
        params["after"] = after
    try:
        async with session.get(
            url, params=params, timeout=aiohttp.ClientTimeout(total=wait + 10)
        ) as response:
            if response.status != 200:
                text = (await response.text())[:200]
                report.error = f"GET /v1/registry answered {response.status}: {text}"
                return None
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as error:
        reason = "no answer in time" if isinstance(error, TimeoutError) else str(error)
        report.error = f"unreachable: {reason or type(error).__name__}"
        return None
    if not isinstance(body, dict):
        report.error = "GET /v1/registry answered no JSON object"
        return None
    return body


async def _compare(
    store: EtcdStore, prefix: str, snapshot: Snapshot, report: Report, body: dict[str, Any]
) -> None:
    report.revision = int(body.get("revision", 0))
    expected = snapshot
    if report.revision > snapshot.revision:  # writes since: compare at its revision
        try:
            expected = await store.load(instances_prefix(prefix), at=report.revision)
        except Compacted:
            report.error = f"etcd no longer has revision {report.revision} (compacted)"
            return
    report.compared_with = expected.revision
    compare(report, etcd_records(expected, prefix), replica_records(body))


async def run_check(
    store: EtcdStore,
    prefix: str,
    replicas: Sequence[str],
    wait: float,
    token: str | None,
    tls: ssl.SSLContext | None = None,
) -> list[Report]:
    snapshot = await store.load(instances_prefix(prefix))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    connector = aiohttp.TCPConnector(ssl=tls if tls is not None else True)
    async with aiohttp.ClientSession(headers=headers, connector=connector) as session:
        return list(
            await asyncio.gather(
                *(check_replica(session, store, prefix, r, snapshot, wait) for r in replicas)
            )
        )


def _value(args: argparse.Namespace, environ: Mapping[str, str], flag: str) -> Any:
    value = getattr(args, flag.lstrip("-").replace("-", "_"))
    if value is None:
        raw = environ.get(env_name(flag))
        if raw is not None:
            value = [r for r in raw.split(",") if r.strip()] if flag == "--replica" else raw
    if value is None:
        value = next(d for f, d, _ in _FLAGS if f == flag)
    return value


def _etcd_endpoint(url: str) -> HostPort:
    url = url.strip()
    for scheme in ("http://", "https://"):
        url = url.removeprefix(scheme)
    return HostPort.parse(url.rstrip("/"), default_port=2379)


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    environ = dict(os.environ)

    def get(flag: str) -> Any:
        return _value(args, environ, flag)

    if not get("--etcd"):
        parser.error("--etcd (or DISCOVERY_ETCD) is required")
    replicas = [r.strip() for item in get("--replica") or () for r in item.split(",")]
    replicas = [r for r in replicas if r]
    if not replicas:
        parser.error("at least one --replica (or DISCOVERY_REPLICA) is required")
    for replica in replicas:
        if not replica.startswith(("http://", "https://")):
            parser.error(f"--replica {replica!r}: must start with http:// or https://")
    try:
        tls = client_tls(get("--cacert"), get("--cert"), get("--key"))
    except OptionError as error:
        parser.error(str(error))
    try:
        wait = float(get("--wait"))
        endpoints = [_etcd_endpoint(url) for url in get("--etcd").split(",") if url.strip()]
    except (ValueError, ConfigError) as error:
        parser.error(str(error))
    try:
        store = EtcdStore(
            [(e.host, e.port) for e in endpoints],
            ca=get("--etcd-ca"),
            cert=get("--etcd-cert"),
            key=get("--etcd-key"),
            user=get("--etcd-user"),
            password=get("--etcd-password"),
        )
    except (ValueError, OSError) as error:
        parser.error(str(error))
    prefix = get("--etcd-prefix")

    async def go() -> list[Report]:
        try:
            return await run_check(store, prefix, replicas, wait, get("--token"), tls)
        finally:
            await store.close()

    try:
        reports = asyncio.run(go())
    except StoreError as error:
        print(f"etcd: {error}", file=sys.stderr)
        return 1
    for report in reports:
        for line in report.lines():
            print(line)
    return 0 if all(report.equal for report in reports) else 1
