"""A real etcd server for tests (the process itself: discovery/testing.py).

Use the `etcd_server` fixture (skips when the `etcd` binary is missing, fails instead when the
CI environment variable is set) and `open_etcd_store(server)` / the `etcd_store` fixture for an
EtcdStore connected to it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from discovery.store.etcd import EtcdStore
from discovery.testing import (
    HOST,
    EtcdServer,
    TlsFiles,
    etcd_binary,
    free_ports,
    make_tls_files,
)

__all__ = [
    "HOST",
    "EtcdServer",
    "TlsFiles",
    "etcd_binary",
    "etcd_server",
    "etcd_store",
    "free_ports",
    "make_tls_files",
    "open_etcd_store",
    "require_etcd",
]


def require_etcd() -> str:
    """The etcd binary; skip the test when missing (fail instead when CI is set)."""
    binary = etcd_binary()
    if binary is None:
        reason = "the `etcd` binary is not installed (Debian/Ubuntu: apt-get install etcd-server)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}, and CI is set: etcd tests must run in CI")
        pytest.skip(reason)
    return binary


@pytest.fixture
def etcd_server(tmp_path: Path) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path / "etcd", binary=require_etcd())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def open_etcd_store(server: EtcdServer, **kwargs: Any) -> AsyncIterator[EtcdStore]:
    """An EtcdStore against the server (kwargs go to EtcdStore), closed on exit."""
    kwargs.setdefault("request_timeout", 2.0)
    kwargs.setdefault("dial_timeout", 2.0)
    if server.tls and "ca" not in kwargs:
        kwargs.update(ca=server.tls.ca, cert=server.tls.client_cert, key=server.tls.client_key)
    store = EtcdStore([server.endpoint], **kwargs)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def etcd_store(etcd_server: EtcdServer) -> AsyncIterator[EtcdStore]:
    async with open_etcd_store(etcd_server) as store:
        yield store
