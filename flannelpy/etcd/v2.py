"""The Store over etcd's v2 keys API (`/v2/keys/...`), as flanneld <= v0.17 used it.

Old flanneld nodes share state with us only through this API, so everything here follows
`subnet/etcdv2` of flanneld v0.10: quorum reads, create with `prevExist=false` and a TTL,
renew with a plain set, and a recursive `waitIndex` watch that yields one event per
response.  Values are written in the legacy shape (no PublicIPv6) so those nodes decode
them; any shape is read.
"""

from __future__ import annotations

import json
import logging
import re
import time
from calendar import timegm
from datetime import date
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from typing import Any, AsyncIterator, Callable, Iterator
from urllib.parse import quote

import httpx
import trio

from flannelpy.errors import FlannelError, LeaseValueError
from flannelpy.jsonlimits import shown
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

from .diagnose import API_DISABLED, UNREACHABLE, ConnectFailure, describe_connect_failure, error_text
from .store import (
    EXPIRY_NOT_READ,
    EtcdOptions,
    SkipLog,
    StoreUnavailable,
    WatchBatch,
    httpx_verify,
    tls_setup,
    unavailable,
)

log = logging.getLogger("flannelpy.etcd.v2")

# etcd v2 error codes (etcd/error/error.go)
KEY_NOT_FOUND = 100
NODE_EXIST = 105
EVENT_INDEX_CLEARED = 401

# Watch actions: which mean the key now holds a value, which that it is gone.
_ADDED_ACTIONS = frozenset({"set", "create", "update", "compareAndSwap"})
_REMOVED_ACTIONS = frozenset({"delete", "expire", "compareAndDelete"})

BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0
# How long one watch long-poll may sit idle before we re-poll (etcd never times it out).
WATCH_POLL_SECONDS = 60.0
# A v2 watch returns one event per long poll.  When the event it returned is this far behind
# etcd's index, the watch has fallen behind (a burst of writes): it re-lists once and yields a
# snapshot (applied by its net effect) instead of a round trip per event still queued.
CATCH_UP_EVENTS = 50

# A removal whose previous value etcd did not send still needs attrs; this placeholder marks it.
UNKNOWN_ATTRS = LeaseAttrs(public_ip=IPv4Address("0.0.0.0"))


