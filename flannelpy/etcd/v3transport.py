"""What the v3 store needs from a transport, and the errors every transport raises.

Both transports (`gateway.py`: etcd's JSON gateway over httpx; `grpc_transport.py`: etcd's gRPC
API over grpcio) speak in the gateway's JSON documents — base64 keys and values, int64s as
strings, proto field names — so `v3.py` holds every rule about keys, leases and watches once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from flannelpy.errors import FlannelError

from .diagnose import ConnectFailure


class EtcdError(FlannelError):
    """etcd answered with an error (bad request, permission denied, ...)."""

    def __init__(self, path: str, status: int, message: str, code: int | None = None, *,
                 advice: str = "") -> None:
        text = f"etcd {path}: {message} (HTTP {status}{f', gRPC code {code}' if code is not None else ''})"
        super().__init__(f"{text}; {advice}" if advice else text)
        self.path = path
        self.status = status
        self.code = code
        self.etcd_message = message


class EndpointFailed(Exception):
    """This endpoint could not be used (refused, timed out, TLS refused); try the next one."""

    def __init__(self, failure: ConnectFailure) -> None:
        super().__init__(failure.text)
        self.failure = failure


class WatchBroken(Exception):
    """An open watch stream ended or failed; the store reconnects."""


class V3Transport(Protocol):
    name: str  # "gateway" or "grpc"

    async def call(self, endpoint: str, path: str, body: dict[str, Any], token: str | None) -> dict[str, Any]:
        """One unary request, as the gateway's POST `path`; raises EndpointFailed or EtcdError."""

    def watch(self, endpoint: str, body: dict[str, Any], token: str | None
              ) -> AbstractAsyncContextManager[AsyncIterator[dict[str, Any]]]:
        """An open watch stream yielding the gateway's per-message documents ({"result": ...} or
        {"error": ...}); opening raises EndpointFailed or EtcdError, reading raises WatchBroken."""

    async def aclose(self) -> None:
        ...
