"""The Store over etcd's v3 API, through its JSON gateway (httpx) or its gRPC API (grpcio).

Everything here is written in the gateway's terms (POST /v3/kv/*, /v3/lease/*, /v3/watch and
its JSON documents); a transport (gateway.py, grpc_transport.py) carries them, and with
-etcd-transport=auto the store moves from the gateway to gRPC once, on the one answer that
means the gateway cannot serve this cluster (transport_choice.py).

Leases are written exactly as flanneld v0.20+ writes them: create = grant(ttl) then a txn
`version(key)==0 -> put(key, value, lease)` (the granted lease is revoked when the txn
fails); renew = grant a fresh lease and a plain put.  Keys and values travel base64-encoded
and int64s arrive as strings, which is why every number below goes through int().
"""

from __future__ import annotations

import base64
import logging
import posixpath
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from typing import Any
from urllib.parse import urlsplit

import trio

from flannelpy.errors import FlannelError, LeaseValueError
from flannelpy.subnet.lease import (
    EventKind,
    Lease,
    LeaseAttrs,
    LeaseEvent,
    ValueStyle,
    decode_attrs,
    encode_attrs,
    lease_key,
    parse_store_key,
)

from .diagnose import ConnectFailure, advice_for_etcd_error
from .store import EXPIRY_NOT_READ, EtcdOptions, SkipLog, StoreUnavailable, WatchBatch, unavailable
from .transport_choice import (
    GATEWAY,
    GRPC,
    after_gateway_failure,
    gateway_cannot_serve,
    initial_transport,
)
from .v3transport import EndpointFailed, EtcdError, V3Transport, WatchBroken

__all__ = ["EtcdError", "V3Store", "prefix_range_end"]

log = logging.getLogger("flanneld.etcd")

BACKOFF_MIN_S = 0.1  # flanneld's watch reconnect backoff: 100 ms doubling to 5 s
BACKOFF_MAX_S = 5.0
_TTL_CONCURRENCY = 16
# Keys per range request of a listing, all pages at one revision.  A page's JSON decodes to ~1 KiB
# of short-lived objects per key; a whole 1000-lease listing at once left ~1 KiB per peer of
# RSS behind for good (the pages they had filled stay with the leases kept from them).
LIST_PAGE = 250
_LIST_RESTARTS = 3  # a listing whose revision is compacted between pages starts over


class _Compacted(Exception):
    def __init__(self, revision: int) -> None:
        self.revision = revision


class GatewayCannotServe(EtcdError):
    """The JSON gateway cannot serve this cluster and gRPC is not an option (the message says why)."""

    def __init__(self, err: EtcdError, message: str) -> None:
        super().__init__(err.path, err.status, err.etcd_message, err.code)
        self.args = (message,)

    def __str__(self) -> str:
        return self.args[0]


def make_transport(name: str, options: EtcdOptions) -> V3Transport:
    if name == GRPC:
        # grpcio is loaded only where it is used
        from .grpc_transport import GrpcTransport

        return GrpcTransport(options)
    from .gateway import GatewayTransport

    return GatewayTransport(options)


def grpc_importable() -> bool | str:
    """True, or why grpcio cannot be imported."""
    try:
        from . import grpc_transport  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return True


def _b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text or "")


def prefix_range_end(prefix: str | bytes) -> bytes:
    """etcd's WithPrefix: the range end is the prefix with its last byte incremented."""
    raw = bytearray(prefix.encode() if isinstance(prefix, str) else prefix)
    for i in range(len(raw) - 1, -1, -1):
        if raw[i] < 0xFF:
            raw[i] += 1
            return bytes(raw[: i + 1])
    return b"\0"  # all 0xff: the whole keyspace above the prefix


def _join(*parts: str) -> str:
    """Go's path.Join: joined and cleaned, "" elements dropped."""
    joined = posixpath.join(*[p for p in parts if p])
    cleaned = posixpath.normpath(joined) if joined else ""
    return cleaned[1:] if cleaned.startswith("//") else cleaned