class V2APIDisabled(StoreUnavailable):
    """The server answers, but not the v2 keys API (etcd >= 3.4 without --enable-v2=true)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, kind=API_DISABLED)


class V2Error(FlannelError):
    """etcd answered a v2 request with an error document (auth, not a file, ...)."""

    def __init__(self, status: int, code: int, message: str, cause: str, index: int) -> None:
        super().__init__(f"etcd v2 error {code}: {message} ({cause})" if cause else f"etcd v2 error {code}: {message}")
        self.status = status
        self.code = code
        self.index = index


_EXP_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")
# The date and time of a match that are plain ASCII digits, as etcd writes them.
_EXP_FIELDS_RE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})", re.ASCII)
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


def _utc_seconds(text: str) -> int:
    """timegm(strptime(text, "%Y-%m-%dT%H:%M:%S")) for `YYYY-MM-DDTHH:MM:SS`, without strptime's cost.

    Only a date and time inside the ranges both accept is computed here (the same arithmetic as
    timegm); anything else (leap seconds, other digits, a day past the month's end) goes through
    strptime, which raises what it raised before."""
    m = _EXP_FIELDS_RE.fullmatch(text)
    if m is not None:
        year, month, day, hour, minute, second = map(int, m.groups())
        if hour <= 23 and minute <= 59 and second <= 59:
            try:
                days = date(year, month, day).toordinal() - _EPOCH_ORDINAL
            except ValueError:
                pass  # year 0, month 13, the 31st of a 30-day month, ...
            else:
                return ((days * 24 + hour) * 60 + minute) * 60 + second
    return timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))


def parse_expiration(text: str | None) -> float | None:
    """etcd's RFC 3339 `expiration` (nanosecond fraction) as Unix time; None when absent."""
    if text is None or text == "":
        return None
    m = _EXP_RE.match(text) if isinstance(text, str) else None
    if not m:
        raise LeaseValueError(f"expiration {shown(repr(text))} is not an RFC 3339 time")
    base = _utc_seconds(m.group(1))
    frac = float("0." + m.group(2)) if m.group(2) else 0.0
    tz = m.group(3)
    offset = 0
    if tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        offset = sign * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    return base + frac - offset


def node_to_lease(node: dict[str, Any], prefix: str | None = None, dual_stack: bool = False,
                  expiry: bool = True) -> Lease:
    """A lease from a v2 node; LeaseValueError when its key or value cannot be decoded.

    `prefix` (`/<etcd-prefix>/subnets/`): the key must sit directly under it (lease.parse_subnet_key);
    `dual_stack` (EnableIPv6): dual-stack keys are read too (lease.parse_store_key); expiry=False:
    a node's expiration is not parsed (EXPIRY_NOT_READ: a peer's is never used, and the float
    would be held for every peer)."""
    key = node.get("key", "")
    subnet, ipv6_subnet = parse_store_key(key, prefix, dual_stack)
    value = node.get("value")
    if value is None:
        raise LeaseValueError(f"lease key {key!r} has no value")
    attrs = decode_attrs(value, key)
    return Lease(
        subnet=subnet,
        attrs=attrs,
        expiration=parse_expiration(node.get("expiration")) if expiry else
        (EXPIRY_NOT_READ if node.get("expiration") else None),
        store_ref=node.get("modifiedIndex"),
        ipv6_subnet=ipv6_subnet,
    )


_JSON = json.JSONDecoder()
_WS = re.compile(r"[ \t\n\r]*")


def listing_nodes(text: str) -> Iterator[Any]:
    """The nodes of a recursive GET's answer (`{"action":"get","node":{...,"nodes":[...]}}`), decoded
    one at a time.  v2 has no paging: json.loads of a 5000-lease answer made every node's dict and
    strings at once, and what the leases kept of them sat among their holes in pymalloc's pools
    (RSS per extra peer at 5000, v2: 1.6 KiB, v3, which pages, 0.95).  ValueError where the text is
    not that shape (the caller then parses it whole, as before)."""
    pos = _member(text, _ws(text, 0), "node")
    if pos is None:
        raise ValueError("no node")  # an error document, say: the caller's whole parse says what
    pos = _member(text, pos, "nodes")  # absent: an empty directory
    if pos is None or text.startswith("null", pos):
        return
    if text[pos:pos + 1] != "[":
        raise ValueError("nodes is not an array")
    pos = _ws(text, pos + 1)
    if text[pos:pos + 1] == "]":
        return
    while True:
        node, pos = _JSON.raw_decode(text, pos)
        yield node
        pos = _ws(text, pos)
        if text[pos:pos + 1] == ",":
            pos = _ws(text, pos + 1)
        elif text[pos:pos + 1] == "]":
            return
        else:
            raise ValueError(f"unexpected {text[pos:pos + 20]!r} in nodes")


def _ws(text: str, pos: int) -> int:
    return _WS.match(text, pos).end()  # type: ignore[union-attr]  # matches the empty string too


def _member(text: str, pos: int, name: str) -> int | None:
    """Where member `name`'s value starts in the object at text[pos]; the members before it are
    decoded and dropped.  None: the object has no such member."""
    if text[pos:pos + 1] != "{":
        raise ValueError("not an object")
    pos = _ws(text, pos + 1)
    if text[pos:pos + 1] == "}":
        return None
    while True:
        key, pos = _JSON.raw_decode(text, pos)
        if not isinstance(key, str):
            raise ValueError("a member name that is not a string")
        pos = _ws(text, pos)
        if text[pos:pos + 1] != ":":
            raise ValueError("no ':' after a member name")
        pos = _ws(text, pos + 1)
        if key == name:
            return pos
        _, pos = _JSON.raw_decode(text, pos)
        pos = _ws(text, pos)
        if text[pos:pos + 1] == ",":
            pos = _ws(text, pos + 1)
        elif text[pos:pos + 1] == "}":
            return None
        else:
            raise ValueError(f"unexpected {text[pos:pos + 20]!r} in an object")


def event_from_response(doc: dict[str, Any], prefix: str | None = None, dual_stack: bool = False,
                        expiry: bool = True) -> LeaseEvent:
    """One watch response as a LeaseEvent; LeaseValueError when it is not about a lease."""
    action = doc.get("action", "")
    node = doc.get("node") or {}
    if node.get("dir"):
        raise LeaseValueError(f"{node.get('key')!r} is a directory, not a lease")
    if action in _ADDED_ACTIONS:
        return LeaseEvent(EventKind.ADDED, node_to_lease(node, prefix, dual_stack, expiry))
    if action in _REMOVED_ACTIONS:
        key = node.get("key", "")
        subnet, ipv6_subnet = parse_store_key(key, prefix, dual_stack)
        attrs = UNKNOWN_ATTRS
        prev = doc.get("prevNode") or {}
        if prev.get("value") is not None:
            try:
                attrs = decode_attrs(prev["value"], key)
            except LeaseValueError:
                pass  # the subnet alone is enough to remove it
        return LeaseEvent(EventKind.REMOVED, Lease(subnet=subnet, attrs=attrs, store_ref=node.get("modifiedIndex"),
                                                   ipv6_subnet=ipv6_subnet))
    raise LeaseValueError(f"unknown etcd v2 action {action!r} on {node.get('key')!r}")


class V2Store:
    """flannel's subnet registry over the etcd v2 keys API."""

    def __init__(self, options: EtcdOptions, *, style: ValueStyle = ValueStyle.LEGACY) -> None:
        if not options.endpoints:
            raise ValueError("etcd options: no endpoints")
        self.on_watch_reconnect: Callable[[], None] | None = None  # see V3Store
        self.options = options
        self.style = style
        # EnableIPv6: dual-stack keys are read (lease.parse_store_key); the agent sets it from the config.
        self.dual_stack = False
        self._endpoints = [e.rstrip("/") for e in options.endpoints]
        self._current = 0  # the endpoint that answered last; tried first
        self._skip_log = SkipLog(log)
        self._tls = tls_setup(options)  # to name a refused TLS handshake
        auth = (options.username, options.password) if options.username else None
        self._client = httpx.AsyncClient(
            verify=httpx_verify(options),
            auth=auth,
            timeout=httpx.Timeout(options.request_timeout),
        )

    # -- plumbing ---------------------------------------------------------------------

    def _key_path(self, key: str) -> str:
        # v2 keys are paths; etcd joins a prefix without a leading slash the same way.
        full = "/" + key.lstrip("/")
        return "/v2/keys" + quote(full, safe="/")

    @property
    def subnets_key(self) -> str:
        return self.options.prefix.rstrip("/") + "/subnets"

    @property
    def _lease_key_prefix(self) -> str:
        """What every lease key etcd returns starts with: `/<prefix>/subnets/`, slashes collapsed as etcd does."""
        return re.sub(r"/+", "/", f"/{self.subnets_key}/")

    @property
    def config_key(self) -> str:
        return self.options.prefix.rstrip("/") + "/config"

    async def _request(self, method: str, key: str, *, params: dict[str, str] | None = None,
                       data: dict[str, str] | None = None, timeout: httpx.Timeout | None = None,
                       ) -> tuple[int, dict[str, Any], int]:
        """Send to the first endpoint that answers; (status, JSON doc, X-Etcd-Index).

        Errors documents raise V2Error; no endpoint answering raises StoreUnavailable.
        """
        return self._decode(await self._response(method, key, params=params, data=data, timeout=timeout))

    async def _response(self, method: str, key: str, *, params: dict[str, str] | None = None,
                        data: dict[str, str] | None = None, timeout: httpx.Timeout | None = None,
                        ) -> httpx.Response:
        """The first endpoint's answer (status below 500), undecoded; StoreUnavailable when none answers."""
        failures: list[ConnectFailure] = []
        n = len(self._endpoints)
        for i in range(n):
            idx = (self._current + i) % n
            url = self._endpoints[idx] + self._key_path(key)
            try:
                resp = await self._client.request(
                    method, url, params=params, data=data,
                    timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
                )
            except httpx.TransportError as exc:
                failures.append(describe_connect_failure(self._endpoints[idx], error_text(exc), self._tls))
                continue
            if resp.status_code >= 500:
                failures.append(ConnectFailure(UNREACHABLE, f"{self._endpoints[idx]}: HTTP {resp.status_code} "
                                                            f"{resp.text.strip()[:200]}"))
                continue
            self._current = idx
            return resp
        raise unavailable(failures)

    def _decode(self, resp: httpx.Response) -> tuple[int, dict[str, Any], int]:
        index = _int(resp.headers.get("X-Etcd-Index"))
        try:
            doc = resp.json() if resp.content else {}
        except ValueError:
            if resp.status_code == 404:
                raise V2APIDisabled(
                    f"{resp.request.url.scheme}://{resp.request.url.netloc.decode()} does not serve the etcd v2 API "
                    "(start etcd with --enable-v2=true)"
                ) from None
            raise StoreUnavailable(f"etcd answered HTTP {resp.status_code} with non-JSON {resp.text[:200]!r}") from None
        if not isinstance(doc, dict):
            raise StoreUnavailable(f"etcd answered HTTP {resp.status_code} with {resp.text[:200]!r}")
        if "errorCode" in doc:
            raise V2Error(resp.status_code, int(doc["errorCode"]), doc.get("message", ""), doc.get("cause", ""),
                          _int(doc.get("index")) or index)
        return resp.status_code, doc, index

    # -- Store protocol ------------------------------------------------------------------

    async def get_config(self) -> str | None:
        try:
            _, doc, _ = await self._request("GET", self.config_key, params={"quorum": "true"})
        except V2Error as err:
            if err.code == KEY_NOT_FOUND:
                return None
            raise
        value = doc.get("node", {}).get("value")
        return value  # a directory at the config key has no value: same as absent

    async def put_config(self, text: str) -> None:
        await self._request("PUT", self.config_key, data={"value": text})

    async def list_leases(self, *, expiry: bool = True) -> tuple[list[Lease], int]:
        # Every node of the listing carries its expiration: expiry=False only skips parsing it.
        leases, _skipped, index = await self._list(expiry)
        return leases, index

    async def _list(self, expiry: bool = True) -> tuple[list[Lease], list[str], int]:
        """Every lease under the subnets key (and the keys skipped as undecodable), at an index."""
        resp = await self._response("GET", self.subnets_key, params={"recursive": "true", "quorum": "true"})
        nodes: Iterator[Any] | None = None
        if resp.status_code == 200:
            index = _int(resp.headers.get("X-Etcd-Index"))
            nodes = listing_nodes(resp.text)  # one node at a time; a shape it cannot follow is parsed whole
        leases: list[Lease] = []
        skipped: list[str] = []
        try:
            self._decode_listing(nodes, expiry, leases, skipped)
        except ValueError:
            leases.clear()
            skipped.clear()
            nodes = None
        if nodes is None:
            try:
                _, doc, index = self._decode(resp)
            except V2Error as err:
                if err.code == KEY_NOT_FOUND:
                    return [], [], err.index
                raise
            self._decode_listing(iter(doc.get("node", {}).get("nodes") or []), expiry, leases, skipped)
        return leases, skipped, index

    def _decode_listing(self, nodes: Iterator[Any] | None, expiry: bool, leases: list[Lease],
                        skipped: list[str]) -> None:
        """The listing's leases into `leases`, the keys of undecodable ones into `skipped`."""
        if nodes is None:
            return
        prefix = self._lease_key_prefix
        dual_stack = self.dual_stack
        for node in nodes:
            if not isinstance(node, dict) or node.get("dir"):
                continue  # a directory (or garbage) under subnets/ is no lease
            try:
                leases.append(node_to_lease(node, prefix, dual_stack, expiry))
            except LeaseValueError as exc:
                self._skip_log.skipped(exc)
                skipped.append(node.get("key", ""))

    async def get_lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None = None) -> Lease | None:
        """The lease stored for one subnet, or None (also None when its value is undecodable)."""
        try:
            _, doc, _ = await self._request("GET", self._lease_key(subnet, ipv6_subnet), params={"quorum": "true"})
        except V2Error as err:
            if err.code == KEY_NOT_FOUND:
                return None
            raise
        try:
            return node_to_lease(doc.get("node", {}), self._lease_key_prefix, self.dual_stack)
        except LeaseValueError as exc:
            log.warning("lease for %s: %s", subnet, exc)
            return None

    def _lease_key(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None = None) -> str:
        return f"{self.subnets_key}/{lease_key(subnet, ipv6_subnet)}"

    def _lease_from_doc(self, subnet: IPv4Network, attrs: LeaseAttrs, doc: dict[str, Any],
                        ipv6_subnet: IPv6Network | None = None) -> Lease:
        node = doc.get("node", {})
        return Lease(subnet=subnet, attrs=attrs, expiration=parse_expiration(node.get("expiration")),
                     store_ref=node.get("modifiedIndex"), ipv6_subnet=ipv6_subnet)

    async def create_lease(self, subnet: IPv4Network, attrs: LeaseAttrs, ttl: int,
                           ipv6_subnet: IPv6Network | None = None) -> Lease | None:
        data = {"value": encode_attrs(attrs, self.style), "prevExist": "false"}
        if ttl > 0:
            data["ttl"] = str(ttl)
        try:
            _, doc, _ = await self._request("PUT", self._lease_key(subnet, ipv6_subnet), data=data)
        except V2Error as err:
            if err.code == NODE_EXIST:
                return None
            raise
        return self._lease_from_doc(subnet, attrs, doc, ipv6_subnet)

    async def renew_lease(self, subnet: IPv4Network, attrs: LeaseAttrs, ttl: int,
                          ipv6_subnet: IPv6Network | None = None) -> Lease:
        # An empty ttl clears it: a reservation (ttl=0) stays without one.
        data = {"value": encode_attrs(attrs, self.style), "ttl": str(ttl) if ttl > 0 else ""}
        _, doc, _ = await self._request("PUT", self._lease_key(subnet, ipv6_subnet), data=data)
        return self._lease_from_doc(subnet, attrs, doc, ipv6_subnet)

    async def time_left(self, lease: Lease) -> float | None:
        return None  # only a quorum GET could tell: a raft round, as the renewal's PUT is

    async def delete_lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None = None) -> None:
        try:
            await self._request("DELETE", self._lease_key(subnet, ipv6_subnet))
        except V2Error as err:
            if err.code != KEY_NOT_FOUND:
                raise

    def _watch_reconnected(self) -> None:
        if self.on_watch_reconnect is not None:
            self.on_watch_reconnect()

    async def watch_leases(self, after_revision: int, *, expiry: bool = True) -> AsyncIterator[WatchBatch]:
        """One WatchBatch per v2 event; a snapshot batch when the index was cleared, or when
        the watch is more than CATCH_UP_EVENTS behind etcd's index."""
        wait_index = after_revision + 1
        backoff = BACKOFF_MIN
        poll_timeout = httpx.Timeout(self.options.request_timeout, read=WATCH_POLL_SECONDS)
        prefix = self._lease_key_prefix
        while True:
            try:
                doc, header_index = await self._watch_once(wait_index, poll_timeout)
            except V2Error as err:
                if err.code != EVENT_INDEX_CLEARED:
                    log.warning("watching %s: %s; retrying in %.1fs", self.subnets_key, err, backoff)
                    self._watch_reconnected()
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
                # Our waitIndex fell out of etcd's 1000-event history: start over from a list.
                log.info("watch index %d cleared from etcd history (%s); re-listing leases", wait_index, err)
                try:
                    leases, skipped, index = await self._list(expiry)
                except (StoreUnavailable, V2Error) as exc:
                    log.warning("re-listing leases: %s; retrying in %.1fs", exc, backoff)
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
                backoff = BACKOFF_MIN
                wait_index = index + 1
                yield WatchBatch(snapshot=tuple(leases), revision=index, skipped=tuple(skipped))
                continue
            except (StoreUnavailable, httpx.HTTPError) as exc:
                # etcd restarting or unreachable: back off and resume at the same index.
                log.warning("watching %s: %s; retrying in %.1fs", self.subnets_key, _short(exc), backoff)
                self._watch_reconnected()
                await trio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = BACKOFF_MIN
            if not doc or "node" not in doc:
                # Idle poll (our timeout) or closed without an event.  Nothing under the
                # prefix changed up to the index etcd reported when the poll began, so
                # resume after it: that keeps a quiet watch inside etcd's event history.
                if header_index >= wait_index:
                    wait_index = header_index + 1
                continue
            node = doc["node"]
            index = _int(node.get("modifiedIndex")) or header_index
            wait_index = max(wait_index, index + 1)
            if header_index - index > CATCH_UP_EVENTS:
                try:
                    leases, skipped, listed_at = await self._list(expiry)
                except (StoreUnavailable, V2Error) as exc:
                    log.debug("catching up by a re-list failed (%s); following events one by one", exc)
                else:
                    log.debug("watch %d events behind etcd: re-listed at index %d", header_index - index, listed_at)
                    wait_index = max(wait_index, listed_at + 1)
                    yield WatchBatch(snapshot=tuple(leases), revision=listed_at, skipped=tuple(skipped))
                    continue
            try:
                event = event_from_response(doc, prefix, self.dual_stack, expiry)
            except LeaseValueError as exc:
                log.warning("skipping watch event: %s", exc)
                yield WatchBatch(revision=index, skipped=(node.get("key", ""),))
                continue
            yield WatchBatch(events=(event,), revision=index)

    async def _watch_once(self, wait_index: int, timeout: httpx.Timeout) -> tuple[dict[str, Any], int]:
        """One long poll: (event doc or {} when idle/closed, X-Etcd-Index at poll start)."""
        n = len(self._endpoints)
        failures: list[ConnectFailure] = []
        params = {"wait": "true", "recursive": "true", "waitIndex": str(wait_index)}
        for i in range(n):
            idx = (self._current + i) % n
            url = self._endpoints[idx] + self._key_path(self.subnets_key)
            try:
                async with self._client.stream("GET", url, params=params, timeout=timeout) as resp:
                    # etcd sends the headers as soon as the watch is registered
                    self._current = idx
                    header_index = _int(resp.headers.get("X-Etcd-Index"))
                    try:
                        await resp.aread()
                    except httpx.ReadTimeout:
                        return {}, header_index
                    except httpx.RemoteProtocolError:
                        return {}, 0  # server went away mid-poll: same index again
                    if resp.status_code >= 500:
                        failures.append(ConnectFailure(UNREACHABLE, f"{self._endpoints[idx]}: HTTP {resp.status_code}"))
                        continue
                    _, doc, _ = self._decode(resp)
                    return doc, header_index
            except httpx.TransportError as exc:
                failures.append(describe_connect_failure(self._endpoints[idx], error_text(exc), self._tls))
                continue
        raise unavailable(failures)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> "V2Store":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if text else type(exc).__name__
