"""One connection to one etcd member: a grpc.aio channel, the generated stubs, the auth token.

Only the public grpc.aio API and aetcd's generated messages and stubs (`aetcd.rpc`) are used,
nothing of aetcd's client. `EtcdConnection.request()` is the one place where what a gRPC call
can raise (a timeout, a cancellation, an `AioRpcError`) becomes a store error.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
from aetcd import rpc

from .base import LeaseExists, LeaseNotFound, StoreError, StoreUnavailable, being_cancelled

# gRPC codes that mean "etcd is unreachable or did not answer": the call may be retried,
# on another endpoint. etcd itself answers UNAVAILABLE for "no leader" and "request timed out".
_UNAVAILABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)
_FAILED = (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN)
_LEASE_NOT_FOUND = "requested lease not found"
_LEASE_EXISTS = "lease already exists"
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # A restarted etcd is found again quickly (gRPC's default backoff grows to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


class Unauthenticated(StoreError):
    """etcd refused the auth token (it expires when unused): log in again."""


class EtcdConnection:
    """A channel to one member and its stubs (`kv`, `lease`, `watch`, `maintenance`).

    Created inside the event loop; `connect()` waits for the channel and logs in. Every call
    passes `timeout` and `metadata` (the auth token) and runs inside `request()`.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        credentials: grpc.ChannelCredentials | None,
        user: str | None,
        password: str | None,
        timeout: float,
    ) -> None:
        self.host = host
        self.port = port
        self.endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.timeout = timeout
        self.token: str | None = None
        self.metadata: tuple[tuple[str, str], ...] | None = None
        self.closed = False
        self._user = user
        self._password = password
        if credentials is not None:
            self.channel = grpc.aio.secure_channel(
                self.endpoint, credentials, options=_CHANNEL_OPTIONS
            )
        else:
            self.channel = grpc.aio.insecure_channel(self.endpoint, options=_CHANNEL_OPTIONS)
        self.kv: Any = rpc.KVStub(self.channel)
        self.lease: Any = rpc.LeaseStub(self.channel)
        self.watch: Any = rpc.WatchStub(self.channel)
        self.maintenance: Any = rpc.MaintenanceStub(self.channel)
        self._auth: Any = rpc.AuthStub(self.channel)

    async def connect(self) -> None:
        """Wait until the channel is up, then log in. Raises StoreUnavailable as soon as a
        connection attempt fails; the caller bounds the whole in time."""
        state = self.channel.get_state(try_to_connect=True)
        while state != grpc.ChannelConnectivity.READY:
            if state in _FAILED:
                raise StoreUnavailable(f"cannot connect to {self.endpoint}")
            await self.channel.wait_for_state_change(state)
            state = self.channel.get_state(try_to_connect=True)
        if self._user is not None:
            await self.login()

    async def login(self) -> None:
        """Log in (again) and use the new token for every later call."""
        request = rpc.AuthenticateRequest(name=self._user, password=self._password)
        async with self.request("login"):
            response = await self._auth.Authenticate(request, timeout=self.timeout)
        self.token = str(response.token)
        self.metadata = (("token", self.token),)

    @contextlib.asynccontextmanager
    async def request(self, what: str = "request", bounded: bool = True) -> AsyncIterator[None]:
        """Bound the block by the request timeout (+0.5 s for gRPC's own deadline to answer
        first) and raise only store errors from it. A member that does not answer in time or
        answers "unavailable" is closed: the store then dials the next endpoint.
        """
        try:
            async with asyncio.timeout(self.timeout + 0.5 if bounded else None):
                yield
        except TimeoutError:
            await self.close()
            raise StoreUnavailable(
                f"etcd {self.endpoint}: no answer to {what} within {self.timeout} s"
            ) from None
        except asyncio.CancelledError:
            if being_cancelled():
                raise
            # gRPC cancels the calls of a channel being closed (store closed or rotated)
            raise StoreUnavailable(f"etcd {self.endpoint}: connection closed") from None
        except grpc.aio.UsageError:  # a call started on a closing channel
            raise StoreUnavailable(f"etcd {self.endpoint}: connection closed") from None
        except grpc.aio.AioRpcError as e:
            code, details = e.code(), e.details() or ""
            message = f"etcd {self.endpoint}: {what}: {code.name}: {details}"
            if _LEASE_NOT_FOUND in details:
                raise LeaseNotFound(details) from e
            if _LEASE_EXISTS in details:
                raise LeaseExists(details) from e
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise Unauthenticated(message) from e
            if code in _UNAVAILABLE:
                await self.close()
                raise StoreUnavailable(message) from e
            raise StoreError(message) from e

    @property
    def call_args(self) -> dict[str, Any]:
        """The keyword arguments of every call: gRPC's deadline and the auth token."""
        return {"timeout": self.timeout, "metadata": self.metadata}

    @property
    def healthy(self) -> bool:
        """False once closed or once the channel has seen its connection fail."""
        return not self.closed and self.channel.get_state() not in _FAILED

    async def close(self) -> None:
        """Close the channel; gRPC cancels the calls still running on it."""
        self.closed = True
        await self.channel.close()