class V3Store:
    """A flannel subnet registry in etcd, v3 API.  Use `async with` or aclose()."""

    def __init__(self, options: EtcdOptions, *, backoff_min_s: float = BACKOFF_MIN_S,
                 backoff_max_s: float = BACKOFF_MAX_S) -> None:
        if not options.endpoints:
            raise FlannelError("no etcd endpoints given")
        self.options = options
        # EnableIPv6: dual-stack keys are read (lease.parse_store_key); the agent sets it from the config.
        self.dual_stack = False
        self._endpoints = [e.rstrip("/") for e in options.endpoints]
        self._good = 0  # index of the endpoint that answered last
        self._skip_log = SkipLog(log)
        self._token: str | None = None
        self._auth_lock = trio.Lock()
        self._backoff = (backoff_min_s, backoff_max_s)
        # Called whenever a watch stream breaks and is re-opened (the agent counts it in /metrics).
        self.on_watch_reconnect: Callable[[], None] | None = None
        self.config_key = _join(options.prefix, "config")
        self.subnets_prefix = _join(options.prefix, "subnets") + "/"
        start = initial_transport(options.transport)
        self._transport: V3Transport = make_transport(start.transport or GATEWAY, options)
        self._choice_to_log: str | None = start.message  # logged once the transport has answered
        self._switch_lock = trio.Lock()

    @property
    def transport(self) -> str:
        """The transport in use: "gateway" or "grpc"."""
        return self._transport.name

    # --- connection ---------------------------------------------------------------------

    async def __aenter__(self) -> V3Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self._transport.aclose()

    def _order(self) -> list[int]:
        n = len(self._endpoints)
        return [(self._good + i) % n for i in range(n)]

    async def _authenticate(self, stale: str | None) -> None:
        async with self._auth_lock:
            if self._token is not None and self._token != stale:
                return  # another task already refreshed it
            self._token = None
            doc = await self._post("/v3/auth/authenticate",
                                   {"name": self.options.username, "password": self.options.password}, auth=False)
            self._token = doc["token"]

    async def _token_for(self, auth: bool) -> str | None:
        if not (auth and self.options.username):
            return None
        if self._token is None:
            await self._authenticate(None)
        return self._token or ""

    async def _call(self, path: str, body: dict[str, Any], token: str | None) -> dict[str, Any]:
        """One request on the first endpoint that can be used; StoreUnavailable when none can."""
        transport = self._transport
        failures: list[ConnectFailure] = []
        for idx in self._order():
            endpoint = self._endpoints[idx]
            try:
                doc = await transport.call(endpoint, path, body, token)
            except EndpointFailed as exc:
                log.debug("etcd endpoint %s: %s", endpoint, exc)
                failures.append(exc.failure)
                continue
            except EtcdError as err:
                self._good = idx
                err.endpoint = endpoint  # type: ignore[attr-defined]
                raise
            self._good = idx
            self._log_choice()
            return doc
        raise unavailable(failures)

    async def _post(self, path: str, body: dict[str, Any], *, auth: bool = True) -> dict[str, Any]:
        """POST to the first endpoint that answers; raise StoreUnavailable when none does."""
        reauthenticated = switched = False
        while True:
            token = await self._token_for(auth)
            try:
                return await self._call(path, body, token)
            except EtcdError as err:
                if not switched and await self._switch_if_gateway_cannot_serve(err):
                    switched = True
                    continue
                if token is not None and not reauthenticated and _token_rejected(err):
                    log.info("etcd rejected the auth token; authenticating again")
                    await self._authenticate(token)
                    reauthenticated = True
                    continue
                raise self._with_advice(err) from None

    def _with_advice(self, err: EtcdError) -> EtcdError:
        advice = advice_for_etcd_error(err.etcd_message, prefix=self.options.prefix, username=self.options.username)
        if not advice or isinstance(err, GatewayCannotServe):
            return err
        return EtcdError(err.path, err.status, err.etcd_message, err.code, advice=advice)

    def _log_choice(self) -> None:
        if self._choice_to_log is not None:
            log.info("%s", self._choice_to_log)
            self._choice_to_log = None

    async def _switch_if_gateway_cannot_serve(self, err: EtcdError) -> bool:
        """Move to gRPC when the gateway answered that it cannot serve; True when the caller should retry.

        Raises GatewayCannotServe when it cannot serve and gRPC is not allowed or not installed.
        """
        transport = self._transport
        endpoint = getattr(err, "endpoint", "")
        if transport.name != GATEWAY or not gateway_cannot_serve(
                urlsplit(endpoint).scheme, err.status, err.code, err.etcd_message):
            return False
        async with self._switch_lock:
            if self._transport is not transport:
                return True  # another task switched already
            decision = after_gateway_failure(self.options.transport, endpoint, err.etcd_message, grpc_importable())
            if decision.transport is None:
                raise GatewayCannotServe(err, decision.message)
            self._transport = make_transport(decision.transport, self.options)
            self._choice_to_log = None
            log.info("%s", decision.message)
            with trio.CancelScope(shield=True):
                await transport.aclose()
        return True

    # --- reads ----------------------------------------------------------------------------

    async def get_config(self) -> str | None:
        doc = await self._post("/v3/kv/range", {"key": _b64(self.config_key)})
        kvs = doc.get("kvs") or []
        return _unb64(kvs[0].get("value", "")).decode() if kvs else None

    async def put_config(self, text: str) -> None:
        """Write <prefix>/config (flannelctl's `config set`)."""
        await self._post("/v3/kv/put", {"key": _b64(self.config_key), "value": _b64(text)})

    async def _ttl(self, lease_id: int) -> int:
        """An etcd lease's TTL left, in seconds, as TimeToLive answers it: -1 when it is gone.
        The leader's lessor answers it itself: no raft round, no fsync."""
        doc = await self._post("/v3/lease/timetolive", {"ID": str(lease_id)})
        return int(doc.get("TTL", -1))

    async def _expiration(self, lease_id: int) -> float | None:
        """Unix expiry of an etcd lease; None when the key has no lease (a reservation)."""
        if not lease_id:
            return None
        ttl = await self._ttl(lease_id)
        # Like flanneld's kvToIPLease: an unknown/expired lease (TTL -1) is "already expired".
        return time.time() + (ttl if ttl >= 0 else -1)

    def _kv_to_lease_unread(self, kv: dict[str, Any]) -> Lease:
        """The lease without its expiry: EXPIRY_NOT_READ when the key has an etcd lease."""
        key = _unb64(kv.get("key", "")).decode(errors="replace")
        subnet, ipv6_subnet = parse_store_key(key, self.subnets_prefix, self.dual_stack)
        attrs = decode_attrs(_unb64(kv.get("value", "")), key)
        lease_id = int(kv.get("lease", 0))
        return Lease(subnet=subnet, attrs=attrs, expiration=EXPIRY_NOT_READ if lease_id else None,
                     store_ref=lease_id or None, ipv6_subnet=ipv6_subnet)

    async def _kv_to_lease(self, kv: dict[str, Any]) -> Lease:
        lease = self._kv_to_lease_unread(kv)
        if lease.store_ref is None:
            return lease
        return Lease(subnet=lease.subnet, attrs=lease.attrs, expiration=await self._expiration(lease.store_ref),
                     store_ref=lease.store_ref, ipv6_subnet=lease.ipv6_subnet)

    async def _kvs_to_leases(self, kvs: list[dict[str, Any]], expiry: bool = True) -> tuple[list[Lease], list[str]]:
        skipped: list[str] = []
        if not expiry:
            # No round trip per lease (flanneld's kvToIPLease makes one TimeToLive call each): the
            # agent never reads a peer's expiry, and 1000 calls were most of a cold start.
            leases: list[Lease] = []
            for kv in kvs:
                try:
                    leases.append(self._kv_to_lease_unread(kv))
                except LeaseValueError as exc:
                    self._skip_log.skipped(exc)
                    skipped.append(_unb64(kv.get("key", "")).decode(errors="replace"))
            return leases, skipped
        results: list[Lease | None] = [None] * len(kvs)
        limiter = trio.CapacityLimiter(_TTL_CONCURRENCY)

        async def one(i: int, kv: dict[str, Any]) -> None:
            async with limiter:
                try:
                    results[i] = await self._kv_to_lease(kv)
                except LeaseValueError as exc:
                    self._skip_log.skipped(exc)
                    skipped.append(_unb64(kv.get("key", "")).decode(errors="replace"))

        async with trio.open_nursery() as nursery:
            for i, kv in enumerate(kvs):
                nursery.start_soon(one, i, kv)
        return [lease for lease in results if lease is not None], skipped

    async def list_leases(self, *, expiry: bool = True) -> tuple[list[Lease], int]:
        leases, _rev, _skipped = await self._list(expiry)
        return leases, _rev

    async def _list(self, expiry: bool = True) -> tuple[list[Lease], int, list[str]]:
        """Every lease under the subnets prefix at one revision, read LIST_PAGE keys at a time."""
        for attempt in range(_LIST_RESTARTS + 1):
            try:
                return await self._list_pages(expiry)
            except EtcdError as err:
                if "compacted" not in err.etcd_message or attempt == _LIST_RESTARTS:
                    raise
                log.info("listing leases: its revision was compacted between pages; listing again")
        raise AssertionError("unreachable")

    async def _list_pages(self, expiry: bool) -> tuple[list[Lease], int, list[str]]:
        start, end = _b64(self.subnets_prefix), _b64(prefix_range_end(self.subnets_prefix))
        leases: list[Lease] = []
        skipped: list[str] = []
        revision = 0
        while True:
            body = {"key": start, "range_end": end, "limit": str(LIST_PAGE)}
            if revision:
                body["revision"] = str(revision)  # the first page's: one consistent listing
            doc = await self._post("/v3/kv/range", body)
            revision = revision or int(doc["header"]["revision"])
            kvs = doc.get("kvs") or []
            page, bad = await self._kvs_to_leases(kvs, expiry)
            leases += page
            skipped += bad
            if not doc.get("more") or not kvs:
                return leases, revision, skipped
            start = _b64(_unb64(kvs[-1].get("key", "")) + b"\0")  # the first key after the page's last

    async def get_lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None = None) -> Lease | None:
        """The lease stored for one subnet, or None (also None when its value is undecodable)."""
        doc = await self._post("/v3/kv/range", {"key": _b64(self._key(subnet, ipv6_subnet))})
        kvs = doc.get("kvs") or []
        if not kvs:
            return None
        try:
            return await self._kv_to_lease(kvs[0])
        except LeaseValueError as exc:
            log.warning("lease for %s: %s", subnet, exc)
            return None

    # --- writes ---------------------------------------------------------------------------

    def _key(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None = None) -> str:
        return self.subnets_prefix + lease_key(subnet, ipv6_subnet)

    async def _grant(self, ttl: int) -> int:
        doc = await self._post("/v3/lease/grant", {"TTL": str(ttl)})
        return int(doc["ID"])

    async def create_lease(self, subnet: IPv4Network, attrs: LeaseAttrs, ttl: int,
                           ipv6_subnet: IPv6Network | None = None) -> Lease | None:
        key, value = self._key(subnet, ipv6_subnet), encode_attrs(attrs, ValueStyle.CURRENT)
        lease_id = await self._grant(ttl) if ttl > 0 else 0
        put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease_id:
            put["lease"] = str(lease_id)
        doc = await self._post("/v3/kv/txn", {
            "compare": [{"key": _b64(key), "result": "EQUAL", "target": "VERSION", "version": "0"}],
            "success": [{"request_put": put}],
            "failure": [{"request_range": {"key": _b64(key)}}],
        })
        if doc.get("succeeded"):
            expiration = time.time() + ttl if ttl > 0 else None
            return Lease(subnet=subnet, attrs=attrs, expiration=expiration, store_ref=lease_id or None,
                         ipv6_subnet=ipv6_subnet)
        if lease_id:
            await self._revoke(lease_id)
        # A retried request (timeout after etcd applied it) finds our own value: that is a win.
        kvs = (doc.get("responses") or [{}])[0].get("response_range", {}).get("kvs") or []
        if kvs and _unb64(kvs[0].get("value", "")).decode(errors="replace") == value:
            try:
                return await self._kv_to_lease(kvs[0])
            except LeaseValueError:
                pass
        return None

    async def _revoke(self, lease_id: int) -> None:
        try:
            await self._post("/v3/lease/revoke", {"ID": str(lease_id)})
        except EtcdError as exc:
            log.debug("revoking unused lease %x: %s", lease_id, exc)

    async def renew_lease(self, subnet: IPv4Network, attrs: LeaseAttrs, ttl: int,
                          ipv6_subnet: IPv6Network | None = None) -> Lease:
        # As flanneld's updateSubnet: a new lease and a plain put; the old lease is left to
        # expire empty.
        lease_id = await self._grant(ttl) if ttl > 0 else 0
        put: dict[str, Any] = {"key": _b64(self._key(subnet, ipv6_subnet)),
                               "value": _b64(encode_attrs(attrs, ValueStyle.CURRENT))}
        if lease_id:
            put["lease"] = str(lease_id)
        await self._post("/v3/kv/put", put)
        return Lease(subnet=subnet, attrs=attrs, expiration=time.time() + ttl if ttl > 0 else None,
                     store_ref=lease_id or None, ipv6_subnet=ipv6_subnet)

    async def time_left(self, lease: Lease) -> float | None:
        # One read (_ttl), where the renewal it spares is a grant and a put, an fsync each.
        if not lease.store_ref:
            return None
        ttl = await self._ttl(lease.store_ref)
        return float(ttl) if ttl > 0 else None  # -1: gone; 0: expiring now

    async def delete_lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None = None) -> None:
        await self._post("/v3/kv/deleterange", {"key": _b64(self._key(subnet, ipv6_subnet))})

    # --- watch ----------------------------------------------------------------------------

    async def watch_leases(self, after_revision: int, *, expiry: bool = True) -> AsyncIterator[WatchBatch]:
        """Batches of changes after `after_revision`, forever.

        Reconnects with backoff and resumes at the last seen revision + 1; when the history
        it needs was compacted away it re-lists and yields a snapshot batch instead.
        """
        last = after_revision
        delay = self._backoff[0]
        while True:
            try:
                async for batch in self._watch_once(last + 1, expiry):
                    delay = self._backoff[0]  # the stream works again
                    last = max(last, batch.revision)
                    if batch.events or batch.skipped:
                        yield batch
            except _Compacted as exc:
                log.warning("watch fell behind etcd compaction (revision %d); re-listing leases", exc.revision)
                try:
                    leases, rev, skipped = await self._list(expiry)
                except (StoreUnavailable, EtcdError) as err:
                    log.warning("re-list after compaction failed: %s", err)
                    await trio.sleep(delay)
                    delay = min(delay * 2, self._backoff[1])
                    continue
                last = rev
                delay = self._backoff[0]
                yield WatchBatch(snapshot=tuple(leases), revision=rev, skipped=tuple(skipped))
                continue
            except (StoreUnavailable, EtcdError, WatchBroken) as exc:
                log.warning("watch on %s interrupted (%s); reconnecting in %.1fs from revision %d",
                            self.subnets_prefix, exc, delay, last + 1)
                if self.on_watch_reconnect is not None:
                    self.on_watch_reconnect()
            await trio.sleep(delay)
            delay = min(delay * 2, self._backoff[1])

    async def _watch_once(self, start_revision: int, expiry: bool = True) -> AsyncIterator[WatchBatch]:
        """One watch stream; ends by raising (disconnect, compaction, error)."""
        body = {"create_request": {
            "key": _b64(self.subnets_prefix),
            "range_end": _b64(prefix_range_end(self.subnets_prefix)),
            "start_revision": str(start_revision),
            "progress_notify": True,
        }}
        switched = False
        while True:
            token = await self._token_for(True)
            transport = self._transport
            failures: list[ConnectFailure] = []
            for idx in self._order():
                endpoint = self._endpoints[idx]
                try:
                    async with transport.watch(endpoint, body, token) as messages, aclosing(messages):
                        self._good = idx
                        self._log_choice()
                        async for doc in messages:
                            batch = await self._watch_message(doc, expiry)
                            if batch is not None:
                                yield batch
                    raise WatchBroken(f"etcd {endpoint} closed the watch stream")
                except EndpointFailed as exc:
                    failures.append(exc.failure)
                    continue
                except EtcdError as err:
                    err.endpoint = endpoint  # type: ignore[attr-defined]
                    if not switched and await self._switch_if_gateway_cannot_serve(err):
                        switched = True
                        break  # open it again on the new transport
                    if token is not None and _token_rejected(err):
                        await self._authenticate(token)
                    raise self._with_advice(err) from None
            else:
                raise unavailable(failures)

    async def _watch_message(self, doc: dict[str, Any], expiry: bool = True) -> WatchBatch | None:
        if "error" in doc:
            err = doc["error"]
            msg = err.get("message", str(err)) if isinstance(err, dict) else str(err)
            if "compacted" in msg:
                raise _Compacted(0)
            if isinstance(err, dict) and _token_rejected(EtcdError("/v3/watch", 401, msg, err.get("code"))):
                self._token = None
            raise WatchBroken(f"watch error: {msg}")
        res = doc.get("result") or {}
        compact = int(res.get("compact_revision", 0))
        if compact:
            raise _Compacted(compact)
        if res.get("canceled"):
            raise WatchBroken(f"etcd cancelled the watch: {res.get('cancel_reason', '')}")
        events = res.get("events") or []
        if not events:
            if res.get("created"):
                return None  # the created header revision may predate events still to come
            # A progress notification: everything up to this revision was delivered.
            return WatchBatch(revision=int(res.get("header", {}).get("revision", 0)))
        out: list[LeaseEvent] = []
        skipped: list[str] = []
        revision = 0
        for ev in events:
            kv = ev.get("kv") or {}
            revision = max(revision, int(kv.get("mod_revision", 0)))
            key = _unb64(kv.get("key", "")).decode(errors="replace")
            try:
                if ev.get("type") == "DELETE":
                    # Only the subnet is known; the tracker fills in the last-known attrs.
                    subnet, ipv6_subnet = parse_store_key(key, self.subnets_prefix, self.dual_stack)
                    out.append(LeaseEvent(EventKind.REMOVED, Lease(subnet=subnet, attrs=REMOVED_ATTRS,
                                                                   ipv6_subnet=ipv6_subnet)))
                else:
                    lease = await self._kv_to_lease(kv) if expiry else self._kv_to_lease_unread(kv)
                    out.append(LeaseEvent(EventKind.ADDED, lease))
            except LeaseValueError as exc:
                log.warning("skipping watch event: %s", exc)
                skipped.append(key)
        return WatchBatch(events=tuple(out), revision=revision, skipped=tuple(skipped))


# Placeholder attrs on a REMOVED event from the store (etcd does not say what was deleted).
REMOVED_ATTRS = LeaseAttrs(public_ip=IPv4Address(0))


def _token_rejected(err: EtcdError) -> bool:
    return err.code == 16 or err.status == 401 or "invalid auth token" in err.etcd_message
