"""etcd v3 over its JSON gateway (etcd >= 3.4: POST /v3/kv/*, /v3/lease/*, /v3/watch) with httpx.

The default transport: httpx is loaded anyway (the v2 store, the health server's client side),
so this path costs no memory of its own. The token travels in the Authorization header.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from .diagnose import describe_connect_failure, error_text
from .store import EtcdOptions, httpx_verify, tls_setup
from .transport_choice import GATEWAY
from .v3transport import EndpointFailed, EtcdError, WatchBroken

# etcd sends progress notifications every 10 min by default; a silent stream for longer
# than this means a dead peer that TCP has not noticed yet.
WATCH_IDLE_TIMEOUT_S = 15 * 60

# Errors that mean "this endpoint did not answer": try the next one.
_UNREACHABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadTimeout, httpx.WriteTimeout,
                httpx.PoolTimeout, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


def error_from_response(path: str, r: httpx.Response, endpoint: str) -> EtcdError:
    try:
        doc = r.json()
        msg, code = doc.get("message") or doc.get("error") or r.text, doc.get("code")
    except (ValueError, AttributeError):
        msg, code = r.text.strip() or r.reason_phrase, None
    err = EtcdError(path, r.status_code, str(msg), code)
    err.endpoint = endpoint  # type: ignore[attr-defined]
    return err


class GatewayTransport:
    name = GATEWAY

    def __init__(self, options: EtcdOptions) -> None:
        self._tls = tls_setup(options)
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(options.request_timeout), verify=httpx_verify(options))
        self._timeout = options.request_timeout

    async def aclose(self) -> None:
        await self._client.aclose()

    def _failed(self, endpoint: str, exc: BaseException) -> EndpointFailed:
        return EndpointFailed(describe_connect_failure(endpoint, error_text(exc), self._tls))

    async def call(self, endpoint: str, path: str, body: dict[str, Any], token: str | None) -> dict[str, Any]:
        headers = {"Authorization": token} if token is not None else {}
        try:
            r = await self._client.post(endpoint + path, json=body, headers=headers)
        except _UNREACHABLE as exc:
            raise self._failed(endpoint, exc) from None
        if r.status_code != 200:
            raise error_from_response(path, r, endpoint)
        try:
            return r.json()
        except ValueError:
            raise EtcdError(path, 200, f"not an etcd v3 gateway answer: {r.text[:200]!r}") from None

    @asynccontextmanager
    async def watch(self, endpoint: str, body: dict[str, Any], token: str | None
                    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        headers = {"Authorization": token} if token is not None else {}
        timeout = httpx.Timeout(self._timeout, read=WATCH_IDLE_TIMEOUT_S)
        try:
            async with self._client.stream("POST", endpoint + "/v3/watch", json=body, headers=headers,
                                           timeout=timeout) as r:
                if r.status_code != 200:
                    await r.aread()
                    raise error_from_response("/v3/watch", r, endpoint)
                yield self._messages(r)
        except _UNREACHABLE as exc:  # while opening (reading errors are WatchBroken, from _messages)
            raise self._failed(endpoint, exc) from None

    @staticmethod
    async def _messages(r: httpx.Response) -> AsyncIterator[dict[str, Any]]:
        try:
            async for line in r.aiter_lines():
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except ValueError:
                    raise WatchBroken(f"undecodable watch message {line[:200]!r}") from None
        except _UNREACHABLE as exc:
            raise WatchBroken(error_text(exc)) from None
