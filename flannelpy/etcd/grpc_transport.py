"""etcd v3 over its native gRPC API with grpcio, for clusters whose JSON gateway cannot serve.

Imported only when chosen (transport_choice.py): grpcio costs about 21 MiB of RSS.

How it runs under trio: grpcio's synchronous API does its network work on its own C-core
threads. A unary call is started with `.future()` and its completion callback wakes the trio
task, so no thread of ours waits on it; cancelling the task cancels the call. A watch stream
is read one message at a time in a trio worker thread (`trio.to_thread`, `next()` on the
stream); leaving the stream cancels the call, which ends any `next()` still waiting, so no
thread outlives its stream.

Requests and answers are the gateway's JSON documents (protobuf's JSON mapping with proto field
names is exactly what etcd's gateway sends), so the store is the same for both transports.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import trio

from flannelpy.errors import FlannelError

from .diagnose import describe_connect_failure
from .store import EtcdOptions, tls_context, tls_setup
from .transport_choice import GRPC
from .v3transport import EndpointFailed, EtcdError, WatchBroken

# gRPC core logs TLS trouble to stderr in its own format; we report it ourselves, in one line.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc  # after the environment above: gRPC core reads it at import
from google.protobuf import json_format

from .grpc_schema import MESSAGES, METHODS

# How grpc-gateway maps gRPC codes to HTTP statuses, so errors read the same on both transports.
_HTTP_STATUS = {1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400, 10: 409, 11: 400,
                12: 501, 13: 500, 14: 503, 15: 500, 16: 401}
# Codes that mean "this endpoint could not serve the call": try the next one.
_ENDPOINT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# Reconnect quickly after an etcd restart (gRPC's default backoff grows to 2 min), and notice a
# dead peer on an idle watch within ~40 s.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 5000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]
_DONE = object()


def _read(flag: str, path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise FlannelError(f"-{flag}={path}: cannot read it: {exc.strerror}") from None


def _tls_probe(endpoint: str, ctx: ssl.SSLContext, timeout: float) -> str:
    """One TLS handshake and read with Python's ssl and the same files: the error text, or ""."""
    parts = urlsplit(endpoint)
    try:
        with socket.create_connection((parts.hostname, parts.port or 2379), timeout=timeout) as sock:
            with ctx.wrap_socket(sock, server_hostname=parts.hostname) as tls:
                tls.sendall(b"GET /version HTTP/1.1\r\nHost: etcd\r\nConnection: close\r\n\r\n")
                tls.recv(1)
    except (ssl.SSLError, OSError) as exc:
        return str(exc) or type(exc).__name__
    return ""


def _target(endpoint: str) -> tuple[str, bool]:
    """("host:port", secure) for an -etcd-endpoints URL."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FlannelError(f"etcd endpoint {endpoint!r}: expected http(s)://host:port")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{parts.port or 2379}", parts.scheme == "https"


class GrpcTransport:
    name = GRPC

    def __init__(self, options: EtcdOptions) -> None:
        self._tls = tls_setup(options)
        self._timeout = options.request_timeout
        verify = tls_context(options)
        self._ssl = verify if isinstance(verify, ssl.SSLContext) else ssl.create_default_context()
        creds = None
        if any(urlsplit(e).scheme == "https" for e in options.endpoints):
            ca = _read("etcd-cafile", options.cafile) if options.cafile else None
            key = cert = None
            if options.certfile and options.keyfile:
                key, cert = _read("etcd-keyfile", options.keyfile), _read("etcd-certfile", options.certfile)
            creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        self._channels: dict[str, grpc.Channel] = {}
        for endpoint in options.endpoints:
            target, secure = _target(endpoint.rstrip("/"))
            self._channels[endpoint.rstrip("/")] = (grpc.secure_channel(target, creds, options=_CHANNEL_OPTIONS)
                                                    if secure else grpc.insecure_channel(target, options=_CHANNEL_OPTIONS))
        self._methods: dict[tuple[str, str], Callable[..., Any]] = {}

    async def aclose(self) -> None:
        for channel in self._channels.values():
            channel.close()

    def _method(self, endpoint: str, path: str) -> tuple[Any, Any]:
        name, request_type, _response_type = METHODS[path]
        key = (endpoint, path)
        if key not in self._methods:
            channel = self._channels[endpoint]
            response = MESSAGES[METHODS[path][2]]
            make = channel.stream_stream if path == "/v3/watch" else channel.unary_unary
            self._methods[key] = make(name, request_serializer=lambda m: m.SerializeToString(),
                                      response_deserializer=response.FromString)
        return self._methods[key], MESSAGES[request_type]

    async def _error(self, endpoint: str, path: str, exc: grpc.RpcError) -> Exception:
        code, details = exc.code(), exc.details() or ""
        # etcd's own refusals ("etcdserver: no leader", "etcdserver: request timed out") come from a
        # working endpoint; anything else unavailable is the connection (refused, TLS, reset, timeout).
        if code in _ENDPOINT_CODES and not details.startswith("etcdserver:"):
            failure = describe_connect_failure(endpoint, f"{code.name}: {details}", self._tls)
            if (code == grpc.StatusCode.UNAVAILABLE and urlsplit(endpoint).scheme == "https"
                    and "refused" not in details.lower()):
                # gRPC core words a failed handshake differently from run to run ("handshaker
                # shutdown", "Unwrap failed", the verify error); a handshake of our own with the
                # same files names the cause exactly, and only costs anything on this failure path.
                probed = await trio.to_thread.run_sync(_tls_probe, endpoint, self._ssl, self._timeout)
                if probed:
                    failure = describe_connect_failure(endpoint, probed, self._tls)
            return EndpointFailed(failure)
        number = code.value[0]
        err = EtcdError(path, _HTTP_STATUS.get(number, 500), details, number)
        err.endpoint = endpoint  # type: ignore[attr-defined]
        return err

    @staticmethod
    def _metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
        return (("token", token),) if token is not None else None

    async def call(self, endpoint: str, path: str, body: dict[str, Any], token: str | None) -> dict[str, Any]:
        method, request_type = self._method(endpoint, path)
        request = json_format.ParseDict(body, request_type())
        future = method.future(request, timeout=self._timeout, metadata=self._metadata(token))
        done = trio.Event()
        trio_token = trio.lowlevel.current_trio_token()

        def wake(_f: object) -> None:  # on a gRPC thread, or right here when already done
            try:
                trio_token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        future.add_done_callback(wake)
        try:
            await done.wait()
        finally:
            if not future.done():
                future.cancel()
        try:
            response = future.result()
        except grpc.RpcError as exc:
            raise await self._error(endpoint, path, exc) from None
        return json_format.MessageToDict(response, preserving_proto_field_name=True)

    @asynccontextmanager
    async def watch(self, endpoint: str, body: dict[str, Any], token: str | None
                    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        method, request_type = self._method(endpoint, "/v3/watch")
        # One create request, then the client half-closes: etcd keeps sending on the stream.
        call = method(iter([json_format.ParseDict(body, request_type())]), metadata=self._metadata(token))
        try:
            # The first message (the "created" answer) shows whether the endpoint took the stream.
            first = await self._next(call, endpoint, opening=True)
            yield self._messages(call, endpoint, first)
        finally:
            call.cancel()

    async def _next(self, call: Any, endpoint: str, *, opening: bool = False) -> Any:
        try:
            return await trio.to_thread.run_sync(next, call, _DONE, abandon_on_cancel=True)
        except grpc.RpcError as exc:
            err = await self._error(endpoint, "/v3/watch", exc)
            if opening:
                raise err from None
            raise WatchBroken(str(err)) from None

    async def _messages(self, call: Any, endpoint: str, first: Any) -> AsyncIterator[dict[str, Any]]:
        message = first
        while message is not _DONE:
            yield {"result": json_format.MessageToDict(message, preserving_proto_field_name=True)}
            message = await self._next(call, endpoint)
